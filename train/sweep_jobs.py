"""What one sweep job does: train through `train_and_evaluate`, then score.

* lr:   MQAR training of a mixer's pure model at one rate; `val_accuracy` on the MQAR source's
        validation stream (its own seed stream: never a reported cell).
* mqar: MQAR training of the cell's model; accuracy on each evaluation cell
        (`mqar_<L>_kv<pairs>` keys become the CSV's `mqar_L{L}_kv{pairs}` columns) and `recall`,
        the mean over cells no longer than the training length.
* lm:   byte-level LM on the standard library; held-out loss, bits per byte, passkey.
Each returns train_tokens (steps × batch × seq_len) and the mean logged tokens/s after the
first (compiling) step.
"""

from __future__ import annotations

import json
import os
import statistics

from train.sweep import Job, _to_config

__all__ = ["run_job"]


def _tokens_per_s(workdir: str) -> float:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 1]
    return statistics.fmean(speeds) if speeds else float("nan")


def _cells(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in c.split(":")) for c in spec.split(",") if c]


def run_job(job: Job, workdir: str, *, sweep, quiet: bool = True) -> dict:
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415

    from train.loop import train_and_evaluate  # noqa: PLC0415
    cfg = _to_config(job.config)
    sink = io.StringIO() if quiet else None
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        final = train_and_evaluate(cfg, workdir, explicit=set())
        out = {"train_tokens": int(cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len),
               "tokens_per_s": _tokens_per_s(workdir), "train_loss": final["train_loss"]}
        if job.kind in ("lr", "mqar"):
            out.update(_score_mqar(job, workdir, cfg, sweep))
        else:
            out.update(_score_lm(workdir, final, sweep))
    return out


def _score_mqar(job: Job, workdir: str, cfg, sweep) -> dict:
    import jax  # noqa: PLC0415

    from train.data import load_data  # noqa: PLC0415
    from train.eval import mqar_cell_accuracy, mqar_validation_accuracy  # noqa: PLC0415
    from train.restore import restore_run  # noqa: PLC0415
    m = sweep.mqar
    r = restore_run(workdir)
    if job.kind == "lr":
        data = load_data(cfg.data, seed=int(cfg.seed))
        with jax.set_mesh(r.ts.mesh):
            acc = mqar_validation_accuracy(r.ts, r.params, data, int(m.batch_size),
                                           int(m.val_batches))
        return {"val_accuracy": float(acc)}
    train_len = max(L for L, _ in _cells(m.train_cells))
    accs = mqar_cell_accuracy(r, _cells(m.eval_cells), int(m.eval_examples), int(m.batch_size))
    out = {f"mqar_{k}": float(v) for k, v in accs.items() if k.startswith("L")}
    scored = [v for (L, kv) in _cells(m.eval_cells) if L <= train_len
              for v in [accs[f"L{L}_kv{kv}"]]]
    out["recall"] = sum(scored) / len(scored)
    return out


def _score_lm(workdir: str, final: dict, sweep) -> dict:
    from train.eval import run_eval  # noqa: PLC0415
    t = sweep.lm
    res = run_eval(workdir, tasks=("passkey",), passkey_lengths=list(t.passkey_lengths),
                   passkey_trials=int(t.passkey_trials))
    return {"eval_loss": final["eval_loss"], "bits_per_byte": final["bits_per_byte"],
            "passkey": res["passkey"]["mean"]}
