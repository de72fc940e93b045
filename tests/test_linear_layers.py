"""Mixer-specific math: Lightning's decay rules, Hedgehog's feature map, normalisation and
distillation, GatedDeltaNet's and Mamba-2's gates and weight-decay tags."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from layers.attention import Attention
from layers.gated_deltanet import GatedDeltaNet
from layers.hedgehog import Hedgehog
from layers.lightning import alibi_slopes, lightning_decay
from layers.mamba import Mamba2
from tests.tolerance import assert_close
from train.sharding import no_decay_mask


def test_alibi_slopes():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    # 6 heads: the 4-head slopes, then every other slope of the 8-head set.
    np.testing.assert_allclose(alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_lightning_decay_rules():
    first = lightning_decay(4, 0, 5)
    np.testing.assert_allclose(first, -np.array(alibi_slopes(4)) * (1 + 1e-5), rtol=1e-6)
    last = lightning_decay(4, 4, 5)
    np.testing.assert_allclose(last, -np.array(alibi_slopes(4)) * 1e-5, rtol=1e-5)
    np.testing.assert_allclose(lightning_decay(4, 0, 1), first, rtol=1e-6)  # L = 1: ratio 0
    np.testing.assert_allclose(lightning_decay(4, 1, 4, "fla"), -(8 * np.arange(4) / 4) * 0.75)


def test_hedgehog_matches_quadratic_form():
    layer = Hedgehog(16, num_heads=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 7, 16))
    y, _ = layer(x)
    q = layer.q_proj(x).reshape(1, 7, 2, 8)
    k = layer.k_proj(x).reshape(1, 7, 2, 8)
    v = layer.v_proj(x).reshape(1, 7, 2, 8)
    phi = lambda u: jnp.concatenate([jax.nn.softmax(u, -1), jax.nn.softmax(-u, -1)], -1)
    a = jnp.einsum("bqhf,bkhf->bhqk", phi(q), phi(k)) * jnp.tril(jnp.ones((7, 7)))
    a = a / a.sum(-1, keepdims=True)
    o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(1, 7, 16)
    assert_close(y, layer.o_proj(o), jnp.float32)


def test_hedgehog_distillation_from_softmax_attention():
    attn = Attention(16, num_heads=2, rngs=nnx.Rngs(0))
    layer = Hedgehog.from_attention(attn, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(layer.q_proj.w[...], attn.q_proj.w[...])
    x = jax.random.normal(jax.random.key(0), (2, 12, 16))
    opt = nnx.Optimizer(layer, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(layer, opt):
        loss, grads = nnx.value_and_grad(lambda m: m.distillation_loss(x))(layer)
        opt.update(layer, grads)
        return loss

    losses = [float(step(layer, opt)) for _ in range(15)]
    assert losses[-1] < losses[0], losses


def test_gdn_and_mamba_gates_and_no_decay_tags():
    gdn = GatedDeltaNet(16, num_heads=2, rngs=nnx.Rngs(0))
    g, beta = gdn._gates(jax.random.normal(jax.random.key(0), (1, 5, 16)))
    assert bool(jnp.all(g <= 0)) and bool(jnp.all((beta > 0) & (beta < 1)))
    decay = no_decay_mask(nnx.state(gdn, nnx.Param))
    assert decay["A_log"] is False and decay["dt_bias"] is False and decay["q_proj"]["w"] is True
    mamba = Mamba2(16, num_heads=2, d_state=8, rngs=nnx.Rngs(0))
    decay = no_decay_mask(nnx.state(mamba, nnx.Param))
    assert not (decay["A_log"] or decay["dt_bias"] or decay["D"]) and decay["x_proj"]["w"] and decay["B_proj"]["w"]
