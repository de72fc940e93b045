"""Scale features of the backbone: the partitioning rules, activation sharding on a mesh, remat
policies, scanned layer groups, the "auto" compute dtype."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from layers.common import Constant
from layers.partitioning import ACTIVATION_RULES, PARAM_RULES, constrain, spec_for
from tests import background
from tests.offload import offload
from tests.tolerance import assert_close
from train.sharding import RULES, no_decay_mask, trainable_mask
from zoo import LM, ConfigError, ModelConfig
from zoo.config import layer_period
from zoo.model import cross_entropy, stack_layer_params

HYBRID = ("gdn", "gdn", "gdn", "attn")
# tests/model_sharding_check.py runs beside the suite from collection on (tests/background.py).
SHARDING_CHECK = background.job("model_sharding_check", ["tests/model_sharding_check.py"],
                                timeout=600)
BACKGROUND_JOBS = {"sharding_report": [SHARDING_CHECK]}


def cfg(**kw):
    base = dict(vocab_size=64, d_model=32, num_heads=2, n_layers=8, layer_types=HYBRID * 2,
                impl="auto")
    base.update(kw)
    return ModelConfig.from_dict(base)


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model))


def loss_fn(graphdef):
    def f(params, tokens):
        logits, _ = nnx.merge(graphdef, nnx.State(params))(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:])[0]
    return f


TOKENS = jax.random.randint(jax.random.key(1), (2, 17), 0, 64)


def test_rules_and_specs():
    assert RULES is PARAM_RULES and PARAM_RULES["layers"] is None
    assert PARAM_RULES["embed"] == "fsdp" and ACTIVATION_RULES["embed"] is None
    assert ACTIVATION_RULES["batch"] == ("data", "fsdp") and ACTIVATION_RULES["heads"] == "tensor"
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    # batch over data x fsdp; a dim the tensor axis does not divide (3) stays whole
    assert spec_for(("batch", None, "heads"), (8, 5, 3), ACTIVATION_RULES, mesh) == \
        P(("data", "fsdp"), None, None)
    assert spec_for(("batch", None, "mlp"), (6, 5, 4), ACTIVATION_RULES, mesh) == \
        P(None, None, "tensor")                                             # 6 % 4 != 0
    assert spec_for(("layers", "embed", "heads"), (3, 4, 4), PARAM_RULES, mesh) == \
        P(None, "fsdp", "tensor")
    assert spec_for(("heads", "kv_heads"), (4, 4), PARAM_RULES, mesh) == P("tensor", None)
    x = jnp.ones((4, 3))
    assert constrain(x, ("batch", None)) is x                               # no mesh: no-op


def test_dtype_auto_and_remat_strings():
    assert ModelConfig().dtype == "auto"
    want = "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
    assert cfg().dtype == want
    assert cfg(remat=True).remat == "full" and cfg(remat=False).remat == "none"
    with pytest.raises(ConfigError, match=r"model.remat must be one of \('none', 'save_dots', "
                                          r"'full'\), got 'some'"):
        cfg(remat="some")
    assert layer_period(HYBRID * 2) == 4 and layer_period(("a", "b", "a")) == 3


@offload
@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_save_less_and_agree(scan):
    """Residual bytes shrink none > save_dots > full; loss and grads are the same (remat
    composes with the scan)."""
    out = {}
    for policy in ("none", "save_dots", "full"):
        m = LM(cfg(n_layers=2, layer_types=("attn",) * 2, remat=policy, scan_layers=scan),
               rngs=nnx.Rngs(0))
        assert m.scanned == scan
        graphdef, params = nnx.split(m)
        params = nnx.to_pure_dict(params)
        f = loss_fn(graphdef)
        # the vjp closure's leaves are exactly the residuals saved for the backward pass
        res = jax.eval_shape(lambda p, t: jax.vjp(f, p, t)[1], params, TOKENS)
        nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(res))
        out[policy] = (nbytes, *jax.jit(jax.value_and_grad(f))(params, TOKENS))
    assert out["none"][0] > out["save_dots"][0] > out["full"][0], {k: v[0] for k, v in out.items()}
    for policy in ("save_dots", "full"):
        np.testing.assert_allclose(out[policy][1], out["none"][1], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(out[policy][2]), jax.tree.leaves(out["none"][2])):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


@offload
def test_scanned_equals_looped():
    """Same seed -> the scanned model holds the looped weights stacked; forward and grads match."""
    looped = LM(cfg(), rngs=nnx.Rngs(0))
    scanned = LM(cfg(scan_layers=True), rngs=nnx.Rngs(0))
    assert scanned.scanned and scanned.repeats == 2 and not looped.scanned
    lp = params_of(looped)
    sp = stack_layer_params(lp, period=4)
    assert jax.tree.structure(sp) == jax.tree.structure(params_of(scanned))
    for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(params_of(scanned))):
        np.testing.assert_array_equal(a, b)
    assert scanned.groups.blocks[0].mixer.q_proj.w.get_metadata()["logical_axes"][0] == "layers"
    fl, fs = loss_fn(nnx.graphdef(looped)), loss_fn(nnx.graphdef(scanned))
    loss_l, g_l = jax.jit(jax.value_and_grad(fl))(lp, TOKENS)
    loss_s, g_s = jax.jit(jax.value_and_grad(fs))(sp, TOKENS)
    np.testing.assert_allclose(loss_s, loss_l, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(stack_layer_params(g_l, 4))):
        assert_close(a, b, jnp.float32, "grad")
    assert looped.flops_per_token(16) == scanned.flops_per_token(16)
    assert looped.cache_bytes(16) == scanned.cache_bytes(16)


def test_scanned_cache_decodes_like_the_forward():
    m = LM(cfg(n_layers=4, layer_types=("gdn", "attn") * 2, scan_layers=True), rngs=nnx.Rngs(0))
    full, _ = m(TOKENS)
    cache = m.init_cache(2, 20)
    assert len(cache) == 2 and jax.tree.leaves(cache[1])[0].shape[0] == 2   # [R, ...] per slot
    pre, cache = m(TOKENS[:, :12], cache=cache)
    assert_close(pre, full[:, :12], jnp.float32)
    for t in range(12, 13):
        step, cache = m(TOKENS[:, t:t + 1], cache=cache)
        assert_close(step[:, 0], full[:, t], jnp.float32)


def test_hlo_size_flat_in_depth():
    def size(n):
        m = nnx.eval_shape(lambda: LM(cfg(n_layers=n, layer_types=("gdn", "attn") * (n // 2),
                                          scan_layers=True), rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(m)
        params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                              nnx.to_pure_dict(params))
        return len(jax.jit(jax.grad(loss_fn(graphdef))).lower(params, TOKENS).as_text())
    small, deep = size(4), size(16)
    assert deep < 1.3 * small, (small, deep)


def test_fallbacks_to_the_loop():
    # R = 1 (not periodic) and repeats of different structure (HGRN's layer 0 has no bound)
    assert not LM(cfg(n_layers=3, layer_types=("gdn", "attn", "gdn"), scan_layers=True),
                  rngs=nnx.Rngs(0)).scanned
    m = LM(cfg(n_layers=2, layer_types=("hgrn",) * 2, scan_layers=True), rngs=nnx.Rngs(0))
    assert not m.scanned and len(m.blocks) == 2


@offload
def test_lightning_decays_are_stacked_constants():
    looped = LM(cfg(n_layers=4, layer_types=("lightning",) * 4), rngs=nnx.Rngs(0))
    scanned = LM(cfg(n_layers=4, layer_types=("lightning",) * 4, scan_layers=True),
                 rngs=nnx.Rngs(0))
    decay = scanned.groups.blocks[0].mixer.decay
    assert isinstance(decay, Constant) and not isinstance(decay, nnx.Param)
    want = np.stack([looped.blocks[i].mixer.decay[...] for i in range(4)])   # [R, H]
    np.testing.assert_array_equal(decay[...], want)
    assert len(set(map(tuple, want))) == 4                                   # depth-dependent
    state = nnx.state(scanned)
    train, decay_mask = trainable_mask(state), no_decay_mask(state)
    blk = lambda t: t["groups"]["blocks"][0]["mixer"]
    assert blk(train)["decay"] is False and blk(train)["q_proj"]["w"] is True
    assert blk(decay_mask)["decay"] is False
    graphdef, params = nnx.split(scanned)
    grads = jax.grad(loss_fn(graphdef))(nnx.to_pure_dict(params), TOKENS)
    assert not np.any(blk(grads)["decay"]) and np.any(blk(grads)["q_proj"]["w"])
    a, _ = looped(TOKENS)
    b, _ = scanned(TOKENS)
    assert_close(b, a, jnp.float32)


@offload
def test_layout_change_is_refused_on_resume(tmp_path):
    from tests.train_utils import tiny_config
    from train.checkpoint import CheckpointError
    from train.loop import train_and_evaluate
    c = tiny_config(steps=2)
    c.checkpoint.every = 2
    c.model.update(n_layers=2, layer_types=("gdn", "gdn"))
    train_and_evaluate(c, str(tmp_path))
    c.model.scan_layers = True
    c.train.steps = 2
    with pytest.raises(CheckpointError, match=r"model.scan_layers False -> True.*use a new "
                                              r"--workdir"):
        train_and_evaluate(c, str(tmp_path))


@pytest.fixture
def sharding_report():
    """tests/model_sharding_check.py's JSON line: all-gathers and remat warnings per mesh."""
    rc, out, err = SHARDING_CHECK.wait()
    assert rc == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_activation_sharding_on_meshes(sharding_report):
    """The compiled train step (tests/model_sharding_check.py, 8 simulated devices): on
    (1, 8, 1) no all-gather of a global-batch activation, on (2, 2, 2) no involuntary full
    rematerialization; parameter all-gathers remain (FSDP)."""
    res = sharding_report
    assert res["1x8x1"]["activation"] == [] and res["1x8x1"]["all_gathers"] > 0, res
    assert res["2x2x2"]["remat_warnings"] == 0 and res["2x2x2"]["activation"] == [], res
