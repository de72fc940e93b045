"""The tiny 2-cell hybrid-ratio sweep of tests/test_sweep.py, also a config file for
`scripts/ablate.py --config tests/sweep_tiny.py`, which the end-to-end test runs in the
background (tests/background.py): cells gdn_r1 (gdn,attn) and attn_all (attn,attn), d_model 16,
MQAR on 16:2 and 32:4 (evaluated up to 64:8) and a byte-level LM, 2 steps each."""

from configs.ablations import hybrid_ratio


def tiny_sweep(lrs=(3e-3,), lm=True):
    c = hybrid_ratio.get_config("preset=cpu")
    c.model.update(dict(d_model=16, num_heads=2, window=16))
    c.cells = (dict(name="gdn_r1", layer_types="gdn,attn"),
               dict(name="attn_all", layer_types="attn,attn"))
    c.mqar.update(dict(train_cells="16:2,32:4", eval_cells="16:2,32:4,64:8", steps=2,
                       batch_size=8, warmup_steps=1, lrs=lrs, eval_examples=8,
                       heldout_examples=16, eval_batches=1, val_batches=1, log_every=1,
                       checkpoint_every=2, vocab_size=64))
    if lm:
        c.lm.update(dict(seq_len=32, steps=2, batch_size=8, warmup_steps=1, max_bytes=200_000,
                         eval_batches=1, log_every=1, checkpoint_every=2,
                         passkey_lengths=(128,), passkey_trials=1))
    else:
        c.lm = None
    return c


def get_config(arg=None):
    """`tests/sweep_tiny.py` (the default sweep of `tiny_sweep()`); no arguments."""
    if arg:
        raise ValueError(f"tests/sweep_tiny.py takes no argument, got {arg!r}")
    return tiny_sweep()
