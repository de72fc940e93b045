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
