"""Softmax attention: the op's XLA path against the reference, and the layer's cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import Attention
from pallas_kernels.attention import attention
from tests.tolerance import assert_close


def _qkv(b, t, hq, hkv, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, hq, d)).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d)).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d)).astype(dtype)
    return q, k, v


def _naive(q, k, v, seg, window):
    """Loop-based softmax attention in numpy float64 (an independent oracle)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                if seg[bi, i] == 0:
                    continue
                js = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i]
                      and (window is None or i - j < window)]
                s = np.array([q[bi, i, h] @ k[bi, j, h // g] for j in js]) / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, h] = sum(pj * v[bi, j, h // g] for pj, j in zip(p, js))
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("window", [None, 3])
def test_op_matches_naive_and_reference(dtype, window):
    q, k, v = _qkv(2, 11, 4, 2, 8, dtype)
    seg = np.array([[1] * 6 + [2] * 3 + [0] * 2, [1] * 11], np.int32)
    want = _naive(q, k, v, seg, window)
    for impl in ("reference", "xla"):
        got = attention(q, k, v, segment_ids=jnp.asarray(seg), window=window, impl=impl)
        assert got.dtype == dtype
        assert_close(got, want, dtype, name=f"{impl} window={window}")
    assert np.all(np.asarray(got[0, -2:], np.float32) == 0), "padding rows must output 0"
    plain = attention(q, k, v, window=window, impl="xla")
    assert_close(plain, _naive(q, k, v, np.ones((2, 11), np.int32), window), dtype, name="plain")


def test_op_gradients_match_reference():
    q, k, v = _qkv(1, 9, 2, 1, 8, jnp.float32)
    seg = jnp.array([[1] * 5 + [2] * 4])
    ct = jax.random.normal(jax.random.key(3), q.shape)
    grads = {}
    for impl in ("reference", "xla"):
        f = lambda q, k, v: attention(q, k, v, segment_ids=seg, window=4, impl=impl)
        _, vjp = jax.vjp(f, q, k, v)
        grads[impl] = vjp(ct)
    for a, b in zip(grads["xla"], grads["reference"]):
        assert_close(a, b, jnp.float32, kind="grad")


def test_op_bad_input():
    q, k, v = _qkv(1, 4, 3, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        attention(q, k, v)
    q, k, v = _qkv(1, 4, 2, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="k must have shape"):
        attention(q, k[:, :, :, :4], v)
    with pytest.raises(TypeError, match="floating"):
        attention(q.astype(jnp.int32), k, v)
    with pytest.raises(ValueError, match="impl="):
        attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        attention(q, k, v, segment_ids=jnp.ones((1, 5), jnp.int32))


def _layer(window, dtype=jnp.float32):
    return Attention(32, num_heads=4, num_kv_heads=2, window=window, dtype=dtype, rngs=nnx.Rngs(0))


def test_sliding_window_cache_is_a_ring_of_w_slots():
    """(prefill + decode == forward for every mixer is in test_mixers.py)"""
    assert _layer(3).init_cache(2, 16)["k"].shape[1] == 3
    assert _layer(None).init_cache(2, 16)["k"].shape[1] == 16


def test_layer_bf16_close_to_fp32():
    x = jax.random.normal(jax.random.key(4), (2, 9, 32))
    m32, m16 = _layer(3), _layer(3, jnp.bfloat16)
    y32, _ = m32(x)
    y16, _ = m16(x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert_close(y16, y32, jnp.bfloat16)


def test_kv_sinks_are_visible_to_every_real_query():
    q, k, v = _qkv(1, 6, 2, 2, 8, jnp.float32)
    ks, vs = _qkv(1, 2, 2, 2, 8, jnp.float32, seed=5)[1:]
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    kk, vv = jnp.concatenate([ks, k], 1), jnp.concatenate([vs, v], 1)
    kv_pos = jnp.concatenate([jnp.zeros((1, 2), jnp.int32), jnp.arange(6)[None]], 1)
    kv_seg = jnp.concatenate([jnp.ones((1, 2), jnp.int32), seg], 1)
    args = dict(segment_ids=seg, kv_segment_ids=kv_seg, q_positions=jnp.arange(6)[None],
                kv_positions=kv_pos, window=2, kv_sinks=2)
    got = attention(q, kk, vv, impl="xla", **args)
    assert_close(got, attention(q, kk, vv, impl="reference", **args), jnp.float32)
    # Query 4 (document 2, window 2) sees the two sinks and keys 3, 4 only.
    logits = jnp.einsum("hd,khd->hk", q[0, 4], jnp.concatenate([ks[0], k[0, 3:5]])) / 8 ** 0.5
    want = jnp.einsum("hk,khd->hd", jax.nn.softmax(logits, -1), jnp.concatenate([vs[0], v[0, 3:5]]))
    assert_close(got[0, 4], want, jnp.float32)
    assert np.all(np.asarray(got[0, 5]) == 0), "padding queries see no sink"


def test_conv_size_0_is_plain_attention_and_the_conv_only_adds():
    """conv_size = 0 (the default): the parameters, cache and output of plain attention; K > 0
    adds `conv` and nothing else (the projections draw the same initial weights)."""
    x = jax.random.normal(jax.random.key(6), (2, 9, 32))
    plain = Attention(32, num_heads=4, num_kv_heads=2, conv_size=0, rngs=nnx.Rngs(0))
    conv = Attention(32, num_heads=4, num_kv_heads=2, conv_size=4, rngs=nnx.Rngs(0))
    params = lambda m: {"/".join(map(str, p)): v[...] for p, v in
                        nnx.to_flat_state(nnx.state(m, nnx.Param))}
    p0, p4 = params(plain), params(conv)
    assert sorted(p0) == [f"{n}_proj/w" for n in "koqv"]
    assert sorted(p4) == sorted([*p0, "conv/w"])
    for name, w in p0.items():
        np.testing.assert_array_equal(w, p4[name])
    assert set(plain.init_cache(2, 8)) == {"k", "v", "slot_pos", "length"}
    assert conv.init_cache(2, 8)["conv"].shape == (2, 3, 32)
    # Plain: o_proj(attention(RoPE(x W_q), RoPE(x W_k), x W_v)), composed here from the op.
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    q, k, v = plain._project(x, pos)
    want = plain.o_proj(attention(q, k, v, impl="reference").reshape(2, 9, -1))
    assert_close(plain(x)[0], want, jnp.float32)
    # With the conv: plain attention (same projections) of x + conv(x).
    assert_close(conv(x)[0], plain(x + conv.conv(x)[0])[0], jnp.float32)


def test_conv_size_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="conv_size"):
        Attention(32, num_heads=4, conv_size=-1, rngs=nnx.Rngs(0))
