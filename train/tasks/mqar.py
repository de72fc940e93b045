"""Multi-query associative recall (MQAR) as defined by Zoology (Arora et al., 2023).

An example of length L with K key-value pairs:
    k_1 v_1 k_2 v_2 … k_K v_K | … k_{π(1)} · … k_{π(2)} · …
The first 2K tokens list the pairs (keys drawn without replacement from the lower half of the
vocabulary [1, V/2), values from the upper half [V/2, V)). Each key is then asked once in the
query region, at an even offset 2·g drawn without replacement from a power law
p(g) ∝ g^(a−1) (a = 0.01), so most queries come soon after the context and a few far away. The
target after reading the query key is its value; every other position is unscored (−100). The
other query-region tokens — the value slots included, so the answer is never in the input — are
random tokens of the values half (`random_non_queries`; Zoology draws them from the whole
vocabulary, which can plant spurious keys) or 0.

Inputs/targets are the usual shift: inputs = example[:-1], targets = example[1:] with −100 off the
value positions. Accuracy is per example (over its K scored positions), then averaged.

A cell is one (L, K); a mixture of cells is written "L:K,L:K,..." (`parse_cells`). Zoology
trains on the mixture `ZOOLOGY_TRAIN_CELLS` (vocabulary 8192) and tests on longer cells.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["MqarSpec", "make_mqar", "mqar_accuracy", "MQAR_SUITE", "ZOOLOGY_TRAIN_CELLS",
           "parse_cells", "format_cells", "power_law_gap_probs"]

IGNORE = -100

# (sequence length, key-value pairs): the training cell and longer ones.
MQAR_SUITE = ((64, 4), (128, 8), (256, 16), (512, 32), (1024, 64))
# Zoology's training mixture (Arora et al., 2023), as (sequence length, key-value pairs).
ZOOLOGY_TRAIN_CELLS = ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))


@dataclasses.dataclass(frozen=True)
class MqarSpec:
    vocab_size: int = 256
    seq_len: int = 64          # model input length (the example has seq_len + 1 tokens)
    num_kv_pairs: int = 4
    power_a: float = 0.01
    random_non_queries: bool = True

    def problem(self) -> str | None:
        """Why this spec cannot generate examples (one line, fields named bare), or None."""
        if self.vocab_size < 8 or self.vocab_size % 2:
            return f"vocab_size must be an even number >= 8, got {self.vocab_size}"
        # Keys are drawn without replacement from [1, V/2): at most V/2 − 1 of them.
        if self.num_kv_pairs < 1 or self.num_kv_pairs >= self.vocab_size // 2:
            return (f"num_kv_pairs must lie in [1, vocab_size/2 - 1] = [1, "
                    f"{self.vocab_size // 2 - 1}], got {self.num_kv_pairs}")
        # 2K context tokens, then K queries at distinct even offsets of the query region.
        if 4 * self.num_kv_pairs > self.seq_len + 1:
            return (f"seq_len ({self.seq_len}) is too short for {self.num_kv_pairs} pairs: it "
                    f"needs at least 4·pairs − 1 tokens")
        return None

    def validate(self, field: str = "mqar") -> None:
        """Raise ValueError `<field>.<problem>` when `problem()` finds one."""
        why = self.problem()
        if why:
            raise ValueError(f"{field}.{why}")


def parse_cells(text: str) -> tuple[tuple[int, int], ...]:
    """ "64:4,128:8" -> ((64, 4), (128, 8)), in the given order. Raises ValueError (one line, no
    field name: the caller adds it) for an item that is not two positive integers L:K, or a
    repeated cell. Whether a cell fits a vocabulary is `MqarSpec.problem`'s question."""
    cells = []
    for item in (x.strip() for x in text.split(",")):
        parts = item.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"{item!r} is not length:pairs with two positive integers "
                             f"(e.g. 64:4,128:8)")
        cell = (int(parts[0]), int(parts[1]))
        if cell in cells:
            raise ValueError(f"cell {item!r} is given twice")
        cells.append(cell)
    return tuple(cells)


def format_cells(cells) -> str:
    """The inverse of `parse_cells`: ((64, 4), (128, 8)) -> "64:4,128:8"."""
    return ",".join(f"{length}:{pairs}" for length, pairs in cells)


def power_law_gap_probs(space: int, a: float) -> np.ndarray:
    p = a * np.arange(1, space + 1, dtype=np.float64) ** (a - 1)
    return p / p.sum()


def make_mqar(spec: MqarSpec, num_examples: int, seed) -> dict:
    """Deterministic in `seed` (an int or a sequence of ints). Returns int32 arrays
    inputs/targets [N, seq_len], plus keys/values [N, K] and query_pos [N, K] (input positions
    whose next-token target is the value)."""
    spec.validate()
    rng = np.random.default_rng(seed)
    n, k, v = num_examples, spec.num_kv_pairs, spec.vocab_size
    length = spec.seq_len + 1
    context = 2 * k
    half = v // 2
    keys = np.stack([rng.choice(np.arange(1, half), size=k, replace=False) for _ in range(n)])
    values = rng.integers(half, v, size=(n, k))
    kvs = np.zeros((n, context), np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values

    space = (length - context) // 2
    p = power_law_gap_probs(space, spec.power_a)
    gaps = np.stack([rng.choice(space, size=k, replace=False, p=p) for _ in range(n)])  # [N, K]
    query_region = np.zeros((n, length - context), np.int64)
    if spec.random_non_queries:
        # Fillers are values-half tokens never equal to a key, so they cannot be mistaken for queries.
        query_region = rng.integers(half, v, size=query_region.shape)
    np.put_along_axis(query_region, 2 * gaps, keys, axis=1)
    labels_region = np.full(query_region.shape, IGNORE, np.int64)
    np.put_along_axis(labels_region, 2 * gaps + 1, values, axis=1)

    example = np.concatenate([kvs, query_region], axis=1)  # [N, L+1]
    labels = np.concatenate([np.full((n, context), IGNORE), labels_region], axis=1)
    return {"inputs": example[:, :-1].astype(np.int32), "targets": labels[:, 1:].astype(np.int32),
            "keys": keys.astype(np.int32), "values": values.astype(np.int32),
            "query_pos": (context + 2 * gaps).astype(np.int32)}


def mqar_accuracy(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Per-example accuracy over scored positions (targets != −100), averaged over examples
    that have at least one scored position."""
    scored = targets != IGNORE
    correct = (predictions == targets) & scored
    per_example = correct.sum(1) / np.maximum(scored.sum(1), 1)
    has = scored.any(1)
    return float(per_example[has].mean()) if has.any() else float("nan")
