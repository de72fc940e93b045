"""Train a small model on multi-query associative recall (Zoology's MQAR).

    python -m train --config configs/mqar.py:mixer=gdn --workdir runs/mqar_gdn
    python -m train.eval --workdir runs/mqar_gdn --tasks mqar

arg: as configs/lm.py (mixer=, ratio=, size=; without size= the model is a 2-layer d_model 64
one), plus the task cell via overrides:
--config.data.seq_len=128 --config.data.mqar.num_kv_pairs=16 --config.data.mqar.vocab_size=512,
or a mixture of cells as Zoology trains (row g takes cell g mod n; data.seq_len = the longest):
--config.data.mqar.cells=64:4,128:8,256:16,256:32,256:64 --config.data.seq_len=256
--config.data.mqar.vocab_size=8192. `train.eval --tasks mqar` then scores each training cell and
(512, 128), (1024, 256); `--mqar_cells` chooses others.
"""

from __future__ import annotations

from configs import lm


def get_config(arg: str | None = None):
    args = lm.parse_arg(arg)
    if args.get("data", "mqar") != "mqar":
        raise ValueError(f"configs/mqar.py: data={args['data']!r}; this config trains on mqar "
                         "(use configs/lm.py for other sources)")
    args.update(data="mqar", mixer=args.get("mixer", "attn"))
    c = lm.get_config(",".join(f"{k}={v}" for k, v in args.items()))
    if "size" not in args:  # a given size= keeps its preset
        c.model.update(dict(d_model=64, n_layers=2, num_heads=2, window=64))
    c.data.seq_len = 64
    c.data.mqar.update(dict(vocab_size=256, num_kv_pairs=4))
    c.train.update(dict(steps=1500, batch_size=64, lr=3e-3, warmup_steps=100, weight_decay=0.1,
                        log_every=100, eval_batches=8))
    c.checkpoint.every = 500
    return c
