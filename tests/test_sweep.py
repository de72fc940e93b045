"""The ablation runner: a 2-cell sweep end to end, resume, shards, failures, learning-rate
choice, dry run and bad input. Only the end-to-end test trains (tiny models, a few steps)."""

import csv
import json
import os

import pytest

from configs.ablations import hybrid_ratio, layer_swap
from configs.ablations import recall as recall_sweep
from scripts import ablate
from tests import background
from tests.sweep_tiny import tiny_sweep as _tiny_sweep
from train.sweep import SweepError, chosen_lr, collect_rows, parse_shard, plan_jobs, run_jobs
from zoo.config import ConfigError


# The end-to-end sweep trains its tiny jobs through the CLI, beside the suite
# (tests/background.py).
SWEEP = background.job("sweep_end_to_end", ["scripts/ablate.py", "--config",
                                            "tests/sweep_tiny.py", "--workdir", "{dir}/sweep"],
                       timeout=1200)
BACKGROUND_JOBS = {"swept": [SWEEP]}


@pytest.fixture
def swept():
    """The end-to-end run's workdir."""
    rc, _, err = SWEEP.wait()
    assert rc == 0, err[-3000:]
    return SWEEP.path("sweep")


def test_a_two_cell_sweep_runs_end_to_end(swept):
    sweep, wd = _tiny_sweep(), swept
    with open(os.path.join(wd, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == ["gdn_r1", "attn_all"]
    assert all(r["status"] == "ok" for r in rows), rows
    gdn, attn = rows
    assert float(gdn["attn_share"]) == 0.5 and float(attn["attn_share"]) == 1.0
    for r in rows:
        accs = [float(r[f"mqar_L{L}_kv{kv}"]) for L, kv in ((16, 2), (32, 4), (64, 8))]
        assert float(r["recall"]) == pytest.approx((accs[0] + accs[1]) / 2)  # trained lengths
        assert int(r["train_tokens"]) == 2 * 8 * 32 and int(r["mqar_train_tokens"]) == 2 * 8 * 32
        assert float(r["bits_per_byte"]) == pytest.approx(float(r["eval_loss"]) / 0.6931471805599453)
        assert 0 <= float(r["passkey"]) <= 1 and float(r["lr"]) == 3e-3
    assert int(attn["cache_bytes_32k"]) > int(gdn["cache_bytes_32k"]) > int(gdn["cache_bytes_2k"])
    md = open(os.path.join(wd, "results.md")).read()
    assert "| gdn_r1 | gdn,attn | 0.50 |" in md
    for png in ("recall_vs_attn_share.png", "loss_vs_attn_share.png", "recall_vs_cache.png"):
        with open(os.path.join(wd, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # A second run finds everything finished and trains nothing.
    calls = []
    run_jobs(plan_jobs(sweep), wd, runner=lambda j, w: calls.append(j) or {}, say=lambda *a, **k: None)
    assert calls == []


def _fake_result(job, wd):
    return {"val_accuracy": {3e-3: 0.4, 1e-2: 0.6}.get(job.lr, 0.0), "recall": 0.5,
            "train_tokens": 1, "tokens_per_s": 1.0, "eval_loss": 1.0, "bits_per_byte": 1.4,
            "passkey": 0.0, "mqar_L16_kv2": 0.5}


def test_resume_runs_only_the_missing_jobs_and_failures_are_recorded(tmp_path):
    sweep = _tiny_sweep(lrs=(3e-3, 1e-2))
    jobs = plan_jobs(sweep)
    assert [j.kind for j in jobs] == ["lr"] * 4 + ["mqar", "lm"] * 2
    seen = []

    def killed_after_six(job, wd):
        if len(seen) == 6:
            raise KeyboardInterrupt
        seen.append(job.name)
        if job.kind == "lm" and job.cell == "gdn_r1":
            raise RuntimeError("loss diverged\nsecond line")
        return _fake_result(job, wd)

    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, str(tmp_path), runner=killed_after_six, say=lambda *a, **k: None)
    again = []
    run_jobs(jobs, str(tmp_path), runner=lambda j, w: again.append(j.name) or _fake_result(j, w),
             say=lambda *a, **k: None)
    assert again == ["attn_all_s0", "attn_all_s0"] and len(seen) == 6
    failed = json.load(open(os.path.join(tmp_path, "lm", "gdn_r1_s0", "result.json")))
    assert failed["status"] == "failed" and failed["reason"] == "RuntimeError: loss diverged"
    mqar = json.load(open(os.path.join(tmp_path, "mqar", "gdn_r1_s0", "job.json")))
    assert mqar["lr"] == 1e-2, "the best validation accuracy picks the rate"
    rows = collect_rows(sweep, str(tmp_path), jobs)
    assert [r["status"] for r in rows] == ["failed", "ok"]


def test_chosen_lr_waits_for_every_rate_and_breaks_ties_low(tmp_path):
    jobs = [j for j in plan_jobs(_tiny_sweep(lrs=(3e-3, 1e-2))) if j.kind == "lr"
            and j.mixer == "gdn"]
    assert chosen_lr(str(tmp_path), jobs) is None
    for job, acc in zip(jobs, (0.7, 0.7)):
        os.makedirs(job.workdir(str(tmp_path)))
        json.dump({"status": "ok", "val_accuracy": acc},
                  open(os.path.join(job.workdir(str(tmp_path)), "result.json"), "w"))
    assert chosen_lr(str(tmp_path), jobs)[0] == 3e-3


def test_shards_cover_every_cell_once():
    sweep = hybrid_ratio.get_config("preset=cpu")
    every = {(j.kind, j.name) for j in plan_jobs(sweep) if j.kind != "lr"}
    parts = [{(j.kind, j.name) for j in plan_jobs(sweep, shard=(i, 2)) if j.kind != "lr"}
             for i in range(2)]
    assert parts[0] | parts[1] == every and not parts[0] & parts[1]
    assert {j.cell for j in plan_jobs(sweep, only="^gdn_") if j.kind != "lr"} == {
        "gdn_pure", "gdn_r3", "gdn_r1"}


def test_dry_run_trains_nothing(tmp_path, capsys):
    wd = str(tmp_path / "sweep")
    assert ablate.main(["--config", "configs/ablations/hybrid_ratio.py:preset=cpu",
                        "--workdir", wd, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mqar   gdn_r3_s0" in out and "20 jobs; estimated" in out
    assert not os.path.exists(wd)


def test_report_only_reads_partial_results(tmp_path, capsys):
    sweep = _tiny_sweep(lm=False)
    jobs = plan_jobs(sweep)
    run_jobs(jobs[:1], str(tmp_path), runner=_fake_result, say=lambda *a, **k: None)
    rows = collect_rows(sweep, str(tmp_path), jobs)
    assert [r["status"] for r in rows] == ["ok", "missing"]
    from train.sweep_report import write_report
    paths = write_report(rows, str(tmp_path), "t")
    assert all(os.path.getsize(p) > 0 for p in paths)


@pytest.mark.parametrize("edit, error, message", [
    (lambda c: setattr(c, "cells", (dict(name="x", layer_types="gdn,nope"),)), SweepError,
     r"cell 'x': unknown mixer\(s\) \['nope'\]"),
    (lambda c: setattr(c, "cells", (dict(name="x", layer_types="gdn,mamba2"),)), SweepError,
     r"mixes linear mixers \['gdn', 'mamba2'\]"),
    (lambda c: setattr(c, "cells", (dict(name="x", layer_types="gdn"),) * 2), SweepError,
     "duplicate names"),
])
def test_bad_sweeps_fail_before_training(edit, error, message):
    sweep = _tiny_sweep()
    edit(sweep)
    with pytest.raises(error, match=message):
        plan_jobs(sweep)


def test_bad_shard_ratio_and_another_sweeps_workdir(tmp_path):
    for spec in ("3/2", "1", "a/b"):
        with pytest.raises(SweepError, match="--shard"):
            parse_shard(spec)
    from train.sweep import ratio_cells
    with pytest.raises(ConfigError, match="model.ratio=2 needs model.n_layers to be a multiple "
                                          "of 3"):
        ratio_cells(["gdn"], [2], 4)
    sweep = _tiny_sweep(lm=False)
    run_jobs(plan_jobs(sweep)[:1], str(tmp_path), runner=_fake_result, say=lambda *a, **k: None)
    sweep.mqar.steps = 5
    with pytest.raises(SweepError, match=r"holds job 'gdn_r1_s0' of another sweep .*config "
                                         r"\['train'\]"):
        run_jobs(plan_jobs(sweep), str(tmp_path), runner=_fake_result, say=lambda *a, **k: None)


def test_sweep_configs_build():
    for cfg in (hybrid_ratio.get_config("preset=cpu"), hybrid_ratio.get_config("preset=gpu"),
                layer_swap.get_config("preset=cpu"), layer_swap.get_config("preset=tpu"),
                recall_sweep.get_config("preset=cpu")):
        assert plan_jobs(cfg)
    swap = {c["name"]: c["layer_types"] for c in layer_swap.get_config("preset=cpu").cells}
    assert swap["gdn_attn_first"] == "attn,gdn,gdn,gdn" and swap["gdn_attn_last"] == "gdn,gdn,gdn,attn"
    with pytest.raises(ValueError, match="preset: unknown 'big'"):
        hybrid_ratio.get_config("preset=big")
