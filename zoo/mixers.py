"""Registrations of the built-in mixers: how the model's config becomes each layer's arguments."""

from __future__ import annotations

import jax.numpy as jnp

from layers.attention import Attention
from zoo.registry import register_mixer


def _dtype(cfg):
    return jnp.dtype(cfg.dtype)


@register_mixer("attn")
def _attention(cfg, layer_idx, rngs):
    return Attention(cfg.d_model, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, impl=cfg.impl,
                     dtype=_dtype(cfg), rngs=rngs, **cfg.options("attn"))


@register_mixer("swa")
def _sliding_window_attention(cfg, layer_idx, rngs):
    return Attention(cfg.d_model, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, window=cfg.window, rope_theta=cfg.rope_theta,
                     impl=cfg.impl, dtype=_dtype(cfg), rngs=rngs, **cfg.options("swa"))


@register_mixer("gdn")
def _gated_deltanet(cfg, layer_idx, rngs):
    from layers.gated_deltanet import GatedDeltaNet
    return GatedDeltaNet(cfg.d_model, num_heads=cfg.num_heads, impl=cfg.impl, dtype=_dtype(cfg),
                         rngs=rngs, **cfg.options("gdn"))


@register_mixer("lightning")
def _lightning(cfg, layer_idx, rngs):
    from layers.lightning import Lightning
    return Lightning(cfg.d_model, num_heads=cfg.num_heads, layer_idx=layer_idx,
                     n_layers=cfg.n_layers, impl=cfg.impl, dtype=_dtype(cfg), rngs=rngs,
                     **cfg.options("lightning"))


@register_mixer("hedgehog")
def _hedgehog(cfg, layer_idx, rngs):
    from layers.hedgehog import Hedgehog
    return Hedgehog(cfg.d_model, num_heads=cfg.num_heads, impl=cfg.impl, dtype=_dtype(cfg),
                    rngs=rngs, **cfg.options("hedgehog"))


@register_mixer("mamba2")
def _mamba2(cfg, layer_idx, rngs):
    from layers.mamba import Mamba2
    options = {"d_state": min(64, cfg.d_model // 2), **cfg.options("mamba2")}
    return Mamba2(cfg.d_model, num_heads=cfg.num_heads, impl=cfg.impl, dtype=_dtype(cfg),
                  rngs=rngs, **options)


@register_mixer("titans")
def _titans(cfg, layer_idx, rngs):
    from layers.titans import Titans
    return Titans(cfg.d_model, num_heads=cfg.num_heads, head_dim=cfg.head_dim, impl=cfg.impl,
                  dtype=_dtype(cfg), rngs=rngs, **cfg.options("titans"))


@register_mixer("titans_mag")
def _titans_mag(cfg, layer_idx, rngs):
    from layers.titans_variants import TitansMAG
    options = {"window": cfg.window, **cfg.options("titans_mag")}
    return TitansMAG(cfg.d_model, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                     rope_theta=cfg.rope_theta, impl=cfg.impl, dtype=_dtype(cfg), rngs=rngs,
                     **options)


@register_mixer("titans_mac")
def _titans_mac(cfg, layer_idx, rngs):
    from layers.titans_variants import TitansMAC
    options = {"segment_len": cfg.window, **cfg.options("titans_mac")}
    return TitansMAC(cfg.d_model, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                     rope_theta=cfg.rope_theta, impl=cfg.impl, dtype=_dtype(cfg), rngs=rngs,
                     **options)
