"""Packing documents into fixed-length rows: the plan (row -> document pieces) and the fill.

Pieces. A document of n >= 2 tokens is cut into pieces of at most ``seq_len`` (= L) tokens that
overlap by one token: piece j covers tokens [j (L - 1), j (L - 1) + len_j). In a row a piece of
m tokens occupies m columns::

    inputs    t0  t1  ...  t(m-2)  t(m-1)
    targets   t1  t2  ...  t(m-1)  -100        (the last token of a piece predicts nothing)
    positions 0   1   ...  m-2     m-1
    segment   k   k   ...  k       k           (k = 1, 2, ... the piece's slot in the row)

Piece j scores tokens j (L - 1) + 1 ... j (L - 1) + len_j - 1; piece j + 1 starts on the last
of them, so every token of a document except its first is a scored target exactly once. No target
crosses a piece (hence a document) boundary: for every scored column t,
``inputs[t + 1] == targets[t]`` and ``segment[t + 1] == segment[t]``.
Columns after the last piece are padding: inputs 0, targets -100, segment 0, positions 0.

Plan. ``pack(offsets, seq_len, rng)`` orders the documents by ``rng.permutation`` (identity when
rng is None), gives each full-length piece a row of its own and packs the shorter pieces (at most
one per document, its tail) first-fit decreasing: sorted by length, ties kept in the shuffled
order, each placed in the lowest-numbered row with room. The number of rows therefore depends only
on the document lengths, not on the order, so every epoch of a split has the same row count.
Finally the rows themselves are permuted by ``rng``. Cost: O(P) numpy for the pieces plus
O(D log D) Python for the first-fit (a max segment tree over rows).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["PackPlan", "split_documents", "first_fit", "pack", "fill_rows", "IGNORE"]

IGNORE = -100  # target value of unscored columns


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Row r holds pieces ``row_ptr[r]:row_ptr[r + 1]`` (in column order)."""

    seq_len: int
    row_ptr: np.ndarray  # [R + 1] int64
    doc: np.ndarray      # [P] int64   document index within the split
    start: np.ndarray    # [P] int64   first token of the piece within its document
    length: np.ndarray   # [P] int64   tokens in the piece, 2 <= length <= seq_len
    src: np.ndarray      # [P] int64   first token of the piece in the split's flat token array
    col: np.ndarray      # [P] int64   first column of the piece in its row
    seg: np.ndarray      # [P] int64   segment id of the piece in its row (1-based)

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1

    @property
    def num_pieces(self) -> int:
        return len(self.doc)

    @property
    def fill_fraction(self) -> float:
        """Share of the plan's columns holding tokens (1 - padding)."""
        return float(self.length.sum()) / max(1, self.num_rows * self.seq_len)

    def row(self, r: int) -> list[tuple[int, int, int]]:
        """[(doc, start, length)] of row r, in column order."""
        s = slice(self.row_ptr[r], self.row_ptr[r + 1])
        return [(int(d), int(a), int(n)) for d, a, n in
                zip(self.doc[s], self.start[s], self.length[s])]


def split_documents(lengths: np.ndarray, seq_len: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of documents with the given lengths, documents in the given order.

    Returns (doc, start, length), each [P] int64: ``doc`` indexes ``lengths``. Documents of fewer
    than two tokens give no piece.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    n = np.asarray(lengths, dtype=np.int64)
    stride = seq_len - 1
    count = np.where(n >= 2, (n - 1 + stride - 1) // stride, 0)  # ceil((n - 1) / (L - 1))
    doc = np.repeat(np.arange(len(n), dtype=np.int64), count)
    first = np.repeat(np.cumsum(count) - count, count)
    j = np.arange(len(doc), dtype=np.int64) - first
    start = j * stride
    length = np.minimum(seq_len, n[doc] - start)
    return doc, start, length


def first_fit(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Row of each item, first-fit in the given order (lowest row with room). [N] int64.

    A max segment tree over at most N rows finds the leftmost row with room in O(log N).
    """
    sizes_list = [int(s) for s in np.asarray(sizes)]
    if any(s > capacity or s < 0 for s in sizes_list):
        raise ValueError(f"item sizes must lie in [0, {capacity}]")
    n = len(sizes_list)
    width = 1
    while width < max(n, 1):
        width *= 2
    tree = [capacity] * (2 * width)  # tree[i] = max room among the rows under node i
    out = [0] * n
    for k, m in enumerate(sizes_list):
        i = 1
        while i < width:
            i *= 2
            if tree[i] < m:
                i += 1
        tree[i] -= m
        out[k] = i - width
        i //= 2
        while i:
            a, b = tree[2 * i], tree[2 * i + 1]
            best = a if a > b else b
            if tree[i] == best:
                break
            tree[i] = best
            i //= 2
    return np.asarray(out, dtype=np.int64)


def pack(offsets: np.ndarray, seq_len: int, rng: np.random.Generator | None = None) -> PackPlan:
    """The packing plan of one epoch of a split (documents given by their ``offsets``)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    order = (rng.permutation(len(lengths)) if rng is not None
             else np.arange(len(lengths), dtype=np.int64))
    d, start, length = split_documents(lengths[order], seq_len)
    doc = order[d]
    full = length == seq_len
    num_full = int(full.sum())
    row = np.empty(len(doc), dtype=np.int64)
    row[full] = np.arange(num_full, dtype=np.int64)
    part = np.flatnonzero(~full)
    by_size = part[np.argsort(-length[part], kind="stable")]  # decreasing, ties in doc order
    row[by_size] = num_full + first_fit(length[by_size], seq_len)
    insertion = np.empty(len(doc), dtype=np.int64)  # order of placement within a row
    insertion[by_size] = np.arange(len(by_size), dtype=np.int64)
    insertion[full] = 0
    num_rows = int(row.max()) + 1 if len(row) else 0
    if rng is not None and num_rows:
        row = rng.permutation(num_rows)[row]
    idx = np.lexsort((insertion, row))
    doc, start, length, row = doc[idx], start[idx], length[idx], row[idx]
    counts = np.bincount(row, minlength=num_rows)
    row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    first_in_row = np.repeat(row_ptr[:-1], counts)
    seg = np.arange(len(doc), dtype=np.int64) - first_in_row + 1
    ends = np.cumsum(length)
    col = ends - length - np.repeat(np.concatenate([[0], ends])[row_ptr[:-1]], counts)
    return PackPlan(seq_len=seq_len, row_ptr=row_ptr, doc=doc, start=start, length=length,
                    src=offsets[doc] + start, col=col, seg=seg)


def fill_rows(plan: PackPlan, rows: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The rows ``rows`` of a plan as arrays [len(rows), seq_len], int32 each.

    Keys: "inputs", "targets" (IGNORE where unscored), "segment_ids" (0 = padding), "positions".
    ``tokens`` is the split's flat token array the plan's ``src`` indexes.
    """
    rows = np.asarray(rows, dtype=np.int64)
    b, seq_len = len(rows), plan.seq_len
    out = {
        "inputs": np.zeros([b, seq_len], np.int32),
        "targets": np.full([b, seq_len], IGNORE, np.int32),
        "segment_ids": np.zeros([b, seq_len], np.int32),
        "positions": np.zeros([b, seq_len], np.int32),
    }
    counts = plan.row_ptr[rows + 1] - plan.row_ptr[rows]
    total = int(counts.sum())
    if total == 0:
        return out
    within_row = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    pid = np.repeat(plan.row_ptr[rows], counts) + within_row   # [pieces]
    piece_b = np.repeat(np.arange(b), counts)
    n = plan.length[pid]
    t = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # position in piece
    tb = np.repeat(piece_b, n)
    col = np.repeat(plan.col[pid], n) + t
    src = np.repeat(plan.src[pid], n) + t
    last = t == np.repeat(n - 1, n)
    out["inputs"][tb, col] = tokens[src]
    nxt = tokens[np.minimum(src + 1, len(tokens) - 1)]
    out["targets"][tb, col] = np.where(last, IGNORE, nxt)
    out["segment_ids"][tb, col] = np.repeat(plan.seg[pid], n)
    out["positions"][tb, col] = t
    return out
