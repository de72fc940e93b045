"""A tiny training config shared by the training tests."""

from configs import lm


def tiny_config(**train):
    c = lm.get_config("size=tiny")
    c.model.update(dict(d_model=32, n_layers=2, num_heads=2, window=16))
    c.data.update(dict(seq_len=32, max_bytes=300_000))
    c.train.update(dict(steps=6, batch_size=8, warmup_steps=2, log_every=1, eval_batches=1,
                        lr=3e-3))
    c.train.update(train)
    c.checkpoint.every = 3
    return c
