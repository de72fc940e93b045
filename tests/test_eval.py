"""Evaluation: each task on a tiny checkpoint, the MQAR generator's invariants, the lm-eval
adapter against the trainer's loss, and bad input that leaves the workdir untouched."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_utils import tiny_config
from train import train_and_evaluate
from train.checkpoint import CheckpointError
from train.eval import EvalError, run_eval
from train.restore import restore_run
from train.tasks import MqarSpec, make_mqar, make_passkey_prompt, mqar_accuracy
from train.tasks.mqar import power_law_gap_probs
from zoo.model import cross_entropy


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(tiny_config(steps=4), path)
    return path


def _snapshot(path):
    return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getmtime(os.path.join(d, f)))
                  for d, _, fs in os.walk(path) for f in fs)


def test_every_task_runs_and_writes_results(workdir):
    res = run_eval(workdir, tasks=("ppl", "mqar", "passkey", "generate"), mqar_examples=8,
                   passkey_lengths=[96], passkey_trials=1, max_batches=1, max_new_tokens=4)
    assert res["step"] == 4
    assert np.isfinite(res["ppl"]["eval_loss"]) and res["ppl"]["bits_per_byte"] > 0
    assert 0 <= res["mqar"]["L64_kv4"] <= 1 and "L256_kv16" in res["mqar"]
    assert 0 <= res["passkey"]["mean"] <= 1
    assert res["generate"]["tokens_per_s"] > 0
    with open(os.path.join(workdir, "eval", "step_4.json")) as f:
        assert json.load(f)["ppl"]["eval_loss"] == res["ppl"]["eval_loss"]
    assert os.listdir(os.path.join(workdir, "eval", "tb"))


def test_mqar_file_is_scored(workdir, tmp_path):
    d = make_mqar(MqarSpec(vocab_size=64, seq_len=32, num_kv_pairs=3), 5, seed=0)
    path = str(tmp_path / "set.npz")
    np.savez(path, inputs=d["inputs"], targets=d["targets"])
    res = run_eval(workdir, tasks=("mqar",), mqar_file=path)
    assert 0 <= res["mqar"]["file_accuracy"] <= 1 and res["mqar"]["file_examples"] == 5


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(tasks=("nope",)), EvalError, r"unknown task\(s\) \['nope'\]"),
    (dict(step=999), CheckpointError, "no checkpoint for step 999"),
    (dict(tasks=("mqar",), mqar_file="big"), EvalError, "vocabulary is 256"),
])
def test_bad_input_leaves_workdir_unchanged(workdir, tmp_path, kwargs, error, message):
    if kwargs.get("mqar_file") == "big":
        kwargs["mqar_file"] = str(tmp_path / "big.npz")
        np.savez(kwargs["mqar_file"], inputs=np.full((2, 8), 300), targets=np.full((2, 8), -100))
    before = _snapshot(workdir)
    with pytest.raises(error, match=message):
        run_eval(workdir, **kwargs)
    assert _snapshot(workdir) == before


def test_workdir_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError):
        run_eval(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_mqar_generator_invariants():
    spec = MqarSpec(vocab_size=128, seq_len=96, num_kv_pairs=8)
    d = make_mqar(spec, 200, seed=3)
    keys, values, inputs, targets = d["keys"], d["values"], d["inputs"], d["targets"]
    assert ((keys >= 1) & (keys < 64)).all() and ((values >= 64) & (values < 128)).all()
    assert all(len(set(row)) == 8 for row in keys), "keys are distinct within an example"
    np.testing.assert_array_equal(inputs[:, 0:16:2], keys)
    np.testing.assert_array_equal(inputs[:, 1:16:2], values)
    for n in range(20):
        for key, value, pos in zip(keys[n], values[n], d["query_pos"][n]):
            assert inputs[n, pos] == key and targets[n, pos] == value
    assert ((targets != -100).sum(1) == 8).all()
    again = make_mqar(spec, 200, seed=3)
    np.testing.assert_array_equal(again["inputs"], inputs)
    assert not np.array_equal(make_mqar(spec, 200, seed=4)["inputs"], inputs)
    # Gaps follow the power law: the observed share of the smallest gap matches its probability
    # under sampling without replacement (simulated with the same law).
    gaps = (d["query_pos"] - 16) // 2
    space = (97 - 16) // 2
    assert gaps.max() < space
    rng = np.random.default_rng(0)
    p = power_law_gap_probs(space, 0.01)
    sim = np.stack([rng.choice(space, 8, replace=False, p=p) for _ in range(2000)])
    assert abs((gaps == 0).mean() - (sim == 0).mean()) < 0.05
    assert (gaps < space // 4).mean() > (gaps >= 3 * space // 4).mean()


def test_mqar_accuracy_per_example_then_mean():
    targets = np.array([[-100, 5, 6], [7, -100, -100]])
    preds = np.array([[0, 5, 0], [7, 0, 0]])
    assert mqar_accuracy(preds, targets) == pytest.approx((0.5 + 1.0) / 2)


def test_passkey_prompt_hides_the_key(workdir):
    tok = restore_run(workdir).tokenizer
    rng = np.random.default_rng(0)
    prompt, key = make_passkey_prompt(tok, 300, 0.5, rng)
    text = tok.decode(prompt)
    assert len(prompt) <= 300 and text.count(key) == 2 and text.endswith("The pass key is")
    with pytest.raises(ValueError, match="shorter than the needle"):
        make_passkey_prompt(tok, 20, 0.5, rng)


def test_lm_eval_rolling_loglikelihood_equals_trainer_loss(workdir):
    pytest.importorskip("lm_eval", reason="lm-eval comes with the `test` extra")
    from train.lm_eval_adapter import ZooLM

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = ZooLM(workdir, batch_size=2)
    text = "def add(a, b):\n    return a + b\n"
    rolling = lm.loglikelihood_rolling([Req(text)])[0]
    ids = jnp.asarray(lm.tok.encode(text))[None]
    logits, _ = lm.run.model()(ids[:, :-1])
    loss, n = cross_entropy(logits, ids[:, 1:])
    np.testing.assert_allclose(-rolling, float(loss) * int(n), rtol=1e-4)
    (ll, greedy), = lm.loglikelihood([Req("def add(a, b):", "\n    return")])
    assert ll < 0 and isinstance(greedy, bool)
    out = lm.generate_until([Req("import", {"until": ["\n"], "max_gen_toks": 8})])
    assert isinstance(out[0], str) and "\n" not in out[0]
