"""Run as a script with 8 simulated CPU devices: every Pallas kernel of the op registry (each op
with a "triton" or "mosaic_tpu" implementation, interpret mode) under a jit sharded over a
(2, 2, 2) mesh, with its gradients, equals the single-device result and runs inside shard_map.

Inputs come from each op's BenchSpec at small sizes (B=4, T=40, H=2, D=16; the spec's first
shape for any further field, e.g. Titans' linear memory) with its keyword options; segment_ids
hold two documents and trailing padding, except for the ops in ``NO_SEGMENTS``. Prints
{"op/impl": max abs error} as JSON on its last line.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from pallas_kernels.common.frame import registered_ops  # noqa: E402

KERNELS = ("triton", "mosaic_tpu")
B, T, H, D = 4, 40, 2, 16
NO_SEGMENTS = {"titans"}           # its kernels take no segment_ids (linear memory, one document)


def kernel_cases():
    """[(op name, impl)] of every registered op's Pallas kernels."""
    return [(name, impl) for name, op in registered_ops().items() if op.bench is not None
            for impl in KERNELS if impl in op.impls]


def loss_and_inputs(name, impl):
    """(loss(*arrays, seg), arrays, seg): the sum of o² and of the final state's float leaves."""
    op = registered_ops()[name]
    spec = op.bench
    extra = {k: v for k, v in spec.shapes[0].items() if k not in ("B", "H", "D")}
    arrays = tuple(spec.inputs(jax.random.PRNGKey(0), B=B, T=T, H=H, D=D, **extra))
    seg = None if name in NO_SEGMENTS else jnp.asarray([[1] * 25 + [2] * 10 + [0] * 5] * B,
                                                       jnp.int32)

    def loss(arrays, seg):
        o, final = op.function(*arrays, segment_ids=seg, output_final_state=True, impl=impl,
                               interpret=True, **spec.kwargs)
        floats = [x for x in jax.tree.leaves(final) if jnp.issubdtype(x.dtype, jnp.floating)]
        return jnp.sum(o.astype(jnp.float32) ** 2) + sum(jnp.sum(x) for x in floats)

    return loss, arrays, seg


def batch_sharded(x, mesh):
    """Batch-leading [B, ...] arrays split over (data, fsdp); parameters (Titans' memory0)
    replicated."""
    batched = hasattr(x, "shape") and x.ndim >= 2 and x.shape[:2] == (B, T)
    return jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")) if batched else P()))


if __name__ == "__main__":
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    out = {}
    for name, impl in kernel_cases():
        loss, arrays, seg = loss_and_inputs(name, impl)
        f = jax.jit(jax.value_and_grad(loss))
        want = f(arrays, seg)
        with jax.set_mesh(mesh):
            sharded = jax.tree.map(lambda x: batch_sharded(x, mesh), arrays)
            seg_s = None if seg is None else batch_sharded(seg, mesh)
            got = f(sharded, seg_s)
            # Interpret-mode kernels would partition without help; the real ones cannot.
            assert "shard_map" in str(jax.make_jaxpr(loss)(sharded, seg_s)), "kernel not in shard_map"
        out[f"{name}/{impl}"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                                    zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    print(json.dumps(out))
