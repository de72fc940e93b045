"""gla: the shared op suite (chunked against the token-level reference — odd T, K != V, grouped
value heads, segment_ids with resets and trailing padding, an initial state — output, final
state and the VJP of q, k, v, g and initial_state with random cotangents; packing; the decode
step; auto; argument errors) plus the op's own cases: strong decays (cumulative log decay of
−100 and far below inside a chunk, next to g = 0 channels) over 4096 tokens, chunk / sub-chunk /
block sizes that do and do not divide each other under mild and strong gates,
``decayed_scores`` on both of its paths, the debug checks and the remaining argument errors.
Jitted functions are cached per static configuration so each compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from pallas_kernels.common.decay import FACTOR_SPREAD, decayed_scores
from pallas_kernels.gla import gla, gla_step
from pallas_kernels.gla.chunked import gla_chunked
from pallas_kernels.gla.reference import gla_reference
from tests.offload import offload
from tests.op_suite import OpSuite
from tests.tolerance import assert_close

F32 = jnp.float32


def _suite_inputs(key, *, B, T, H, HV, K, V, dtype):
    """q, k of norm ~1, v ~ N(0, 1), g = logsigmoid(x) / 4 per key channel, in ``dtype``."""
    ks = jax.random.split(key, 4)
    q, k = (jax.random.normal(kk, (B, T, H, K)) / K ** 0.5 for kk in ks[:2])
    v = jax.random.normal(ks[2], (B, T, HV, V))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, HV, K))) / 4.0
    return tuple(x.astype(dtype) for x in (q, k, v, g))


class TestGla(OpSuite):
    op = staticmethod(gla)
    step = staticmethod(gla_step)
    make_inputs = staticmethod(_suite_inputs)
    impls = ("chunked",)
    impl_kwargs = {"chunked": {"chunk_size": 16}}


# ----------------------------------------------------------------------------------------------
# chunked against the reference, op-specific cases
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _vjp_fn(impl, **static):
    """A jitted (o, final state, grads of q, k, v, g, s0) of ``impl`` for fixed random cotangents,
    one per static configuration (so mild and strong gates of one shape share a compilation)."""
    fn = gla_reference if impl == "reference" else functools.partial(gla_chunked, **static)

    def run(q, k, v, g, s0, seg):
        ko, kf = jax.random.split(jax.random.PRNGKey(9))
        co, cf = jax.random.normal(ko, v.shape), jax.random.normal(kf, s0.shape)

        def loss(q, k, v, g, s0):
            o, final = fn(q, k, v, g, initial_state=s0, segment_ids=seg, output_final_state=True)
            return jnp.sum(o.astype(F32) * co) + jnp.sum(final * cf), (o, final)

        (_, (o, final)), grads = jax.value_and_grad(loss, argnums=range(5), has_aux=True)(
            q, k, v, g, s0)
        return o, final, grads
    return jax.jit(run)


def _assert_matches(got, want, dtype=F32, label=""):
    names = ("o", "final_state", "dq", "dk", "dv", "dg", "dinitial_state")
    for name, a, e in zip(names, got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
        assert_close(a, e, dtype, "out" if name in ("o", "final_state") else "grad",
                     f"{label} {name}")


def _strong_gates(key, B, T, HV, K):
    """Channels 0-1: g = 0 (no decay); 2-3: g ~ −U(2, 4) per token (about −190 over a 64-token
    chunk); 4-5: mild, with a −150 spike every 97 tokens; the rest logsigmoid(x) / 16."""
    k1, k2 = jax.random.split(key)
    g = jax.nn.log_sigmoid(jax.random.normal(k1, (B, T, HV, K))) / 16.0
    g = g.at[..., 0:2].set(0.0)
    g = g.at[..., 2:4].set(-2.0 - 2.0 * jax.random.uniform(k2, (B, T, HV, 2)))
    spikes = (jnp.arange(T) % 97 == 50)[None, :, None, None]
    return g.at[..., 4:6].set(jnp.where(spikes, -150.0, g[..., 4:6]))


@offload
def test_strong_decay_long_sequence():
    """T = 4096, cumulative decays of −100 and far below inside every chunk next to g = 0
    channels: the sub-chunk path of ``decayed_scores`` keeps every value and gradient finite
    and equal to the reference (the factored e^{G}·e^{−G} form would give inf · 0 = NaN)."""
    B, T, H, K, V = 1, 4096, 1, 8, 8
    q, k, v, _ = _suite_inputs(jax.random.PRNGKey(0), B=B, T=T, H=H, HV=H, K=K, V=V, dtype=F32)
    g = _strong_gates(jax.random.PRNGKey(1), B, T, H, K)
    assert float(jnp.min(jnp.sum(g[:, :64], axis=1))) < -100.0
    s0 = 0.5 * jax.random.normal(jax.random.PRNGKey(2), (B, H, K, V))
    want = _vjp_fn("reference")(q, k, v, g, s0, None)
    got = _vjp_fn("chunked")(q, k, v, g, s0, None)
    _assert_matches(got, want, label="strong decay")


_SIZES_T = 101


@functools.lru_cache(maxsize=None)
def _sizes_case(strong):
    """Inputs (mild or strong gates, documents, an initial state) and the reference's VJP."""
    B, T, H, HV, K, V = 2, _SIZES_T, 1, 2, 12, 10
    q, k, v, g = _suite_inputs(jax.random.PRNGKey(3), B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=F32)
    if strong:
        g = _strong_gates(jax.random.PRNGKey(4), B, T, HV, K)
    s0 = 0.5 * jax.random.normal(jax.random.PRNGKey(5), (B, HV, K, V))
    ids = np.ones((B, T), np.int32)
    ids[0, T // 3:] = 2                                        # a reset inside a chunk
    ids[0, T - 7:] = 0                                         # trailing padding
    ids[1, T // 2:] = 3
    args = (q, k, v, g, s0, jnp.asarray(ids))
    return args, _vjp_fn("reference")(*args)


@offload
@pytest.mark.parametrize("chunk,sub,rows", [
    (32, 8, 128),           # blocks of 2 chunks (the last one partly padding)
    (24, 16, 48),           # a sub-chunk that does not divide the chunk; blocks of 1 chunk
])
@pytest.mark.parametrize("strong", [False, True], ids=["mild", "strong"])
def test_chunk_sizes(chunk, sub, rows, strong):
    """Chunk, sub-chunk and block sizes, mild gates (the one-matmul path of decayed_scores) and
    strong ones (its sub-chunk path), T = 101 (no multiple of any chunk), with documents and an
    initial state, against the reference (values and VJPs). The suite above covers a chunk
    equal to its sub-chunk (pairwise scores only)."""
    args, want = _sizes_case(strong)
    got = _vjp_fn("chunked", chunk_size=chunk, sub_chunk=sub, block_rows=rows)(*args)
    _assert_matches(got, want, label=f"C={chunk} s={sub} rows={rows}")
    assert float(jnp.max(jnp.abs(got[0][0, _SIZES_T - 7:]))) == 0.0


# ----------------------------------------------------------------------------------------------
# decayed_scores
# ----------------------------------------------------------------------------------------------
def _pairwise_scores(a, b, G, strict):
    """The definition, pairwise over [C, C, K] (stable: exponents masked to j <= i first)."""
    C = a.shape[-2]
    i = jnp.arange(C)
    keep = ((i[None, :] < i[:, None]) if strict else (i[None, :] <= i[:, None]))[..., None]
    e = jnp.exp(jnp.where(keep, G[..., :, None, :] - G[..., None, :, :], -jnp.inf))
    return jnp.sum(a[..., :, None, :] * b[..., None, :, :] * e, axis=-1)


@functools.lru_cache(maxsize=None)
def _scores_fns(sub, strict):
    """Jitted (value, grads of a, b, G) of decayed_scores and of the pairwise definition."""
    def both(f):
        def run(a, b, G, ct):
            val, vjp = jax.vjp(f, a, b, G)
            return val, vjp(ct)
        return jax.jit(run)
    return (both(lambda a, b, G: decayed_scores(a, b, G, sub_chunk=sub, strict=strict)),
            both(lambda a, b, G: _pairwise_scores(a, b, G, strict)))


@pytest.mark.parametrize("C,sub,strict", [(40, 16, True), (32, 8, False)])
@pytest.mark.parametrize("strength", [0.1, 400.0], ids=["fast", "strong"])
def test_decayed_scores(C, sub, strict, strength):
    """Both paths (spread under / far over FACTOR_SPREAD) equal the pairwise definition, in
    value and in the gradients of a, b and G, and stay finite at cumulative decays of −400."""
    ka, kb, kg = jax.random.split(jax.random.PRNGKey(C), 3)
    a, b = (jax.random.normal(kk, (3, C, 12)) for kk in (ka, kb))
    g = -strength / C * jax.random.uniform(kg, (3, C, 12))
    g = g.at[..., :3].set(0.0)
    G = jnp.cumsum(g, axis=-2)
    spread = float(jnp.max(G.max(-2) - G.min(-2)))
    assert (spread <= FACTOR_SPREAD) == (strength < 1.0)
    ct = jax.random.normal(jax.random.PRNGKey(1), (3, C, C))
    ours, pairwise = _scores_fns(sub, strict)
    got, grads = ours(a, b, G, ct)
    want, wants = pairwise(a, b, G, ct)
    np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.max(jnp.abs(want))), rtol=1e-5)
    for name, x, y in zip(("da", "db", "dG"), grads, wants):
        assert bool(jnp.all(jnp.isfinite(x))), name
        np.testing.assert_allclose(x, y, atol=1e-4 * float(jnp.max(jnp.abs(y))), rtol=1e-4,
                                   err_msg=name)


def test_decayed_scores_rejects_mismatched_shapes():
    a = jnp.zeros((2, 16, 8))
    with pytest.raises(ValueError, match=r"decayed_scores: a, b and G must share one shape"):
        decayed_scores(a, a, a[..., :4])
    with pytest.raises(ValueError, match=r"sub_chunk must be a positive int"):
        decayed_scores(a, a, a, sub_chunk=0)


# ----------------------------------------------------------------------------------------------
# debug checks and argument errors
# ----------------------------------------------------------------------------------------------
def test_debug_checks():
    """g > 0 is caught eagerly (JaxRuntimeError) and under jit through checkify; valid g passes."""
    arrays = _suite_inputs(jax.random.PRNGKey(7), B=1, T=8, H=1, HV=1, K=4, V=4, dtype=F32)
    bad = arrays[:3] + (arrays[3].at[0, 3, 0, 1].set(0.5),)
    gla(*arrays, debug_checks=True, impl="reference")
    with pytest.raises(checkify.JaxRuntimeError, match=r"gla: g \(a log decay\) must be <= 0"):
        gla(*bad, debug_checks=True, impl="reference")
    checked = jax.jit(checkify.checkify(lambda *x: gla(*x, debug_checks=True)[0]))
    err, _ = checked(*bad)
    assert err.get() is not None and "must be <= 0" in err.get()
    assert checked(*arrays)[0].get() is None


def _bad_calls():
    q, k, v, g = _suite_inputs(jax.random.PRNGKey(8), B=2, T=8, H=2, HV=4, K=6, V=5, dtype=F32)
    s0 = jnp.zeros((2, 4, 6, 5))
    qt, kt, vt, gt = q[:, 0], k[:, 0], v[:, 0], g[:, 0]
    return [
        ("g_per_head", lambda: gla(q, k, v, g[..., 0]), r"gla: g must have shape \[2, 8, 4, 6\]"),
        ("g_q_heads", lambda: gla(q, k, v, g[:, :, :2]), r"gla: g must have shape"),
        ("k_shape", lambda: gla(q, k[..., :4], v, g), r"gla: k must have shape \[2, 8, 2, 6\]"),
        ("initial_state", lambda: gla(q, k, v, g, initial_state=s0[..., :4]),
         r"gla: initial_state must have shape \[2, 4, 6, 5\]"),
        ("segment_ids_shape", lambda: gla(q, k, v, g, segment_ids=jnp.ones((2, 7), jnp.int32)),
         r"gla: segment_ids must have shape \[2, 8\]"),
        ("impl", lambda: gla(q, k, v, g, impl="triton"), r"gla: impl='triton' is not implemented"),
        ("step_q_rank", lambda: gla_step(q, kt, vt, gt, s0), r"gla_step: q must have shape"),
        ("step_g", lambda: gla_step(qt, kt, vt, gt[..., 0], s0),
         r"gla_step: g must have shape \[2, 4, 6\]"),
        ("step_heads", lambda: gla_step(qt, kt, vt[:, :3], gt[:, :3], s0[:, :3]),
         r"gla_step: value heads HV=3"),
        ("step_state", lambda: gla_step(qt, kt, vt, gt, s0[:, :, :5]),
         r"gla_step: state must have shape \[2, 4, 6, 5\]"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())),
                         ids=[c[0] for c in _bad_calls()])
def test_argument_errors(case):
    _, call, match = _bad_calls()[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_integer_inputs_rejected():
    q, k, v, g = _suite_inputs(jax.random.PRNGKey(8), B=1, T=4, H=1, HV=1, K=4, V=4, dtype=F32)
    with pytest.raises(TypeError, match=r"gla: g must be a floating dtype"):
        gla(q, k, v, g.astype(jnp.int32))
    with pytest.raises(TypeError, match=r"gla: segment_ids must be an integer array"):
        gla(q, k, v, g, segment_ids=jnp.ones((1, 4), F32))
