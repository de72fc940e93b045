"""Ablation sweeps: a sweep config -> jobs -> one workdir and one result file per job.

A sweep config (`configs/ablations/*.py`) names cells (a layer list each: the hybrid ratio or
the layer placement under study), seeds, and two training recipes shared by every cell:

* `mqar`: a recall model trained on an MQAR mixture of (length, pairs) cells and scored on
  held-out cells, longer ones included (`recall` = mean accuracy over the scored cells no
  longer than the training length; longer ones are reported, not averaged);
* `lm` (optional): a byte-level language model on the standard library's source (held-out loss,
  bits per byte, passkey).

Every cell gets the same training tokens for each recipe (same steps, batch and length). The
MQAR learning rate is chosen once per mixer — the pure-mixer model trained at each rate of
`mqar.lrs` on a calibration seed, scored on the MQAR source's validation stream (its own seed
stream, never a reported cell) — and reused across that mixer's ratios and seeds.

Jobs run in order (learning-rate jobs first), each in `<workdir>/<kind>/<name>/` through
`train_and_evaluate`, and write `result.json` there when done ({"status": "ok" | "failed",
...}): a finished job is skipped, a killed one resumes from its checkpoint, a failed one (a
divergence, an exception) is recorded with its reason and the sweep goes on. `job.json` holds
the job's settings; a workdir whose job was made with other settings is refused before
anything trains. `shard=(i, n)` runs the cells with index ≡ i (mod n) — for a scheduler's job
array — and waits for learning rates that another shard chooses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Callable

import ml_collections

from configs import lm as lm_config
from zoo.config import ConfigError, hybrid_pattern

__all__ = ["Job", "SweepError", "plan_jobs", "run_jobs", "cell_costs", "collect_rows",
           "parse_shard", "cell_layer_types", "ratio_cells"]

ATTENTION = ("attn", "swa")


class SweepError(ValueError):
    """A sweep that cannot run as asked (bad cell, shard spec, or a workdir of other settings)."""


@dataclasses.dataclass(frozen=True)
class Job:
    kind: str                 # "lr" | "mqar" | "lm"
    name: str                 # unique within its kind; the workdir is <kind>/<name>
    cell: str                 # the cell it belongs to ("" for lr jobs)
    mixer: str                # the cell's non-attention mixer ("attn" for all-attention)
    layer_types: tuple
    seed: int
    lr: float | None          # None: chosen by the mixer's lr jobs
    config: dict              # the training config (lr filled in when the job runs)

    def workdir(self, root: str) -> str:
        return os.path.join(root, self.kind, self.name)


def ratio_cells(mixers, ratios, n_layers: int, attention: str = "attn") -> list[dict]:
    """Cells of a hybrid-ratio sweep: every mixer at every ratio (hybrid_pattern rejects a ratio
    n_layers cannot hold), plus the all-attention baseline."""
    cells = []
    for m in mixers:
        for r in ratios:
            name = f"{m}_r{r}" if r else f"{m}_pure"
            cells.append(dict(name=name, layer_types=",".join(hybrid_pattern(n_layers, m, r))))
    cells.append(dict(name=f"{attention}_all", layer_types=",".join((attention,) * n_layers)))
    return cells


def cell_layer_types(cell) -> tuple[str, ...]:
    from train.state import normalize_layer_types  # noqa: PLC0415
    return normalize_layer_types(cell["layer_types"])


def _mixer_of(layer_types) -> str:
    linear = sorted({t for t in layer_types if t not in ATTENTION})
    if len(linear) > 1:
        raise SweepError(f"cell with layer_types {','.join(layer_types)}: mixes linear mixers "
                         f"{linear}; a cell studies one mixer against attention")
    return linear[0] if linear else "attn"


def _model_fields(sweep, layer_types) -> dict:
    model = dict(sweep.model.to_dict())
    # Options of mixers the cell does not use would be an error (a setting never ignored).
    options = {m: o for m, o in dict(model.get("mixer_options", {})).items() if m in layer_types}
    model.update(layer_types=tuple(layer_types), n_layers=len(layer_types),
                 mixer_options=options)
    return model


def _mqar_config(sweep, layer_types, seed: int, lr) -> dict:
    m = sweep.mqar
    cells = [tuple(int(x) for x in c.split(":")) for c in m.train_cells.split(",")]
    return dict(seed=seed, model=_model_fields(sweep, layer_types),
                data=dict(source="mqar", seq_len=max(L for L, _ in cells),
                          mqar=dict(vocab_size=m.vocab_size, cells=m.train_cells,
                                    heldout_examples=m.heldout_examples)),
                train=dict(steps=m.steps, batch_size=m.batch_size, lr=lr,
                           warmup_steps=m.warmup_steps, eval_batches=m.eval_batches,
                           log_every=m.log_every),
                checkpoint=dict(every=m.checkpoint_every))


def _lm_config(sweep, layer_types, seed: int) -> dict:
    t = sweep.lm
    return dict(seed=seed, model=_model_fields(sweep, layer_types),
                data=dict(source="stdlib", seq_len=t.seq_len, max_bytes=t.max_bytes),
                train=dict(steps=t.steps, batch_size=t.batch_size, lr=t.lr,
                           warmup_steps=t.warmup_steps, eval_batches=t.eval_batches,
                           log_every=t.log_every),
                checkpoint=dict(every=t.checkpoint_every))


def parse_shard(spec: str | None) -> tuple[int, int]:
    if not spec:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise SweepError(f"--shard {spec!r}: expected i/n with integers 0 <= i < n") from None
    if not 0 <= i < n:
        raise SweepError(f"--shard {spec!r}: expected i/n with 0 <= i < n")
    return i, n


def plan_jobs(sweep, only: str | None = None, shard=(0, 1)) -> list[Job]:
    """Every job of the sweep in run order (lr jobs, then per cell and seed: mqar, lm),
    filtered by `only` (a regex on the cell name) and `shard`."""
    import re  # noqa: PLC0415
    from zoo.registry import known_mixers  # noqa: PLC0415
    pattern = re.compile(only) if only else None
    names = [c["name"] for c in sweep.cells]
    if len(set(names)) != len(names):
        raise SweepError(f"cells: duplicate names in {names}")
    cells = []
    for index, cell in enumerate(sweep.cells):
        layer_types = cell_layer_types(cell)
        unknown = sorted(set(layer_types) - set(known_mixers()))
        if unknown:
            raise SweepError(f"cell {cell['name']!r}: unknown mixer(s) {unknown}; known: "
                             f"{known_mixers()}")
        if pattern and not pattern.search(cell["name"]):
            continue
        if index % shard[1] == shard[0]:
            cells.append((cell["name"], layer_types))
    lr_jobs, jobs = {}, []
    for name, layer_types in cells:
        mixer = _mixer_of(layer_types)
        if len(sweep.mqar.lrs) > 1 and mixer not in lr_jobs:
            pure = (mixer,) * len(layer_types)
            lr_jobs[mixer] = [Job("lr", f"{mixer}_lr{lr:g}", "", mixer, pure,
                                  int(sweep.mqar.lr_seed), float(lr),
                                  _mqar_config(sweep, pure, int(sweep.mqar.lr_seed), float(lr)))
                              for lr in sweep.mqar.lrs]
        for seed in sweep.seeds:
            fixed_lr = float(sweep.mqar.lrs[0]) if len(sweep.mqar.lrs) == 1 else None
            jobs.append(Job("mqar", f"{name}_s{seed}", name, mixer, layer_types, int(seed),
                            fixed_lr, _mqar_config(sweep, layer_types, int(seed), fixed_lr)))
            if sweep.get("lm") is not None:
                jobs.append(Job("lm", f"{name}_s{seed}", name, mixer, layer_types, int(seed),
                                float(sweep.lm.lr), _lm_config(sweep, layer_types, int(seed))))
    return [j for js in lr_jobs.values() for j in js] + jobs


# ----------------------------------------------------------------------------- running


def _to_config(d: dict) -> ml_collections.ConfigDict:
    cfg = lm_config.get_config(f"data={d['data']['source']}")
    for section, fields in d.items():
        if isinstance(fields, dict):
            for k, v in fields.items():
                if isinstance(v, dict):
                    cfg[section][k].update(v)
                else:
                    cfg[section][k] = v
        else:
            cfg[section] = fields
    return cfg


def _read(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def check_settings(jobs, root: str) -> None:
    """A job workdir made with other settings is an error (before anything trains)."""
    for job in jobs:
        saved = _read(os.path.join(job.workdir(root), "job.json"))
        if saved is None:
            continue
        mine = json.loads(json.dumps(dataclasses.asdict(job)))
        if job.lr is None:   # chosen later: compare without it
            saved = {**saved, "lr": None, "config": {**saved["config"], "train": {
                **saved["config"]["train"], "lr": None}}}
        if saved != mine:
            diff = sorted(k for k in mine if saved.get(k) != mine[k])
            sub = sorted(k for k in mine["config"] if saved["config"].get(k) != mine["config"][k])
            raise SweepError(f"{job.workdir(root)} holds job {job.name!r} of another sweep "
                             f"(differs in {diff}{' / config ' + str(sub) if sub else ''}); use "
                             f"a new --workdir or delete that folder")


def chosen_lr(root: str, jobs_of_mixer: list[Job]) -> tuple[float, dict] | None:
    """The best learning rate of a mixer's finished lr jobs (validation accuracy; ties go to the
    smaller rate), or None while any is unfinished."""
    scores = {}
    for job in jobs_of_mixer:
        res = _read(os.path.join(job.workdir(root), "result.json"))
        if res is None:
            return None
        scores[job.lr] = res.get("val_accuracy", -1.0) if res["status"] == "ok" else -1.0
    best = max(sorted(scores), key=lambda lr: scores[lr])
    return best, scores


def run_jobs(jobs: list[Job], root: str, *, runner: Callable, say=print,
             wait_s: float = 5.0, lr_jobs_by_mixer: dict | None = None) -> None:
    """Run each unfinished job with `runner(job, workdir) -> result dict`; record failures."""
    check_settings(jobs, root)
    lr_jobs_by_mixer = lr_jobs_by_mixer or {}
    for job in jobs:
        if job.kind == "lr":
            lr_jobs_by_mixer.setdefault(job.mixer, []).append(job)
    todo = [j for j in jobs if _read(os.path.join(j.workdir(root), "result.json")) is None]
    say(f"sweep: {len(jobs)} jobs, {len(jobs) - len(todo)} already finished, {len(todo)} to run")
    t0, done = time.time(), 0
    for i, job in enumerate(todo):
        wd = job.workdir(root)
        if job.lr is None:
            job = _with_chosen_lr(job, root, lr_jobs_by_mixer, say, wait_s)
        _write(os.path.join(wd, "job.json"), dataclasses.asdict(job))
        eta = f"{(time.time() - t0) / done * (len(todo) - i):.0f}s" if done else "?"
        say(f"[{i + 1}/{len(todo)}] {job.kind} {job.name} ({','.join(job.layer_types)}, "
            f"lr {job.lr:g}) | eta {eta}", flush=True)
        start = time.time()
        try:
            result = {"status": "ok", **runner(job, wd)}
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001  (a failed cell is recorded; the sweep goes on)
            from train.interrupt import Interrupted  # noqa: PLC0415
            if isinstance(e, Interrupted):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            result = {"status": "failed", "reason": f"{type(e).__name__}: {first}"}
            say(f"    failed: {result['reason']}")
        result.update(seconds=time.time() - start, lr=job.lr)
        _write(os.path.join(wd, "result.json"), result)
        done += 1


def _with_chosen_lr(job, root, lr_jobs_by_mixer, say, wait_s) -> Job:
    lr_jobs = lr_jobs_by_mixer.get(job.mixer)
    if not lr_jobs:
        raise SweepError(f"job {job.name}: no learning-rate jobs for mixer {job.mixer!r}")
    waited = False
    while (chosen := chosen_lr(root, lr_jobs)) is None:
        if not waited:
            say(f"    waiting for the learning rate of {job.mixer} (another shard runs it)")
            waited = True
        time.sleep(wait_s)
    lr, scores = chosen
    say(f"    {job.mixer}: lr {lr:g} (validation accuracy "
        f"{', '.join(f'{k:g}: {v:.3f}' for k, v in sorted(scores.items()))})")
    config = {**job.config, "train": {**job.config["train"], "lr": lr}}
    return dataclasses.replace(job, lr=lr, config=config)


# ----------------------------------------------------------------------------- costs and rows


def cell_costs(sweep, layer_types, seq_len: int) -> dict:
    """Parameters, FLOPs per token at seq_len and decode cache bytes at 2k / 32k of a cell's
    model, from an abstract model (nothing is allocated)."""
    from flax import nnx  # noqa: PLC0415

    from train.state import build_model_config  # noqa: PLC0415
    from zoo.model import LM  # noqa: PLC0415
    cfg = build_model_config(_model_fields(sweep, layer_types), 256)
    model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    import jax  # noqa: PLC0415
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {"params": int(params), "flops_per_token": float(model.flops_per_token(seq_len)),
            "cache_bytes_2k": int(model.cache_bytes(2048)),
            "cache_bytes_32k": int(model.cache_bytes(32768))}


def collect_rows(sweep, root: str, jobs: list[Job]) -> list[dict]:
    """One row per (cell, seed) from whatever has finished: the mqar and lm results merged."""
    rows = {}
    for job in jobs:
        if job.kind == "lr":
            continue
        res = _read(os.path.join(job.workdir(root), "result.json"))
        key = (job.cell, job.seed)
        if key not in rows:
            n_attn = sum(t in ATTENTION for t in job.layer_types)
            rows[key] = {"cell": job.cell, "mixer": job.mixer,
                         "layer_types": ",".join(job.layer_types),
                         "attn_share": n_attn / len(job.layer_types), "seed": job.seed,
                         "status": "missing", **cell_costs(sweep, job.layer_types,
                                                           _cost_len(sweep))}
        row = rows[key]
        if res is None:
            continue
        if res["status"] != "ok":
            row["status"] = "failed"
            row.setdefault("reason", f"{job.kind}: {res.get('reason', '')}")
            continue
        if job.kind == "mqar":
            row.update({k: v for k, v in res.items() if k.startswith("mqar_")},
                       recall=res["recall"], lr=res["lr"], mqar_train_tokens=res["train_tokens"],
                       train_tokens_per_s=res["tokens_per_s"])
        else:
            row.update(eval_loss=res["eval_loss"], bits_per_byte=res["bits_per_byte"],
                       passkey=res["passkey"], train_tokens=res["train_tokens"],
                       lm_tokens_per_s=res["tokens_per_s"])
        if row["status"] == "missing":
            row["status"] = "partial"
        needs = ("recall",) + (("eval_loss",) if sweep.get("lm") is not None else ())
        if row["status"] == "partial" and all(k in row for k in needs):
            row["status"] = "ok"
    return list(rows.values())


def _cost_len(sweep) -> int:
    return int(sweep.lm.seq_len) if sweep.get("lm") is not None else max(
        int(c.split(":")[0]) for c in sweep.mqar.train_cells.split(","))


def mean_std(values) -> tuple[float, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
