"""simple_gla (+ ssd): the shared op suite (every implementation against the token-level
reference with gradients, packing, decode steps, auto, lowering of the Pallas kernels for TPU and
CUDA from CPU, argument errors) plus simple_gla's own cases: small chunks and blocks, extreme
gates, the TPU simulator, the TPU kernels' VMEM bound, Mamba-2 SSD against its own recurrence,
and the remaining argument errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.simple_gla import simple_gla, simple_gla_step, ssd, ssd_step
from pallas_kernels.simple_gla import tpu as sg_tpu
from pallas_kernels.simple_gla.chunked import simple_gla_chunked
from pallas_kernels.simple_gla.reference import simple_gla_reference
from tests.op_suite import OpSuite
from tests.tolerance import assert_close

F32, BF16 = jnp.float32, jnp.bfloat16


def _normal(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _inputs(b=2, t=100, h=2, hv=4, kd=24, vd=40, dtype=F32, seed=0):
    """q, k, v, g (log-decays -softplus(x - 1): mostly -0.05 to -2) in ``dtype``; s0 float32."""
    rng = np.random.default_rng(seed)
    q, k = _normal(rng, b, t, h, kd), _normal(rng, b, t, h, kd)
    v = _normal(rng, b, t, hv, vd)
    g = -np.logaddexp(0.0, _normal(rng, b, t, hv) - 1.0)               # -softplus(x - 1)
    s0 = _normal(rng, b, hv, kd, vd)
    return (*(jnp.asarray(x, dtype) for x in (q, k, v, g)), jnp.asarray(s0))


def _segments(t=100):
    """Row 0: three documents (resets inside both chunks of 64) and trailing padding;
    row 1: a reset exactly on the chunk boundary."""
    row0 = [1] * 30 + [2] * 50 + [3] * 12 + [0] * (t - 92)
    row1 = [4] * 64 + [5] * (t - 64)
    return jnp.array([row0, row1], jnp.int32)


def _suite_inputs(key, *, B, T, H, HV, K, V, dtype):
    """q, k, v standard normal, g = -softplus(x - 1) (mostly -0.05 to -2), in ``dtype``."""
    ks = jax.random.split(key, 4)
    q, k = (jax.random.normal(kk, (B, T, H, K)) for kk in ks[:2])
    v = jax.random.normal(ks[2], (B, T, HV, V))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, HV)) - 1.0)
    return tuple(x.astype(dtype) for x in (q, k, v, g))


class TestSimpleGla(OpSuite):
    """T=100 over chunks of 64, K=24, V=40, grouped heads 2 -> 4, an initial state; segment ids
    with resets inside a chunk, on the chunk boundary and padding in float32, the segment-free
    path in bfloat16."""
    op = staticmethod(simple_gla)
    step = staticmethod(simple_gla_step)
    make_inputs = staticmethod(_suite_inputs)
    impls = ("chunked", "triton", "mosaic_tpu")
    cases = {"float32": dict(B=2, T=100, H=2, HV=4, K=24, V=40),
             "bfloat16": dict(B=2, T=100, H=2, HV=4, K=24, V=40)}
    packing_impls = ("chunked", "triton")
    lower_impls = ("triton", "mosaic_tpu")
    kernel_names = {"triton": ("simple_gla_fwd_h", "simple_gla_fwd_o", "simple_gla_bwd_dh",
                               "simple_gla_bwd_dv", "simple_gla_bwd_dqdk"),
                    "mosaic_tpu": ("simple_gla_fwd", "simple_gla_dq", "simple_gla_dkdv")}

    def make_segments(self, B, T, dtype="float32"):
        if dtype != "float32":
            return None                                     # bfloat16: the segment-free path
        return _segments(T) if (B, T) == (2, 100) else super().make_segments(B, T, dtype)


# ------------------------------------------------------------------------------------------
# simple_gla's own cases
# ------------------------------------------------------------------------------------------
def _run(fn, args, seed=7):
    """Outputs and the VJP of every input for random cotangents (one jitted program)."""
    out_shapes = jax.eval_shape(fn, *args)
    leaves, tree = jax.tree_util.tree_flatten(out_shapes)
    rng = np.random.default_rng(seed)
    cts = jax.tree_util.tree_unflatten(
        tree, [jnp.asarray(_normal(rng, *x.shape), x.dtype) for x in leaves])

    @jax.jit
    def outputs_and_grads(args, cts):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cts)
    return outputs_and_grads(args, cts)


def _compare(impl_fn, ref_fn, args, dtype):
    (o, s), grads = _run(impl_fn, args)
    (o_ref, s_ref), grads_ref = _run(ref_fn, args)
    assert o.dtype == args[2].dtype and s.dtype == F32
    assert_close(o, o_ref, dtype, "out", "o")
    assert_close(s, s_ref, dtype, "out", "final_state")
    for name, a, e in zip(("dq", "dk", "dv", "dg", "ds0"), grads, grads_ref):
        assert a.dtype == e.dtype, name
        assert_close(a, e, dtype, "grad", name)


def _public(impl, segment_ids, **kw):
    def fn(q, k, v, g, s0):
        return simple_gla(q, k, v, g, initial_state=s0, output_final_state=True,
                          segment_ids=segment_ids, impl=impl, **kw)
    return fn


def test_chunked_many_blocks():
    """Small chunks and blocks: resets and states cross chunk and block boundaries."""
    args = _inputs(t=100)
    seg = _segments()

    def chunked(q, k, v, g, s0):
        return simple_gla_chunked(q, k, v, g, initial_state=s0, segment_ids=seg,
                                  chunk_size=8, block_chunks=3)

    def reference(q, k, v, g, s0):
        return simple_gla_reference(q, k, v, g, initial_state=s0, segment_ids=seg)

    _compare(chunked, reference, args, F32)


def test_chunked_extreme_gates():
    """Strong decays (g down to -30, exp(g) underflows) next to g = 0 stay finite and exact."""
    q, k, v, _, s0 = _inputs(b=1, t=150, h=2, hv=2, kd=16, vd=16, seed=5)
    u = np.random.default_rng(5).uniform(size=(1, 150, 2))
    g = jnp.asarray(np.where(u < 0.3, 0.0, -30.0 * u ** 3), F32)
    _compare(_public("chunked", None), _public("reference", None), (q, k, v, g, s0), F32)


def test_tpu_simulator_tiny():
    """The TPU kernels once under the TPU interpreter (pltpu.InterpretParams, slow)."""
    args = _inputs(b=1, t=24, h=1, hv=2, kd=8, vd=8)
    seg = jnp.array([[1] * 10 + [2] * 10 + [0] * 4], jnp.int32)
    _compare(_public("mosaic_tpu", seg, interpret=pltpu.InterpretParams()),
             _public("reference", seg), args, F32)


# ------------------------------------------------------------------------------------------
# Mamba-2 SSD against its own token recurrence (written here, mamba layout)
# ------------------------------------------------------------------------------------------
def _mamba_recurrence(x, dt, a, bm, cm, d, z, dt_bias, h0, softplus=True, limit=None):
    """h_t = exp(dt'A) h + dt' x Bᵀ ; y = h C + D x ; y·silu(z), token by token, [B,H,P,N]."""
    heads, groups = x.shape[2], bm.shape[2]
    rep = heads // groups
    dtp = jax.nn.softplus(dt + dt_bias) if softplus else dt + dt_bias  # [B, T, H]
    if limit is not None:
        dtp = jnp.clip(dtp, *limit)
    d = d[:, None] if d.ndim == 1 else d                               # [H, 1] or [H, P]

    def step(h, inp):
        x_t, dt_t, b_t, c_t, z_t = inp                                 # [B,H,P] [B,H] [B,G,N] ..
        b_t, c_t = jnp.repeat(b_t, rep, axis=1), jnp.repeat(c_t, rep, axis=1)
        h = (jnp.exp(dt_t * a)[..., None, None] * h
             + (dt_t[..., None] * x_t)[..., :, None] * b_t[..., None, :])
        y = jnp.einsum("bhpn,bhn->bhp", h, c_t) + d * x_t
        return h, y * jax.nn.silu(z_t)

    xs = tuple(jnp.moveaxis(u, 1, 0) for u in (x, dtp, bm, cm, z))
    h, y = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(y, 0, 1), h


def _ssd_inputs(b=2, t=40, h=4, g=2, p=12, n=10):
    rng = np.random.default_rng(11)
    x = _normal(rng, b, t, h, p)
    dt = _normal(rng, b, t, h) - 1.0
    a = -np.exp(_normal(rng, h))
    bm, cm = _normal(rng, b, t, g, n), _normal(rng, b, t, g, n)
    d = _normal(rng, h)
    z = _normal(rng, b, t, h, p)
    dt_bias = 0.5 * _normal(rng, h)
    h0 = _normal(rng, b, h, p, n)
    return tuple(jnp.asarray(u, F32) for u in (x, dt, a, bm, cm, d, z, dt_bias, h0))


def test_ssd_matches_mamba_recurrence():
    args = _ssd_inputs()

    def ours(x, dt, a, bm, cm, d, z, dt_bias, h0):
        return ssd(x, dt, a, bm, cm, D=d, z=z, dt_bias=dt_bias, initial_state=h0,
                   output_final_state=True)

    (y, h), grads = _run(ours, args)
    (y_ref, h_ref), grads_ref = _run(_mamba_recurrence, args)
    assert_close(y, y_ref, F32, "out", "y")
    assert_close(h, h_ref, F32, "out", "final state [B, H, P, N]")
    names = ("dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dh0")
    for name, a_, e_ in zip(names, grads, grads_ref):
        assert_close(a_, e_, F32, "grad", name)


def test_ssd_options_match_recurrence():
    """D per head and channel [H, P], no softplus (dt already positive), a dt clip range."""
    x, dt, a, bm, cm, _, z, dt_bias, h0 = _ssd_inputs(t=20)
    d = jnp.linspace(-1.0, 1.0, x.shape[2] * x.shape[3]).reshape(x.shape[2:])
    dt = jnp.abs(dt)
    y, h = jax.jit(lambda *u: ssd(*u[:5], D=u[5], z=u[6], dt_bias=u[7], initial_state=u[8],
                                  dt_softplus=False, dt_limit=(0.05, 1.5),
                                  output_final_state=True))(x, dt, a, bm, cm, d, z, dt_bias, h0)
    y_ref, h_ref = jax.jit(functools.partial(_mamba_recurrence, softplus=False,
                                             limit=(0.05, 1.5)))(x, dt, a, bm, cm, d, z,
                                                                 dt_bias, h0)
    assert_close(y, y_ref, F32, "out", "y")
    assert_close(h, h_ref, F32, "out", "final state")


def test_ssd_step_matches_recurrence():
    x, dt, a, bm, cm, d, z, dt_bias, h0 = _ssd_inputs(t=6)
    y_ref, h_ref = jax.jit(_mamba_recurrence)(x, dt, a, bm, cm, d, z, dt_bias, h0)
    step = jax.jit(lambda x, dt, b, c, h, z: ssd_step(x, dt, a, b, c, h, D=d, z=z,
                                                     dt_bias=dt_bias))
    state = h0
    for t in range(x.shape[1]):
        y_t, state = step(x[:, t], dt[:, t], bm[:, t], cm[:, t], state, z[:, t])
        assert_close(y_t, y_ref[:, t], F32, "out", f"token {t}")
    assert_close(state, h_ref, F32, "out", "state")


# ------------------------------------------------------------------------------------------
# TPU VMEM bound
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
def test_tpu_vmem_per_block(kind):
    """Bound from the block shapes: chunk 128 (default) and 256, features up to 256, f32 (the
    worst case) and bf16."""
    limit = 16 * 2 ** 20                                    # TPU v5e default scoped VMEM
    for chunk in (sg_tpu.DEFAULT_CHUNK, sg_tpu.CHUNK_V6E):
        for dtype in (F32, jnp.bfloat16):
            for feat in (128, 256):
                used = sg_tpu.vmem_bytes(kind, chunk=chunk, k_dim=feat, v_dim=feat, dtype=dtype,
                                         has_seg=True)
                assert 2 * chunk * feat * 2 < used < limit, (kind, chunk, feat, dtype, used)


# ------------------------------------------------------------------------------------------
# argument errors
# ------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    q, k, v, g, s0 = _inputs(b=1, t=8, h=2, hv=4, kd=8, vd=8)
    with pytest.raises(ValueError, match=r"k must have shape \[1, 8, 2, 8\]"):
        simple_gla(q, k[:, :, :1], v, g)
    with pytest.raises(ValueError, match="not a multiple of the 2 q/k heads"):
        simple_gla(q, k, v[:, :, :3], g[:, :, :3])
    with pytest.raises(ValueError, match=r"g must have shape \[1, 8, 4\]"):
        simple_gla(q, k, v, g[:, :, :2])
    with pytest.raises(ValueError, match=r"q must have shape \[B, T, H, K\]"):
        simple_gla(q[0], k, v, g)
    with pytest.raises(TypeError, match="v must be a floating dtype"):
        simple_gla(q, k, v.astype(jnp.int32), g)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[1, 4, 8, 8\]"):
        simple_gla(q, k, v, g, initial_state=s0[:, :2])
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[1, 8\]"):
        simple_gla(q, k, v, g, segment_ids=jnp.ones((1, 7), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must be an integer"):
        simple_gla(q, k, v, g, segment_ids=jnp.ones((1, 8), F32))
    with pytest.raises(ValueError, match="impl="):
        simple_gla(q, k, v, g, impl="cuda")
    with pytest.raises(ValueError, match=r"state must have shape \[1, 4, 8, 8\]"):
        simple_gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s0[..., :4])
    x, dt, a, bm, cm, *_ = _ssd_inputs(b=1, t=4, h=4, g=3)
    with pytest.raises(ValueError, match="not a multiple of the 3 B/C groups"):
        ssd(x, dt, a, bm, cm)


def test_debug_checks_flag_positive_gates():
    q, k, v, g, _ = _inputs(b=1, t=8, h=2, hv=2, kd=8, vd=8)
    simple_gla(q, k, v, g, debug_checks=True)               # valid gates pass
    with pytest.raises(checkify.JaxRuntimeError, match=r"g \(a log decay\) must be <= 0"):
        simple_gla(q, k, v, -g, debug_checks=True)

    checked = jax.jit(checkify.checkify(
        lambda *a: simple_gla(*a, debug_checks=True)[0]))
    err, _ = checked(q, k, v, -g)
    assert err.get() is not None and "log decay" in err.get()
    err, _ = checked(q, k, v, g)
    assert err.get() is None
