"""What a resume must agree with: a run started again on its workdir is the same run.

`check_resume(meta, config, model_cfg, data, workdir)` compares the newest checkpoint's meta
with the new config and raises one CheckpointError line that names every field that differs,
old and new value, before anything is restored:

* the corpus and tokenizer (fingerprint), and the data order: seed, data.seq_len,
  train.batch_size (the batch of step s is a pure function of these);
* the schedule and optimizer: train.steps, lr, warmup_steps, min_lr_ratio (a longer
  train.steps would restart warmup and cosine mid-run), weight_decay, b1, b2, eps, clip_norm;
* the model: every resolved ModelConfig field except the implementation choices (impl, remat),
  which change how the same parameters are computed, not what they are (mixer and ratio are
  compared through the layer_types they resolve to).

Fields free to change on resume: logging, eval batches, checkpoint cadence, mesh (the state is
restored onto any mesh), max_skipped_steps, train.microbatches (the same gradient, computed in
fewer rows at a time) and the profiler window.
"""

from __future__ import annotations

import dataclasses

from train.checkpoint import CheckpointError
from train.state import build_model_config

__all__ = ["check_resume", "DATA_ORDER_FIELDS", "SCHEDULE_FIELDS", "MODEL_FREE_FIELDS"]

DATA_ORDER_FIELDS = ("seed", "data.seq_len", "train.batch_size")
SCHEDULE_FIELDS = ("train.steps", "train.lr", "train.warmup_steps", "train.min_lr_ratio",
                   "train.weight_decay", "train.b1", "train.b2", "train.eps", "train.clip_norm")
# impl/remat: how, not what; mixer/ratio: already compared through the resolved layer_types.
MODEL_FREE_FIELDS = ("impl", "remat", "mixer", "ratio")


def _get(tree, dotted: str):
    node = tree
    for part in dotted.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def _diffs(saved: dict, config, fields) -> list[str]:
    out = []
    for name in fields:
        old, new = _get(saved, name), _get(config, name)
        if old is not None and old != new:
            out.append(f"{name} {old!r} -> {new!r}")
    return out


def check_resume(meta: dict, config, model_cfg, data, workdir: str) -> None:
    """Raise CheckpointError when resuming `workdir` with `config` would not continue its run."""
    if meta.get("fingerprint") != data.fingerprint:
        raise CheckpointError(
            f"{workdir} holds a run on a different corpus or tokenizer (fingerprint "
            f"{meta.get('fingerprint')} != {data.fingerprint}); use a new --workdir")
    saved = meta.get("config", {})
    order = _diffs(saved, config, DATA_ORDER_FIELDS)
    if order:
        raise CheckpointError(f"resume of {workdir}: {', '.join(order)} (old -> new); resuming "
                              f"would change the data order: keep the run's values or use a "
                              f"new --workdir")
    schedule = _diffs(saved, config, SCHEDULE_FIELDS)
    if schedule:
        raise CheckpointError(f"resume of {workdir}: {', '.join(schedule)} (old -> new); a "
                              f"resume continues the run's schedule and optimizer: keep the "
                              f"run's values or use a new --workdir")
    if "model" in saved:
        old = build_model_config(saved["model"], model_cfg.vocab_size)
        diffs = [f"model.{f.name} {getattr(old, f.name)!r} -> {getattr(model_cfg, f.name)!r}"
                 for f in dataclasses.fields(model_cfg) if f.name not in MODEL_FREE_FIELDS
                 and getattr(old, f.name) != getattr(model_cfg, f.name)]
        if diffs:
            raise CheckpointError(f"{workdir} holds a different model: {', '.join(diffs)} "
                                  f"(old -> new); use a new --workdir")
