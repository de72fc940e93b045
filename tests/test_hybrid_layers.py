"""Math of the RetNet, DeltaNet, GLA, HGRN-2 and KDA mixers, checked against forms written here.

The layer contract (prefill + decode, packing, training, costs) runs for these mixers in
tests/test_mixers.py and tests/test_layer_costs.py. Here: each layer's output against an explicit
NumPy float64 form of its math (RetNet's quadratic retention, a token-level delta rule, GLA and
HGRN-2 recurrences, KDA with grouped value heads), built from the layer's own projections; the
gates' formulas and ranges; fixed decays and lower bounds by depth; parameter structure (one
projection per quantity, nothing concatenated then split), logical axes and no_decay tags.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.common import rotary_embedding
from layers.deltanet import DeltaNet
from layers.gla import GLA
from layers.hgrn2 import HGRN2
from layers.kda import KDA
from layers.retnet import RetNet, retention_decays
from zoo import ModelConfig, get_mixer, known_mixers
from zoo.registry import mixer_info

D, H, B, T = 16, 2, 2, 9
# The ops' implementations are tested against their references in the op tests; these tests
# check each layer's parametrisation, so they run the reference scan (the cheapest to trace).
IMPL = "reference"


def _x(seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


def _np(a):
    return np.asarray(a, np.float64)


def _rms(o, scale, eps):
    """RMSNorm over the last axis, float64."""
    return o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + eps) * _np(scale)


def _silu(z):
    return z / (1.0 + np.exp(-z))


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _l2(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def _params(layer):
    """{path: (shape, logical_axes, no_decay)} of every parameter."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        meta = var.get_metadata()
        out[".".join(map(str, path))] = (tuple(var.get_value().shape), meta["logical_axes"],
                                         meta["no_decay"])
    return out


def _close(actual, expected, name, tol=2e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, atol=tol, rtol=tol,
                               err_msg=name)


# ----------------------------------------------------------------------------------------------
# RetNet
# ----------------------------------------------------------------------------------------------
def test_retnet_decays_are_fixed_multiscale_constants():
    want = [1 - 2.0 ** -5, 1 - 2.0 ** -6, 1 - 2.0 ** -7, 1 - 2.0 ** -8]
    np.testing.assert_allclose(retention_decays(4), want, rtol=0, atol=1e-15)
    layer = RetNet(D, num_heads=4, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.exp(layer.log_decay), want, rtol=1e-12)
    assert not any("decay" in p for p in _params(layer)), "decays are constants, not parameters"


def test_retnet_equals_quadratic_retention():
    """o_t = K^−1/2 Σ_{s≤t} γ_h^(t−s) (q_t·k_s) v_s, then per-head RMSNorm, swish gate, W_o;
    value heads twice as wide as key heads (expand_v = 2)."""
    layer = RetNet(D, num_heads=H, impl=IMPL, rngs=nnx.Rngs(0))
    kd, vd = D // H, 2 * D // H
    assert (layer.k_dim, layer.v_dim) == (kd, vd)
    x = _x()
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    q = _np(rotary_embedding(layer.q_proj(x).reshape(B, T, H, kd), pos))
    k = _np(rotary_embedding(layer.k_proj(x).reshape(B, T, H, kd), pos))
    v = _np(layer.v_proj(x)).reshape(B, T, H, vd)
    gamma = retention_decays(H)                                        # [H]
    t = np.arange(T)
    decay = np.where(t[:, None] >= t[None], gamma[:, None, None] ** (t[:, None] - t[None]), 0)
    scores = np.einsum("bthk,bshk->bhts", q, k) * kd ** -0.5 * decay  # [B, H, T, S]
    o = np.einsum("bhts,bshv->bthv", scores, v)
    o = _rms(o, layer.o_norm.scale[...], 1e-5).reshape(B, T, -1) * _silu(_np(layer.g_proj(x)))
    want = o @ _np(layer.o_proj.w[...])
    y, _ = layer(x)
    _close(y, want, "retnet vs quadratic retention")
    # Retention with rotary q/k depends on t − s only: shifting every position changes nothing,
    # and the positions passed in are the ones used (reversed positions change the output).
    _close(layer(x, positions=pos + 7)[0], _np(y), "retnet shifted positions")
    assert np.abs(_np(layer(x, positions=pos[:, ::-1])[0]) - _np(y)).max() > 1e-2


# ----------------------------------------------------------------------------------------------
# DeltaNet
# ----------------------------------------------------------------------------------------------
def _delta_rule(q, k, v, beta, g=None):
    """Token loop: S' = Diag(exp g) S; S = S' + k (β (v − S'ᵀ k))ᵀ; o = K^−1/2 Sᵀ q. Shapes
    q, k [B, T, HV, K] (already per value head), v [B, T, HV, V], β [B, T, HV], g [B, T, HV, K]
    or None."""
    b, t, h, kd = q.shape
    s = np.zeros((b, h, kd, v.shape[-1]))
    out = np.zeros(v.shape)
    for i in range(t):
        if g is not None:
            s = np.exp(g[:, i])[..., None] * s
        pred = np.einsum("bhkv,bhk->bhv", s, k[:, i])
        s = s + np.einsum("bhk,bhv->bhkv", k[:, i], beta[:, i][..., None] * (v[:, i] - pred))
        out[:, i] = np.einsum("bhkv,bhk->bhv", s, q[:, i]) * kd ** -0.5
    return out


@pytest.mark.parametrize("use_gate", [False, True])
def test_deltanet_equals_token_level_delta_rule(use_gate):
    layer = DeltaNet(D, num_heads=H, use_gate=use_gate, impl=IMPL, rngs=nnx.Rngs(0))
    x = _x(2)
    kd = D // H
    q = _l2(_np(layer.q_conv(layer.q_proj(x))[0]).reshape(B, T, H, kd))
    k = _l2(_np(layer.k_conv(layer.k_proj(x))[0]).reshape(B, T, H, kd))
    v = _np(layer.v_conv(layer.v_proj(x))[0]).reshape(B, T, H, kd)
    beta = _sigmoid(_np(layer.b_proj(x)))
    o = _rms(_delta_rule(q, k, v, beta), layer.o_norm.scale[...], 1e-5).reshape(B, T, -1)
    if use_gate:
        o = o * _silu(_np(layer.g_proj(x)))
    y, _ = layer(x)
    _close(y, o @ _np(layer.o_proj.w[...]), f"deltanet use_gate={use_gate}")
    assert (layer.g_proj is not None) == use_gate


# ----------------------------------------------------------------------------------------------
# GLA
# ----------------------------------------------------------------------------------------------
def test_gla_gate_is_logsigmoid_over_16_and_output_equals_recurrence():
    layer = GLA(D, num_heads=H, impl=IMPL, rngs=nnx.Rngs(0))
    kd, vd = D // 2 // H, D // H  # expand_k = 0.5, expand_v = 1
    assert (layer.k_dim, layer.v_dim) == (kd, vd)
    x = 3.0 * _x(3)
    z = _np(layer.gk_up(layer.gk_down(x))).reshape(B, T, H, kd)
    g = _np(layer.gate(x))
    np.testing.assert_allclose(g, -np.logaddexp(0, -z) / 16, atol=1e-6)
    # Range: g < 0, and g ≥ −(max(−z, 0) + log 2)/16: the normaliser keeps each step's decay
    # near 1 (exp(g) ≥ 0.958 wherever z ≥ 0).
    assert np.all(g < 0)
    assert np.all(g >= -(np.maximum(-z, 0) + np.log(2)) / 16 - 1e-7)
    assert np.exp(g[z >= 0]).min() >= 2 ** (-1 / 16) - 1e-7
    q = _np(layer.q_proj(x)).reshape(B, T, H, kd)
    k = _np(layer.k_proj(x)).reshape(B, T, H, kd)
    v = _np(layer.v_proj(x)).reshape(B, T, H, vd)
    s, o = np.zeros((B, H, kd, vd)), np.zeros((B, T, H, vd))
    for i in range(T):
        s = np.exp(g[:, i])[..., None] * s + np.einsum("bhk,bhv->bhkv", k[:, i], v[:, i])
        o[:, i] = np.einsum("bhkv,bhk->bhv", s, q[:, i]) * kd ** -0.5
    o = _rms(o, layer.o_norm.scale[...], 1e-5).reshape(B, T, -1) * _silu(_np(layer.r_proj(x)))
    _close(layer(x)[0], o @ _np(layer.o_proj.w[...]), "gla vs recurrence", tol=5e-5)


# ----------------------------------------------------------------------------------------------
# HGRN-2
# ----------------------------------------------------------------------------------------------
def test_hgrn2_lower_bounds_by_depth():
    n_layers = 4
    layers = [HGRN2(D, num_heads=H, layer_idx=i, n_layers=n_layers, expand_ratio=8,
                    rngs=nnx.Rngs(0)) for i in range(n_layers)]
    assert layers[0].lb_logit is None, "layer 0 has no lower-bound parameter"
    bounds = [np.asarray(l.lower_bound()) for l in layers]
    for i, lb in enumerate(bounds):
        assert lb.shape == (D,)
        np.testing.assert_allclose(lb, i / n_layers, atol=1e-6)
    assert all(np.all(b1 > b0) for b0, b1 in zip(bounds, bounds[1:]))
    with pytest.raises(ValueError, match="layer_idx"):
        HGRN2(D, num_heads=H, layer_idx=4, n_layers=4, expand_ratio=8, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("layer_idx", [0, 2])
def test_hgrn2_gates_and_output(layer_idx):
    """f = lb + (1 − lb)σ(z) ∈ (lb, 1), g = log f, k = 1 − f; o through Diag(f), scale E^−1/2."""
    layer = HGRN2(D, num_heads=H, layer_idx=layer_idx, n_layers=3, expand_ratio=4,
                  impl=IMPL, rngs=nnx.Rngs(0))
    n, e = D // 4, 4
    assert (layer.h, layer.e) == (n, e)
    x = 2.0 * _x(4)
    lb = _np(layer.lower_bound())
    f = (lb + (1 - lb) * _sigmoid(_np(layer.f_proj(x)))).reshape(B, T, n, e)
    g, k = map(_np, layer.gates(x))
    np.testing.assert_allclose(np.exp(g), f, atol=1e-6)
    np.testing.assert_allclose(k, 1 - f, atol=1e-6)
    assert np.all(f >= lb.reshape(n, e) - 1e-7) and np.all(f < 1)
    q = _silu(_np(layer.q_proj(x))).reshape(B, T, n, e)
    v = _np(layer.i_proj(x)).reshape(B, T, n, e)
    s, o = np.zeros((B, n, e, e)), np.zeros((B, T, n, e))
    for i in range(T):
        s = f[:, i][..., None] * s + np.einsum("bhk,bhv->bhkv", k[:, i], v[:, i])
        o[:, i] = np.einsum("bhkv,bhk->bhv", s, q[:, i]) * e ** -0.5
    o = _rms(o.reshape(B, T, -1), layer.o_norm.scale[...], 1e-5)
    _close(layer(x)[0], o @ _np(layer.o_proj.w[...]), "hgrn2 vs recurrence", tol=5e-5)


def test_hgrn2_head_width():
    assert HGRN2(D, num_heads=H, layer_idx=0, n_layers=1, expand_ratio=None,
                 rngs=nnx.Rngs(0)).e == D // H
    with pytest.raises(ValueError, match="expand_ratio"):
        HGRN2(D, num_heads=H, layer_idx=0, n_layers=1, expand_ratio=128, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------
# KDA
# ----------------------------------------------------------------------------------------------
def test_kda_gates_and_grouped_output():
    layer = KDA(D, num_heads=H, num_v_heads=2 * H, impl=IMPL, rngs=nnx.Rngs(0))
    hv, kd = 2 * H, D // H
    x = _x(5)
    g, beta = map(_np, layer.gates(x))
    f = _np(layer.f_up(layer.f_down(x))).reshape(B, T, hv, kd)
    a = np.exp(_np(layer.A_log[...]))[:, None]
    want_g = -a * np.logaddexp(0, f + _np(layer.dt_bias[...]))
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(beta, _sigmoid(_np(layer.b_proj(x))), atol=1e-6)
    assert g.shape == (B, T, hv, kd) and np.all(g < 0)
    # Initialisation: A ∈ [1, 16], softplus(dt_bias) = dt ∈ [1e-3, 1e-1] per channel.
    assert np.all((a >= 1) & (a <= 16)) and layer.dt_bias.shape == (hv, kd)
    dt = np.logaddexp(0, _np(layer.dt_bias[...]))
    assert np.all((dt > 1e-3 * 0.999) & (dt < 0.1 * 1.001))
    # Output: delta rule with per-channel decay; value head j reads q/k head j // 2.
    rep = lambda u: np.repeat(u, hv // H, axis=2)
    q = rep(_l2(_np(layer.q_conv(layer.q_proj(x))[0]).reshape(B, T, H, kd)))
    k = rep(_l2(_np(layer.k_conv(layer.k_proj(x))[0]).reshape(B, T, H, kd)))
    v = _np(layer.v_conv(layer.v_proj(x))[0]).reshape(B, T, hv, kd)
    o = _rms(_delta_rule(q, k, v, beta, g), layer.o_norm.scale[...], 1e-5).reshape(B, T, -1)
    o = o * _sigmoid(_np(layer.r_up(layer.r_down(x))))
    _close(layer(x)[0], o @ _np(layer.o_proj.w[...]), "kda vs token-level rule", tol=5e-5)


# ----------------------------------------------------------------------------------------------
# Parameter structure, logical axes, no_decay; registry
# ----------------------------------------------------------------------------------------------
IN, OUT = ("embed", "heads"), ("heads", "embed")
K_, V_ = D // H, D // H  # per-head widths at expand 1


def _structure(name):
    """Every parameter expected: path -> (shape, logical axes, no_decay). Each projection has
    one quantity as its output (q, k, v, gates separately), each conv one projection's channels."""
    if name == "retnet":
        return {"q_proj.w": ((D, D), IN, False), "k_proj.w": ((D, D), IN, False),
                "v_proj.w": ((D, 2 * D), IN, False), "g_proj.w": ((D, 2 * D), IN, False),
                "o_norm.scale": ((2 * D // H,), ("norm",), True),
                "o_proj.w": ((2 * D, D), OUT, False)}
    conv = lambda c: ((4, c), (None, "heads"), False)
    if name == "deltanet":
        return {"q_proj.w": ((D, D), IN, False), "k_proj.w": ((D, D), IN, False),
                "v_proj.w": ((D, D), IN, False), "b_proj.w": ((D, H), IN, False),
                "q_conv.w": conv(D), "k_conv.w": conv(D), "v_conv.w": conv(D),
                "o_norm.scale": ((V_,), ("norm",), True), "o_proj.w": ((D, D), OUT, False)}
    if name == "gla":
        return {"q_proj.w": ((D, D // 2), IN, False), "k_proj.w": ((D, D // 2), IN, False),
                "v_proj.w": ((D, D), IN, False), "r_proj.w": ((D, D), IN, False),
                "gk_down.w": ((D, 16), ("embed", None), False),
                "gk_up.w": ((16, D // 2), (None, "heads"), False),
                "gk_up.b": ((D // 2,), ("heads",), True),
                "o_norm.scale": ((V_,), ("norm",), True), "o_proj.w": ((D, D), OUT, False)}
    if name == "hgrn2":  # layer 1 of 2
        return {"q_proj.w": ((D, D), IN, False), "f_proj.w": ((D, D), IN, False),
                "i_proj.w": ((D, D), IN, False), "lb_logit": ((D,), ("heads",), True),
                "o_norm.scale": ((D,), ("norm",), True), "o_proj.w": ((D, D), OUT, False)}
    if name == "kda":
        return {"q_proj.w": ((D, D), IN, False), "k_proj.w": ((D, D), IN, False),
                "v_proj.w": ((D, D), IN, False), "b_proj.w": ((D, H), IN, False),
                "q_conv.w": conv(D), "k_conv.w": conv(D), "v_conv.w": conv(D),
                "f_down.w": ((D, V_), ("embed", None), False),
                "f_up.w": ((V_, D), (None, "heads"), False),
                "r_down.w": ((D, V_), ("embed", None), False),
                "r_up.w": ((V_, D), (None, "heads"), False), "r_up.b": ((D,), ("heads",), True),
                "A_log": ((H,), ("heads",), True), "dt_bias": ((H, K_), ("heads", None), True),
                "o_norm.scale": ((V_,), ("norm",), True), "o_proj.w": ((D, D), OUT, False)}
    raise KeyError(name)


NAMES = ("retnet", "deltanet", "gla", "hgrn2", "kda")


def _cfg(name, n_layers=2, **kw):
    return ModelConfig.from_dict(dict(d_model=D, n_layers=n_layers, num_heads=H,
                                      layer_types=(name,) * n_layers, **kw))


@pytest.mark.parametrize("name", NAMES)
def test_parameter_structure_axes_and_no_decay(name):
    layer = get_mixer(name)(_cfg(name), 1, nnx.Rngs(0))
    assert _params(layer) == _structure(name)


def test_registry_names_options_and_depth():
    assert set(NAMES) <= set(known_mixers())
    assert mixer_info("retnet").reads == ("rope_theta",)
    opts = mixer_info("hgrn2").options()
    assert "layer_idx" not in opts and "n_layers" not in opts
    assert opts["expand_ratio"].startswith("128 if")
    # expand_ratio by model: 128 where d_model is a multiple, else d_model / num_heads.
    assert get_mixer("hgrn2")(_cfg("hgrn2"), 0, nnx.Rngs(0)).e == D // H
    big = ModelConfig.from_dict(dict(d_model=256, n_layers=3, num_heads=4,
                                     layer_types=("hgrn2",) * 3))
    layers = [get_mixer("hgrn2")(big, i, nnx.Rngs(0)) for i in range(3)]
    assert {(l.h, l.e) for l in layers} == {(2, 128)}
    np.testing.assert_allclose([float(l.lower_bound()[0]) for l in layers], [0, 1 / 3, 2 / 3],
                               atol=1e-6)
    # Options reach the layer; a wrong value is a one-line error naming the option.
    kda = get_mixer("kda")(_cfg("kda", mixer_options={"kda": {"num_v_heads": 4}}), 0, nnx.Rngs(0))
    assert kda.hv == 4
    with pytest.raises(ValueError, match="num_v_heads"):
        get_mixer("kda")(_cfg("kda", mixer_options={"kda": {"num_v_heads": 3}}), 0, nnx.Rngs(0))
