"""Hybrid ratio: mixers × ratios × seeds, plus the all-attention baseline.

    python scripts/ablate.py --config configs/ablations/hybrid_ratio.py:preset=cpu --workdir runs/ratio

arg: preset=cpu|gpu|tpu, mixers=gdn+lightning (a `+` list of registered mixers, or `study` for
the six linear mixers of the hybrid-attention study), seeds=0+1.
cpu: 4 layers, ratios 0 (pure), 3 (3:1) and 1 (1:1), mixers gdn and mamba2: both have the short
conv that attention turns on in these presets (Lightning has none, so it would compare conv
against no conv; add it with mixers=gdn+mamba2+lightning, about 20 minutes more).
gpu/tpu: 24 layers as in "A Systematic Analysis of Hybrid Linear Attention": ratios 0, 23, 11,
5, 3 (24:0 … 3:1), and by default that study's mixers (HGRN, RetNet, GLA, HGRN-2, DeltaNet,
GatedDeltaNet) plus Kimi Linear's KDA; any registered mixer via mixers=.
"""

from __future__ import annotations

from configs.ablations.presets import base_sweep, parse_arg
from train.sweep import ratio_cells

# The linear mixers compared at every ratio by "A Systematic Analysis of Hybrid Linear Attention".
STUDY = ("hgrn", "retnet", "gla", "hgrn2", "deltanet", "gdn")


def get_config(arg: str | None = None):
    a = parse_arg(arg)
    c = base_sweep("hybrid_ratio", a["preset"])
    cpu = a["preset"] == "cpu"
    mixers = a.get("mixers", "gdn+mamba2" if cpu else "study+kda").split("+")
    mixers = [m for name in mixers for m in (STUDY if name == "study" else (name,))]
    n_layers, ratios = (4, (0, 3, 1)) if cpu else (24, (0, 23, 11, 5, 3))
    c.cells = tuple(ratio_cells(mixers, ratios, n_layers))
    c.seeds = tuple(int(s) for s in a.get("seeds", "0").split("+"))
    return c
