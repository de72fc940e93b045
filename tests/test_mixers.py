"""The layer contract for every registered mixer (DESIGN.md §3): prefill + decode equals the full
forward pass for rows of different lengths, packed documents equal separate sequences, and a
2-layer model of the mixer trains with falling loss. The cache and packing cases also run the
options that change a layer's dataflow (attention's short conv)."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from tests.tolerance import assert_close
from zoo import LM, ModelConfig, cross_entropy, get_mixer, hybrid_pattern, known_mixers

D_MODEL, HEADS = 32, 2


def _cfg(layer_types, **kw):
    return ModelConfig.from_dict(dict(d_model=D_MODEL, n_layers=len(layer_types), num_heads=HEADS,
                                      layer_types=tuple(layer_types), window=4, **kw))


def _layer(name, options=None):
    return get_mixer(name)(_cfg((name, name), mixer_options={name: options or {}}), 1,
                           nnx.Rngs(0))


MIXERS = known_mixers()
# Every mixer with its defaults, and options that add state to the cache.
CASES = [(n, {}) for n in MIXERS] + [("attn", {"conv_size": 4}), ("swa", {"conv_size": 4})]
IDS = [n + "".join(f"-{k}{v}" for k, v in o.items()) for n, o in CASES]


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_prefill_then_decode_equals_forward(name, options):
    layer = _layer(name, options)
    x = jax.random.normal(jax.random.key(1), (2, 13, D_MODEL))
    full, _ = layer(x)
    lens = jnp.array([9, 5])
    seg = (jnp.arange(10)[None] < lens[:, None]).astype(jnp.int32)
    y, cache = layer(x[:, :10], segment_ids=seg, cache=layer.init_cache(2, 32))
    assert_close(y[0, :9], full[0, :9], jnp.float32, name=f"{name} prefill row 0")
    assert_close(y[1, :5], full[1, :5], jnp.float32, name=f"{name} prefill row 1")
    for s in range(4):
        xt = jnp.stack([x[0, 9 + s], x[1, 5 + s]])[:, None]
        yt, cache = layer(xt, cache=cache)
        assert_close(yt[0, 0], full[0, 9 + s], jnp.float32, name=f"{name} decode {s} row 0")
        assert_close(yt[1, 0], full[1, 5 + s], jnp.float32, name=f"{name} decode {s} row 1")


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_packing_equals_separate_sequences(name, options):
    layer = _layer(name, options)
    x = jax.random.normal(jax.random.key(2), (1, 12, D_MODEL))
    seg = jnp.array([[1] * 5 + [2] * 6 + [0]])
    packed, _ = layer(x, segment_ids=seg)
    a, _ = layer(x[:, :5])
    b, _ = layer(x[:, 5:11])
    assert_close(packed[:, :5], a, jnp.float32, name=f"{name} doc 1")
    assert_close(packed[:, 5:11], b, jnp.float32, name=f"{name} doc 2")


@pytest.mark.parametrize("name", MIXERS + ("gdn 3:1 hybrid",))
def test_two_layer_model_trains(name):
    """Every mixer in a 2-layer model, and a 4-layer 3:1 GDN/attention hybrid."""
    layer_types = hybrid_pattern(4, "gdn", 3) if name == "gdn 3:1 hybrid" else (name, name)
    model = LM(_cfg(layer_types), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    toks = jnp.sort(jax.random.randint(jax.random.key(0), (4, 25), 0, 16), axis=1)

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            logits, _ = model(toks[:, :-1])
            return cross_entropy(logits, toks[:, 1:])[0]
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(6)]
    assert all(jnp.isfinite(jnp.array(losses))), losses
    assert losses[-1] < losses[0] - 0.3, losses


def test_generation_with_caches_equals_repeated_forward_for_every_mixer():
    """Greedy decoding with caches == argmax of a full forward pass over the growing sequence
    (right-padded to one length, padding masked by segment_ids, so it compiles once)."""
    from zoo import generate
    model = LM(_cfg(MIXERS), rngs=nnx.Rngs(0))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]
    new = 4
    out = generate(model, prompts, new, greedy=True)
    length = max(map(len, prompts)) + new
    forward = nnx.jit(lambda m, toks, seg: m(toks, segment_ids=seg)[0])
    for prompt, row in zip(prompts, out):
        seq = list(prompt)
        for _ in range(new):
            toks = jnp.zeros((1, length), jnp.int32).at[0, :len(seq)].set(jnp.array(seq))
            seg = (jnp.arange(length) < len(seq)).astype(jnp.int32)[None]
            seq.append(int(jnp.argmax(forward(model, toks, seg)[0, len(seq) - 1])))
        assert list(row) == seq[len(prompt):]
