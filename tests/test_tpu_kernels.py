"""The Mosaic TPU kernels (gated delta rule, simple_gla, Titans) on a CPU.

* Numerics, Pallas interpret mode (the plain interpreter, not the TPU simulator): float32 and
  bfloat16 inputs through the public ops (``impl="mosaic_tpu"``, the default chunk 128 / 128
  rows per Titans grid step) against the token-level reference at odd T (several chunks, the
  last one partial), K != V, grouped value heads, packing and an initial state where the op
  takes them — output, final state and the VJP of every float input; then the v6e chunk (256)
  in float32 through the TPU entry points (output and final state).
* Lowering for TPU from CPU (an abstract "TPU v5 lite" mesh): every matmul of every kernel is a
  ``tpu.matmul`` with float32 accumulation whose operands are bf16 for bf16 inputs and float32
  at the default precision (no ``contract_precision<fp32>``) for float32 inputs, read off the
  Mosaic MLIR inside the ``tpu_custom_call`` (the kernel body is serialized MLIR bytecode in its
  backend config; jax's private ``tpu`` dialect bindings deserialize it). Every block of every
  kernel is lane-dense: no block's last dim is 1 (no [C, 1] gate columns, no [1, 1] scalars).
* The VMEM bound: at chunk 128 and 256 and D = 128 and 256, bf16 and float32, every kernel's
  double-buffered blocks + scratch + temporaries fit the 16 MiB default scoped VMEM of v5e
  (``tpu_supports`` is None), and ``tpu_supports`` names the kernel that would not fit.
"""

from __future__ import annotations

import base64
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta import gated_delta_rule
from pallas_kernels.gated_delta import tpu as gd_tpu
from pallas_kernels.simple_gla import simple_gla
from pallas_kernels.simple_gla import kernels as sg_kernels
from pallas_kernels.simple_gla import tpu as sg_tpu
from pallas_kernels.titans import titans
from pallas_kernels.titans import tpu as ti_tpu
from tests.op_suite import segments
from tests.tolerance import assert_close

F32, BF16 = jnp.float32, jnp.bfloat16
B, T, H, HV, K, V = 1, 261, 1, 2, 24, 40       # T = 2·128 + 5: three chunks, the last partial
BLOCK = 16                                      # Titans' gradient block: 8 per 128-row step
SEG = segments(T, [(1, 90), (2, 150), (3, 11)])  # resets inside chunks, trailing padding
# Each test compiles small programs once: XLA's backend optimisations would cost more than
# they save (the numerics are the same programs).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _inputs(op, dtype, seed=0):
    """Positional float inputs of ``op`` (the last one the state or memory), in ``dtype``."""
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    n = lambda *shape: jax.random.normal(next(ks), shape)
    heads = H if op == "titans" else HV
    q, k = n(B, T, H, K) / K ** 0.5, n(B, T, H, K) / K ** 0.5
    v = n(B, T, heads, V)
    if op == "gated_delta":
        g = -jax.nn.softplus(n(B, T, HV) - 1.0)
        beta = jax.nn.sigmoid(n(B, T, HV))
        arrays = (q, k, v, g, beta)
    elif op == "simple_gla":
        arrays = (q, k, v, -jax.nn.softplus(n(B, T, HV) - 1.0))
    else:
        arrays = (q, k, v, 0.1 * jax.nn.sigmoid(n(B, T, H)), jax.nn.sigmoid(n(B, T, H) + 1.0),
                  0.1 * jax.nn.sigmoid(n(B, T, H)))
    arrays = tuple(x.astype(dtype) for x in arrays)
    if op == "titans":
        return arrays + ({"w": (n(H, K, V) / K ** 0.5).astype(dtype)},)
    return arrays + (0.5 * n(B, HV, K, V),)


def _call(op, impl, args, chunk=None, interpret=True):
    """(o, final state) of ``op``; chunk None: the public op, else the TPU entry point at it;
    the kernels run interpreted unless ``interpret`` is False (lowering)."""
    *arrays, last = args
    kernel = impl == "mosaic_tpu" and interpret
    if op == "titans":
        if chunk is None:
            return titans(*arrays, last, block_size=BLOCK, impl=impl, output_final_state=True,
                          interpret=kernel)
        with _titans_rows(chunk):
            return titans(*arrays, last, block_size=BLOCK, impl=impl, output_final_state=True,
                          interpret=interpret)
    kw = dict(initial_state=last, segment_ids=SEG, output_final_state=True)
    if chunk is not None:
        entry = (gd_tpu.gated_delta_rule_tpu if op == "gated_delta"
                 else sg_kernels.simple_gla_tpu)
        return entry(*arrays, chunk=chunk, interpret=interpret, **kw)
    fn = gated_delta_rule if op == "gated_delta" else simple_gla
    return fn(*arrays, impl=impl, interpret=kernel, **kw)


class _titans_rows:
    """Titans' rows per grid step (the module default, read at trace time) inside a block."""

    def __init__(self, rows):
        self.rows = rows

    def __enter__(self):
        self.saved, ti_tpu.ROWS = ti_tpu.ROWS, self.rows

    def __exit__(self, *exc):
        ti_tpu.ROWS = self.saved


def _fwd_bwd(op, impl, args, chunk=None):
    """(o, final state, grads of every input) for fixed random cotangents, one program."""
    def run(args):
        out, vjp = jax.vjp(lambda a: _call(op, impl, a, chunk), args)
        leaves, tree = jax.tree.flatten(out)
        ks = jax.random.split(jax.random.PRNGKey(9), len(leaves))
        cts = [jax.random.normal(kk, x.shape).astype(x.dtype) if jnp.issubdtype(
            x.dtype, jnp.floating) else np.zeros(x.shape, jax.dtypes.float0)
            for kk, x in zip(ks, leaves)]
        return out, vjp(jax.tree.unflatten(tree, cts))[0]
    return jit(run)(args)


_REFERENCE: dict = {}


def _reference(op, dtype):
    if (op, dtype) not in _REFERENCE:
        args = _inputs(op, dtype)
        _REFERENCE[op, dtype] = args, _fwd_bwd(op, "reference", args)
    return _REFERENCE[op, dtype]


def _check(got, want, dtype, name):
    (o, state), grads = got
    (o_ref, state_ref), grads_ref = want
    assert o.dtype == o_ref.dtype == jnp.dtype(dtype), (name, o.dtype)
    assert_close(o, o_ref, dtype, "out", f"{name} o")
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(state_ref)):
        if jnp.issubdtype(e.dtype, jnp.floating):
            assert a.dtype == F32, f"{name} state{jax.tree_util.keystr(path)}: {a.dtype}"
            assert_close(a, e, dtype, "out", f"{name} state{jax.tree_util.keystr(path)}")
        else:
            np.testing.assert_array_equal(a, e)
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)):
        assert a.dtype == e.dtype, f"{name} d{jax.tree_util.keystr(path)}"
        assert_close(a, e, dtype, "grad", f"{name} d{jax.tree_util.keystr(path)}")


OPS = ("gated_delta", "simple_gla", "titans")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", OPS)
def test_interpret_matches_reference(op, dtype):
    """The public op at the default chunk (128) == the reference, float32 and bfloat16."""
    args, want = _reference(op, dtype)
    got = _fwd_bwd(op, "mosaic_tpu", args)
    _check(got, want, dtype, f"{op} {dtype}")
    if op != "titans":
        o = got[0][0]
        assert float(jnp.max(jnp.abs(o.astype(F32)) * (SEG == 0)[..., None, None])) == 0.0


@pytest.mark.parametrize("op", OPS)
def test_interpret_v6e_chunk_matches_reference(op):
    """Chunk 256 (v6e's MXU; Titans: 256 rows = 16 gradient blocks per step), float32: output
    and final state (the backward kernels are the chunk-128 ones at another block shape)."""
    chunk = {"gated_delta": gd_tpu.CHUNK_V6E, "simple_gla": sg_tpu.CHUNK_V6E,
             "titans": ti_tpu.ROWS_V6E}[op]
    args, ((o_ref, state_ref), _) = _reference(op, "float32")
    o, state = jit(lambda a: _call(op, "mosaic_tpu", a, chunk))(args)
    assert_close(o, o_ref, F32, "out", f"{op} chunk {chunk} o")
    for a, e in zip(jax.tree.leaves(state), jax.tree.leaves(state_ref)):
        assert_close(a, e, F32, "out", f"{op} chunk {chunk} state")


# --------------------------------------------------------------------------- lowering
def _mosaic_modules(text):
    """{kernel name: Mosaic MLIR text} of every tpu_custom_call in lowered StableHLO text."""
    from jax._src.interpreters import mlir
    from jax._src.lib import tpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.passmanager import PassManager

    out = {}
    calls = re.findall(r'custom_call @tpu_custom_call\(.*?\\22body\\22: \\22([A-Za-z0-9+/=]+)'
                       r'\\22.*?kernel_name = "([^"]+)"', text)
    for body, name in calls:
        ctx = mlir.make_ir_context()
        tpu.register_dialect(ctx)
        with ctx, ir.Location.unknown():
            ctx.allow_unregistered_dialects = True
            module = ir.Module.parse(base64.b64decode(body))
            PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(
                module.operation)
            out[name] = str(module)
    return out


KERNEL_NAMES = {"gated_delta": ("gated_delta_fwd_tpu", "gated_delta_bwd_tpu"),
                "simple_gla": ("simple_gla_fwd", "simple_gla_dq", "simple_gla_dkdv"),
                "titans": ("titans_linear_fwd_tpu", "titans_linear_bwd_tpu")}
MATMUL = re.compile(r"tpu\.matmul .*?: vector<[0-9x]+x(\w+)>, vector<[0-9x]+x(\w+)>, "
                    r"vector<[0-9x]+x(\w+)> -> vector<[0-9x]+x(\w+)>")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("op", OPS)
def test_lowered_matmuls_take_operand_dtype(op, dtype):
    """bf16 inputs: every MXU matmul of the forward and backward kernels has bf16 operands and a
    float32 accumulator; float32 inputs: float32 operands at the default precision. And every
    block is lane-dense (no block's last dim is 1)."""
    args = jax.eval_shape(lambda: _inputs(op, dtype))

    def loss(args):
        out = _call(op, "mosaic_tpu", args, interpret=False)
        return sum(jnp.sum(x.astype(F32)) for x in jax.tree.leaves(out)
                   if jnp.issubdtype(x.dtype, jnp.floating))

    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="TPU v5 lite", num_cores=1, platform="tpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        traced = jax.jit(jax.grad(loss)).trace(args)
        text = traced.lower(lowering_platforms=("tpu",)).as_text()
    modules = _mosaic_modules(text)
    assert set(KERNEL_NAMES[op]) <= set(modules), sorted(modules)
    want = "bf16" if dtype == "bfloat16" else "f32"
    for name, mlir_text in modules.items():
        found = MATMUL.findall(mlir_text)
        assert found, f"{name}: no tpu.matmul"
        for lhs, rhs, acc, res in found:
            assert (lhs, rhs, acc, res) == (want, want, "f32", "f32"), (name, lhs, rhs, acc)
        assert "contract_precision<fp32>" not in mlir_text, f"{name}: HIGHEST precision"
    blocks = [bm.block_shape for eqn in _pallas_eqns(traced.jaxpr.jaxpr)
              for bm in eqn.params["grid_mapping"].block_mappings]
    assert blocks
    for shape in blocks:
        last = shape[-1] if isinstance(shape[-1], int) else shape[-1].block_size
        assert last > 1, f"{op}: a lane-sparse block {shape}"


def _pallas_eqns(jaxpr):
    """Every pallas_call equation in ``jaxpr`` and the jaxprs nested in its equations' params
    (shard_map, custom_vjp, pjit)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
            continue
        for p in eqn.params.values():
            for j in (p if isinstance(p, (tuple, list)) else (p,)):
                j = getattr(j, "jaxpr", j)                     # ClosedJaxpr -> Jaxpr
                if hasattr(j, "eqns"):
                    yield from _pallas_eqns(j)


# --------------------------------------------------------------------------- VMEM bound
def _vmem_table():
    """{(kernel, chunk, D, dtype): bytes} of every TPU kernel at chunk 128/256, D 128/256."""
    table = {}
    for chunk in (128, 256):
        for d in (128, 256):
            for dtype in (F32, BF16):
                name = jnp.dtype(dtype).name
                for kernel in ("fwd", "bwd"):
                    table["gated_delta_" + kernel, chunk, d, name] = gd_tpu.vmem_bytes(
                        kernel, chunk, d, d, dtype)
                    table["titans_" + kernel, chunk, d, name] = ti_tpu.vmem_bytes(
                        kernel, chunk, BLOCK, d, d, dtype)
                for kind in ("fwd", "dq", "dkdv"):
                    table["simple_gla_" + kind, chunk, d, name] = sg_tpu.vmem_bytes(
                        kind, chunk=chunk, k_dim=d, v_dim=d, dtype=dtype)
    return table


# The one cell over 16 MiB: Titans' backward at 256 rows (16 gradient blocks) and D = 256 in
# float32 (its replayed block states are 2 x 16 x 256 x 256 x 4 B); the entry point halves the
# rows per step there (``fit_rows``).
OVER_LIMIT = {("titans_bwd", 256, 256, "float32")}


def test_vmem_fits_v5e_scoped_limit():
    """Every kernel x chunk {128, 256} x D {128, 256} x {f32, bf16} fits 16 MiB but
    ``OVER_LIMIT``, bf16 needs less than f32, and tpu_supports agrees."""
    table = _vmem_table()
    limit = 16 * 2 ** 20
    for key, used in table.items():
        assert 2 ** 19 < used, (key, used)
        assert (used > limit) == (key in OVER_LIMIT), (key, used)
        kernel, chunk, d, name = key
        if name == "bfloat16":
            assert used < table[kernel, chunk, d, "float32"], key
    for chunk in (128, 256):
        for dtype in (F32, BF16):
            assert gd_tpu.tpu_supports(dtype, 256, 256, chunk) is None
            assert sg_tpu.tpu_supports(dtype, 256, 256, chunk) is None
            reason = ti_tpu.tpu_supports(dtype, 256, 256, chunk, BLOCK)
            if ("titans_bwd", chunk, 256, jnp.dtype(dtype).name) in OVER_LIMIT:
                assert "the bwd kernel needs" in reason, reason
                assert ti_tpu.fit_rows(dtype, 256, 256, chunk, BLOCK) == chunk // 2
            else:
                assert reason is None, reason
                assert ti_tpu.fit_rows(dtype, 256, 256, chunk, BLOCK) == chunk


def test_tpu_supports_names_what_does_not_fit():
    reason = gd_tpu.tpu_supports(F32, 1024, 1024, 256)
    assert reason is not None and "kernel needs" in reason and "limit 16777216" in reason
    assert "chunk must be a multiple of 8" in sg_tpu.tpu_supports(F32, 128, 128, 100)
    assert "block_size must be a multiple of 8" in ti_tpu.tpu_supports(F32, 128, 128, 128, 12)
    with pytest.raises(ValueError, match="chunk must be a positive multiple of 8"):
        sg_kernels.simple_gla_tpu(None, None, None, None, chunk=100)  # checked first
