"""The mixer registry: a name in `layer_types` -> a factory that builds that layer.

A factory takes `(cfg: ModelConfig, layer_idx: int, rngs)` and returns a module obeying the
layer contract (DESIGN.md §3). Layers never read the config tree; the factory is where the
model's fields become a layer's arguments. Layer modules register themselves on import via
`register_mixer`; `zoo/mixers.py` imports them all.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["register_mixer", "get_mixer", "known_mixers"]

_MIXERS: dict[str, Callable] = {}


def register_mixer(name: str):
    def wrap(factory):
        if name in _MIXERS and _MIXERS[name] is not factory:
            raise ValueError(f"mixer {name!r} is registered twice")
        _MIXERS[name] = factory
        return factory
    return wrap


def _load():
    import zoo.mixers  # noqa: F401  (registers every built-in mixer)


def known_mixers() -> tuple[str, ...]:
    _load()
    return tuple(sorted(_MIXERS))


def get_mixer(name: str) -> Callable:
    _load()
    if name not in _MIXERS:
        raise KeyError(f"unknown mixer {name!r}; known mixers: {tuple(sorted(_MIXERS))}")
    return _MIXERS[name]
