"""Evaluate a checkpoint: `python -m train.eval --workdir runs/x [--step N] [--tasks ...]`.

Tasks (comma list, default all that fit the run):
  ppl       loss, perplexity and bits per byte (per token for other tokenizers) on the run's
            held-out split, or on `--data` files (.txt/.md/.py as text, .jsonl as jsonl)
  mqar      multi-query associative recall accuracy on the standard (length, pairs) suite,
            lengths beyond training included, or on `--mqar_file` (npz: inputs, targets [N, L])
  passkey   greedy recall of a number hidden at depths 0..1 in filler text, by length
  generate  sampled continuations of a batch of prompts of different lengths, tokens/s
Results: a table on stdout, `<workdir>/eval/step_<N>.json`, TensorBoard scalars under
`<workdir>/eval/tb`. Every input is checked before anything is written.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from train.checkpoint import CheckpointError
from train.data import DataError, load_data
from train.loop import evaluate_heldout
from train.sharding import to_global
from train.metrics import MetricsWriter
from train.restore import Restored, restore_run
from train.sharding import batch_sharding
from train.state import TrainState
from train.tasks import MQAR_SUITE, MqarSpec, make_mqar, make_passkey_prompt, mqar_accuracy
from zoo.generate import generate

__all__ = ["TASKS", "run_eval", "recall_accuracy", "EvalError"]

TASKS = ("ppl", "mqar", "passkey", "generate")


class EvalError(ValueError):
    """A task that cannot run on this checkpoint."""


def eval_ppl(r: Restored, data_files: str | None, batch_size: int, max_batches: int) -> dict:
    data_cfg = r.config.data.copy_and_resolve_references()
    if data_files:
        jsonl = all(p.endswith(".jsonl") for p in data_files.split(","))
        data_cfg.update(dict(source="jsonl" if jsonl else "text", path=data_files,
                             heldout_fraction=0.5))
    data = load_data(data_cfg, seed=int(r.config.seed))
    with jax.set_mesh(r.ts.mesh):
        return evaluate_heldout(r.ts, r.params, data, batch_size, max_batches)


@functools.partial(jax.jit, static_argnums=0)
def _argmax_tokens(graphdef, params, inputs):
    logits, _ = nnx.merge(graphdef, nnx.State(params))(inputs)
    return jnp.argmax(logits, -1)  # [B, L]


def recall_accuracy(ts: TrainState, params, inputs: np.ndarray, targets: np.ndarray,
                    batch_size: int) -> float:
    """MQAR accuracy (`mqar_accuracy`) of the model's argmax predictions on inputs/targets
    [N, L], in batches spread over the mesh's batch axes (the last one zero-padded)."""
    sh = batch_sharding(ts.mesh)
    n_shards = ts.mesh.shape["data"] * ts.mesh.shape["fsdp"]
    bs = max(n_shards, batch_size // n_shards * n_shards)
    preds = []
    with jax.set_mesh(ts.mesh):
        for i in range(0, len(inputs), bs):
            chunk = inputs[i:i + bs]
            pad = bs - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])
            out = _argmax_tokens(ts.graphdef, params, to_global({"x": chunk}, sh)["x"])
            preds.append(np.asarray(out)[:bs - pad])
    return mqar_accuracy(np.concatenate(preds), targets)


def _mqar_spec_of(r: Restored, seq_len: int, pairs: int) -> MqarSpec:
    mq = r.config.data.get("mqar") if r.config.data.source == "mqar" else None
    vocab = int(mq.vocab_size) if mq else min(256, r.tokenizer.vocab_size)
    return MqarSpec(vocab_size=vocab, seq_len=seq_len, num_kv_pairs=pairs)


def eval_mqar(r: Restored, mqar_file: str | None, examples: int, batch_size: int) -> dict:
    if mqar_file:
        with np.load(mqar_file) as f:
            inputs, targets = f["inputs"].astype(np.int32), f["targets"].astype(np.int32)
        return {"file_accuracy": recall_accuracy(r.ts, r.params, inputs, targets, batch_size),
                "file_examples": float(len(inputs))}
    out = {}
    train_len = int(r.config.data.seq_len)
    for seq_len, pairs in _mqar_cells(r):
        d = make_mqar(_mqar_spec_of(r, seq_len, pairs), examples, seed=(1234, seq_len, pairs))
        acc = recall_accuracy(r.ts, r.params, d["inputs"], d["targets"], batch_size)
        out[f"L{seq_len}_kv{pairs}"] = acc
    out["train_length"] = float(train_len)
    return out


def _mqar_cells(r: Restored):
    if r.config.data.source == "mqar":
        base_len, base_pairs = int(r.config.data.seq_len), int(r.config.data.mqar.num_kv_pairs)
        return [(base_len * m, base_pairs * m) for m in (1, 2, 4)]
    return list(MQAR_SUITE[:3])


def eval_passkey(r: Restored, lengths, depths, trials: int) -> dict:
    rng = np.random.default_rng(0)
    model = r.model()
    out = {}
    for length in lengths:
        for depth in depths:
            prompts, keys = zip(*[make_passkey_prompt(r.tokenizer, length, depth, rng)
                                  for _ in range(trials)])
            conts = generate(model, [p.tolist() for p in prompts], max_new_tokens=8, greedy=True)
            hits = [r.tokenizer.decode(c).strip().startswith(k) for c, k in zip(conts, keys)]
            out[f"len{length}_depth{depth:.2f}"] = float(np.mean(hits))
    out["mean"] = float(np.mean(list(out.values())))
    return out


def eval_generate(r: Restored, max_new_tokens: int) -> dict:
    prompts = ["def ", "import numpy as np\n", "class Parser:\n    def __init__(self"]
    if r.config.data.source == "mqar":
        prompts = ["1 200 2 201 3 202 2", "5 250 1"]
    ids = [r.tokenizer.encode(p).tolist() for p in prompts]
    model = r.model()
    generate(model, ids, max_new_tokens, temperature=0.8, top_k=40, seed=0)  # compile
    t0 = time.time()
    out = generate(model, ids, max_new_tokens, temperature=0.8, top_k=40, seed=0)
    dt = time.time() - t0
    for p, c in zip(prompts, out):
        print(f"--- prompt {p!r}\n{p}{r.tokenizer.decode(c)}")
    return {"tokens_per_s": len(ids) * max_new_tokens / dt, "batch": float(len(ids))}


def check_tasks(r: Restored, tasks, mqar_file: str | None, passkey_lengths) -> None:
    """Raise EvalError before any work when a task cannot run on this checkpoint."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EvalError(f"--tasks: unknown task(s) {unknown}; known: {TASKS}")
    vocab = r.ts.model_cfg.vocab_size
    if "mqar" in tasks:
        if mqar_file:
            if not os.path.isfile(mqar_file):
                raise EvalError(f"--mqar_file: {mqar_file!r} does not exist")
            with np.load(mqar_file) as f:
                if "inputs" not in f or "targets" not in f or f["inputs"].shape != f["targets"].shape:
                    raise EvalError("--mqar_file must hold int arrays 'inputs' and 'targets' of one shape [N, L]")
                if f["inputs"].max() >= vocab or f["targets"].max() >= vocab:
                    raise EvalError(f"--mqar_file: token ids reach {max(f['inputs'].max(), f['targets'].max())}"
                                    f" but the model's vocabulary is {vocab}")
        else:
            for seq_len, pairs in _mqar_cells(r):
                if _mqar_spec_of(r, seq_len, pairs).vocab_size > vocab:
                    raise EvalError(f"mqar: vocabulary {_mqar_spec_of(r, seq_len, pairs).vocab_size} "
                                    f"does not fit the model's {vocab}")
    if "passkey" in tasks and r.tokenizer.to_dict()["type"] == "ids":
        raise EvalError("passkey: the checkpoint's tokenizer is ids-only (a synthetic-task run); "
                        "passkey needs a text tokenizer")


def run_eval(workdir: str, *, step=None, tasks=TASKS, data_files=None, mqar_file=None,
             mqar_examples=256, passkey_lengths=None, passkey_trials=4, batch_size=None,
             max_batches=None, max_new_tokens=64) -> dict:
    """Run `tasks` on the checkpoint of `workdir`; batch_size and max_batches default to the
    run's own train.batch_size and train.eval_batches (so `ppl` matches the end-of-run eval)."""
    tasks = tuple(tasks)
    if not os.path.isdir(workdir):
        raise CheckpointError(f"--workdir {workdir!r} does not exist")
    r = restore_run(workdir, step)
    if r.tokenizer.to_dict()["type"] == "ids":
        tasks = tuple(t for t in tasks if t != "passkey") if tasks == TASKS else tasks
    check_tasks(r, tasks, mqar_file, passkey_lengths)
    batch_size = int(batch_size or r.config.train.batch_size)
    max_batches = int(max_batches or r.config.train.eval_batches)
    seq_len = int(r.config.data.seq_len)
    lengths = passkey_lengths or [seq_len // 2, seq_len, 2 * seq_len]
    results = {}
    for task in tasks:
        t0 = time.time()
        if task == "ppl":
            results[task] = eval_ppl(r, data_files, batch_size, max_batches)
        elif task == "mqar":
            results[task] = eval_mqar(r, mqar_file, mqar_examples, batch_size)
        elif task == "passkey":
            results[task] = eval_passkey(r, lengths, (0.0, 0.25, 0.5, 0.75, 1.0), passkey_trials)
        elif task == "generate":
            results[task] = eval_generate(r, max_new_tokens)
        results[task]["seconds"] = time.time() - t0
    _report(workdir, r.step, results)
    return {"step": r.step, **results}


def _report(workdir: str, step: int, results: dict) -> None:
    print(f"{'task':10s} {'metric':24s} {'value':>12s}")
    for task, metrics in results.items():
        for k, v in metrics.items():
            print(f"{task:10s} {k:24s} {v:12.4f}")
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"step_{step}.json")
    with open(path, "w") as f:
        json.dump({"step": step, **results}, f, indent=1)
    writer = MetricsWriter(out_dir, subdir="tb", jsonl="scalars.jsonl", resume_step=10 ** 12)
    writer.write(step, {f"{t}/{k}": v for t, m in results.items() for k, v in m.items()})
    writer.close()
    print(f"wrote {path}")


_WORKDIR = flags.DEFINE_string("workdir", None, "the run's work directory", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), f"comma list of {TASKS}")
_DATA = flags.DEFINE_string("data", None, "text/jsonl files for ppl (comma list)")
_MQAR_FILE = flags.DEFINE_string("mqar_file", None, "npz with int arrays inputs, targets [N, L]")
_MQAR_EXAMPLES = flags.DEFINE_integer("mqar_examples", 256, "examples per MQAR cell")
_PASSKEY_LENGTHS = flags.DEFINE_list("passkey_lengths", None, "prompt lengths in tokens")
_PASSKEY_TRIALS = flags.DEFINE_integer("passkey_trials", 4, "prompts per (length, depth)")
_BATCH = flags.DEFINE_integer("batch_size", None, "evaluation batch size (default: the run's)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    lengths = [int(x) for x in _PASSKEY_LENGTHS.value] if _PASSKEY_LENGTHS.value else None
    try:
        run_eval(_WORKDIR.value, step=_STEP.value, tasks=_TASKS.value, data_files=_DATA.value,
                 mqar_file=_MQAR_FILE.value, mqar_examples=_MQAR_EXAMPLES.value,
                 passkey_lengths=lengths, passkey_trials=_PASSKEY_TRIALS.value,
                 batch_size=_BATCH.value)
    except (CheckpointError, DataError, EvalError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
