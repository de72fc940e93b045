"""Nothing is lost and no run is silently another: signals save and resume exactly, non-finite
updates are skipped, a resume with another schedule or model is refused in one line, the
tokenizer travels with the checkpoint, a finished run is not evaluated twice."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest

from tests import background
from tests.offload import offload
from tests.test_data import _FakeHF
from tests.train_utils import tiny_config
from train import train_and_evaluate
from train.checkpoint import CheckpointError
from train.guard import NonFiniteError
from train.restore import restore_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The SIGINT / SIGTERM sequence: five CLI runs in a script beside the suite (tests/background.py).
SIGNALS = background.job("signal_runs", ["tests/signal_runs.py", "{dir}"], timeout=1500)
BACKGROUND_JOBS = {"signal_runs": [SIGNALS]}


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture
def signal_runs():
    rc, _, err = SIGNALS.wait()
    assert rc == 0, err[-3000:]
    with open(SIGNALS.path("signals.json")) as f:
        return json.load(f)


def test_sigint_and_sigterm_save_and_the_rerun_resumes_exactly(signal_runs):
    """tests/signal_runs.py: a straight 40-step CLI run; the same command SIGINTed after 3
    steps, SIGTERMed after 3 more, hit by two SIGINTs, then run to the end."""
    r = signal_runs
    assert r["straight_rc"] == 0, r["straight_err"]
    straight, run = r["straight"], r["run"]
    ckpts = os.path.join(run, "checkpoints")
    sigint, sigterm, twice, final = r["runs"]

    rc, err = sigint["rc"], sigint["err"]
    assert rc == 130, err[-2000:]
    m = re.search(r"stopped: SIGINT at step (\d+)/40: saved checkpoint (\S+); run the same "
                  r"command to resume \(exit 130\)", err)
    assert m, err[-2000:]
    first = int(m.group(1))
    assert 3 <= first < 40 and m.group(2) == os.path.join(ckpts, str(first))
    assert "Traceback" not in err
    assert sigint["checkpoints"] == [first]

    rc, out, err = sigterm["rc"], sigterm["out"], sigterm["err"]
    assert rc == 143, err[-2000:]
    assert f"resumed from step {first}" in out
    second = int(re.search(r"stopped: SIGTERM at step (\d+)/40", err).group(1))
    assert second > first

    # Two Ctrl-C: abort at once, nothing new saved.
    rc, err = twice["rc"], twice["err"]
    assert rc == 130 and "SIGINT again: aborting now without saving" in err, err[-2000:]
    assert max(twice["checkpoints"]) == second

    assert final["rc"] == 0, final["err"][-2000:]
    a, b = _losses(straight), _losses(run)
    assert sorted(b) == list(range(1, 41)), "every step logged once"
    np.testing.assert_allclose([b[s] for s in range(1, 41)], [a[s] for s in range(1, 41)],
                               rtol=1e-6)


def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path, capsys):
    cfg = tiny_config(steps=12, lr=1e38, warmup_steps=1, max_skipped_steps=3)
    cfg.checkpoint.every = 2
    with pytest.raises(NonFiniteError) as e:
        train_and_evaluate(cfg, str(tmp_path))
    msg = str(e.value)
    m = re.match(r"step (\d+): 3 updates in a row skipped for a non-finite (loss|loss / "
                 r"grad_norm) \(train.max_skipped_steps=3\); the weights are those after step "
                 r"(\d+); last good checkpoint: (\S+); ", msg)
    assert m, msg
    stop, good = int(m.group(1)), int(m.group(3))
    assert stop == good + 3 and good >= 1
    assert m.group(4) == os.path.join(str(tmp_path), "checkpoints", str(good // 2 * 2))
    out = capsys.readouterr().out
    skipped = re.findall(r"step (\d+): update skipped, non-finite loss", out)
    assert [int(s) for s in skipped] == [good + 1, good + 2, good + 3]
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if r.get("skipped_update")] == [good + 1, good + 2, good + 3]
    # Skipped updates never reach the weights: the newest checkpoint is finite.
    params = restore_run(str(tmp_path)).params
    import jax
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("finished"))
    final = train_and_evaluate(tiny_config(steps=4), path)
    return path, final


def test_resume_with_another_schedule_is_refused(finished):
    path, _ = finished
    for edit, message in ((dict(steps=8), r"resume of .*: train.steps 4 -> 8 \(old -> new\); a "
                                          r"resume continues the run's schedule"),
                          (dict(steps=4, lr=1e-2), r"train.lr 0.003 -> 0.01"),
                          (dict(steps=4, warmup_steps=3), r"train.warmup_steps 2 -> 3")):
        with pytest.raises(CheckpointError, match=message):
            train_and_evaluate(tiny_config(**edit), path)


def test_resume_with_another_model_is_one_line(finished):
    path, _ = finished
    cfg = tiny_config(steps=4)
    cfg.model.layer_types = ("gdn", "attn")
    with pytest.raises(CheckpointError) as e:
        train_and_evaluate(cfg, path)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("use a new --workdir")
    assert "holds a different model: model.layer_types ('attn', 'attn') -> ('gdn', 'attn')" in msg


def test_rerunning_a_finished_run_does_not_duplicate_its_eval(finished, capsys):
    path, final = finished
    again = train_and_evaluate(tiny_config(steps=4), path)
    assert again["eval_loss"] == final["eval_loss"]
    assert "run already finished at step 4" in capsys.readouterr().out
    with open(os.path.join(path, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval_loss" in r]
    assert len(evals) == 1


def test_the_tokenizer_file_travels_with_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=_FakeHF))
    rng = np.random.default_rng(0)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text("".join(rng.choice(list("abc "), 3000)))
    tok = tmp_path / "tok.json"
    tok.write_text(json.dumps({"chars": "abc "}))
    cfg = tiny_config(steps=2)
    cfg.data.update(dict(source="text", path=str(docs), tokenizer=str(tok), max_bytes=0))
    run = str(tmp_path / "run")
    train_and_evaluate(cfg, run)
    stored = os.path.join(run, "checkpoints", "tokenizer.json")
    assert json.load(open(stored)) == {"chars": "abc "}
    shutil.move(str(tok), str(tmp_path / "moved.json"))
    r = restore_run(run)
    assert r.tokenizer.vocab_size == 4 and r.tokenizer.decode([2, 3, 0]) == "c a"
    with open(os.path.join(run, "checkpoints", "2", "meta", "metadata")) as f:
        ref = json.load(f)["tokenizer"]
    assert ref["file"] == "tokenizer.json" and len(ref["sha256"]) == 64 and "json" not in ref
    with open(stored, "w") as f:
        f.write(json.dumps({"chars": "abcd"}))
    with pytest.raises(CheckpointError, match="tokenizer file .* was changed"):
        restore_run(run)


@offload
def test_an_mqar_run_reports_recall_accuracy(tmp_path):
    from configs import mqar
    from train.recall import recall_accuracy
    cfg = mqar.get_config(None)
    cfg.train.update(dict(steps=3, batch_size=16, warmup_steps=1, log_every=1, eval_batches=2))
    cfg.data.mqar.heldout_examples = 32
    final = train_and_evaluate(cfg, str(tmp_path))
    r = restore_run(str(tmp_path))
    from train.data import load_data
    batches = load_data(cfg.data, seed=0).eval_batches(batch_size=16, max_batches=2)
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    expected = recall_accuracy(r.ts, r.params, inputs, targets, 16)
    assert final["recall_accuracy"] == pytest.approx(expected, abs=1e-6)


@offload
def test_two_hosts_stop_at_the_same_step_when_one_is_signalled(tmp_path):
    """Two processes (gloo collectives on CPU); SIGINT reaches only process 1, yet both stop
    at one step and write one checkpoint."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = os.path.join(ROOT, "tests", "multihost_interrupt.py")
    # Process 1's output goes to files: an unread pipe that fills would block it inside a
    # collective and so hang process 0 too.
    logs = [open(tmp_path / f"p{i}.{k}", "w+") for i in range(2) for k in ("out", "err")]
    procs = [subprocess.Popen([sys.executable, script, "0", str(port), str(tmp_path / "run")],
                              cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=logs[1]),
             subprocess.Popen([sys.executable, script, "1", str(port), str(tmp_path / "run")],
                              cwd=ROOT, text=True, stdout=logs[2], stderr=logs[3])]
    first = []
    try:
        for line in procs[0].stdout:
            first.append(line)
            if re.match(r"step\s+3/", line):
                procs[1].send_signal(signal.SIGINT)
                break
        rest = procs[0].communicate(timeout=300)[0]
        procs[1].wait(timeout=300)
    finally:
        for p in procs:
            p.kill()
    for f in logs:
        f.seek(0)
    outs = [("".join(first) + rest, logs[1].read()), (logs[2].read(), logs[3].read())]
    stopped = [re.search(r"STOPPED (\d+) (\d+)", out) for out, _ in outs]
    assert all(stopped), [err[-2000:] for _, err in outs]
    steps = {int(m.group(1)) for m in stopped}
    assert len(steps) == 1 and {int(m.group(2)) for m in stopped} == {130}
    assert sorted(s for s in os.listdir(tmp_path / "run" / "checkpoints") if s.isdigit()) == [
        str(steps.pop())]
