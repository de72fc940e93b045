"""Registrations of the built-in mixers: how the model's config becomes each layer's arguments.

Every registration is one `_register` call: the layer class (imported on first use), the
optional model fields it reads, the arguments fixed by the model, and the overridable defaults
that depend on the model. Everything else in the class's constructor is an option that
`model.mixer_options[name]` may set; an unknown option is a ConfigError listing the allowed ones.

A constructor argument whose default is an instance of a dataclass (an options dataclass, e.g.
Titans' `memory: MemoryOptions = MemoryOptions()`) is offered field by field: its fields are
options of their own (`model.mixer_options.titans.memory_depth=2`), gathered back into one
instance of the dataclass for the constructor. Its field names may not repeat another option.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable

import jax.numpy as jnp

from zoo.registry import register_mixer

__all__ = ["layer_options", "option_groups"]

# Set from the model for every layer; never an option.
_ALWAYS_FIXED = ("num_heads", "impl", "dtype")


def _import(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _keywords(cls) -> dict:
    """{keyword: default} of the constructor (`inspect._empty` for a required one)."""
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def option_groups(cls) -> dict:
    """{argument: default instance} of the constructor's options-dataclass arguments (module
    docstring)."""
    return {name: default for name, default in _keywords(cls).items()
            if dataclasses.is_dataclass(default) and not isinstance(default, type)}


def layer_options(cls, exclude=()) -> dict:
    """{option: default} of the class's constructor, an options-dataclass argument replaced by
    its fields; a required keyword has the default `inspect._empty`."""
    groups = option_groups(cls)
    out = {}
    for name, default in _keywords(cls).items():
        if name not in groups:
            out[name] = default
    for arg, default in groups.items():
        for field in dataclasses.fields(default):
            if field.name in out:
                raise ValueError(f"{cls.__name__}: option {field.name!r} of {arg}: "
                                 f"{type(default).__name__} repeats a constructor argument")
            out[field.name] = getattr(default, field.name)
    for name in ("self", "d_model", "rngs", *_ALWAYS_FIXED, *exclude):
        out.pop(name, None)
    return out


def _gather_groups(cls, options: dict) -> dict:
    """The constructor's keywords from flat options: each options dataclass's fields become one
    instance of it (the others keep their defaults)."""
    kw = dict(options)
    for arg, default in option_groups(cls).items():
        fields = {f.name: kw.pop(f.name) for f in dataclasses.fields(default) if f.name in kw}
        kw[arg] = dataclasses.replace(default, **fields)
    return kw


def _register(name: str, layer: str, *, passes: tuple[str, ...] = (),
              fixed: Callable | None = None, defaults: dict | None = None, doc: str):
    """Register `name`: cls(d_model, num_heads=, impl=, dtype=, **{f: cfg.f for f in passes},
    **fixed(cfg, layer_idx), **{option: rule(cfg) for defaults}) with the defaults overridden by
    model.mixer_options[name] (an options dataclass's fields gathered into it, module docstring).

    ``defaults`` maps an option to (text, rule): its default computed from the model config and
    how `--mixers` shows it. The mixer declares that it reads the optional model fields in
    ``passes`` and those its default rules name (``text`` starting with "model.")."""
    defaults = defaults or {}
    fixed = fixed or (lambda cfg, layer_idx: {})
    reads = tuple(passes) + tuple(t[len("model."):] for t, _ in defaults.values()
                                  if t.startswith("model."))

    def factory(cfg, layer_idx, rngs):
        cls = _import(layer)
        kw = dict(num_heads=cfg.num_heads, impl=cfg.impl, dtype=jnp.dtype(cfg.dtype),
                  **{f: getattr(cfg, f) for f in passes}, **fixed(cfg, layer_idx))
        allowed = set(layer_options(cls, exclude=kw))
        options = {**{k: rule(cfg) for k, (_, rule) in defaults.items()},
                   **cfg.options(name, allowed)}
        return cls(cfg.d_model, rngs=rngs, **kw, **_gather_groups(cls, options))

    def options():
        opts = layer_options(_import(layer), exclude=(*passes, *_fixed_names(fixed)))
        return {**opts, **{k: text for k, (text, _) in defaults.items()}}

    register_mixer(name, reads=reads, options=options, doc=doc)(factory)


def _fixed_names(fixed: Callable) -> set[str]:
    """The argument names a `fixed(cfg, layer_idx)` rule sets (probed with a stand-in config)."""
    class _Any:
        def __getattr__(self, _):
            return 0
    return set(fixed(_Any(), 0))


_register("attn", "layers.attention:Attention",
          passes=("num_kv_heads", "head_dim", "rope_theta"),
          doc="causal softmax attention (grouped-query, RoPE, KV cache)")
_register("swa", "layers.attention:Attention",
          passes=("num_kv_heads", "head_dim", "window", "rope_theta"),
          doc="sliding-window softmax attention over model.window tokens (ring-buffer cache)")
_register("gdn", "layers.gated_deltanet:GatedDeltaNet",
          doc="GatedDeltaNet: gated delta rule, short convs, output gate")
_register("lightning", "layers.lightning:Lightning",
          fixed=lambda cfg, layer_idx: dict(layer_idx=layer_idx, n_layers=cfg.n_layers),
          doc="Lightning attention: linear attention with per-head constant decay by layer depth")
_register("hedgehog", "layers.hedgehog:Hedgehog",
          doc="Hedgehog: linear attention with learned softmax-mimicking feature maps")
_register("mamba2", "layers.mamba:Mamba2",
          defaults={"d_state": ("min(64, d_model / 2)", lambda cfg: min(64, cfg.d_model // 2))},
          doc="Mamba-2 block (SSD: scalar-decay state-space duality)")
_register("titans", "layers.titans:Titans",
          passes=("head_dim",),
          doc="Titans neural memory as a layer (MAL when followed by swa)")
_register("titans_mag", "layers.titans_variants:TitansMAG",
          passes=("head_dim", "rope_theta"),
          defaults={"window": ("model.window", lambda cfg: cfg.window)},
          doc="Titans memory as a gate over sliding-window attention with persistent tokens")
_register("titans_mac", "layers.titans_variants:TitansMAC",
          passes=("head_dim", "rope_theta"),
          defaults={"segment_len": ("model.window", lambda cfg: cfg.window)},
          doc="Titans memory as context: segments attend over memory read-outs")
_register("retnet", "layers.retnet:RetNet", passes=("rope_theta",),
          doc="RetNet: multi-scale retention, fixed per-head decays 1 - 2^(-5-h), rotary, gated group norm")
_register("deltanet", "layers.deltanet:DeltaNet",
          doc="DeltaNet: delta rule (no decay), separate SiLU short convs, L2-normed q/k")
_register("gla", "layers.gla:GLA",
          doc="GLA: gated linear attention, low-rank per-channel gate logsigmoid/16, swish output gate")
_register("hgrn2", "layers.hgrn2:HGRN2",
          fixed=lambda cfg, layer_idx: dict(layer_idx=layer_idx, n_layers=cfg.n_layers),
          defaults={"expand_ratio": ("128 if d_model % 128 == 0 else d_model / num_heads",
                                     lambda cfg: 128 if cfg.d_model % 128 == 0
                                     else cfg.d_model // cfg.num_heads)},
          doc="HGRN-2: gated linear RNN with state expansion, forget-gate lower bound by depth")
_register("kda", "layers.kda:KDA",
          doc="KDA (Kimi Linear): delta rule with per-channel decay, short convs, sigmoid-gated norm")
_register("hgrn", "layers.hgrn:HGRN",
          fixed=lambda cfg, layer_idx: dict(layer_idx=layer_idx, n_layers=cfg.n_layers),
          doc="HGRN: elementwise gated linear recurrence with a forget-gate lower bound by depth")
