"""The mixer registry: a name in `layer_types` -> a factory that builds that layer, plus what the
mixer declares about itself.

A factory takes `(cfg: ModelConfig, layer_idx: int, rngs)` and returns a module obeying the
layer contract (layers/common.py). Layers never read the config tree; the factory is where the
model's fields become a layer's arguments. Each registration declares

* `reads`: the optional model fields (`window`, `rope_theta`, `num_kv_heads`, `head_dim`) the
  factory passes on, so a field set for a model in which no layer reads it is an error rather
  than silently ignored (`train/fields.py`);
* `options()`: {option: default} that `model.mixer_options[name]` may set (listed by
  `python -m train --mixers`);
* `doc`: one line for that listing.

The built-in mixers are registered by `zoo/mixers.py`, which `known_mixers()` / `get_mixer()`
import on first use; a user's own mixer registers with `@register_mixer(name, ...)` before the
model is built.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

__all__ = ["register_mixer", "get_mixer", "known_mixers", "mixer_info", "MixerInfo",
           "OPTIONAL_MODEL_FIELDS"]

# Model fields that only some layers read (every layer reads d_model, num_heads, impl, dtype).
OPTIONAL_MODEL_FIELDS = ("num_kv_heads", "head_dim", "window", "rope_theta")


@dataclasses.dataclass(frozen=True)
class MixerInfo:
    name: str
    factory: Callable
    reads: tuple[str, ...] = ()
    options: Callable[[], dict] = dict
    doc: str = ""


_MIXERS: dict[str, MixerInfo] = {}


def register_mixer(name: str, *, reads=(), options: Callable[[], dict] = dict, doc: str = ""):
    unknown = sorted(set(reads) - set(OPTIONAL_MODEL_FIELDS))
    if unknown:
        raise ValueError(f"mixer {name!r}: reads unknown model field(s) {unknown}; "
                         f"declarable: {OPTIONAL_MODEL_FIELDS}")

    def wrap(factory):
        if name in _MIXERS and _MIXERS[name].factory is not factory:
            raise ValueError(f"mixer {name!r} is registered twice")
        _MIXERS[name] = MixerInfo(name, factory, tuple(reads), options, doc)
        return factory
    return wrap


def _load():
    import zoo.mixers  # noqa: F401  (registers every built-in mixer)


def known_mixers() -> tuple[str, ...]:
    _load()
    return tuple(sorted(_MIXERS))


def mixer_info(name: str) -> MixerInfo:
    _load()
    if name not in _MIXERS:
        raise KeyError(f"unknown mixer {name!r}; known mixers: {tuple(sorted(_MIXERS))}")
    return _MIXERS[name]


def get_mixer(name: str) -> Callable:
    return mixer_info(name).factory
