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


@pytest.mark.parametrize("window", [None, 3])
def test_layer_prefill_decode_equals_forward_ragged(window):
    m = _layer(window)
    x = jax.random.normal(jax.random.key(1), (2, 12, 32))
    full, _ = m(x)
    lens = jnp.array([7, 4])
    seg = (jnp.arange(8)[None] < lens[:, None]).astype(jnp.int32)
    cache = m.init_cache(2, 16)
    if window:
        assert cache["k"].shape[1] == window, "a sliding-window cache is a ring of w slots"
    y, cache = m(x[:, :8], segment_ids=seg, cache=cache)
    assert_close(y[0, :7], full[0, :7], jnp.float32)
    assert_close(y[1, :4], full[1, :4], jnp.float32)
    for s in range(4):
        xt = jnp.stack([x[0, 7 + s], x[1, 4 + s]])[:, None]
        yt, cache = m(xt, cache=cache)
        assert_close(yt[0, 0], full[0, 7 + s], jnp.float32, name=f"row0 step{s}")
        assert_close(yt[1, 0], full[1, 4 + s], jnp.float32, name=f"row1 step{s}")


def test_layer_packing_equals_separate_sequences():
    """Rotary positions restart per document, and no attention crosses documents."""
    m = _layer(None)
    x = jax.random.normal(jax.random.key(2), (1, 10, 32))
    seg = jnp.array([[1] * 4 + [2] * 5 + [0]])
    packed, _ = m(x, segment_ids=seg)
    a, _ = m(x[:, :4])
    b, _ = m(x[:, 4:9])
    assert_close(packed[:, :4], a, jnp.float32)
    assert_close(packed[:, 4:9], b, jnp.float32)


def test_layer_bf16_close_to_fp32():
    x = jax.random.normal(jax.random.key(4), (2, 9, 32))
    m32, m16 = _layer(3), _layer(3, jnp.bfloat16)
    y32, _ = m32(x)
    y16, _ = m16(x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert_close(y16, y32, jnp.bfloat16)
