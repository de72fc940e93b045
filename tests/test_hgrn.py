"""hgrn: the chunked scan against the token-level reference, plus the HGRN layer.

The shared OpSuite is written for q/k/v ops with a [B, HV, K, V] state; hgrn (x, g [B, T, D],
state [B, D]) has its own compact file in the same spirit. One combined case per dtype (odd T
over several chunks, segment_ids with a reset inside a chunk and trailing padding, initial_state):
output, final state and the VJP of x, g and initial_state with random cotangents. Then packing ==
separate sequences, step == reference, strong decays (g down to −100) at T = 4096, chunk sizes
that do not divide T, argument errors, and the layer's math (lower bound by depth, an explicit
token loop).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

from layers.hgrn import HGRN
from pallas_kernels.hgrn import hgrn, hgrn_step
from pallas_kernels.hgrn.reference import hgrn_reference
from tests.op_suite import segments
from tests.tolerance import assert_close

F32, BF16 = jnp.float32, jnp.bfloat16
CHUNK = 4           # several levels of the chunk recursion at T = 70
# Jitted once per signature: eagerly, every primitive of the scans would compile on its own.
run = jax.jit(hgrn, static_argnames=("output_final_state", "impl", "chunk_size"))
reference = jax.jit(hgrn_reference, static_argnames=("output_final_state",))


def make_inputs(seed, B, T, D, dtype=F32, g_min=None):
    """x ~ N(0, 1), g = log sigmoid(z + 1) (forget gates ~0.7) or uniform in [g_min, 0];
    initial state ~ N(0, 1) float32. NumPy's generator: jax.random would compile per shape."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D))
    if g_min is None:
        g = -np.logaddexp(0.0, -(rng.standard_normal((B, T, D)) + 1.0))   # log sigmoid
    else:
        g = rng.uniform(g_min, 0.0, (B, T, D))
    s0 = rng.standard_normal((B, D))
    return jnp.asarray(x, dtype), jnp.asarray(g, dtype), jnp.asarray(s0, F32)


# One combined odd-size case per dtype: resets at t = 21 and 40 (inside chunks of 16), padding.
CASES = {
    "float32": (dict(B=2, T=70, D=24), segments(70, [(1, 21), (2, 19), (3, 25)], [(4, 70)])),
    "bfloat16": (dict(B=2, T=37, D=12), segments(37, [(1, 20), (2, 14)], [(1, 37)])),
}


def _vjp(impl, x, g, s0, seg, chunk_size=CHUNK):
    """Outputs and the VJP of x, g and initial_state for fixed random cotangents."""
    rng = np.random.default_rng(7)
    do = jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    dfinal = jnp.asarray(rng.standard_normal(s0.shape), F32)
    return _vjp_jit(impl, x, g, s0, seg, do, dfinal, chunk_size)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _vjp_jit(impl, x, g, s0, seg, do, dfinal, chunk_size):
    kw = {} if impl == "reference" else {"chunk_size": chunk_size}

    def f(x, g, s0):
        return hgrn(x, g, initial_state=s0, output_final_state=True, segment_ids=seg, impl=impl,
                    **kw)
    (o, final), pull = jax.vjp(f, x, g, s0)
    return o, final, pull((do, dfinal))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_chunked_matches_reference(dtype):
    shape, seg = CASES[jnp.dtype(dtype).name]
    x, g, s0 = make_inputs(0, **shape, dtype=dtype)
    o, final, grads = _vjp("chunked", x, g, s0, seg)
    o_ref, final_ref, grads_ref = _vjp("reference", x, g, s0, seg)
    assert o.dtype == dtype and final.dtype == F32
    assert_close(o, o_ref, dtype, name="o")
    assert_close(final, final_ref, dtype, name="final_state")
    for name, got, want in zip(("dx", "dg", "dinitial_state"), grads, grads_ref):
        assert got.dtype == want.dtype, name
        assert_close(got, want, dtype, kind="grad", name=name)
    # Padding outputs exactly 0; its x and g receive no gradient.
    pad = np.asarray(seg == 0)
    assert np.all(np.asarray(o, np.float32)[pad] == 0)
    assert np.all(np.asarray(grads[0], np.float32)[pad] == 0)
    assert np.all(np.asarray(grads[1], np.float32)[pad] == 0)


def test_reference_is_the_recurrence():
    """The specification itself, against a NumPy loop (reset, padding, initial state)."""
    x, g, s0 = make_inputs(1, B=1, T=9, D=3)
    seg = segments(9, [(1, 4), (2, 3)])
    o, final = hgrn_reference(x, g, initial_state=s0, output_final_state=True, segment_ids=seg)
    xs, a, h = np.asarray(x[0]), np.exp(np.asarray(g[0])), np.asarray(s0[0])
    want = np.zeros((9, 3), np.float32)
    for t in range(7):
        h = (0.0 if t == 4 else a[t] * h) + xs[t]
        want[t] = h
    np.testing.assert_allclose(o[0], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final[0], h, rtol=1e-6, atol=1e-6)


def test_packing_equals_separate_sequences():
    x, g, s0 = make_inputs(2, B=1, T=50, D=8)
    seg = segments(50, [(1, 17), (2, 30)])
    o, final = run(x, g, initial_state=s0, output_final_state=True, segment_ids=seg,
                   chunk_size=CHUNK)
    o1, _ = run(x[:, :17], g[:, :17], initial_state=s0, chunk_size=CHUNK)
    o2, final2 = run(x[:, 17:47], g[:, 17:47], output_final_state=True, chunk_size=CHUNK)
    assert_close(o[:, :17], o1, F32, name="doc 1 (with the initial state)")
    assert_close(o[:, 17:47], o2, F32, name="doc 2")
    assert_close(final, final2, F32, name="final state after the last real token")
    assert np.all(np.asarray(o[:, 47:]) == 0)


def test_step_equals_reference_token_by_token():
    x, g, s0 = make_inputs(3, B=2, T=6, D=5, dtype=BF16)
    o_ref, final_ref = hgrn_reference(x, g, initial_state=s0, output_final_state=True)
    state = s0
    for t in range(6):
        o_t, state = hgrn_step(x[:, t], g[:, t], state)
        assert o_t.dtype == BF16 and state.dtype == F32
        assert_close(o_t, o_ref[:, t], BF16, name=f"step {t}")
    assert_close(state, final_ref, F32, name="state after the steps")


def test_strong_decays_long_sequence():
    """g uniform in [−100, 0] over T = 4096 with resets: forward and VJP stay exact."""
    T = 4096
    x, g, s0 = make_inputs(4, B=1, T=T, D=16, g_min=-100.0)
    seg = segments(T, [(1, 1000), (2, 2500), (3, 500)])
    o, final, grads = _vjp("chunked", x, g, s0, seg, chunk_size=8)
    o_ref, final_ref, grads_ref = _vjp("reference", x, g, s0, seg)
    assert_close(o, o_ref, F32, name="o")
    assert_close(final, final_ref, F32, name="final_state")
    for name, got, want in zip(("dx", "dg", "dinitial_state"), grads, grads_ref):
        assert_close(got, want, F32, kind="grad", name=name)


@pytest.mark.parametrize("chunk_size", [1, 7, 128])
def test_chunk_sizes(chunk_size):
    """Chunks of one token, a chunk that does not divide T, a chunk longer than T."""
    x, g, s0 = make_inputs(5, B=2, T=45, D=6)
    o, final = run(x, g, initial_state=s0, output_final_state=True, chunk_size=chunk_size)
    o_ref, final_ref = reference(x, g, initial_state=s0, output_final_state=True)
    assert_close(o, o_ref, F32, name="o")
    assert_close(final, final_ref, F32, name="final_state")


def test_auto_is_chunked_on_cpu_and_no_state_unless_asked():
    x, g, _ = make_inputs(6, B=1, T=20, D=4)
    o_auto, final = run(x, g)
    o_chunked, _ = run(x, g, impl="chunked")
    assert final is None
    np.testing.assert_array_equal(o_auto, o_chunked)


def test_debug_checks_reject_positive_log_decay():
    x, g, _ = make_inputs(7, B=1, T=5, D=3)
    with pytest.raises(checkify.JaxRuntimeError, match="g"):
        hgrn(x, g.at[0, 2, 1].set(0.5), debug_checks=True)


@pytest.mark.parametrize("call,message", [
    (lambda x, g: hgrn(x[0], g[0]), r"x must have shape \[B, T, D\]"),
    (lambda x, g: hgrn(x, g[:, :-1]), r"g must have shape \[2, 5, 3\]"),
    (lambda x, g: hgrn(x, g, initial_state=jnp.zeros((2, 4))), r"initial_state must have shape \[2, 3\]"),
    (lambda x, g: hgrn(x, g, segment_ids=jnp.ones((2, 4), jnp.int32)), r"segment_ids must have shape \[2, 5\]"),
    (lambda x, g: hgrn(x.astype(jnp.int32), g), "x must be a floating dtype"),
    (lambda x, g: hgrn(x, g, impl="triton"), "impl='triton' is not implemented"),
    (lambda x, g: hgrn(x, g, chunk_size=0), "chunk_size must be a positive int"),
    (lambda x, g: hgrn_step(x[:, 0], g[:, 0], jnp.zeros((2, 4))), r"state must have shape \[2, 3\]"),
    (lambda x, g: hgrn_step(x, g, jnp.zeros((2, 3))), r"x must have shape \[B, D\]"),
])
def test_argument_errors(call, message):
    x, g, _ = make_inputs(8, B=2, T=5, D=3)
    with pytest.raises((ValueError, TypeError), match=message):
        call(x, g)


# ---------------------------------------------------------------------------- the layer's math

def test_layer_lower_bound_grows_with_depth():
    """Layer l of L starts with the bound l / L (fla's softmax-cumsum at its initialisation);
    layer 0 has none, so its forget gate is sigmoid(z) alone."""
    layers = [HGRN(16, num_heads=2, layer_idx=l, n_layers=4, rngs=nnx.Rngs(0)) for l in range(4)]
    assert layers[0].lower_bound_logit is None
    for l, layer in enumerate(layers):
        np.testing.assert_allclose(layer.lower_bound(), np.full(16, l / 4), rtol=1e-6, atol=1e-7)
    # The gate really is bounded: with z -> −inf, f -> β, i.e. log f -> log(l / L).
    x = jnp.full((1, 1, 16), 1.0)
    for l, layer in enumerate(layers[1:], start=1):
        layer.f_proj.w[...] = jnp.full((16, 16), -10.0)
        _, log_f = layer.gates(x)
        np.testing.assert_allclose(np.exp(log_f), l / 4 + (1 - l / 4) * jax.nn.sigmoid(-160.0),
                                   rtol=1e-5)


def test_layer_equals_explicit_token_loop():
    """y = (RMSNorm(h) ⊙ SiLU(x W_g)) W_o with h_t = f_t h_{t−1} + SiLU(x_t W_i)(1 − f_t),
    f = β + (1 − β) sigmoid(x W_f), computed token by token in NumPy."""
    d, T = 8, 11
    layer = HGRN(d, num_heads=2, layer_idx=2, n_layers=3, rngs=nnx.Rngs(1))
    layer.lower_bound_logit[...] = jnp.linspace(-2.0, 2.0, d)    # distinct per-channel bounds
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, T, d)), F32)
    y, _ = nnx.jit(lambda m, x: m(x))(layer, x)
    w = lambda p: np.asarray(p.w[...], np.float64)
    xs = np.asarray(x[0], np.float64)
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))
    beta = sig(np.asarray(layer.lower_bound_logit[...], np.float64))
    h = np.zeros(d)
    want = np.zeros((T, d))
    for t in range(T):
        f = beta + (1.0 - beta) * sig(xs[t] @ w(layer.f_proj))
        i = xs[t] @ w(layer.i_proj)
        h = f * h + i * sig(i) * (1.0 - f)
        u = xs[t] @ w(layer.g_proj)
        normed = h / np.sqrt(np.mean(h * h) + 1e-5) * np.asarray(layer.o_norm.scale[...])
        want[t] = (normed * u * sig(u)) @ w(layer.o_proj)
    np.testing.assert_allclose(np.asarray(y[0]), want, rtol=2e-4, atol=2e-5)
