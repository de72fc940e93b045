"""The layer contract for every registered mixer: prefill + decode equals the full
forward pass for rows of different lengths, packed documents equal separate sequences, a 2-layer
model of the mixer trains with falling loss, and no projection's output is cut apart into
streams or joined with another's (`layers/common.py`, rule 1). The cache and packing cases also
run the options that change a layer's dataflow (attention's short conv)."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.extend import core as jcore
from jax.tree_util import DictKey

from layers.common import Linear
from tests.offload import offload
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


@offload
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


@offload
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


@offload
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


@offload
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


# -- rule 1: projections are never sliced apart ------------------------------------------------

_CUTS = ("slice", "split", "dynamic_slice", "gather")


def _walk(jaxpr, weights, projected, found):
    """Follow every `Linear`'s output through the jaxpr until it is reshaped (into heads).

    weights: var -> Linear path for its weight (or a cast of it); projected: var -> Linear path
    for its output, carried through every op that keeps the shape (casts, bias, activations,
    masks, the short conv, which slices and joins only along time). A cut of the last (feature)
    axis, or a join along it, before the reshape is what the rule forbids: appended to `found`
    as (primitive, path). Jitted calls (`pjit`) are followed inside."""
    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        ins = [v for v in eqn.invars if isinstance(v, jcore.Var)]
        if prim == "convert_element_type" and ins[0] in weights:
            weights[eqn.outvars[0]] = weights[ins[0]]
            continue
        if prim == "dot_general" and any(v in weights for v in ins):
            projected[eqn.outvars[0]] = next(weights[v] for v in ins if v in weights)
            continue
        if prim in ("pjit", "jit"):
            inner = eqn.params["jaxpr"].jaxpr
            pairs = [(v, iv) for v, iv in zip(eqn.invars, inner.invars) if isinstance(v, jcore.Var)]
            w2 = {iv: weights[v] for v, iv in pairs if v in weights}
            p2 = {iv: projected[v] for v, iv in pairs if v in projected}
            _walk(inner, w2, p2, found)
            projected.update({ov: p2[iv] for ov, iv in zip(eqn.outvars, inner.outvars)
                              if isinstance(iv, jcore.Var) and iv in p2})
            continue
        src = [v for v in ins if v in projected]
        if not src or prim == "reshape":  # a reshape forms heads: what follows is per head
            continue
        path, shape = projected[src[0]], src[0].aval.shape
        same_rank = [o for o in eqn.outvars if len(o.aval.shape) == len(shape)]
        if prim in _CUTS and any(o.aval.shape[-1] < shape[-1] for o in same_rank):
            found.append((prim, path))
        elif prim == "concatenate" and eqn.params["dimension"] == len(shape) - 1:
            found.append((prim, path))
        else:
            keep = same_rank if prim in _CUTS + ("concatenate",) else [
                o for o in eqn.outvars if o.aval.shape == shape]
            projected.update({o: path for o in keep})


def split_projections(layer, *args, **kwargs) -> list:
    """[(primitive, Linear path)] where `layer(*args, **kwargs)` cuts a projection's output at a
    feature offset or joins it with another along features (empty when the rule holds). Traced
    only (`jax.make_jaxpr`), nothing runs."""
    linears = {tuple(str(k) for k in path) for path, node in nnx.iter_graph(layer)
               if isinstance(node, Linear)}
    graphdef, state = nnx.split(layer)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [tuple(k.key for k in path if isinstance(k, DictKey)) for path, _ in flat]

    def call(leaves, args):
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))(*args, **kwargs)

    jaxpr = jax.make_jaxpr(call)([leaf for _, leaf in flat], args).jaxpr
    weights = {jaxpr.invars[i]: "/".join(n[:-1]) for i, n in enumerate(names)
               if n[-1] == "w" and n[:-1] in linears}
    found = []
    _walk(jaxpr, weights, {}, found)
    return sorted(set(found))


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_projections_are_not_split(name, options):
    """Sequence form with packed documents and padding, and the single-token cached step."""
    layer = _layer(name, options)
    x = jnp.ones((2, 6, D_MODEL))
    seg = jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]])
    assert split_projections(layer, x, segment_ids=seg) == [], name
    assert split_projections(layer, x[:, :1], cache=layer.init_cache(2, 8)) == [], name


class _Fused(nnx.Module):
    """What rule 1 forbids: one [q | k] projection sliced apart (``cut``), or two projections
    joined along features and convolved as one stream (``join``)."""

    def __init__(self, d, *, mode, rngs):
        self.mode = mode
        self.qk = Linear(d, 2 * d, rngs=rngs)
        self.v = Linear(d, d, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        if self.mode == "cut":
            qk = jax.nn.silu(self.qk(x))
            q, k = qk[..., :d], qk[..., d:]
        else:
            q, k = jnp.split(self.qk(x).reshape(b, t, 2, d), 2, axis=2)  # whole "heads": allowed
            joined = jnp.concatenate([self.v(x), q[:, :, 0]], axis=-1)
            k = k[:, :, 0] + joined[..., :d]
        return (q * k).reshape(b, t, -1)


def test_split_projection_check_finds_fused_projections():
    x = jnp.ones((1, 3, 8))
    assert split_projections(_Fused(8, mode="cut", rngs=nnx.Rngs(0)), x) == [("slice", "qk")]
    assert split_projections(_Fused(8, mode="join", rngs=nnx.Rngs(0)), x) == [
        ("concatenate", "v")]
