"""Layer placement: which layers of an all-attention model become the linear mixer.

    python scripts/ablate.py --config configs/ablations/layer_swap.py:preset=cpu --workdir runs/swap

arg: preset=, mixers= (default gdn), seeds=. For n layers (cpu 4, gpu/tpu 24) the cells keep one
attention layer in n // 4 and place it first, in the middle, last, or every 4th layer (the rest
the mixer), plus the all-attention and all-mixer ends.
"""

from __future__ import annotations

from configs.ablations.presets import base_sweep, parse_arg


def placements(n: int, mixer: str) -> dict[str, tuple[str, ...]]:
    k = max(1, n // 4)                      # attention layers kept
    def with_attn(idx):
        return tuple("attn" if i in idx else mixer for i in range(n))
    mid = (n - k) // 2
    return {"attn_first": with_attn(range(k)), "attn_middle": with_attn(range(mid, mid + k)),
            "attn_last": with_attn(range(n - k, n)),
            "attn_every4": with_attn(range(3, n, 4)),
            "all_linear": (mixer,) * n}


def get_config(arg: str | None = None):
    a = parse_arg(arg)
    c = base_sweep("layer_swap", a["preset"])
    n = 4 if a["preset"] == "cpu" else 24
    cells = []
    for mixer in a.get("mixers", "gdn").split("+"):
        for name, layers in placements(n, mixer).items():
            cells.append(dict(name=f"{mixer}_{name}", layer_types=",".join(layers)))
    cells.append(dict(name="attn_all", layer_types=",".join(("attn",) * n)))
    c.cells = tuple(cells)
    c.seeds = tuple(int(s) for s in a.get("seeds", "0").split("+"))
    return c
