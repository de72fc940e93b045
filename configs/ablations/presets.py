"""Training recipes shared by the ablation sweeps, per preset.

cpu: 4-layer d_model-64 models a 2-core machine trains in minutes. MQAR on the mixture
     (64:4, 128:8, 128:16) — Zoology's mixture cut to what separates mixers at this size (the
     easy 64:4 cell is solved by every mixer) — scored on those cells and on 256:32 and 512:64
     (longer than trained: reported, not in `recall`). The learning rate is swept over
     (3e-3, 1e-2) per mixer on calibration seed 100. The LM: bytes of the standard library, seq
     256. Every mixer has a short conv before its mixing (attention turns on its kernel-4 conv,
     the linear mixers have theirs), so the comparison is of the mixing itself.
gpu/tpu: the hybrid study's 340M-scale settings (d_model 1024, 24 layers, 16 heads); the LM runs
     on the user's tokenized corpus (`--set lm.path=...`, source tokens), MQAR on Zoology's
     full mixture at d_model 1024.

Cost of the cpu sweep: a training step of 4096 tokens (MQAR 32 × 128, LM 16 × 256) of these
4-layer models took 0.70 s with GatedDeltaNet layers and 0.35 s with Lightning or attention on
the 2-core development machine (measured, `seconds_per_step`; Mamba-2 is taken as GDN's); a
sweep costs about Σ jobs × steps × s/step plus ~25 s per job of compilation and evaluation,
and `scripts/ablate.py --dry-run` prints that estimate: about 55 minutes for the default cpu
sweep (gdn and mamba2 × 3 ratios + attention, one seed).
"""

from __future__ import annotations

import ml_collections

__all__ = ["base_sweep", "parse_arg", "PRESETS"]

PRESETS = ("cpu", "gpu", "tpu")


def parse_arg(arg: str | None) -> dict:
    out = {"preset": "cpu"}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in ("preset", "mixers", "seeds"):
            raise ValueError(f"sweep config arg {item!r}: expected preset=, mixers= or seeds=")
        out[key] = value
    if out["preset"] not in PRESETS:
        raise ValueError(f"preset: unknown {out['preset']!r}; known: {PRESETS}")
    return out


def base_sweep(name: str, preset: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.preset = preset
    c.seeds = (0,)
    c.cells = ()
    # Seconds per 4096-token step of the preset's models by their linear mixer (the dry run's
    # estimate); "default" for mixers not measured.
    c.seconds_per_step = ml_collections.ConfigDict(dict(gdn=0.70, lightning=0.35, attn=0.35,
                                                        default=0.70))
    if preset == "cpu":
        c.model = ml_collections.ConfigDict(dict(
            d_model=64, num_heads=2, window=64, dtype="float32",
            mixer_options={"attn": {"conv_size": 4}, "swa": {"conv_size": 4}}))
        c.mqar = ml_collections.ConfigDict(dict(
            vocab_size=256, train_cells="64:4,128:8,128:16", eval_cells="64:4,128:8,128:16,"
            "256:32,512:64", steps=300, batch_size=32, warmup_steps=30, lrs=(3e-3, 1e-2),
            lr_seed=100, eval_examples=256, heldout_examples=128, eval_batches=2, val_batches=4,
            log_every=50, checkpoint_every=300))
        c.lm = ml_collections.ConfigDict(dict(
            seq_len=256, steps=100, batch_size=16, lr=3e-3, warmup_steps=10, max_bytes=0,
            eval_batches=8, log_every=50, checkpoint_every=100, passkey_lengths=(128, 256),
            passkey_trials=2))
    else:
        c.model = ml_collections.ConfigDict(dict(
            d_model=1024, num_heads=16, window=1024, dtype="bfloat16",
            mixer_options={"attn": {"conv_size": 4}, "swa": {"conv_size": 4}}))
        c.mqar = ml_collections.ConfigDict(dict(
            vocab_size=8192, train_cells="64:4,128:8,256:16,256:32,256:64",
            eval_cells="64:4,128:8,256:16,256:32,256:64,512:128,1024:256", steps=20000,
            batch_size=256, warmup_steps=1000, lrs=(1e-4, 3e-4, 1e-3, 3e-3), lr_seed=100,
            eval_examples=1000, heldout_examples=1024, eval_batches=4, val_batches=8,
            log_every=200, checkpoint_every=2000))
        c.lm = ml_collections.ConfigDict(dict(
            seq_len=2048, steps=20000, batch_size=256, lr=1e-3, warmup_steps=1000,
            max_bytes=0, eval_batches=64, log_every=100, checkpoint_every=1000,
            passkey_lengths=(1024, 2048, 4096), passkey_trials=8))
        c.seconds_per_step = ml_collections.ConfigDict(dict(default=1.0))  # not measured
    return c
