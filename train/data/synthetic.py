"""Synthetic training data (MQAR) with the same interface as `PackedData`.

Each row of step s is an MQAR example generated from (seed, stream, global row g), so the batch
of a step is a pure function of (seed, s) as for text corpora, and the data never repeats.
Three seed streams never share an example:

    train       stream 0           rows g = s·B + i, fresh every step
    heldout     stream 2^31 − 1    a fixed set of `data.mqar.heldout_examples` rows (eval_batches)
    validation  stream 2^31 − 2    a fixed set for choosing hyperparameters (validation_batches),
                                   so a learning rate is never picked on the reported numbers

Mixture of cells. `data.mqar.cells` = "L:K,L:K,..." trains on several (length L, pairs K) cells;
empty, the single cell (data.seq_len, data.mqar.num_kv_pairs) — then rows, fingerprint and
`describe()` are what they were before mixtures existed. Row g of every stream takes cell
g mod n (n cells, in the given order). Cycling by row index rather than drawing a cell per row:
it is still a pure function of (seed, s, g), and a batch whose size is a multiple of n holds
exactly B/n rows of each cell (so does each host's slice when B/hosts is), which keeps the mix
of the loss the same at every step instead of noisy. Rows are `data.seq_len` = max L long; an
example of length L < max L is right-padded as `packing` pads a row:

    inputs    x_0 … x_{L−1}  0 … 0
    targets   y_0 … y_{L−1}  −100 … −100
    segment   1   … 1        0 … 0
    positions 0   … L−1      0 … 0

so a causal model's predictions on the real tokens do not see the padding, and the loss scores
exactly K positions per example.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from train.data.pipeline import serve_by_index
from train.data.tokenizer import DataError, IdTokenizer
from train.tasks.mqar import MqarSpec, format_cells, make_mqar, parse_cells

__all__ = ["MqarData", "MQAR_FIELDS", "MQAR_SPLITS", "load_mqar", "mqar_train_cells"]

# The `data.*` fields the mqar source reads (seq_len is the row length).
MQAR_FIELDS = ("seq_len", "mqar.vocab_size", "mqar.num_kv_pairs", "mqar.power_a",
               "mqar.random_non_queries", "mqar.heldout_examples", "mqar.cells")

MQAR_SPLITS = ("train", "heldout", "validation")
_STREAMS = {"train": 0, "heldout": 2 ** 31 - 1, "validation": 2 ** 31 - 2}


class MqarData:
    # The end-of-run evaluation reports recall accuracy (argmax hits on the value positions).
    is_recall_task = True

    def __init__(self, spec: MqarSpec, *, seed: int, heldout_examples: int, cells=()):
        """`spec`: vocabulary, generator settings and the row length `spec.seq_len`; its
        num_kv_pairs is the single cell's and is not read when `cells` [(L, K), ...] is given."""
        cells = tuple((int(length), int(pairs)) for length, pairs in cells)
        # With cells, only the vocabulary of `spec` is checked here (a 3-token, 1-pair probe
        # cannot fail otherwise); each cell is checked below, named as a cell.
        probe = spec if not cells else MqarSpec(vocab_size=spec.vocab_size, seq_len=3,
                                                num_kv_pairs=1)
        try:
            probe.validate(field="data.mqar")
        except ValueError as e:
            raise DataError(str(e)) from None
        if cells:
            longest = max(length for length, _ in cells)
            if spec.seq_len != longest:
                raise DataError(f"data.seq_len = {spec.seq_len} must equal the longest length "
                                f"of data.mqar.cells ({format_cells(cells)}): set it to {longest}")
        self.spec, self.seed, self.seq_len = spec, int(seed), spec.seq_len
        self.mixture = bool(cells)
        self.cells = cells or ((spec.seq_len, spec.num_kv_pairs),)
        self._specs = []
        for length, pairs in self.cells:
            cell = MqarSpec(spec.vocab_size, length, pairs, spec.power_a, spec.random_non_queries)
            if cells and cell.problem():
                raise DataError(f"data.mqar.cells: cell {length}:{pairs} does not fit: "
                                f"{cell.problem()} (vocab_size {spec.vocab_size})")
            self._specs.append(cell)
        self.heldout_examples = int(heldout_examples)
        self.tokenizer = IdTokenizer(spec.vocab_size)
        record = {"mqar": spec.__dict__, "heldout": heldout_examples}
        if cells:  # absent for a single cell, so those fingerprints are unchanged
            record["cells"] = [list(c) for c in cells]
        blob = json.dumps(record, sort_keys=True)
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]

    def cell_of(self, row: int) -> tuple[int, int]:
        """(L, K) of global row `row` of any split: cell row mod n."""
        return self.cells[int(row) % len(self.cells)]

    def _rows(self, stream: int, first_row: int, count: int) -> dict:
        t = self.seq_len
        out = {"inputs": np.zeros((count, t), np.int32),
               "targets": np.full((count, t), -100, np.int32),
               "segment_ids": np.zeros((count, t), np.int32),
               "positions": np.zeros((count, t), np.int32)}
        for i in range(count):
            g = first_row + i
            spec = self._specs[g % len(self._specs)]
            ex = make_mqar(spec, 1, (self.seed, stream, g))
            length = spec.seq_len
            out["inputs"][i, :length] = ex["inputs"][0]
            out["targets"][i, :length] = ex["targets"][0]
            out["segment_ids"][i, :length] = 1
            out["positions"][i, :length] = np.arange(length)
        return out

    def _local(self, batch_size: int, process_index: int, process_count: int) -> int:
        if batch_size % process_count:
            raise DataError(f"batch_size: {batch_size} is not divisible by process_count {process_count}")
        return batch_size // process_count

    def batch(self, step: int, *, split: str = "train", batch_size: int, process_index: int = 0,
              process_count: int = 1) -> dict:
        if split not in MQAR_SPLITS:
            raise DataError(f"split: unknown split {split!r} (allowed: {', '.join(MQAR_SPLITS)})")
        local = self._local(batch_size, process_index, process_count)
        first = int(step) * batch_size + process_index * local
        if split == "heldout":
            first %= max(self.heldout_examples, 1)
        return self._rows(_STREAMS[split], first, local)

    def iterator(self, start_step: int, *, split: str = "train", batch_size: int,
                 process_index: int = 0, process_count: int = 1):
        self._local(batch_size, process_index, process_count)
        return serve_by_index(lambda s: self.batch(int(s), split=split, batch_size=batch_size,
                                                   process_index=process_index,
                                                   process_count=process_count), int(start_step))

    def eval_batches(self, *, batch_size: int, max_batches: int, process_index: int = 0,
                     process_count: int = 1) -> list[dict]:
        n = min(int(max_batches), -(-self.heldout_examples // batch_size))
        return [self.batch(s, split="heldout", batch_size=batch_size, process_index=process_index,
                           process_count=process_count) for s in range(n)]

    def validation_batches(self, *, batch_size: int, max_batches: int, process_index: int = 0,
                           process_count: int = 1) -> list[dict]:
        """Batches 0 … max_batches − 1 of the validation stream: the same mixture as training
        from a seed stream of its own (neither the training nor the held-out rows), for
        choosing learning rates without touching the numbers that are reported."""
        return [self.batch(s, split="validation", batch_size=batch_size,
                           process_index=process_index, process_count=process_count)
                for s in range(int(max_batches))]

    def num_tokens(self, split: str = "train") -> int:
        """Real (unpadded) tokens of the held-out set; 0 for the endless training stream."""
        if split != "heldout":
            return 0
        return sum(self.cell_of(g)[0] for g in range(self.heldout_examples))

    def describe(self) -> str:
        s = self.spec
        cells = (f"cells {format_cells(self.cells)} (row g: cell g mod {len(self.cells)}, "
                 f"padded to {s.seq_len})" if self.mixture
                 else f"seq_len {s.seq_len}, {s.num_kv_pairs} pairs")
        return (f"data: mqar (vocab {s.vocab_size}, {cells}, "
                f"fresh examples every step, {self.heldout_examples} held-out), "
                f"fingerprint {self.fingerprint}")


def mqar_train_cells(data_cfg: Any) -> tuple[tuple[int, int], ...]:
    """The (L, K) cells an mqar run trains on: `data.mqar.cells` parsed, or the single cell
    (data.seq_len, data.mqar.num_kv_pairs) when it is empty or absent (configs saved before the
    field existed). Raises a one-line DataError naming data.mqar.cells for a malformed list."""
    text = _cells_text(data_cfg)
    if not text:
        return ((int(data_cfg.seq_len), int(data_cfg.mqar.num_kv_pairs)),)
    try:
        return parse_cells(text)
    except ValueError as e:
        raise DataError(f"data.mqar.cells = {text!r}: {e}") from None


def load_mqar(data_cfg: Any, seed: int) -> MqarData:
    m = data_cfg.mqar
    spec = MqarSpec(vocab_size=int(m.vocab_size), seq_len=int(data_cfg.seq_len),
                    num_kv_pairs=int(m.num_kv_pairs), power_a=float(m.power_a),
                    random_non_queries=bool(m.random_non_queries))
    cells = mqar_train_cells(data_cfg) if _cells_text(data_cfg) else ()
    return MqarData(spec, seed=seed, heldout_examples=int(m.heldout_examples), cells=cells)


def _cells_text(data_cfg: Any) -> str:
    return str(data_cfg.mqar.get("cells", "") or "").strip()
