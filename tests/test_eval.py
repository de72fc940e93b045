"""Evaluation: each task on a tiny checkpoint, results merged per task and data source, the
generate settings, the tokenizer travelling with the checkpoint, the MQAR generator's
invariants, the lm-eval adapter against the trainer's loss, and bad input that leaves the
workdir untouched."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_utils import tiny_config
from train import train_and_evaluate
from train.checkpoint import CheckpointError
from train.data import ByteTokenizer
from train.eval import EvalError, data_label, decode_escapes, run_eval
from train.restore import restore_run
from train.tasks import MqarSpec, make_mqar, make_passkey_prompt, mqar_accuracy
from train.tasks.mqar import power_law_gap_probs
from zoo.model import cross_entropy


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(tiny_config(steps=4), path)
    return path


def _final_eval_loss(workdir):
    """eval_loss of the end-of-run evaluation, from the run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "eval_loss" in row][-1]["eval_loss"]


def _results(workdir, step=4):
    with open(os.path.join(workdir, "eval", f"step_{step}.json")) as f:
        return json.load(f)


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
    (dict(temperature=-0.5), EvalError, "^--temperature: must be >= 0"),
    (dict(top_p=0.0), EvalError, r"^--top_p: must lie in \(0, 1\]"),
    (dict(top_p=1.5), EvalError, "^--top_p"),
    (dict(top_k=-1), EvalError, "^--top_k"),
    (dict(max_new_tokens=0), EvalError, "^--max_new_tokens"),
    (dict(prompts_file="/nonexistent/prompts.txt"), EvalError, "^--prompts_file: cannot read"),
    (dict(tasks=("generate",), prompts=["def ", ""]), EvalError, "^--prompt #2: '' is not a"),
    (dict(tasks=("ppl",), data_files="/nonexistent/a.txt"), EvalError, "^--data: .* not exist"),
    (dict(tasks=("mqar",), data_files="a.txt"), EvalError, "^--data is read by the ppl task"),
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
    pytest.importorskip("lm_eval", reason="lm-eval is in the `eval` extra: pip install -e '.[eval]'")
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


def test_results_merge_per_task_and_data_source(workdir, tmp_path, monkeypatch):
    """ppl, then mqar, then ppl on files (with mqar again) merge into one step_<N>.json; the
    checkpoint's tokenizer is used throughout: loading the configured one fails here."""
    import train.data.pipeline as pipeline

    def gone(spec, **_):
        raise AssertionError(f"load_tokenizer({spec!r}) called: eval must use the checkpoint's")

    monkeypatch.setattr(pipeline, "load_tokenizer", gone)
    shutil.rmtree(os.path.join(workdir, "eval"), ignore_errors=True)
    held = run_eval(workdir, tasks=("ppl",))["ppl"]
    # Same batch size and eval_batches as the run: the end-of-run evaluation, reproduced.
    assert held["eval_loss"] == pytest.approx(_final_eval_loss(workdir), abs=1e-5)
    mqar = run_eval(workdir, tasks=("mqar",), mqar_examples=8)["mqar"]
    assert set(_results(workdir)) == {"step", "ppl", "mqar", "sources"}
    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(40)))
    res = run_eval(workdir, tasks=("ppl", "mqar"), data_files=str(notes), mqar_examples=8)
    files = res["ppl[notes.txt]"]
    assert files["eval_loss"] != held["eval_loss"] and files["eval_tokens"] > 0

    out = _results(workdir)
    assert set(out) == {"step", "ppl", "mqar", "ppl[notes.txt]", "sources"}
    assert out["ppl"] == held and out["ppl[notes.txt]"] == files
    # mqar ran again: its entry is replaced (same accuracies, this run's seconds), not added.
    assert out["mqar"] == res["mqar"] and out["mqar"]["L64_kv4"] == mqar["L64_kv4"]
    assert out["sources"] == {
        "ppl": out["sources"]["ppl"], "ppl[notes.txt]": res["sources"]["ppl[notes.txt]"]}
    assert out["sources"]["ppl"].startswith("held-out split of stdlib (")
    # No "(the run trained on fingerprint ...)": the corpus is the one the run trained on.
    assert re.search(r"\), fingerprint [0-9a-f]{16}$", out["sources"]["ppl"])
    assert out["sources"]["ppl[notes.txt]"].startswith(f"files: {notes} (text), held-out half")

    # One TensorBoard tag per (key, metric): each tag only ever holds one source's values.
    with open(os.path.join(workdir, "eval", "scalars.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    values = {}
    for row in rows:
        for tag, v in row.items():
            if tag.endswith("/eval_loss"):
                values.setdefault(tag, set()).add(v)
    assert values == {"ppl/eval_loss": {held["eval_loss"]},
                      "ppl[notes.txt]/eval_loss": {files["eval_loss"]}}


def test_data_label_is_a_short_deterministic_tag():
    assert data_label("/a/notes.txt, b/c.jsonl") == "notes.txt+c.jsonl"
    assert data_label("corpus/dir/") == "dir" and data_label("x/my file*.txt") == "my_file_.txt"
    long = ",".join(f"/d/shard_{i:03d}.jsonl" for i in range(20))
    label = data_label(long)
    assert len(label) == 40 and label.startswith("shard_000.jsonl+shard_001.jsonl~")
    assert label == data_label(long) != data_label(long.replace("019", "020"))
    assert decode_escapes(r"a\nb\tc\\n\q") == "a\nb\tc\\n\\q"


def test_generate_settings_are_used_and_recorded(workdir, tmp_path):
    prompt = "def f(x):\n    return"
    res = run_eval(workdir, tasks=("generate",), prompts=[prompt], greedy=True, max_new_tokens=3)
    (sample,) = res["generate_samples"]
    assert sample["prompt"] == prompt and len(sample["tokens"]) == 3
    assert sample["continuation"] == ByteTokenizer().decode(sample["tokens"])
    out = _results(workdir)
    assert out["generate_samples"] == [sample] and out["generate"]["batch"] == 1.0
    assert out["generate_settings"] == dict(max_new_tokens=3, temperature=0.8, top_k=40,
                                            top_p=1.0, greedy=True, seed=0)
    # The same prompt from a file, its newline escaped: decoded, and greedy is deterministic.
    path = tmp_path / "prompts.txt"
    path.write_text("def f(x):\\n    return\n\n")
    again = run_eval(workdir, tasks=("generate",), prompts_file=str(path), greedy=True,
                     max_new_tokens=3)
    assert again["generate_samples"] == [sample]


def test_hf_tokenizer_file_can_move_after_training(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers is optional")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                             initial_alphabet=alphabet)
    tok.train_from_iterator([f"def f{i}(x):\n    return x + {i}\n" for i in range(200)], trainer)
    path = tmp_path / "tok.json"
    tok.save(str(path))
    cfg = tiny_config(steps=2)
    cfg.data.tokenizer = str(path)
    run = str(tmp_path / "run")
    train_and_evaluate(cfg, run)
    os.rename(path, tmp_path / "moved.json")
    res = run_eval(run, tasks=("ppl",))
    assert res["ppl"]["eval_loss"] == pytest.approx(_final_eval_loss(run), abs=1e-5)
    assert "bits_per_token" in res["ppl"]
