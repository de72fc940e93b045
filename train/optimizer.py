"""AdamW with linear warmup + cosine decay, global-norm clipping and masked weight decay.

lr(s) = lr · s / warmup for s < warmup, then decays by a cosine to lr · min_lr_ratio at the
last step. Weight decay skips parameters tagged `no_decay` (norms, biases, gates, decays).
"""

from __future__ import annotations

import optax

__all__ = ["make_schedule", "make_optimizer"]


def make_schedule(train_cfg) -> optax.Schedule:
    warmup = max(1, min(int(train_cfg.warmup_steps), int(train_cfg.steps) - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.lr, warmup_steps=warmup,
        decay_steps=max(int(train_cfg.steps), warmup + 1),
        end_value=train_cfg.lr * train_cfg.min_lr_ratio)


def make_optimizer(train_cfg, decay_mask) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train_cfg.clip_norm),
        optax.adamw(make_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                    eps=train_cfg.eps, weight_decay=train_cfg.weight_decay, mask=decay_mask),
    )
