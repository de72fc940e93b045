"""gated_delta_rule: the shared op suite (every implementation against the token-level
reference — odd T, K != V and not powers of two, grouped value heads, segment_ids with resets
and trailing padding, an initial state; l2norm and scale 0.3 in the float32 case — output,
final state and the VJP of q, k, v, g, β and initial_state with random cotangents; packing;
the decode step; auto; lowering of the Pallas kernels for TPU and CUDA from CPU; argument
errors) plus the op's own cases: the TPU simulator on one small case, a long bf16 sequence,
the TPU kernels' VMEM bound, the remaining argument errors and the debug checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta import gated_delta_rule, gated_delta_rule_step
from pallas_kernels.gated_delta import tpu as gd_tpu
from tests.op_suite import OpSuite, segments
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


def _suite_inputs(key, *, B, T, H, HV, K, V, dtype):
    """q, k of norm ~1, v, g = -softplus(x - 1), β = sigmoid(x), in ``dtype``."""
    ks = jax.random.split(key, 5)
    q, k = (jax.random.normal(kk, (B, T, H, K)) / K ** 0.5 for kk in ks[:2])
    v = jax.random.normal(ks[2], (B, T, HV, V))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, HV)) - 1.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, HV)))
    return tuple(x.astype(dtype) for x in (q, k, v, g, beta))


class TestGatedDelta(OpSuite):
    op = staticmethod(gated_delta_rule)
    step = staticmethod(gated_delta_rule_step)
    make_inputs = staticmethod(_suite_inputs)
    impls = ("chunked", "triton", "mosaic_tpu")
    impl_kwargs = {"chunked": {"chunk_size": 16}}
    cases = {"float32": dict(B=2, T=130, H=2, HV=4, K=24, V=40),
             "bfloat16": dict(B=2, T=63, H=2, HV=4, K=20, V=12)}
    packing_impls = ("reference", "chunked")
    lower_impls = ("triton", "mosaic_tpu")
    kernel_names = {"triton": ("gated_delta_fwd_wy", "gated_delta_fwd_h", "gated_delta_fwd_o",
                               "gated_delta_bwd_dv_local", "gated_delta_bwd_dh",
                               "gated_delta_bwd_dqkw", "gated_delta_bwd_wy_v",
                               "gated_delta_bwd_wy", "gated_delta_bwd_dqdk"),
                    "mosaic_tpu": ("gated_delta_fwd_tpu", "gated_delta_bwd_tpu")}

    def case_kwargs(self, dtype):
        # float32 (and the step): the q/k norm and a non-default scale; bfloat16: neither.
        return {"use_qk_l2norm": True, "scale": 0.3} if dtype == "float32" else {}


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


def test_long_bf16_is_finite():
    T = 16384
    q, k, v, g, beta, _ = make_inputs(8, B=1, T=T, H=1, HV=2, K=16, V=16, dtype=BF16,
                                      l2norm=True)
    o, final = jax.jit(lambda *a: gated_delta_rule(*a, use_qk_l2norm=True, impl="chunked",
                                                   output_final_state=True))(q, k, v, g, beta)
    assert o.shape == (1, T, 2, 16) and o.dtype == BF16
    assert bool(jnp.all(jnp.isfinite(o.astype(F32)))) and bool(jnp.all(jnp.isfinite(final)))


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_mosaic_tpu_vmem_per_block(kernel):
    """Double-buffered blocks + scratch + temporaries fit a 16 MiB scoped-VMEM budget (v5e) at
    chunk 128 and 256, D up to 256, float32 and bfloat16; the count follows the kernel's block
    specs (chunk 128, D = 128, f32: fwd ~1.4 MiB, bwd ~2.3 MiB) and grows with C and D."""
    for chunk in (gd_tpu.CHUNK, gd_tpu.CHUNK_V6E):
        for dtype in (F32, BF16):
            for d in (128, 256):
                assert gd_tpu.vmem_bytes(kernel, chunk, d, d, dtype) <= 16 * 2 ** 20
            assert gd_tpu.tpu_supports(dtype, 256, 256, chunk) is None
    small, big = (gd_tpu.vmem_bytes(kernel, gd_tpu.CHUNK, d, d) for d in (128, 256))
    assert 0.5 * 2 ** 20 < small < big < gd_tpu.vmem_bytes(kernel, gd_tpu.CHUNK_V6E, 256, 256)


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
