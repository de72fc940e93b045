"""Run as a script with 8 simulated CPU devices: the op registry's Pallas kernels under sharded jits.

``python tests/sharded_kernels.py`` (tests/test_train.py): every Pallas kernel of the registry
(each op whose public function takes ``interpret`` and has a "triton" or "mosaic_tpu"
implementation) in interpret mode under a jit on a (2, 2, 2) mesh, batch-sharded inputs, with its
gradients: equal to the single-device result and inside shard_map (which also splits the two
heads over "tensor"). Inputs come from each op's BenchSpec at small sizes (B=4, T=40, H=2, D=16;
the spec's first shape for any further field, e.g. Titans' linear memory) with its keyword
options; segment_ids hold two documents and trailing padding, except for the ops in
``NO_SEGMENTS``. Prints {"op/impl": max abs error} as JSON on its last line.

``python tests/sharded_kernels.py triton`` (tests/test_triton_sharding.py, with
TRITON_INTERPRET=1): the same for the Triton kernels only.

``python tests/sharded_kernels.py heads`` (tests/test_kernel_sharding.py): heads on "tensor".
Prints one JSON object on its last line:

* ``"numerics"``: {case: {"specs": the jaxpr's shard_map in_specs, "all_gathers": the
  all-gather instructions of the compiled forward + backward, "error": max relative error of the
  loss and every gradient vs one device}} on a (2, 1, 4) mesh, inputs sharded batch over data
  and heads over tensor. One kernel per op ("mosaic_tpu" in interpret mode; the default mode runs
  every kernel), grouped heads (q/k 4, v 8) where the op has them, plus the ``CHUNKED`` forms.
* ``"tpu"``: {"op/(1,1,8)": {"kernel": tpu_custom_call in the module, "shard_map": ...},
  "op/(8,1,1)b3": {...}} — forward + backward lowered for TPU from CPU under an abstract mesh of
  TPU devices; a batch of 3 on (8, 1, 1) falls back to "chunked" (no kernel in the module).
* ``"warnings"``: the fallback notes logged by pallas_kernels.common.sharding.
"""

import os
import sys

if __name__ == "__main__":     # before jax is imported; importers (kernel_cases) keep theirs
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    if sys.argv[1:] == ["heads"]:
        # The interpret-mode kernels' HLO takes tens of seconds to optimise; the checks need none.
        os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from pallas_kernels.common import triton_call  # noqa: E402
from pallas_kernels.common.frame import registered_ops  # noqa: E402

# Triton kernels run on a CPU only in Triton's interpreter (a process started with
# TRITON_INTERPRET=1: tests/test_triton_sharding.py in the gpu-check venv).
KERNELS = ((("triton",) if triton_call.missing() is None and triton_call.interpreter_on() else ())
           + ("mosaic_tpu",))
B, T, H, D = 4, 40, 2, 16
NO_SEGMENTS = {"titans"}           # its kernels take no segment_ids (linear memory, one document)
GROUPED = {"simple_gla", "gated_delta_rule", "gla", "kda"}    # q/k may have fewer heads than v
# Chunked forms checked too: simple_gla's and gla's run per shard (Op.shard_map_impls), kda's and
# hgrn's (no kernels) under the frame's constraints; hgrn has channels, not heads, on tensor.
CHUNKED = ("simple_gla", "gla", "kda", "hgrn")
AUTO = (jax.sharding.AxisType.Auto,) * 3


def kernel_cases():
    """[(op name, impl)] of every registered op's interpret-mode Pallas kernels."""
    return [(name, impl) for name, op in registered_ops().items() if op.bench is not None
            and "interpret" in inspect.signature(op.function).parameters
            for impl in KERNELS if impl in op.impls]


def loss_and_inputs(name, impl, b=B, t=T, h=H, d=D, grouped=False, interpret=True):
    """(loss(*arrays, seg), arrays, seg): the sum of o² and of the final state's float leaves.
    ``grouped``: q and k keep the first h/2 heads (value head j reads q/k head j // 2);
    ``interpret``: kernels in Pallas' interpreter (False to lower for the hardware)."""
    op = registered_ops()[name]
    spec = op.bench
    extra = {k: v for k, v in spec.shapes[0].items() if k not in ("B", "H", "D")}
    arrays = tuple(spec.inputs(jax.random.PRNGKey(0), B=b, T=t, H=h, D=d, **extra))
    if grouped:
        arrays = (arrays[0][:, :, :h // 2], arrays[1][:, :, :h // 2]) + arrays[2:]
    docs = [1] * (t * 5 // 8) + [2] * (t // 4)
    seg = None if name in NO_SEGMENTS else jnp.asarray([docs + [0] * (t - len(docs))] * b,
                                                       jnp.int32)
    kw = {"interpret": interpret} if impl in KERNELS else {}

    def loss(arrays, seg):
        o, final = op.function(*arrays, segment_ids=seg, output_final_state=True, impl=impl,
                               **kw, **spec.kwargs)
        floats = [x for x in jax.tree.leaves(final) if jnp.issubdtype(x.dtype, jnp.floating)]
        return jnp.sum(o.astype(jnp.float32) ** 2) + sum(jnp.sum(x) for x in floats)

    return loss, arrays, seg


def batch_sharded(x, mesh, b=B, t=T):
    """Batch-leading [B, ...] arrays split over (data, fsdp); parameters (Titans' memory0)
    replicated."""
    batched = hasattr(x, "shape") and x.ndim >= 2 and x.shape[:2] == (b, t)
    return jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")) if batched else P()))


def head_spec(x, b, t):
    """How a model hands an op its arrays: [B, T, H, ...] / [B, T, D] batch over (data, fsdp)
    and axis 2 over tensor; a parameter [H, ...] (Titans' memory0) heads over tensor; [B, T]."""
    if x.ndim >= 3 and x.shape[:2] == (b, t):
        return P(("data", "fsdp"), None, "tensor")
    if x.ndim == 2:
        return P(("data", "fsdp"))
    return P("tensor")


def max_rel_error(got, want):
    return max(float(jnp.max(jnp.abs(a - b)) / jnp.maximum(1.0, jnp.max(jnp.abs(b))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def numerics(name, impl, grouped):
    """(2, 1, 4) mesh, heads on tensor: shard_map specs, compiled all-gathers, error vs 1 device."""
    b, t, h, d = 2, 32, (8 if grouped else 4), 16
    loss, arrays, seg = loss_and_inputs(name, impl, b, t, h, d, grouped)
    f = jax.jit(jax.value_and_grad(loss))
    want = f(arrays, seg)
    mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=AUTO)
    with jax.set_mesh(mesh):
        put = lambda x: jax.device_put(x, NamedSharding(mesh, head_spec(x, b, t)))
        arrays_s, seg_s = jax.tree.map(put, arrays), None if seg is None else put(seg)
        specs = re.findall(r"in_specs=(\(.*?\))\n", str(jax.make_jaxpr(loss)(arrays_s, seg_s)))
        compiled = f.lower(arrays_s, seg_s).compile()
        got = compiled(arrays_s, seg_s)
    gathers = [line.strip()[:160] for line in compiled.as_text().splitlines()
               if re.search(r"= \S+ all-gather(-start)?\(", line)]
    return {"specs": specs, "all_gathers": gathers, "error": max_rel_error(got, want)}


def tpu_lowering(name, mesh_shape, b):
    """Forward + backward of the op's "mosaic_tpu" impl lowered for TPU under an abstract mesh of
    TPU devices, inputs sharded as a model hands them over."""
    t, h, d = 32, 8, 16
    loss, arrays, seg = loss_and_inputs(name, "mosaic_tpu", b, t, h, d, interpret=False)
    mesh = jax.sharding.AbstractMesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=AUTO,
                                     abstract_device=jax.sharding.AbstractDevice(
                                         device_kind="TPU v5 lite", num_cores=1, platform="tpu"))

    def abstract(x):
        spec = head_spec(x, b, t)
        spec = P(*(None if (s == ("data", "fsdp") and x.shape[0] % mesh_shape[0]) else s
                   for s in spec))                              # a batch of 3 stays whole
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    arrays_a = jax.tree.map(abstract, arrays)
    seg_a = None if seg is None else abstract(seg)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(jax.grad(loss)).trace(arrays_a, seg_a).lower(
            lowering_platforms=("tpu",)).as_text()
    return {"kernel": "tpu_custom_call" in text, "shard_map": "sdy.manual_computation" in text}


class _Notes(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def heads_checks():
    notes = _Notes()
    logging.getLogger("pallas_kernels.common.sharding").addHandler(notes)
    ops = registered_ops()
    kernel_ops = sorted({name for name, _ in kernel_cases()})
    out = {"numerics": {}, "tpu": {}}
    cases = [(n, "mosaic_tpu", n in GROUPED) for n in kernel_ops]
    cases += [(n, "chunked", n in GROUPED) for n in CHUNKED if n in ops]
    for name, impl, grouped in cases:
        out["numerics"][f"{name}/{impl}" + ("/grouped" if grouped else "")] = numerics(
            name, impl, grouped)
    for name in kernel_ops:
        if "mosaic_tpu" in ops[name].impls:
            out["tpu"][f"{name}/(1,1,8)"] = tpu_lowering(name, (1, 1, 8), 2)
            out["tpu"][f"{name}/(8,1,1)b3"] = tpu_lowering(name, (8, 1, 1), 3)
    out["warnings"] = notes.messages
    return out


# XLA's CPU compiler in jax 0.11.2 segfaults compiling Titans' mesh-sharded gradient (its
# Triton kernels in the interpreter and its interpreted Mosaic kernels alike; jax 0.10.2, the
# main suite's, compiles it): there the forward on the mesh is checked, the Triton kernels'
# gradients on one device (tests/test_titans_op.py under the interpreter).
FORWARD_ONLY = {("titans", "triton")}


def batch_checks(impls=KERNELS):
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=AUTO)
    out = {}
    for name, impl in [c for c in kernel_cases() if c[1] in impls]:
        loss, arrays, seg = loss_and_inputs(name, impl)
        f = jax.jit(loss if (name, impl) in FORWARD_ONLY else jax.value_and_grad(loss))
        want = f(arrays, seg)
        with jax.set_mesh(mesh):
            sharded = jax.tree.map(lambda x: batch_sharded(x, mesh), arrays)
            seg_s = None if seg is None else batch_sharded(seg, mesh)
            got = f(sharded, seg_s)
            # Interpret-mode kernels would partition without help; the real ones cannot.
            assert "shard_map" in str(jax.make_jaxpr(loss)(sharded, seg_s)), "no shard_map"
        out[f"{name}/{impl}"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                                    zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    return out


if __name__ == "__main__":
    mode = sys.argv[1:]
    print(json.dumps(heads_checks() if mode == ["heads"] else
                     batch_checks(("triton",)) if mode == ["triton"] else batch_checks()))
