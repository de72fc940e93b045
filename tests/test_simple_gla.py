"""simple_gla (+ ssd): every implementation against the token-level reference, decode steps,
packing, Mamba-2 SSD against its own recurrence, lowering of every Pallas kernel for TPU and
CUDA from CPU, the TPU kernels' VMEM bound, and argument errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.common import resolve_impl
from pallas_kernels.simple_gla import simple_gla, simple_gla_step, ssd, ssd_step
from pallas_kernels.simple_gla import tpu as sg_tpu
from pallas_kernels.simple_gla.chunked import simple_gla_chunked
from pallas_kernels.simple_gla.reference import simple_gla_reference
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


# ------------------------------------------------------------------------------------------
# implementations vs the reference: one combined odd-size case per implementation × dtype
# (T=100 over chunks of 64, K=24, V=40, grouped heads 2 -> 4, initial state; segment ids with
# resets and padding in float32, the segment-free path in bfloat16)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("impl", ["chunked", "triton", "mosaic_tpu"])
def test_impl_matches_reference(impl, dtype):
    args = _inputs(dtype=dtype)
    seg = _segments() if dtype == F32 else None
    kw = {} if impl == "chunked" else {"interpret": True}
    _compare(_public(impl, seg, **kw), _public("reference", seg), args, dtype)


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


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_packing_equals_separate_sequences(impl):
    lengths, pad = (37, 50, 20), 13
    q, k, v, g, s0 = _inputs(b=1, t=sum(lengths) + pad, h=2, hv=2, kd=16, vd=16, seed=3)
    ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])
    o, s = simple_gla(q, k, v, g, initial_state=s0, output_final_state=True,
                      segment_ids=jnp.asarray(ids[None], jnp.int32), impl=impl, interpret=True)
    start = 0
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        o_i, s_i = simple_gla(q[:, sl], k[:, sl], v[:, sl], g[:, sl], output_final_state=True,
                              initial_state=s0 if i == 0 else None, impl=impl, interpret=True)
        assert_close(o[:, sl], o_i, F32, "out", f"document {i}")
        start += n
    assert_close(s, s_i, F32, "out", "final state after the last document")
    np.testing.assert_array_equal(np.asarray(o[:, start:]), 0.0)


def test_step_matches_reference_token_by_token():
    q, k, v, g, s0 = _inputs(b=2, t=12, h=2, hv=4, kd=24, vd=40)
    o_ref, s_ref = simple_gla(q, k, v, g, initial_state=s0, output_final_state=True,
                              impl="reference")
    step = jax.jit(simple_gla_step)
    state = s0
    for t in range(q.shape[1]):
        o_t, state = step(q[:, t], k[:, t], v[:, t], g[:, t], state)
        assert_close(o_t, o_ref[:, t], F32, "out", f"token {t}")
    assert state.dtype == F32
    assert_close(state, s_ref, F32, "out", "state")


def test_auto_is_chunked_on_cpu():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("simple_gla", "auto", ("reference", "chunked", "triton")) == "chunked"
    args = _inputs(b=1, t=20)
    o_auto, _ = jax.jit(simple_gla)(*args[:4])
    o_chunked, _ = jax.jit(lambda *a: simple_gla(*a, impl="chunked"))(*args[:4])
    np.testing.assert_array_equal(np.asarray(o_auto), np.asarray(o_chunked))


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
# Pallas kernels lower for real hardware from CPU; TPU VMEM bound
# ------------------------------------------------------------------------------------------
# Lowering from a CPU host needs a device kind for the target: TPU blocks ask for the chip, and
# jax >= 0.11 asks the GPU's for the Triton compute capability.
_TARGET_MESH = {
    "tpu": AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="TPU v5 lite", num_cores=1, platform="tpu")),
    "cuda": AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100", num_cores=1, platform="gpu")),
}


@pytest.mark.parametrize("with_seg", [False, True], ids=["plain", "segments"])
@pytest.mark.parametrize("impl,platform", [("triton", "cuda"), ("mosaic_tpu", "tpu")])
def test_kernels_lower(impl, platform, with_seg):
    shapes = [(1, 128, 2, 64), (1, 128, 2, 64), (1, 128, 4, 64), (1, 128, 4)]
    args = [jax.ShapeDtypeStruct(s, BF16) for s in shapes]
    seg = jax.ShapeDtypeStruct((1, 128), jnp.int32) if with_seg else None

    def fwd_bwd(q, k, v, g, segment_ids):
        def loss(q, k, v, g):
            o, s = simple_gla(q, k, v, g, impl=impl, output_final_state=True,
                              segment_ids=segment_ids)
            return jnp.sum(o.astype(F32) ** 2) + jnp.sum(s)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, g)

    with jax.sharding.use_abstract_mesh(_TARGET_MESH[platform]):
        traced = jax.jit(fwd_bwd).trace(*args, seg)
        text = traced.lower(lowering_platforms=(platform,)).as_text()
    target = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    assert text.count(f"@{target}(") == 3                     # forward, dq pass, dk/dv pass
    for kernel in ("fwd", "dq", "dkdv"):
        assert f"simple_gla_{kernel}" in text, kernel


@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
def test_tpu_vmem_per_block(kind):
    """Bound from the block shapes: default chunk, features up to 256, f32 (the worst case)."""
    limit = 16 * 2 ** 20                                    # TPU v5e default scoped VMEM
    for feat in (128, 256):
        used = sg_tpu.vmem_bytes(kind, k_dim=feat, v_dim=feat, dtype=F32, has_seg=True)
        assert 2 * 64 * feat * 4 < used < limit, (kind, feat, used)


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
