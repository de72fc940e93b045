"""The backbone: registry, hybrid patterns, config validation, packing, generation, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.common import CausalConv1d, positions_from_segments
from tests.offload import offload
from tests.tolerance import assert_close
from zoo import LM, ConfigError, ModelConfig, count_params, generate, hybrid_pattern, known_mixers


def tiny_cfg(**kw):
    base = dict(d_model=32, n_layers=2, num_heads=2, window=4)
    base.update(kw)
    return ModelConfig.from_dict(base)


def test_hybrid_pattern():
    assert hybrid_pattern(8, "gdn", 3) == ("gdn", "gdn", "gdn", "attn") * 2
    assert hybrid_pattern(4, "gdn", 0) == ("gdn",) * 4
    assert hybrid_pattern(3, "attn", 3) == ("attn",) * 3
    for n, ratio in ((24, 24), (24, 4), (2, 3)):   # no exact r:1 hybrid of n layers
        with pytest.raises(ConfigError, match=f"model.ratio={ratio} needs model.n_layers to be "
                                              f"a multiple of {ratio + 1}"):
            hybrid_pattern(n, "gdn", ratio)
    assert tiny_cfg(n_layers=4, mixer="swa", ratio=1).layer_types == ("swa", "attn", "swa", "attn")


@pytest.mark.parametrize("fields, message", [
    (dict(layer_types=("attn", "nope")), "unknown mixer 'nope'; known"),
    (dict(mixer="nope"), "model.mixer: unknown mixer"),
    (dict(layer_types=("attn",)), "model.layer_types has 1 entries but model.n_layers is 2"),
    (dict(d_model=30, num_heads=4), r"model.d_model \(30\) must be divisible by model.num_heads"),
    (dict(dtype="float16"), "model.dtype must be one of"),
    (dict(bogus=1), r"unknown field\(s\) \['bogus'\]"),
    (dict(mixer_options={"atn": {"window": 4}}), "model.mixer_options: unknown mixer 'atn'"),
])
def test_bad_model_config(fields, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(**fields)


def test_registry_lists_mixers():
    assert {"attn", "swa"} <= set(known_mixers())


def test_positions_from_segments():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_conv_cache_and_segments():
    conv = CausalConv1d(6, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 9, 6))
    full, _ = conv(x)
    lens = jnp.array([5, 3])
    seg = (jnp.arange(6)[None] < lens[:, None]).astype(jnp.int32)
    y, cache = conv(x[:, :6], segment_ids=seg, cache=conv.init_cache(2))
    assert_close(y[0, :5], full[0, :5], jnp.float32)
    for s in range(3):
        xt = jnp.stack([x[0, 5 + s], x[1, 3 + s]])[:, None]
        yt, cache = conv(xt, cache=cache)
        assert_close(yt[0, 0], full[0, 5 + s], jnp.float32)
        assert_close(yt[1, 0], full[1, 3 + s], jnp.float32)
    packed, _ = conv(x, segment_ids=jnp.array([[1] * 4 + [2] * 5] * 2))
    second, _ = conv(x[:, 4:])
    assert_close(packed[:, 4:], second, jnp.float32)


@offload
def test_lm_packing_equals_separate_sequences():
    m = LM(tiny_cfg(layer_types=("swa", "attn")), rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(1), (1, 11), 0, 256)
    seg = jnp.array([[1] * 6 + [2] * 4 + [0]])
    packed, _ = m(toks, segment_ids=seg)
    a, _ = m(toks[:, :6])
    b, _ = m(toks[:, 6:10])
    assert_close(packed[:, :6], a, jnp.float32)
    assert_close(packed[:, 6:10], b, jnp.float32)


@offload
def test_generate_samples_with_top_k_top_p():
    """(greedy generation == repeated forward passes, for every mixer, is in test_mixers.py)"""
    m = LM(tiny_cfg(layer_types=("swa", "attn")), rngs=nnx.Rngs(0))
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41]]
    sampled = generate(m, prompts, 5, temperature=0.8, top_k=20, top_p=0.9, seed=1)
    assert sampled.shape == (2, 5) and sampled.min() >= 0 and sampled.max() < 256
    assert count_params(m) > 0
    greedy = generate(m, prompts, 5, greedy=True)
    np.testing.assert_array_equal(generate(m, prompts, 5, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(generate(m, prompts, 5, top_p=1e-6, seed=3), greedy)
