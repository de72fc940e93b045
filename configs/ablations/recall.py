"""The recall suite: every mixer's 2-layer model (and a gdn/attn hybrid) on MQAR only.

    python scripts/ablate.py --config configs/ablations/recall.py:preset=cpu --workdir runs/recall

This replaces the former scripts/recall_suite.py: the same question (which mixers recall, at
what cost) through the one sweep runner. No LM model is trained (`lm = None`).
"""

from __future__ import annotations

from configs.ablations.presets import base_sweep, parse_arg
from zoo.registry import known_mixers


def get_config(arg: str | None = None):
    a = parse_arg(arg)
    c = base_sweep("recall", a["preset"])
    mixers = a.get("mixers", "+".join(m for m in known_mixers() if m != "swa")).split("+")
    cells = [dict(name=m, layer_types=f"{m},{m}") for m in mixers]
    cells.append(dict(name="gdn+attn", layer_types="gdn,attn"))
    c.cells = tuple(cells)
    c.lm = None
    c.seeds = tuple(int(s) for s in a.get("seeds", "0").split("+"))
    return c
