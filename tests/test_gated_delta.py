"""gated_delta_rule: every implementation against the token-level reference, plus API checks.

One combined odd-size case per implementation × dtype (odd T, K != V and not powers of two,
grouped value heads, segment_ids with a reset and trailing padding, initial_state; l2norm in
the bf16 case): output, final state and the VJP for q, k, v, g, β and initial_state with random
cotangents. The Pallas kernels run in interpret mode, are lowered for TPU and CUDA from CPU, and
the TPU kernels also run once in the TPU simulator.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta import gated_delta_rule, gated_delta_rule_step
from pallas_kernels.gated_delta import tpu as gd_tpu
from pallas_kernels.gated_delta.reference import gated_delta_rule_reference
from tests.tolerance import assert_close

F32, BF16 = jnp.float32, jnp.bfloat16
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dinitial_state")


def make_inputs(seed, B, T, H, HV, K, V, dtype=F32, l2norm=False):
    """Random inputs; without l2norm q, k are scaled to norm ~1 so the recurrence is stable."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    if not l2norm:
        q, k = q / K ** 0.5, k / K ** 0.5
    v = jax.random.normal(ks[2], (B, T, HV, V))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, HV)) - 1.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, HV)))
    s0 = 0.5 * jax.random.normal(ks[5], (B, HV, K, V))
    return tuple(x.astype(dtype) for x in (q, k, v, g, beta)) + (s0,)


def segments(T, *rows):
    """segment_ids [len(rows), T]: each row a list of (id, length), the rest padding (0)."""
    out = np.zeros((len(rows), T), np.int32)
    for r, spans in enumerate(rows):
        t = 0
        for seg_id, n in spans:
            out[r, t:t + n] = seg_id
            t += n
    return jnp.asarray(out)


# Combined odd-size cases: (shape, segment_ids, use_qk_l2norm) per dtype.
CASES = {
    "float32": (dict(B=2, T=130, H=2, HV=4, K=24, V=40),
                segments(130, [(1, 50), (2, 60)], [(3, 70), (4, 60)]), False),
    "bfloat16": (dict(B=2, T=63, H=2, HV=4, K=20, V=12),
                 segments(63, [(1, 30), (2, 25)], [(1, 63)]), True),
}


def _vjp_fn(impl, segment_ids, use_qk_l2norm, **extra):
    def fn(q, k, v, g, beta, s0):
        return gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                segment_ids=segment_ids, use_qk_l2norm=use_qk_l2norm,
                                impl=impl, **extra)

    @jax.jit
    def run(args, cts):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cts)

    return run


@functools.lru_cache(maxsize=None)
def _case(dtype_name):
    """Inputs, cotangents and the reference's outputs and VJP for one dtype (computed once)."""
    shape, seg, l2 = CASES[dtype_name]
    dtype = jnp.dtype(dtype_name)
    args = make_inputs(1, **shape, dtype=dtype, l2norm=l2)
    B, T, HV, V, K = shape["B"], shape["T"], shape["HV"], shape["V"], shape["K"]
    ck = jax.random.split(jax.random.PRNGKey(7), 2)
    cts = (jax.random.normal(ck[0], (B, T, HV, V)).astype(dtype),
           jax.random.normal(ck[1], (B, HV, K, V)))
    return args, cts, _vjp_fn("reference", seg, l2)(args, cts)


def _check_against_reference(impl, dtype_name, **extra):
    _, seg, l2 = CASES[dtype_name]
    dtype = jnp.dtype(dtype_name)
    args, cts, ((o_ref, s_ref), g_ref) = _case(dtype_name)
    (o, s), grads = _vjp_fn(impl, seg, l2, **extra)(args, cts)
    assert o.dtype == dtype and s.dtype == F32
    assert_close(o, o_ref, dtype, "out", f"{impl} o")
    assert_close(s, s_ref, dtype, "out", f"{impl} final_state")
    for name, gr, gr_ref in zip(GRAD_NAMES, grads, g_ref):
        assert gr.dtype == gr_ref.dtype, name
        assert_close(gr, gr_ref, dtype, "grad", f"{impl} {name}")
    # padding tokens output exactly zero
    assert float(jnp.max(jnp.abs(o.astype(F32) * (seg == 0)[..., None, None]))) == 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_matches_reference(dtype):
    _check_against_reference("chunked", dtype, chunk_size=16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_interpret_matches_reference(dtype):
    _check_against_reference("triton", dtype, interpret=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mosaic_tpu_interpret_matches_reference(dtype):
    _check_against_reference("mosaic_tpu", dtype, interpret=True)


def test_mosaic_tpu_simulator_small():
    """One small case through the TPU simulator: 2 chunks, forward and VJP."""
    seg = segments(70, [(1, 40), (2, 25)])
    args = make_inputs(3, B=1, T=70, H=1, HV=1, K=16, V=8)
    cts = (jax.random.normal(jax.random.PRNGKey(4), (1, 70, 1, 8)), jnp.ones((1, 1, 16, 8)))
    (o_ref, s_ref), g_ref = _vjp_fn("reference", seg, False)(args, cts)
    (o, s), grads = _vjp_fn("mosaic_tpu", seg, False, interpret=pltpu.InterpretParams())(args, cts)
    assert_close(o, o_ref, F32, "out", "o")
    assert_close(s, s_ref, F32, "out", "final_state")
    for name, gr, gr_ref in zip(GRAD_NAMES, grads, g_ref):
        assert_close(gr, gr_ref, F32, "grad", name)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_packed_equals_separate_sequences(impl):
    lengths = (37, 50, 20)
    T = sum(lengths) + 13                                               # trailing padding
    seg = segments(T, [(1, 37), (2, 50), (5, 20)])
    q, k, v, g, beta, s0 = make_inputs(5, B=1, T=T, H=2, HV=4, K=12, V=20)
    run = lambda *a, **kw: gated_delta_rule(*a, output_final_state=True, impl=impl,
                                            chunk_size=16, **kw)
    o, final = run(q, k, v, g, beta, initial_state=s0, segment_ids=seg)
    t = 0
    for i, n in enumerate(lengths):
        sl = lambda x: x[:, t:t + n]
        o_doc, f_doc = run(*map(sl, (q, k, v, g, beta)), initial_state=s0 if i == 0 else None)
        assert_close(o[:, t:t + n], o_doc, F32, "out", f"document {i}")
        t += n
    assert_close(final, f_doc, F32, "out", "final state = state after the last real token")
    assert float(jnp.max(jnp.abs(o[:, t:]))) == 0.0


def test_step_matches_reference():
    B, T, H, HV, K, V = 2, 9, 2, 4, 10, 6
    q, k, v, g, beta, s0 = make_inputs(6, B, T, H, HV, K, V, l2norm=True)
    o_ref, s_ref = gated_delta_rule_reference(q, k, v, g, beta, scale=0.3, initial_state=s0,
                                              output_final_state=True, use_qk_l2norm=True)
    step = jax.jit(lambda *a: gated_delta_rule_step(*a, scale=0.3, use_qk_l2norm=True))
    state = s0
    for t in range(T):
        o_t, state = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        assert_close(o_t, o_ref[:, t], F32, "out", f"token {t}")
    assert_close(state, s_ref, F32, "out", "state")


def test_long_bf16_is_finite():
    T = 16384
    q, k, v, g, beta, _ = make_inputs(8, B=1, T=T, H=1, HV=2, K=16, V=16, dtype=BF16,
                                      l2norm=True)
    o, final = jax.jit(lambda *a: gated_delta_rule(*a, use_qk_l2norm=True, impl="chunked",
                                                   output_final_state=True))(q, k, v, g, beta)
    assert o.shape == (1, T, 2, 16) and o.dtype == BF16
    assert bool(jnp.all(jnp.isfinite(o.astype(F32)))) and bool(jnp.all(jnp.isfinite(final)))


# Lowering from CPU needs a target device kind: from a CPU-only jaxlib, jax >= 0.11 lowers Pallas
# Triton only under an abstract mesh whose device kind is a GPU, and Mosaic rejects some block
# shapes (1-D blocks: "Unsupported TPU device kind: cpu") unless that device kind is a TPU.
TARGETS = {"tpu": ("TPU v5 lite", "tpu"), "cuda": ("NVIDIA H100 80GB HBM3", "gpu")}


def _lowered_text(impl, platform):
    B, T, H, HV, K, V = 1, 130, 2, 4, 24, 40
    sds = jax.ShapeDtypeStruct
    args = (sds((B, T, H, K), F32), sds((B, T, H, K), F32), sds((B, T, HV, V), F32),
            sds((B, T, HV), F32), sds((B, T, HV), F32), sds((B, HV, K, V), F32))
    seg = segments(T, [(1, 60), (2, 60)])

    def fwd(q, k, v, g, beta, s0):
        return gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg,
                                output_final_state=True, impl=impl)

    def fwd_bwd(*a):
        out, vjp = jax.vjp(fwd, *a)
        return vjp(out)

    kind, device_platform = TARGETS[platform]
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind=kind, num_cores=1, platform=device_platform))
    with jax.sharding.use_abstract_mesh(mesh):
        return [jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
                for f in (fwd, fwd_bwd)]


def test_mosaic_tpu_lowers_for_tpu():
    fwd, fwd_bwd = _lowered_text("mosaic_tpu", "tpu")
    assert "gated_delta_fwd_tpu" in fwd
    assert "gated_delta_fwd_tpu" in fwd_bwd and "gated_delta_bwd_tpu" in fwd_bwd


def test_triton_lowers_for_cuda():
    fwd, fwd_bwd = _lowered_text("triton", "cuda")
    assert "gated_delta_fwd_triton" in fwd and "__gpu$xla.gpu.triton" in fwd
    assert "gated_delta_fwd_triton" in fwd_bwd and "gated_delta_bwd_triton" in fwd_bwd


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_mosaic_tpu_vmem_per_block(kernel):
    """Double-buffered blocks + scratch fit a 16 MiB scoped-VMEM budget up to D = 256; the
    count follows the kernel's block specs (D = 128: fwd ~0.9 MiB, bwd ~1.3 MiB)."""
    for d in (128, 256):
        assert gd_tpu.vmem_bytes(kernel, gd_tpu.CHUNK, d, d) <= 16 * 2 ** 20
    small, big = (gd_tpu.vmem_bytes(kernel, 64, d, d) for d in (128, 256))
    assert 0.5 * 2 ** 20 < small < big


def _bad(**changes):
    args = dict(zip(("q", "k", "v", "g", "beta"), make_inputs(0, 1, 8, 2, 4, 6, 5)[:5]))
    args.update(changes)
    return args


@pytest.mark.parametrize("kwargs, error, match", [
    (_bad(k=jnp.zeros((1, 8, 2, 7))), ValueError, r"k must have shape \[1, 8, 2, 6\]"),
    (_bad(v=jnp.zeros((1, 8, 3, 5))), ValueError, "multiple of the q/k heads"),
    (_bad(v=jnp.zeros((1, 9, 4, 5))), ValueError, "v must have shape"),
    (_bad(g=jnp.zeros((1, 8, 2))), ValueError, r"g must have shape \[1, 8, 4\]"),
    (_bad(beta=jnp.zeros((1, 8, 4, 1))), ValueError, "beta must have shape"),
    (_bad(q=jnp.zeros((1, 8, 2, 6), jnp.int32)), TypeError, "q must be a floating dtype"),
    (_bad(segment_ids=jnp.ones((1, 7), jnp.int32)), ValueError, r"segment_ids must have shape"),
    (_bad(segment_ids=jnp.ones((1, 8), jnp.float32)), TypeError, "segment_ids must be an integer"),
    (_bad(initial_state=jnp.zeros((1, 2, 6, 5))), ValueError, "initial_state must have shape"),
    (_bad(impl="cuda"), ValueError, "impl="),
])
def test_bad_inputs_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        gated_delta_rule(**kwargs)


def test_step_bad_inputs_raise():
    q = jnp.zeros((2, 2, 4))
    with pytest.raises(ValueError, match="state must have shape"):
        gated_delta_rule_step(q, q, jnp.zeros((2, 4, 3)), jnp.zeros((2, 4)), jnp.zeros((2, 4)),
                              jnp.zeros((2, 4, 4, 4)))


@pytest.mark.parametrize("bad", ["beta", "g"])
def test_debug_checks_catch_bad_values(bad):
    q, k, v, g, beta, _ = make_inputs(0, 1, 8, 1, 1, 4, 4)
    gated_delta_rule(q, k, v, g, beta, debug_checks=True, impl="reference")   # valid: no error
    if bad == "beta":
        beta = beta.at[0, 3, 0].set(1.5)
    else:
        g = g.at[0, 2, 0].set(0.1)
    with pytest.raises(checkify.JaxRuntimeError, match=bad):
        gated_delta_rule(q, k, v, g, beta, debug_checks=True, impl="reference")
