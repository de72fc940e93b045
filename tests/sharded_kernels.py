"""Run as a script with 8 simulated CPU devices: the Pallas kernels (interpret mode) of
simple_gla, gated_delta_rule and titans (linear memory) under a jit sharded over a (2, 2, 2)
mesh, with their gradients, equal the single-device result."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from pallas_kernels.gated_delta import gated_delta_rule  # noqa: E402
from pallas_kernels.simple_gla import simple_gla  # noqa: E402
from pallas_kernels.titans import titans  # noqa: E402


def inputs(b=4, t=40, h=2, d=16):
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32) for _ in range(3))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = jnp.asarray(-r.uniform(0.01, 0.3, size=(b, t, h)), jnp.float32)
    beta = jnp.asarray(r.uniform(0.1, 0.9, size=(b, t, h)), jnp.float32)
    seg = jnp.asarray(np.repeat([[1] * 25 + [2] * 10 + [0] * 5], b, 0), jnp.int32)
    return q, k, v, g, beta, seg


def losses(impl):
    def sgla(q, k, v, g, beta, seg):
        o, s = simple_gla(q, k, v, g, segment_ids=seg, output_final_state=True, impl=impl,
                          interpret=True)
        return jnp.sum(o ** 2) + jnp.sum(s)

    def gdn(q, k, v, g, beta, seg):
        o, s = gated_delta_rule(q, k, v, g, beta, segment_ids=seg, output_final_state=True,
                                impl=impl, interpret=True)
        return jnp.sum(o ** 2) + jnp.sum(s)

    def titans_linear(q, k, v, g, beta, seg):  # the kernels take no segment_ids
        w0 = {"w": 0.1 * jnp.ones((q.shape[2], q.shape[3], v.shape[3]), jnp.float32)}
        y, st = titans(q, k, v, 0.1 * beta, beta, -g, w0, block_size=16, impl=impl,
                       output_final_state=True, interpret=True)
        return jnp.sum(y ** 2) + jnp.sum(st["memory"]["w"])

    return {"simple_gla": sgla, "gated_delta_rule": gdn, "titans": titans_linear}


if __name__ == "__main__":
    args = inputs()
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    out = {}
    for impl in ("triton", "mosaic_tpu"):
        for name, f in losses(impl).items():
            want = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(*args)
            with jax.set_mesh(mesh):
                sharded = [jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp")))) for a in args]
                got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(*sharded)
                # Interpret-mode kernels would partition without help; the real ones cannot.
                assert "shard_map" in str(jax.make_jaxpr(f)(*sharded)), "kernel not in shard_map"
            err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                      zip(jax.tree.leaves(got), jax.tree.leaves(want)))
            out[f"{name}/{impl}"] = err
    print(json.dumps(out))
