"""Every mixer reports its cost: forward FLOPs per token at a sequence length and
decode cache bytes per sequence at a context length, and the LM sums them.

Parametrised over `known_mixers()`, so a new mixer is covered for free: its cache_bytes must equal
the bytes its own init_cache allocates, and its costs must grow with the context the way its
family does (GROWTH below; a recurrent state, "constant", unless listed)."""

import functools
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from layers.attention import Attention
from layers.common import mean_causal_keys
from layers.gated_deltanet import GatedDeltaNet
from zoo import LM, ModelConfig, get_mixer, known_mixers

D_MODEL, HEADS, WINDOW = 32, 2, 4

# How cost grows with the context: "full" linearly without bound, "window" saturates at WINDOW
# (cache) or approaches a limit (FLOPs); a mixer not listed has a fixed-size state ("constant").
GROWTH = {"attn": "full", "swa": "window", "titans_mag": "window", "titans_mac": "window"}

CASES = [(n, {}) for n in known_mixers()] + [("attn", {"conv_size": 4}), ("swa", {"conv_size": 4})]
IDS = [n + "".join(f"-{k}{v}" for k, v in o.items()) for n, o in CASES]


def _cfg(layer_types, options=None, **kw):
    return ModelConfig.from_dict(dict(
        d_model=D_MODEL, n_layers=len(layer_types), num_heads=HEADS, window=WINDOW,
        layer_types=tuple(layer_types), mixer_options=options or {}, **kw))


@functools.lru_cache(maxsize=None)
def _built(name, options):
    return get_mixer(name)(_cfg((name, name), {name: dict(options)}), 1, nnx.Rngs(0))


def _layer(name, options):
    """Built once per case (construction runs eagerly and dominates these tests)."""
    return _built(name, tuple(sorted(options.items())))


def _cache_nbytes(init_cache, *args) -> int:
    """Bytes of the leaves `init_cache(*args)` returns, from their shapes (nothing allocated)."""
    leaves = jax.tree.leaves(jax.eval_shape(lambda: init_cache(*args)))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_cache_bytes_equal_init_cache_nbytes(name, options):
    """Exact, bookkeeping (positions, lengths) included; below and above the window."""
    layer = _layer(name, options)
    for context in (3, 37):
        for dtype in (jnp.bfloat16, jnp.float32):
            want = _cache_nbytes(layer.init_cache, 1, context, dtype)
            assert layer.cache_bytes(context, dtype) == want, (name, context, dtype)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_cost_growth_with_context(name, options):
    layer = _layer(name, options)
    growth = GROWTH.get(name, "constant")
    cache = {n: layer.cache_bytes(n) for n in (1, WINDOW, 64, 128, 4096)}
    flops = {n: layer.flops_per_token(n) for n in (1, WINDOW, 64, 128, 4096, 1 << 20)}
    assert all(f > 0 for f in flops.values())
    if growth == "full":
        # k and v of every token: 2·H_kv·D·itemsize(bf16) + 4 (slot_pos) bytes per token.
        per_token = 2 * layer.num_kv_heads * layer.head_dim * 2 + 4
        assert cache[128] - cache[64] == 64 * per_token
        assert cache[4096] - cache[128] == (4096 - 128) * per_token
        # q·k and p·v over (T + 1)/2 keys: 4·H·D·(T + 1)/2, slope 2·H·D per unit of T.
        slope = 2 * layer.num_heads * layer.head_dim
        assert flops[128] - flops[64] == pytest.approx(64 * slope)
        assert flops[4096] - flops[128] == pytest.approx((4096 - 128) * slope)
    elif growth == "window":
        assert cache[WINDOW] == cache[64] == cache[4096]
        assert cache[1] <= cache[WINDOW]
        assert flops[1] <= flops[64] <= flops[1 << 20] <= flops[64] * 1.01
    else:
        assert len(set(cache.values())) == 1, cache
        assert len(set(flops.values())) == 1, flops


def test_mean_causal_keys_is_the_mean_of_min_t_w():
    for t in (1, 5, 16, 37):
        for w in (None, 1, 4, 16, 40):
            want = sum(min(i, w or i) for i in range(1, t + 1)) / t
            assert mean_causal_keys(t, w) == pytest.approx(want)


def test_attention_flops_closed_form():
    d, h, t = 64, 4, 128
    hd = d // h
    layer = Attention(d, num_heads=h, rngs=nnx.Rngs(0))
    assert layer.flops_per_token(t) == 4 * 2 * d * d + 4 * h * hd * (t + 1) / 2
    # Grouped-query, sliding window of 16 and the short conv (2·d·K).
    layer = Attention(d, num_heads=h, num_kv_heads=2, window=16, conv_size=4, rngs=nnx.Rngs(0))
    proj = 2 * 2 * d * d + 2 * 2 * d * (2 * hd)
    keys = 16 - 16 * 15 / (2 * t)
    assert layer.flops_per_token(t) == pytest.approx(proj + 2 * d * 4 + 4 * h * hd * keys)
    # Cache: k, v of 16 slots in bf16, slot_pos and length int32, the conv's last 3 inputs.
    assert layer.cache_bytes(t) == 2 * 16 * 2 * hd * 2 + 4 * 16 + 4 + 3 * d * 2


def test_gated_deltanet_flops_closed_form():
    d, h = 64, 4
    k = d // h
    layer = GatedDeltaNet(d, num_heads=h, rngs=nnx.Rngs(0))
    proj = 2 * d * 3 * d + 2 * d * 2 * h + 2 * d * d + 2 * d * d  # q k v, a β, gate, o
    conv = 2 * 3 * d * 4
    assert layer.flops_per_token(128) == proj + conv + 7 * h * k * k
    assert layer.cache_bytes(128) == 4 * h * k * k + 3 * 3 * d * 2


def test_lm_costs_sum_the_blocks_mlp_and_head():
    cfg = _cfg(("attn", "gdn", "swa"), vocab_size=96, d_ff=64)
    model = LM(cfg, rngs=nnx.Rngs(0))
    t, d = 128, cfg.d_model
    mixers = sum(blk.mixer.flops_per_token(t) for blk in model.blocks)
    want = mixers + 3 * (3 * 2 * d * 64) + 2 * d * 96
    assert model.flops_per_token(t) == pytest.approx(want)
    assert model.train_flops_per_token(t) == pytest.approx(3 * want)
    # All-attention: the whole model in closed form (H = 2 heads of D = 16).
    model = LM(_cfg(("attn",) * 2, vocab_size=96, d_ff=64), rngs=nnx.Rngs(0))
    attn = 4 * 2 * d * d + 4 * HEADS * (d // HEADS) * (t + 1) / 2
    assert model.flops_per_token(t) == pytest.approx(2 * (attn + 6 * d * 64) + 2 * d * 96)
    for dtype in (jnp.bfloat16, jnp.float32):
        assert model.cache_bytes(40, dtype) == _cache_nbytes(model.init_cache, 1, 40, dtype)
