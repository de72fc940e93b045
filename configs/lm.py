"""Language-model pretraining config.

    python -m train --config configs/lm.py:mixer=gdn,ratio=3,size=tiny,data=stdlib --workdir runs/x

arg: a comma list of key=value with keys
  mixer  the linear (or any) mixer name of the registry (default attn)
  ratio  linear layers per attention layer (0: every layer is `mixer`; 3: a 3:1 hybrid)
  size   a preset of zoo/presets.py: tiny, small, 340M, 1.3B (default tiny)
  data   the data source: stdlib (default), text, jsonl, tokens — point data.path at your files —
         or mqar (synthetic associative recall, fields under data.mqar)
"""

from __future__ import annotations

import dataclasses

import ml_collections

from zoo.config import ModelConfig
from zoo.presets import preset

ARG_KEYS = ("mixer", "ratio", "size", "data")


def parse_arg(arg: str | None) -> dict:
    out = {}
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config arg {item!r}: expected key=value with key in {ARG_KEYS}")
        key, value = item.split("=", 1)
        if key not in ARG_KEYS:
            raise ValueError(f"config arg: unknown key {key!r}; known keys: {ARG_KEYS}")
        out[key] = value
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0

    # The model's defaults are ModelConfig's (one source); the size preset then sets its fields.
    model = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    model.update(vocab_size=0,       # 0: the tokenizer's vocabulary size
                 layer_types=(),     # empty: hybrid_pattern(n_layers, mixer, ratio)
                 mixer=args.get("mixer", ModelConfig.mixer),
                 ratio=int(args.get("ratio", ModelConfig.ratio)),
                 mixer_options=ml_collections.ConfigDict())
    c.model = ml_collections.ConfigDict(model)
    c.model.update(preset(args.get("size", "tiny")))

    c.data = ml_collections.ConfigDict(dict(
        source=args.get("data", "stdlib"), path="", jsonl_field="text", tokenizer="bytes",
        seq_len=256, heldout_fraction=0.02, max_bytes=0,
        # used when source == "mqar" (seq_len above is the example length)
        mqar=ml_collections.ConfigDict(dict(vocab_size=256, num_kv_pairs=4, power_a=0.01,
                                            random_non_queries=True, heldout_examples=512,
                                            cells="")),
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=16, lr=3e-3, warmup_steps=100, min_lr_ratio=0.1,
        weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
        log_every=25, eval_batches=8, max_skipped_steps=5,
        microbatches=1,    # gradient accumulation: batch_size / microbatches rows per pass
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(every=250, keep=2))
    # "A:B": trace steps A..B-1 with the JAX profiler into <workdir>/profile; "" = off
    c.profile = ml_collections.ConfigDict(dict(steps=""))
    # -1 on one axis: all remaining devices. data x fsdp x tensor must equal the device count.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return c
