"""``load_data(data_cfg, seed)``: the trainer's one entry point to the input pipeline.

The batch of a step is a pure function of (corpus, tokenizer, seq_len, seed, step): nothing is
stateful, so a resume only needs the step, and a change of worker or host count sees the same
global batches.

* Global rows. The training split is packed once per epoch (``packing.pack``, documents shuffled
  by ``np.random.default_rng([seed, epoch])``); every epoch has the same number of rows R, so
  global row g is row ``g % R`` of epoch ``g // R``. Step s of global batch size B covers global
  rows [s B, (s + 1) B); host p of P takes rows [s B + p B/P, s B + (p + 1) B/P).
* The held-out split is packed once, in corpus order, independent of the seed: every run of the
  same corpus evaluates on the same rows. ``eval_batches`` takes its first rows; the last batch
  is completed with empty rows (targets all -100) rather than repeating data.
* Batches: dict of int32 arrays [B / P, seq_len]: "inputs", "targets" (-100 = unscored),
  "segment_ids" (1, 2, ... per piece in the row, 0 = trailing padding), "positions" (from 0
  within each piece). See ``packing`` for the exact layout.
* ``iterator`` serves the same batches through grain: a ``MapDataset`` over step numbers, mapped
  by ``batch``, read with one thread and a prefetch of 2 (more threads stall on 2 cores).
* ``fingerprint``: a hash of the corpus content (both splits' tokens and document boundaries),
  the tokenizer definition and ``heldout_fraction``. ``seq_len`` and ``seed`` are not part of it:
  they belong to the run's config.

Every unusable setting raises ``DataError`` from ``load_data`` (or from ``batch``/``iterator``
for batch-size arguments), with the config field named in the message.
"""

from __future__ import annotations

import collections
import hashlib
import json
import sys
import threading
from typing import Any, Callable, Iterator

import numpy as np

from train.data.corpus import SOURCES, Corpus, Split, build_corpus
from train.data.packing import PackPlan, fill_rows, pack
from train.data.tokenizer import DataError, Tokenizer, load_tokenizer, tokenizer_digest

__all__ = ["PackedData", "load_data", "SPLITS"]

SPLITS = ("train", "heldout")
Batch = dict[str, np.ndarray]


def _field(cfg: Any, name: str, default: Any) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def serve_by_index(load: Callable[[int], Batch], start_step: int) -> Iterator[Batch]:
    """Batches load(s) for s = start_step, start_step + 1, ... through a grain MapDataset served
    by index: the batch of a step never depends on what was drawn before."""
    import grain  # noqa: PLC0415  (0.7 s to import: only for iterators)

    steps = grain.MapDataset.range(start_step, sys.maxsize)
    return iter(steps.map(load).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


class PackedData:
    """A tokenized, split corpus served as packed batches; built by ``load_data``."""

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer, *, seq_len: int, seed: int,
                 heldout_fraction: float):
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.heldout_fraction = heldout_fraction
        blob = json.dumps({"corpus": corpus.digest(), "tokenizer": tokenizer_digest(tokenizer),
                           "heldout_fraction": float(heldout_fraction)}, sort_keys=True)
        self.fingerprint = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
        self._lock = threading.Lock()
        self._plans: collections.OrderedDict[tuple[str, int], PackPlan] = (
            collections.OrderedDict())
        self._heldout_plan = pack(corpus.heldout.offsets, seq_len, None)
        self._rows = {"train": self._plan("train", 0).num_rows,
                      "heldout": self._heldout_plan.num_rows}

    # ------------------------------------------------------------------ plans and sizes

    def _split(self, split: str) -> Split:
        if split not in SPLITS:
            raise DataError(f"split: unknown split {split!r} (allowed: {', '.join(SPLITS)})")
        return self.corpus.train if split == "train" else self.corpus.heldout

    def _plan(self, split: str, epoch: int) -> PackPlan:
        if split == "heldout":
            return self._heldout_plan
        key = (split, epoch)
        with self._lock:
            plan = self._plans.get(key)
            if plan is None:
                rng = np.random.default_rng([self.seed, epoch])
                plan = pack(self.corpus.train.offsets, self.seq_len, rng)
                if epoch and plan.num_rows != self._rows["train"]:
                    raise AssertionError("packing gave epochs of different row counts")
                self._plans[key] = plan
                while len(self._plans) > 4:
                    self._plans.popitem(last=False)
            else:
                self._plans.move_to_end(key)
            return plan

    def plan(self, epoch: int, split: str = "train") -> PackPlan:
        """The packing plan (row -> [(doc, start, length)]) of one epoch of a split."""
        self._split(split)
        return self._plan(split, epoch)

    def rows_per_epoch(self, split: str = "train") -> int:
        self._split(split)
        return self._rows[split]

    def num_tokens(self, split: str = "train") -> int:
        """Tokens in a split's documents."""
        return self._split(split).num_tokens

    def num_docs(self, split: str = "train") -> int:
        return self._split(split).num_docs

    # ------------------------------------------------------------------ batches

    def _local_size(self, batch_size: int, process_index: int, process_count: int) -> int:
        if not _is_int(batch_size) or batch_size < 1:
            raise DataError(f"batch_size: must be a positive integer, got {batch_size!r}")
        if not _is_int(process_count) or process_count < 1:
            raise DataError(f"process_count: must be a positive integer, got {process_count!r}")
        if batch_size % process_count:
            raise DataError(f"batch_size: {batch_size} is not divisible by process_count "
                            f"{process_count} (each host takes an equal slice)")
        if not _is_int(process_index) or not 0 <= process_index < process_count:
            raise DataError(f"process_index: must lie in [0, {process_count}), "
                            f"got {process_index!r}")
        return batch_size // process_count

    def _check_split_rows(self, split: str) -> int:
        self._split(split)
        rows = self._rows[split]
        if rows == 0:
            raise DataError(f"data.heldout_fraction: there is no held-out split "
                            f"({self.corpus.heldout_note})")
        return rows

    def _rows_batch(self, split: str, first_row: int, count: int) -> Batch:
        """Global rows [first_row, first_row + count) of a split, epochs wrapping."""
        per_epoch = self._rows[split]
        tokens = self._split(split).tokens
        parts, g, end = [], first_row, first_row + count
        while g < end:
            epoch, r = divmod(g, per_epoch)
            n = min(end - g, per_epoch - r)
            parts.append(fill_rows(self._plan(split, epoch), np.arange(r, r + n), tokens))
            g += n
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def batch(self, step: int, *, split: str = "train", batch_size: int,
              process_index: int = 0, process_count: int = 1) -> Batch:
        """This host's slice of the global batch of ``step``: arrays [batch_size // P, seq_len]."""
        local = self._local_size(batch_size, process_index, process_count)
        if not _is_int(step) or step < 0:
            raise DataError(f"step: must be a non-negative integer, got {step!r}")
        self._check_split_rows(split)
        first = int(step) * batch_size + process_index * local
        return self._rows_batch(split, first, local)

    def iterator(self, start_step: int, *, split: str = "train", batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
        """Yields ``batch(s)`` for s = start_step, start_step + 1, ... through grain.

        Arguments are checked here, before the first batch is drawn.
        """
        self._local_size(batch_size, process_index, process_count)
        if not _is_int(start_step) or start_step < 0:
            raise DataError(f"start_step: must be a non-negative integer, got {start_step!r}")
        self._check_split_rows(split)

        def load(step: int) -> Batch:
            return self.batch(int(step), split=split, batch_size=batch_size,
                              process_index=process_index, process_count=process_count)

        return serve_by_index(load, int(start_step))

    def eval_batches(self, *, batch_size: int, max_batches: int, process_index: int = 0,
                     process_count: int = 1) -> list[Batch]:
        """Held-out batches: the first min(max_batches, ceil(rows / batch_size)) of them.

        Deterministic and seed-independent; [] when there is no held-out split. The last batch
        is completed with empty rows (all targets -100).
        """
        local = self._local_size(batch_size, process_index, process_count)
        rows = self._rows["heldout"]
        n = min(int(max_batches), -(-rows // batch_size)) if rows else 0
        out = []
        for s in range(n):
            first = s * batch_size + process_index * local
            real = max(0, min(local, rows - first))   # rows past the split are left empty
            b = self._empty_rows(local)
            if real:
                for k, v in self._rows_batch("heldout", first, real).items():
                    b[k][:real] = v
            out.append(b)
        return out

    def _empty_rows(self, n: int) -> Batch:
        """n rows of padding only (targets -100, segment 0)."""
        shape = [n, self.seq_len]
        return {"inputs": np.zeros(shape, np.int32), "targets": np.full(shape, -100, np.int32),
                "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32)}

    def describe(self) -> str:
        c, tok = self.corpus, self.tokenizer
        kind = tok.to_dict()["type"]
        plan = self._plan("train", 0)
        text = (f"data: {c.source} ({c.origin}), {c.num_files} files, "
                f"{c.train.num_docs + c.heldout.num_docs} docs "
                f"({c.train.num_docs} train / {c.heldout.num_docs} held-out), "
                f"{c.train.num_tokens:,} train / {c.heldout.num_tokens:,} held-out tokens, "
                f"vocab {tok.vocab_size} ({kind}), seq_len {self.seq_len}, "
                f"{self._rows['train']:,} rows/epoch ({plan.fill_fraction:.1%} filled), "
                f"fingerprint {self.fingerprint}")
        return text + (f"; held-out: {c.heldout_note}" if c.heldout_note else "")

    def __repr__(self) -> str:
        return f"PackedData({self.describe()})"


def load_data(data_cfg: Any, seed: int = 0, *, tokenizer: Tokenizer | None = None
              ) -> PackedData:
    """Read, tokenize, split and plan the corpus described by ``data_cfg``.

    ``data_cfg`` fields (attributes, or keys of a dict): source ("stdlib" | "text" | "jsonl" |
    "tokens"), path, jsonl_field ("text"), tokenizer ("bytes" or a tokenizer JSON path),
    seq_len, heldout_fraction (0.02), max_bytes (0 = no limit). Raises DataError.

    ``tokenizer``: a Tokenizer to use instead of loading ``data_cfg.tokenizer`` (a restored
    checkpoint passes its own, so evaluation does not need the original file). The synthetic
    ``mqar`` source has no tokenizer of its own choosing (its ids are the task's vocabulary),
    so one given there must be the matching ids tokenizer.
    """
    source = _field(data_cfg, "source", "stdlib")
    if source == "mqar":
        from train.data.synthetic import load_mqar  # noqa: PLC0415  (imports this module)
        data = load_mqar(data_cfg, seed)
        if tokenizer is not None and tokenizer.to_dict() != data.tokenizer.to_dict():
            raise DataError(f"tokenizer: {tokenizer!r} does not match the mqar source's "
                            f"{data.tokenizer!r} (data.mqar.vocab_size)")
        return data
    if source not in SOURCES:
        raise DataError(f"data.source: unknown source {source!r} "
                        f"(allowed: {', '.join(repr(s) for s in SOURCES + ('mqar',))})")
    seq_len = _field(data_cfg, "seq_len", None)
    if not _is_int(seq_len) or seq_len < 2:
        raise DataError(f"data.seq_len: must be an integer >= 2, got {seq_len!r}")
    fraction = _field(data_cfg, "heldout_fraction", 0.02)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
            0 <= fraction < 1):
        raise DataError(f"data.heldout_fraction: must lie in [0, 1), got {fraction!r}")
    max_bytes = _field(data_cfg, "max_bytes", 0)
    if not _is_int(max_bytes) or max_bytes < 0:
        raise DataError(f"data.max_bytes: must be an integer >= 0 (0 = no limit), "
                        f"got {max_bytes!r}")
    jsonl_field = _field(data_cfg, "jsonl_field", "text")
    if source == "jsonl" and (not isinstance(jsonl_field, str) or not jsonl_field):
        raise DataError(f"data.jsonl_field: must be a non-empty string, got {jsonl_field!r}")
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed: must be a non-negative integer, got {seed!r}")
    if tokenizer is None:
        tokenizer = load_tokenizer(_field(data_cfg, "tokenizer", "bytes"))
    corpus = build_corpus(source=source, path=_field(data_cfg, "path", ""),
                          jsonl_field=jsonl_field, tokenizer=tokenizer,
                          heldout_fraction=float(fraction), max_bytes=int(max_bytes),
                          min_train_tokens=int(seq_len) + 1)
    return PackedData(corpus, tokenizer, seq_len=int(seq_len), seed=int(seed),
                      heldout_fraction=float(fraction))
