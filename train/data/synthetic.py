"""Synthetic training data (MQAR) with the same interface as `PackedData`.

Each row of step s is an MQAR example generated from (seed, step, global row), so the batch of
a step is a pure function of (seed, s) as for text corpora, and the data never repeats. The
held-out split is a fixed set of examples from a separate seed stream.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from train.data.pipeline import serve_by_index
from train.data.tokenizer import DataError, IdTokenizer
from train.tasks.mqar import MqarSpec, make_mqar

__all__ = ["MqarData", "MQAR_FIELDS"]

# The `data.*` fields the mqar source reads (seq_len is the example length).
MQAR_FIELDS = ("seq_len", "mqar.vocab_size", "mqar.num_kv_pairs", "mqar.power_a",
               "mqar.random_non_queries", "mqar.heldout_examples")

_HELDOUT_STREAM = 2 ** 31 - 1


class MqarData:
    # The end-of-run evaluation reports recall accuracy (argmax hits on the value positions).
    is_recall_task = True

    def __init__(self, spec: MqarSpec, *, seed: int, heldout_examples: int):
        try:
            spec.validate(field="data.mqar")
        except ValueError as e:
            raise DataError(str(e)) from None
        self.spec, self.seed, self.seq_len = spec, int(seed), spec.seq_len
        self.heldout_examples = int(heldout_examples)
        self.tokenizer = IdTokenizer(spec.vocab_size)
        blob = json.dumps({"mqar": spec.__dict__, "heldout": heldout_examples}, sort_keys=True)
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _rows(self, stream: int, first_row: int, count: int) -> dict:
        rows = [make_mqar(self.spec, 1, (self.seed, stream, first_row + i)) for i in range(count)]
        inputs = np.concatenate([r["inputs"] for r in rows])
        targets = np.concatenate([r["targets"] for r in rows])
        n, t = inputs.shape
        return {"inputs": inputs, "targets": targets, "segment_ids": np.ones((n, t), np.int32),
                "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy()}

    def _local(self, batch_size: int, process_index: int, process_count: int) -> int:
        if batch_size % process_count:
            raise DataError(f"batch_size: {batch_size} is not divisible by process_count {process_count}")
        return batch_size // process_count

    def batch(self, step: int, *, split: str = "train", batch_size: int, process_index: int = 0,
              process_count: int = 1) -> dict:
        local = self._local(batch_size, process_index, process_count)
        first = int(step) * batch_size + process_index * local
        if split == "heldout":
            return self._rows(_HELDOUT_STREAM, first % max(self.heldout_examples, 1), local)
        return self._rows(0, first, local)

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

    def num_tokens(self, split: str = "train") -> int:
        return self.heldout_examples * self.seq_len if split == "heldout" else 0

    def describe(self) -> str:
        s = self.spec
        return (f"data: mqar (vocab {s.vocab_size}, seq_len {s.seq_len}, {s.num_kv_pairs} pairs, "
                f"fresh examples every step, {self.heldout_examples} held-out), "
                f"fingerprint {self.fingerprint}")


def load_mqar(data_cfg: Any, seed: int) -> MqarData:
    m = data_cfg.mqar
    spec = MqarSpec(vocab_size=int(m.vocab_size), seq_len=int(data_cfg.seq_len),
                    num_kv_pairs=int(m.num_kv_pairs), power_a=float(m.power_a),
                    random_non_queries=bool(m.random_non_queries))
    return MqarData(spec, seed=seed, heldout_examples=int(m.heldout_examples))
