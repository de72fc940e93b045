"""Registrations of the built-in mixers: how the model's config becomes each layer's arguments."""

from __future__ import annotations

import inspect

import jax.numpy as jnp

from layers.attention import Attention
from zoo.registry import register_mixer


def _keywords(*classes) -> set[str]:
    """The keyword arguments the classes' constructors take (a layer that forwards **kwargs to
    its core lists the core as a second class)."""
    out = set()
    for cls in classes:
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                out.add(p.name)
    return out - {"self", "d_model", "rngs"}


def _build(cls, cfg, name: str, rngs, *, core=(), defaults=None, **fixed):
    """cls(d_model, num_heads=, impl=, dtype=, **fixed, **defaults overridden by
    model.mixer_options[name]); the model fields passed here (num_heads, impl, dtype and
    ``fixed``) cannot be overridden, and an unknown option is a ConfigError listing the allowed
    ones."""
    fixed = dict(num_heads=cfg.num_heads, impl=cfg.impl, dtype=jnp.dtype(cfg.dtype), **fixed)
    allowed = _keywords(cls, *core) - set(fixed)
    options = {**(defaults or {}), **cfg.options(name, allowed)}
    return cls(cfg.d_model, rngs=rngs, **fixed, **options)


@register_mixer("attn")
def _attention(cfg, layer_idx, rngs):
    return _build(Attention, cfg, "attn", rngs, num_kv_heads=cfg.num_kv_heads,
                  head_dim=cfg.head_dim, rope_theta=cfg.rope_theta)


@register_mixer("swa")
def _sliding_window_attention(cfg, layer_idx, rngs):
    return _build(Attention, cfg, "swa", rngs, num_kv_heads=cfg.num_kv_heads,
                  head_dim=cfg.head_dim, window=cfg.window, rope_theta=cfg.rope_theta)


@register_mixer("gdn")
def _gated_deltanet(cfg, layer_idx, rngs):
    from layers.gated_deltanet import GatedDeltaNet
    return _build(GatedDeltaNet, cfg, "gdn", rngs)


@register_mixer("lightning")
def _lightning(cfg, layer_idx, rngs):
    from layers.lightning import Lightning
    return _build(Lightning, cfg, "lightning", rngs, layer_idx=layer_idx, n_layers=cfg.n_layers)


@register_mixer("hedgehog")
def _hedgehog(cfg, layer_idx, rngs):
    from layers.hedgehog import Hedgehog
    return _build(Hedgehog, cfg, "hedgehog", rngs)


@register_mixer("mamba2")
def _mamba2(cfg, layer_idx, rngs):
    from layers.mamba import Mamba2
    return _build(Mamba2, cfg, "mamba2", rngs, defaults={"d_state": min(64, cfg.d_model // 2)})


@register_mixer("titans")
def _titans(cfg, layer_idx, rngs):
    from layers.titans import NeuralMemory, Titans
    return _build(Titans, cfg, "titans", rngs, core=(NeuralMemory,), head_dim=cfg.head_dim)


@register_mixer("titans_mag")
def _titans_mag(cfg, layer_idx, rngs):
    from layers.titans import NeuralMemory
    from layers.titans_variants import TitansMAG
    return _build(TitansMAG, cfg, "titans_mag", rngs, core=(NeuralMemory,),
                  defaults={"window": cfg.window}, head_dim=cfg.head_dim,
                  rope_theta=cfg.rope_theta)


@register_mixer("titans_mac")
def _titans_mac(cfg, layer_idx, rngs):
    from layers.titans import NeuralMemory
    from layers.titans_variants import TitansMAC
    return _build(TitansMAC, cfg, "titans_mac", rngs, core=(NeuralMemory,),
                  defaults={"segment_len": cfg.window}, head_dim=cfg.head_dim,
                  rope_theta=cfg.rope_theta)
