"""Evaluate a checkpoint: `python -m train.eval --workdir runs/x [--step N] [--tasks ...]`.

Tasks (comma list, default all that fit the run):
  ppl       loss, perplexity and bits per byte (per token for other tokenizers) on the run's
            held-out split, or on `--data` files (.txt/.md/.py as text, .jsonl as jsonl; their
            held-out half, data.heldout_fraction = 0.5), tokenized with the checkpoint's own
            tokenizer (the file named in config.data.tokenizer is not needed)
  mqar      multi-query associative recall accuracy per (length, pairs) cell: `--mqar_cells
            64:4,128:8,...`, by default each training cell of an mqar run plus (2L, 2K) and
            (4L, 4K) of its largest one (those the vocabulary fits), or MQAR_SUITE[:3] for a
            text run; or on `--mqar_file` (npz: inputs, targets [N, L])
  passkey   greedy recall of a number hidden at depths 0..1 in filler text, by length
  generate  continuations of a batch of prompts of different lengths, tokens/s; prompts from
            `--prompt` (repeatable) and `--prompts_file` (one per line), sampled with
            `--temperature`, `--top_k`, `--top_p` (or `--greedy`), `--max_new_tokens`, `--gen_seed`

Results: a table on stdout, TensorBoard scalars under `<workdir>/eval/tb` (also
`eval/scalars.jsonl`), and `<workdir>/eval/step_<N>.json`, merged across runs: each entry of a
run replaces the entry of the same key and every other entry is kept. Layout:

    {"step": 4,
     "ppl":            {"eval_loss": 2.31, "eval_ppl": 10.1, "bits_per_byte": 3.33, ...},
     "ppl[notes.txt]": {...},          # ppl on --data files: key `ppl[<label>]`, see data_label
     "mqar":           {"L64_kv4": 0.12, ..., "train_length": 64.0, "seconds": 1.9},
     "generate":       {"tokens_per_s": 310.0, "batch": 3.0, "seconds": 2.2},
     "sources":  {"ppl": "held-out split of stdlib (/usr/lib/python3.11), ..., fingerprint ab12",
                  "ppl[notes.txt]": "files: /abs/notes.txt (text), held-out half, fingerprint c3"},
     "generate_samples":  [{"prompt": "def ", "continuation": "f(x):", "tokens": [102, ...]}],
     "generate_settings": {"max_new_tokens": 64, "temperature": 0.8, "top_k": 40, "top_p": 1.0,
                           "greedy": false, "seed": 0}}

Task entries are dicts of numbers only (the table and TensorBoard read them; a tag is
`<key>/<metric>`); the other top-level keys are `INFO_KEYS`. Every input is checked before any
task runs and before anything is written; a bad one is a one-line EvalError, DataError or
CheckpointError naming the flag.

Without the CLI (a sweep runner): `mqar_cell_accuracy(restore_run(workdir), cells, examples,
batch_size)` is the mqar task's numbers, and `mqar_validation_accuracy(ts, params, data, ...)`
scores the mqar source's validation stream (for choosing hyperparameters; never reported).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from train.checkpoint import CheckpointError
from train.data import DataError, load_data
from train.data.synthetic import mqar_train_cells
from train.loop import evaluate_heldout
from train.metrics import MetricsWriter
from train.paths import workdir_path
from train.recall import recall_accuracy
from train.restore import Restored, restore_run
from train.tasks import MQAR_SUITE, MqarSpec, make_mqar, make_passkey_prompt
from train.tasks.mqar import format_cells, parse_cells
from zoo.generate import generate

__all__ = ["TASKS", "INFO_KEYS", "run_eval", "recall_accuracy", "EvalError", "data_label",
           "decode_escapes", "mqar_cell_accuracy", "mqar_validation_accuracy",
           "default_mqar_cells", "MQAR_EVAL_SEED"]

TASKS = ("ppl", "mqar", "passkey", "generate")
# Top-level keys of step_<N>.json that are not task entries.
INFO_KEYS = ("step", "sources", "generate_samples", "generate_settings")

# Today's defaults: a few code prompts of different lengths; id prompts for synthetic runs.
TEXT_PROMPTS = ("def ", "import numpy as np\n", "class Parser:\n    def __init__(self")
# The mqar task's examples of cell (L, K) come from seed (MQAR_EVAL_SEED, L, K): a stream of its
# own: the mqar source seeds its rows (run seed, stream, row) with stream 0 (train), 2^31 − 2
# (validation) or 2^31 − 1 (held-out), and no cell's L equals a stream id.
MQAR_EVAL_SEED = 1234


class EvalError(ValueError):
    """A task or flag value that cannot be used on this checkpoint; the message names the flag."""


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """Sampling settings of the generate task (zoo.generate.sample_logits states the math)."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0

    def check(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise EvalError(f"--max_new_tokens: must be an integer >= 1, "
                            f"got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not self.temperature >= 0:  # `not >=`: NaN too
            raise EvalError(f"--temperature: must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise EvalError(f"--top_k: must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise EvalError(f"--top_p: must lie in (0, 1] (1 = no limit), got {self.top_p!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise EvalError(f"--gen_seed: must be an integer >= 0, got {self.seed!r}")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def decode_escapes(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` -> newline, tab, carriage return, backslash; any other
    backslash is kept as it is (so a prompt can hold a newline on one line of a file)."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line (UTF-8), escapes decoded by `decode_escapes`; blank lines skipped.
    Trailing spaces are kept: they are part of the prompt."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--prompts_file: cannot read {path!r} "
                        f"({getattr(e, 'strerror', None) or e})") from None
    prompts = [decode_escapes(ln.removesuffix("\r")) for ln in lines if ln.strip()]
    if not prompts:
        raise EvalError(f"--prompts_file: {path!r} holds no prompt (one per line)")
    return prompts


def _gather_prompts(prompts, prompts_file) -> list[tuple[str, str]] | None:
    """[(prompt, where it came from)] of the `prompts` list then the file; None = defaults."""
    if isinstance(prompts, str):
        raise EvalError("--prompt: give a list of prompts, not one string")
    out = [(p, f"--prompt #{i + 1}") for i, p in enumerate(prompts or ())]
    if prompts_file:
        out += [(p, f"--prompts_file {prompts_file!r}, prompt #{i + 1}")
                for i, p in enumerate(read_prompts_file(prompts_file))]
    for p, where in out:
        if not isinstance(p, str) or not p:
            raise EvalError(f"{where}: {p!r} is not a non-empty string")
    return out or None


def _default_prompts(r: Restored) -> list[str]:
    if r.config.data.source != "mqar":
        return list(TEXT_PROMPTS)
    # Key-value pairs then a query (keys from the lower half of the vocabulary, values from the
    # upper half): at vocab 256 "1 200 2 201 3 202 2" and "5 250 1"; scaled for other vocabs.
    v = r.tokenizer.vocab_size
    h = v // 2
    val = [min(v - 1, h + (72 * h) // 128 + i) for i in range(3)]
    val.append(min(v - 1, h + (122 * h) // 128))
    return [f"1 {val[0]} 2 {val[1]} 3 {val[2]} 2", f"5 {val[3]} 1"]


def _encode_prompts(r: Restored, prompts: list[tuple[str, str]] | None):
    """(texts, token lists); raises EvalError naming the prompt that does not encode."""
    if prompts is None:
        prompts = [(p, "default prompt") for p in _default_prompts(r)]
    vocab = r.ts.model_cfg.vocab_size
    texts, ids = [], []
    for text, where in prompts:
        try:
            tokens = r.tokenizer.encode(text)
        except ValueError:  # the ids tokenizer of synthetic runs reads decimal ids only
            raise EvalError(f"{where}: {text!r} is not space-separated token ids, which this "
                            "run's ids-only tokenizer needs") from None
        if len(tokens) == 0:
            raise EvalError(f"{where}: {text!r} encodes to no token")
        if not ((tokens >= 0) & (tokens < vocab)).all():
            raise EvalError(f"{where}: {text!r} has token ids outside the model's vocabulary "
                            f"[0, {vocab})")
        texts.append(text)
        ids.append(tokens.tolist())
    return texts, ids


_LABEL_CHARS = re.compile(r"[^A-Za-z0-9._+~-]")


def data_label(data_files: str, max_len: int = 40) -> str:
    """The `<label>` of `ppl[<label>]` for `--data`: the basenames of the comma list, joined by
    "+", characters other than [A-Za-z0-9._-] replaced by "_" (a TensorBoard tag takes "/" as a
    group separator). A label longer than max_len keeps its first max_len - 9 characters and
    adds "~" and 8 hex digits of the full basenames' SHA-256, so it stays deterministic and
    distinct. Files of one basename in different folders share a label (the entry's source
    records the full paths)."""
    parts = [p.strip() for p in data_files.split(",") if p.strip()]
    names = [os.path.basename(os.path.normpath(p)) or p for p in parts]
    label = _LABEL_CHARS.sub("_", "+".join(names))
    if len(label) > max_len:
        digest = hashlib.sha256("+".join(names).encode("utf-8")).hexdigest()[:8]
        label = f"{label[:max_len - 9]}~{digest}"
    return label


def _check_data_files(data_files: str) -> tuple[list[str], str]:
    """(absolute paths, "text" | "jsonl") of `--data`; globs are left to the corpus reader."""
    parts = [p.strip() for p in data_files.split(",") if p.strip()]
    if not parts:
        raise EvalError("--data: empty; give files, folders or globs (comma list)")
    for p in parts:
        if not any(c in p for c in "*?[") and not os.path.exists(os.path.expanduser(p)):
            raise EvalError(f"--data: {p!r} does not exist")
    jsonl = [p.endswith(".jsonl") for p in parts]
    if any(jsonl) and not all(jsonl):
        raise EvalError(f"--data: mixes .jsonl and text files ({data_files}); evaluate them in "
                        "separate runs")
    return [os.path.abspath(os.path.expanduser(p)) for p in parts], (
        "jsonl" if all(jsonl) else "text")


@dataclasses.dataclass
class _PplInput:
    key: str        # "ppl" or "ppl[<label>]"
    data: object    # PackedData or MqarData
    source: str     # what the entry was measured on, for step_<N>.json's "sources"


def _load_ppl_input(r: Restored, data_files: str | None) -> _PplInput:
    """Load (and so validate) the data of the ppl task before any task runs."""
    data_cfg = r.config.data.copy_and_resolve_references()
    seed = int(r.config.seed)
    if not data_files:
        data = load_data(data_cfg, seed=seed, tokenizer=r.tokenizer)
        corpus = getattr(data, "corpus", None)
        what = (f"{corpus.source} ({corpus.origin})" if corpus is not None
                else f"mqar (vocab {data.spec.vocab_size}, {data.spec.num_kv_pairs} pairs)")
        source = f"held-out split of {what}, fingerprint {data.fingerprint}"
        trained = r.meta.get("fingerprint")
        if trained and trained != data.fingerprint:
            # The corpus changed since training: say so rather than compare unlike numbers.
            source += f" (the run trained on fingerprint {trained})"
        return _PplInput("ppl", data, source)
    paths, kind = _check_data_files(data_files)  # checked before the restore too: cheap
    data_cfg.update(dict(source=kind, path=",".join(paths), heldout_fraction=0.5))
    try:
        data = load_data(data_cfg, seed=seed, tokenizer=r.tokenizer)
    except DataError as e:
        raise EvalError(f"--data: {e}") from None
    return _PplInput(f"ppl[{data_label(data_files)}]", data,
                     f"files: {','.join(paths)} ({kind}), held-out half, "
                     f"fingerprint {data.fingerprint}")


def _check_mqar_cells(mqar_cells) -> tuple[tuple[int, int], ...] | None:
    """`--mqar_cells` as ((L, K), ...): from "64:4,128:8" or a sequence of pairs; None = the
    defaults (`default_mqar_cells`). Whether each cell fits the model is checked after the
    restore (`_mqar_cell_specs`)."""
    if mqar_cells is None:
        return None
    try:
        if isinstance(mqar_cells, str):
            return parse_cells(mqar_cells)
        cells = tuple(mqar_cells)
        if not all(len(c) == 2 and all(_is_int(x) and x > 0 for x in c) for c in cells):
            raise ValueError(f"{list(cells)} is not a list of (length, pairs) positive integers")
        return parse_cells(format_cells(cells))  # one check of order and repeats
    except (TypeError, ValueError) as e:
        raise EvalError(f"--mqar_cells: {e}") from None


def _mqar_cell_specs(r: Restored, cells, where: str = "--mqar_cells") -> list[MqarSpec]:
    """The spec of each (L, K) cell on this checkpoint; EvalError naming `where` for a cell that
    the task's vocabulary cannot hold, or a vocabulary larger than the model's."""
    vocab = r.ts.model_cfg.vocab_size
    specs = []
    for length, pairs in cells:
        spec = _mqar_spec_of(r, length, pairs)
        if spec.vocab_size > vocab:
            raise EvalError(f"mqar: vocabulary {spec.vocab_size} does not fit the model's {vocab}")
        if spec.problem():
            raise EvalError(f"{where}: cell {length}:{pairs} does not fit: {spec.problem()} "
                            f"(vocab_size {spec.vocab_size})")
        specs.append(spec)
    return specs


def check_tasks(r: Restored, tasks, mqar_file: str | None, mqar_cells=None) -> None:
    """Raise EvalError before any work when a task cannot run on this checkpoint."""
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
            _mqar_cell_specs(r, mqar_cells if mqar_cells is not None else default_mqar_cells(r))
    if "passkey" in tasks and r.tokenizer.to_dict()["type"] == "ids":
        raise EvalError("passkey: the checkpoint's tokenizer is ids-only (a synthetic-task run); "
                        "passkey needs a text tokenizer")


# ----------------------------------------------------------------------------- tasks


def eval_ppl(r: Restored, data, batch_size: int, max_batches: int) -> dict:
    with jax.set_mesh(r.ts.mesh):
        return evaluate_heldout(r.ts, r.params, data, batch_size, max_batches)


def _mqar_spec_of(r: Restored, seq_len: int, pairs: int) -> MqarSpec:
    mq = r.config.data.get("mqar") if r.config.data.source == "mqar" else None
    vocab = int(mq.vocab_size) if mq else min(256, r.tokenizer.vocab_size)
    return MqarSpec(vocab_size=vocab, seq_len=seq_len, num_kv_pairs=pairs)


def mqar_cell_accuracy(restored: Restored, cells, examples: int, batch_size: int,
                       seed: int = MQAR_EVAL_SEED) -> dict[str, float]:
    """{"L{L}_kv{K}": accuracy} for each (L, K) of `cells`: `recall_accuracy` (argmax hits per
    scored position, per example, then averaged) on `examples` MQAR examples of length L with K
    pairs, drawn from seed (seed, L, K), at the run's MQAR vocabulary (256 for a text run).
    Each cell runs at its own length, unpadded. The mqar task's numbers are these."""
    out = {}
    for spec in _mqar_cell_specs(restored, cells, where="mqar_cells"):
        length, pairs = spec.seq_len, spec.num_kv_pairs
        d = make_mqar(spec, int(examples), seed=(int(seed), length, pairs))
        out[f"L{length}_kv{pairs}"] = recall_accuracy(restored.ts, restored.params, d["inputs"],
                                                      d["targets"], batch_size)
    return out


def mqar_validation_accuracy(ts, params, data, batch_size: int, max_batches: int) -> float:
    """`recall_accuracy` on the first `max_batches` batches of an mqar source's validation stream
    (`MqarData.validation_batches`: the training mixture, rows neither trained on nor held out),
    for choosing a learning rate. Padded rows are scored on their real tokens only (their
    targets are −100 past the example), and a causal model's predictions there do not see the
    padding. After a run: `r = restore_run(workdir)`, `data = load_data(r.config.data,
    seed=r.config.seed)`, then `mqar_validation_accuracy(r.ts, r.params, data, ...)`."""
    batches = data.validation_batches(batch_size=batch_size, max_batches=max_batches)
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    return recall_accuracy(ts, params, inputs, targets, batch_size)


def eval_mqar(r: Restored, mqar_file: str | None, cells, examples: int, batch_size: int) -> dict:
    if mqar_file:
        with np.load(mqar_file) as f:
            inputs, targets = f["inputs"].astype(np.int32), f["targets"].astype(np.int32)
        return {"file_accuracy": recall_accuracy(r.ts, r.params, inputs, targets, batch_size),
                "file_examples": float(len(inputs))}
    cells = cells if cells is not None else default_mqar_cells(r)
    out = mqar_cell_accuracy(r, cells, examples, batch_size)
    out["train_length"] = float(r.config.data.seq_len)  # an mqar run's longest training L
    return out


def default_mqar_cells(r: Restored) -> list[tuple[int, int]]:
    """The mqar task's cells when none are given. An mqar run: each training cell, then
    (2L, 2K) and (4L, 4K) of the largest training cell (longest L, then most pairs) to test
    length extrapolation — each kept only when the run's vocabulary holds 2K or 4K keys —
    without repeats, in that order. A text run: MQAR_SUITE[:3]."""
    if r.config.data.source != "mqar":
        return list(MQAR_SUITE[:3])
    train = list(mqar_train_cells(r.config.data))
    length, pairs = max(train)
    cells = list(train)
    for m in (2, 4):
        cell = (length * m, pairs * m)
        if cell not in cells and _mqar_spec_of(r, *cell).problem() is None:
            cells.append(cell)
    return cells


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


def eval_generate(r: Restored, texts: list[str], ids: list[list[int]],
                  gen: GenerateSettings) -> tuple[dict, list[dict]]:
    """(metrics, samples): tokens/s of the second of two identical calls (the first compiles),
    and each prompt with its decoded continuation and token ids."""
    model = r.model()
    kw = dict(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, greedy=gen.greedy,
              seed=gen.seed)
    generate(model, ids, gen.max_new_tokens, **kw)  # compile
    t0 = time.time()
    out = generate(model, ids, gen.max_new_tokens, **kw)
    dt = time.time() - t0
    samples = []
    for p, c in zip(texts, out):
        cont = r.tokenizer.decode(c)
        print(f"--- prompt {p!r}\n{p}{cont}")
        samples.append({"prompt": p, "continuation": cont, "tokens": [int(t) for t in c]})
    return {"tokens_per_s": len(ids) * gen.max_new_tokens / dt, "batch": float(len(ids))}, samples


# ----------------------------------------------------------------------------- driver


def run_eval(workdir: str, *, step=None, tasks=TASKS, data_files=None, mqar_file=None,
             mqar_cells=None, mqar_examples=256, passkey_lengths=None, passkey_trials=4,
             batch_size=None, max_batches=None, prompts=None, prompts_file=None,
             max_new_tokens=64, temperature=0.8, top_k=40, top_p=1.0, greedy=False,
             gen_seed=0) -> dict:
    """Run `tasks` on the checkpoint of `workdir` and merge the results into
    `<workdir>/eval/step_<N>.json` (layout in the module docstring).

    batch_size and max_batches default to the run's own train.batch_size and
    train.eval_batches (so `ppl` matches the end-of-run eval). `prompts` (a list of strings,
    taken as they are) and `prompts_file` (see `read_prompts_file`) replace the default prompts
    of `generate`. `mqar_cells` ("64:4,128:8" or [(64, 4), (128, 8)]) replaces the mqar task's
    default cells (`default_mqar_cells`). Returns {"step", each task key: metrics, "sources",
    and for generate "generate_samples" and "generate_settings"} of this call only.
    """
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EvalError(f"--tasks: unknown task(s) {unknown}; known: {TASKS}")
    if data_files and "ppl" not in tasks:
        raise EvalError(f"--data is read by the ppl task only, and --tasks is {list(tasks)}")
    if mqar_file and "mqar" not in tasks:
        raise EvalError(f"--mqar_file is read by the mqar task only, and --tasks is {list(tasks)}")
    cells = _check_mqar_cells(mqar_cells)
    if cells is not None and "mqar" not in tasks:
        raise EvalError(f"--mqar_cells is read by the mqar task only, and --tasks is {list(tasks)}")
    if cells is not None and mqar_file:
        raise EvalError("--mqar_cells and --mqar_file: give one (the file holds its own examples)")
    gen = GenerateSettings(max_new_tokens, temperature, top_k, top_p, bool(greedy), gen_seed)
    gen.check()
    prompt_list = _gather_prompts(prompts, prompts_file)
    if data_files:
        _check_data_files(data_files)
    if not workdir_path(workdir).is_dir():
        raise CheckpointError(f"--workdir {os.fspath(workdir)!r} does not exist")
    r = restore_run(workdir, step)
    if r.tokenizer.to_dict()["type"] == "ids":
        tasks = tuple(t for t in tasks if t != "passkey") if tasks == TASKS else tasks
    check_tasks(r, tasks, mqar_file, cells)
    texts, ids = _encode_prompts(r, prompt_list) if "generate" in tasks else ([], [])
    ppl = _load_ppl_input(r, data_files) if "ppl" in tasks else None
    path = workdir_path(workdir) / "eval" / f"step_{r.step}.json"
    _read_results(path)  # a damaged results file is reported now, not after the tasks
    batch_size = int(batch_size or r.config.train.batch_size)
    max_batches = int(max_batches or r.config.train.eval_batches)
    seq_len = int(r.config.data.seq_len)
    lengths = passkey_lengths or [seq_len // 2, seq_len, 2 * seq_len]

    results, info = {}, {"sources": {}}
    for task in tasks:
        t0 = time.time()
        key = task
        if task == "ppl":
            key = ppl.key
            results[key] = eval_ppl(r, ppl.data, batch_size, max_batches)
            info["sources"][key] = ppl.source
        elif task == "mqar":
            results[key] = eval_mqar(r, mqar_file, cells, mqar_examples, batch_size)
        elif task == "passkey":
            results[key] = eval_passkey(r, lengths, (0.0, 0.25, 0.5, 0.75, 1.0), passkey_trials)
        elif task == "generate":
            results[key], info["generate_samples"] = eval_generate(r, texts, ids, gen)
            info["generate_settings"] = dataclasses.asdict(gen)
        results[key]["seconds"] = time.time() - t0
    _report(path, r.step, results, info)
    return {"step": r.step, **results, **info}


def _read_results(path) -> dict:
    """The results of earlier runs at this step ({} when there are none); `path`: epath.Path."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict) or not isinstance(old.get("sources", {}), dict):
            raise ValueError("not a JSON object with a 'sources' mapping")
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: cannot merge into this results file ({e}); "
                        "move it away") from None
    return old


def _report(path, step: int, results: dict, info: dict) -> None:
    """Print this call's table, merge it into `path` (same key: replaced), write TB scalars."""
    width = max([10] + [len(t) for t in results])
    print(f"{'task':{width}s} {'metric':24s} {'value':>12s}")
    for task, metrics in results.items():
        for k, v in metrics.items():
            print(f"{task:{width}s} {k:24s} {v:12.4f}")
    merged = _read_results(path)
    merged.update({"step": step, **results})
    merged["sources"] = {**merged.get("sources", {}), **info["sources"]}
    merged.update({k: v for k, v in info.items() if k != "sources"})
    # Task entries first, then the info keys, so the file reads top-down.
    merged = {"step": step, **{k: v for k, v in merged.items() if k not in INFO_KEYS},
              **{k: merged[k] for k in INFO_KEYS[1:] if k in merged}}
    out_dir = path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(path)  # a reader never sees half a file
    writer = MetricsWriter(out_dir, subdir="tb", jsonl="scalars.jsonl", resume_step=10 ** 12)
    writer.write(step, {f"{t}/{k}": v for t, m in results.items() for k, v in m.items()})
    writer.close()
    print(f"wrote {path}")


_WORKDIR = flags.DEFINE_string("workdir", None, "the run's work directory", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), f"comma list of {TASKS}")
_DATA = flags.DEFINE_string("data", None, "text/jsonl files, folders or globs for ppl (comma "
                            "list); results under ppl[<their basenames>]")
_MQAR_FILE = flags.DEFINE_string("mqar_file", None, "npz with int arrays inputs, targets [N, L]")
_MQAR_CELLS = flags.DEFINE_string(
    "mqar_cells", None, "MQAR cells length:pairs, comma list (e.g. 64:4,128:8,512:32). Default: "
    "an mqar run's training cells plus 2x and 4x its largest; 64:4,128:8,256:16 for a text run")
_MQAR_EXAMPLES = flags.DEFINE_integer("mqar_examples", 256, "examples per MQAR cell")
_PASSKEY_LENGTHS = flags.DEFINE_list("passkey_lengths", None, "prompt lengths in tokens")
_PASSKEY_TRIALS = flags.DEFINE_integer("passkey_trials", 4, "prompts per (length, depth)")
_BATCH = flags.DEFINE_integer("batch_size", None, "evaluation batch size (default: the run's)")
_PROMPT = flags.DEFINE_multi_string(
    "prompt", None, "a generate prompt; repeat the flag for several. Escapes \\n, \\t, \\r and "
    "\\\\ are decoded. Default: a few code prompts (token ids for synthetic runs)")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "UTF-8 file of generate prompts, one per line (blank lines skipped), "
    "escapes decoded as for --prompt; added after any --prompt")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens generated per prompt (>= 1)")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "sampling temperature (>= 0; 0 = greedy)")
_TOP_K = flags.DEFINE_integer("top_k", 40, "sample from the k most likely tokens (0 = all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass, in (0, 1] (1 = all)")
_GREEDY = flags.DEFINE_boolean("greedy", False, "argmax decoding (ignores the sampling flags)")
_GEN_SEED = flags.DEFINE_integer("gen_seed", 0, "sampling seed (>= 0)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        lengths = [int(x) for x in _PASSKEY_LENGTHS.value] if _PASSKEY_LENGTHS.value else None
    except ValueError:
        sys.exit(f"error: --passkey_lengths: expected integers, got {_PASSKEY_LENGTHS.value}")
    prompts = [decode_escapes(p) for p in _PROMPT.value] if _PROMPT.value else None
    try:
        run_eval(_WORKDIR.value, step=_STEP.value, tasks=_TASKS.value, data_files=_DATA.value,
                 mqar_file=_MQAR_FILE.value, mqar_cells=_MQAR_CELLS.value,
                 mqar_examples=_MQAR_EXAMPLES.value,
                 passkey_lengths=lengths, passkey_trials=_PASSKEY_TRIALS.value,
                 batch_size=_BATCH.value, prompts=prompts, prompts_file=_PROMPTS_FILE.value,
                 max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                 top_k=_TOP_K.value, top_p=_TOP_P.value, greedy=_GREEDY.value,
                 gen_seed=_GEN_SEED.value)
    except (CheckpointError, DataError, EvalError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
