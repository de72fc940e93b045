"""Size presets, from `tiny` (tests, CPU) to the sizes of the hybrid-attention literature.

With a 32k-token vocabulary the parameter counts are about 125M (small), 340M and 1.3B; with the
default byte tokenizer the embedding is small and the counts are lower (the model prints its own
count at start).
"""

from __future__ import annotations

__all__ = ["PRESETS", "preset"]

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=4, num_heads=4, window=128),
    "small": dict(d_model=768, n_layers=12, num_heads=12, window=512),
    # the large presets scan their (periodic) layer groups: compile time flat in depth
    "340M": dict(d_model=1024, n_layers=24, num_heads=16, window=1024, scan_layers=True),
    "1.3B": dict(d_model=2048, n_layers=24, num_heads=16, window=2048, scan_layers=True),
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"size: unknown preset {name!r}; known: {tuple(PRESETS)}")
    return dict(PRESETS[name])
