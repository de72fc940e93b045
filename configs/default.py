"""The main job (`python -m train`): a tiny byte-level 3:1 GatedDeltaNet/attention hybrid
(gdn, gdn, gdn, attn) on the Python standard library's own source, sized to train for about 2-3
minutes on 2 CPU cores and visibly lower the loss."""

from __future__ import annotations

from configs import lm


def get_config(arg: str | None = None):
    c = lm.get_config(arg or "mixer=gdn,ratio=3,size=tiny")
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.warmup_steps = 30
    c.train.log_every = 25
    c.checkpoint.every = 100
    c.data.seq_len = 256
    return c
