"""The model's own configuration: a frozen dataclass built from `config.model` and validated
before anything is traced, so bad input fails fast with the field name and the allowed values."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

__all__ = ["ModelConfig", "ConfigError", "hybrid_pattern", "layer_period", "DTYPES",
           "REMAT_POLICIES"]

# "auto": bfloat16 compute on GPU/TPU, float32 on CPU (resolved in ModelConfig.resolved)
DTYPES = ("float32", "bfloat16", "auto")
# in order of activation memory saved (zoo/model.py maps each to a jax.checkpoint policy)
REMAT_POLICIES = ("none", "save_dots", "full")


class ConfigError(ValueError):
    """A configuration field has a value the model cannot be built from."""


def hybrid_pattern(n_layers: int, mixer: str, ratio: int, attention: str = "attn") -> tuple[str, ...]:
    """One `attention` layer at the end of every group of `ratio` `mixer` layers.

    ratio 3 over 8 layers -> (m, m, m, attn, m, m, m, attn); ratio 0 -> all `mixer`. When the
    mixer is itself attention the pattern is uniform. A ratio r puts n_layers / (r + 1) attention
    layers in the model, so n_layers must be a multiple of r + 1: anything else would not be the
    r:1 hybrid asked for (24 layers at ratio 24 would hold no attention layer at all).
    """
    if ratio < 0:
        raise ConfigError(f"model.ratio must be >= 0, got {ratio}")
    if ratio == 0 or mixer == attention:
        return (mixer,) * n_layers
    if n_layers % (ratio + 1):
        raise ConfigError(f"model.ratio={ratio} needs model.n_layers to be a multiple of "
                          f"{ratio + 1} (one {attention} layer per {ratio + 1} layers), got "
                          f"n_layers={n_layers}; allowed ratios for {n_layers} layers: "
                          f"{[r for r in range(n_layers) if n_layers % (r + 1) == 0]}")
    return tuple(attention if (i + 1) % (ratio + 1) == 0 else mixer for i in range(n_layers))


def layer_period(layer_types: tuple[str, ...]) -> int:
    """The smallest p with layer_types == layer_types[:p] * (n / p) (n itself when none is)."""
    n = len(layer_types)
    return next(p for p in range(1, n + 1)
                if n % p == 0 and tuple(layer_types[:p]) * (n // p) == tuple(layer_types))


def _freeze(options) -> tuple:
    """{mixer: {option: value}} (or its frozen form) -> sorted nested tuples; list values become
    tuples."""
    items = options.items() if hasattr(options, "items") else options
    out = []
    for mixer, opts in items:
        opts = opts.items() if hasattr(opts, "items") else opts
        out.append((mixer, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                        for k, v in opts))))
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0            # 0 -> num_heads
    head_dim: int = 0                # 0 -> d_model // num_heads
    d_ff: int = 0                    # 0 -> 8/3 d_model rounded up to a multiple of 64
    layer_types: tuple[str, ...] = ()
    mixer: str = "attn"              # used with `ratio` when layer_types is empty
    ratio: int = 0
    window: int = 256                # sliding window of `swa` layers
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dtype: str = "auto"              # compute dtype (DTYPES); parameters stay float32
    impl: str = "auto"               # op implementation passed to every layer
    remat: str = "none"              # REMAT_POLICIES: what each block saves for the backward
    scan_layers: bool = False        # periodic layer_types: one group module, lax.scan over repeats
    # ((mixer, ((option, value), ...)), ...): a frozen mapping, so the config (and the model's
    # graphdef) stays hashable for jit's static arguments.
    mixer_options: tuple = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model: unknown field(s) {unknown}; known fields: {sorted(names)}")
        kw = dict(d)
        if "layer_types" in kw:
            kw["layer_types"] = tuple(kw["layer_types"])
        if "mixer_options" in kw:
            kw["mixer_options"] = _freeze(kw["mixer_options"])
        if isinstance(kw.get("remat"), bool):    # configs written when remat was a bool
            kw["remat"] = "full" if kw["remat"] else "none"
        return cls(**kw).resolved()

    def resolved(self) -> "ModelConfig":
        """Fill the derived fields (0 / empty) and validate every field."""
        from zoo.registry import known_mixers  # late: the registry imports the layers

        mixers = known_mixers()
        if self.n_layers < 1:
            raise ConfigError(f"model.n_layers must be >= 1, got {self.n_layers}")
        if self.d_model < 1 or self.num_heads < 1:
            raise ConfigError("model.d_model and model.num_heads must be positive")
        if self.d_model % self.num_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.num_heads "
                              f"({self.num_heads})")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                              f"model.num_kv_heads ({kv})")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"model.scan_layers must be a bool, got {self.scan_layers!r}")
        layer_types = self.layer_types
        if not layer_types:
            if self.mixer not in mixers:
                raise ConfigError(f"model.mixer: unknown mixer {self.mixer!r}; known: {mixers}")
            layer_types = hybrid_pattern(self.n_layers, self.mixer, self.ratio)
        if len(layer_types) != self.n_layers:
            raise ConfigError(f"model.layer_types has {len(layer_types)} entries but model.n_layers "
                              f"is {self.n_layers}; give one mixer name per layer")
        for name in layer_types:
            if name not in mixers:
                raise ConfigError(f"model.layer_types: unknown mixer {name!r}; known: {mixers}")
        for name, _ in self.mixer_options:
            if name not in mixers:
                raise ConfigError(f"model.mixer_options: unknown mixer {name!r}; known: {mixers}")
        d_ff = self.d_ff or -(-int(self.d_model * 8 / 3) // 64) * 64
        return dataclasses.replace(self, num_kv_heads=kv, head_dim=self.head_dim or self.d_model // self.num_heads,
                                   d_ff=d_ff, layer_types=tuple(layer_types),
                                   dtype=_resolve_dtype(self.dtype))

    def options(self, mixer: str, allowed=None) -> dict:
        """The user's options for ``mixer``; with ``allowed`` (names), an unknown one is an error
        that lists them."""
        opts = dict(dict(self.mixer_options).get(mixer, ()))
        unknown = sorted(set(opts) - set(allowed)) if allowed is not None else []
        if unknown:
            raise ConfigError(f"model.mixer_options[{mixer!r}]: unknown option(s) {unknown}; "
                              f"allowed: {sorted(allowed)}")
        return opts


def _resolve_dtype(dtype: str) -> str:
    """"auto" -> "bfloat16" on GPU/TPU (their matmul units run bf16 at full rate), else
    "float32" (CPUs gain nothing from bf16 and tests compare against float32 references)."""
    if dtype != "auto":
        return dtype
    import jax  # late: the config module is imported before any backend is chosen
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "float32"
