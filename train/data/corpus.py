"""Corpus reading: files -> documents -> token arrays, split into train / held-out.

Sources (``data.source``):

* ``"stdlib"``: the Python standard library's own ``.py`` files
  (``sysconfig.get_paths()["stdlib"]``), in sorted relative-path order, without ``site-packages``
  and test folders (``STDLIB_SKIP_DIRS``).
  One file = one document. Setting ``data.path`` with it is an error.
* ``"text"``: one file = one document; directories are searched recursively for
  ``*.txt``/``*.md``/``*.py``.
* ``"jsonl"``: one document per non-blank line, the string under ``data.jsonl_field``;
  directories are searched for ``*.jsonl``.
* ``"tokens"``: ``.npy`` files of integer token ids; a 1-D array is one document, a 2-D [N, L]
  array is N documents. Ids must lie in [0, tokenizer.vocab_size).

``data.path`` is a file, a directory, a glob (``**`` allowed) or a comma-separated list of those.
An explicitly named file is read whatever its extension. Hidden files and folders are skipped.

``data.max_bytes`` (0 = no limit) caps what is read, in corpus order: UTF-8 bytes of text, or
4 bytes per token for the tokens source; the document that crosses the cap is truncated.

Every document has a key (its relative path, plus ``:<line>`` / ``:<row>`` for jsonl lines and
2-D token rows). A document is held out when ``zlib.crc32(key) < heldout_fraction * 2**32``: the
split is deterministic and independent of reading order and of ``max_bytes``. Documents of fewer
than two tokens (nothing to predict) are dropped. When the hash split holds nothing out but
``heldout_fraction > 0`` (tiny corpora), the trailing document(s), or the tail of the last one,
are held out instead and ``Corpus.heldout_note`` says so.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import sysconfig
import zlib
from typing import Iterator

import numpy as np

from train.data.tokenizer import DataError, Tokenizer

__all__ = ["SOURCES", "SOURCE_FIELDS", "STDLIB_SKIP_DIRS", "Split", "Corpus", "build_corpus", "resolve_paths"]

SOURCES = ("stdlib", "text", "jsonl", "tokens")
# The `data.*` fields each source reads; a field set for a source that does not read it is a
# config error (train/fields.py).
_COMMON = ("seq_len", "heldout_fraction", "max_bytes", "tokenizer")
SOURCE_FIELDS: dict[str, tuple[str, ...]] = {
    "stdlib": _COMMON,
    "text": _COMMON + ("path",),
    "jsonl": _COMMON + ("path", "jsonl_field"),
    "tokens": _COMMON + ("path",),   # the tokenizer bounds the ids (and decodes samples)
}
EXTENSIONS = {"text": (".txt", ".md", ".py"), "jsonl": (".jsonl",), "tokens": (".npy",)}
# Folders left out of the stdlib corpus: installed packages, caches and the test suites
# (19 of the stdlib's 30 MiB; e.g. test/, lib2to3/tests/, idlelib/idle_test/).
STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


@dataclasses.dataclass(frozen=True)
class Split:
    """Documents concatenated: document i is ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray   # [N] int32
    offsets: np.ndarray  # [D + 1] int64, offsets[0] == 0, offsets[-1] == N
    keys: tuple[str, ...]

    @property
    def num_docs(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:  # [D] int64
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def from_docs(cls, docs: list[np.ndarray], keys: list[str]) -> "Split":
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = (np.concatenate(docs).astype(np.int32, copy=False) if docs
                  else np.zeros([0], np.int32))
        return cls(tokens, offsets, tuple(keys))


@dataclasses.dataclass(frozen=True)
class Corpus:
    source: str
    origin: str          # where it came from (stdlib folder or data.path)
    num_files: int
    train: Split
    heldout: Split
    heldout_note: str    # "" for the plain hash split, else what was done instead

    def digest(self) -> str:
        """sha256 of both splits' tokens and document boundaries."""
        h = hashlib.sha256()
        for split in (self.train, self.heldout):
            h.update(np.int64(split.num_docs).tobytes())
            h.update(np.ascontiguousarray(split.offsets, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(split.tokens, dtype=np.int32).tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------- files


def _walk(root: str, exts: tuple[str, ...], skip_dirs=frozenset()) -> list[str]:
    """Files under root with one of exts, sorted by relative path; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
        found += [os.path.join(dirpath, f) for f in filenames
                  if f.endswith(exts) and not f.startswith(".")]
    return sorted(found, key=lambda p: os.path.relpath(p, root).split(os.sep))


def resolve_paths(path: str, exts: tuple[str, ...], field: str = "data.path"
                  ) -> list[tuple[str, str]]:
    """``data.path`` -> [(file, key)], key = path relative to the folder named (or glob base)."""
    parts = [p.strip() for p in str(path or "").split(",") if p.strip()]
    if not parts:
        raise DataError(f"{field} is empty: give a file, a directory, a glob or a "
                        "comma-separated list of those")
    out: list[tuple[str, str]] = []
    for part in parts:
        expanded = os.path.expanduser(part)
        if any(c in expanded for c in "*?["):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise DataError(f"{field}: glob {part!r} matches nothing")
            base = expanded[:min(expanded.index(c) for c in "*?[" if c in expanded)]
            base = base if base.endswith(os.sep) or not base else os.path.dirname(base)
            for m in matches:
                files = _walk(m, exts) if os.path.isdir(m) else [m]
                out += [(f, os.path.relpath(f, base or ".")) for f in files]
        elif os.path.isdir(expanded):
            out += [(f, os.path.relpath(f, expanded)) for f in _walk(expanded, exts)]
        elif os.path.isfile(expanded):
            out.append((expanded, os.path.basename(expanded)))
        else:
            raise DataError(f"{field}: {part!r} does not exist")
    seen, unique = set(), []
    for f, key in out:
        real = os.path.realpath(f)
        if real not in seen:
            seen.add(real)
            unique.append((f, key.replace(os.sep, "/")))
    if not unique:
        raise DataError(f"{field}: no {'/'.join('*' + e for e in exts)} files found in {path!r}")
    return unique


def _stdlib_files() -> tuple[str, list[tuple[str, str]]]:
    root = sysconfig.get_paths()["stdlib"]
    files = _walk(root, (".py",), STDLIB_SKIP_DIRS)
    return root, [(f, os.path.relpath(f, root).replace(os.sep, "/")) for f in files]


# ----------------------------------------------------------------------------- documents


class _Budget:
    """The ``data.max_bytes`` cap: hands out what is left, truncating the crossing document."""

    def __init__(self, max_bytes: int):
        self.left = max_bytes if max_bytes > 0 else math.inf

    @property
    def exhausted(self) -> bool:
        return self.left <= 0

    def text(self, text: str) -> str:
        if math.isinf(self.left):
            return text
        data = text.encode("utf-8", errors="replace")
        if len(data) > self.left:
            data = data[:int(self.left)]
            text = data.decode("utf-8", errors="ignore")
        self.left -= len(data)
        return text

    def tokens(self, ids: np.ndarray) -> np.ndarray:
        if math.isinf(self.left):
            return ids
        ids = ids[:int(self.left) // 4]
        self.left = self.left - 4 * len(ids) if len(ids) else 0
        return ids


def _read_text(file: str) -> str | None:
    try:
        with open(file, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _text_docs(files, budget: _Budget) -> Iterator[tuple[str, str]]:
    for file, key in files:
        if budget.exhausted:
            return
        text = _read_text(file)
        if text:
            yield key, budget.text(text)


def _jsonl_docs(files, field_name: str, budget: _Budget) -> Iterator[tuple[str, str]]:
    for file, key in files:
        text = _read_text(file)
        for lineno, line in enumerate((text or "").splitlines(), start=1):
            if budget.exhausted:
                return
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"data.path: {where} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field_name not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"data.jsonl_field: {field_name!r} is missing in {where} "
                                f"(found: {keys})")
            value = record[field_name]
            if not isinstance(value, str):
                raise DataError(f"data.jsonl_field: {field_name!r} in {where} is a "
                                f"{type(value).__name__}, not a string")
            yield f"{key}:{lineno}", budget.text(value)


def _token_docs(files, vocab_size: int, budget: _Budget) -> Iterator[tuple[str, np.ndarray]]:
    for file, key in files:
        if budget.exhausted:
            return
        try:
            arr = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"data.path: cannot read {file} as a .npy token file ({e})") from None
        if not np.issubdtype(arr.dtype, np.integer) or arr.ndim not in (1, 2):
            raise DataError(f"data.path: {file} must hold a 1-D or 2-D integer array of token "
                            f"ids, not {arr.ndim}-D {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            bad = arr.max() if arr.max() >= vocab_size else arr.min()
            raise DataError(f"data.path: {file} holds token id {int(bad)} outside "
                            f"[0, {vocab_size}) (vocab_size of data.tokenizer)")
        rows = [(key, arr)] if arr.ndim == 1 else [(f"{key}:{i}", r) for i, r in enumerate(arr)]
        for k, row in rows:
            if budget.exhausted:
                return
            yield k, budget.tokens(row.astype(np.int32))


# ----------------------------------------------------------------------------- split


def _hash_heldout(key: str, fraction: float) -> bool:
    return zlib.crc32(key.encode("utf-8")) < fraction * 2.0**32


def _fallback_heldout(docs, keys, fraction, min_train_tokens):
    """Hold out trailing documents (or the last one's tail) when the hash split held out none.

    Returns (train_docs, train_keys, heldout_docs, heldout_keys, note).
    """
    total = sum(len(d) for d in docs)
    want = max(2, math.ceil(fraction * total))
    n_train, held = len(docs), 0
    while n_train > 1 and held < want:
        size = len(docs[n_train - 1])
        if held + size > 2 * want or total - held - size < min_train_tokens:
            break
        held += size
        n_train -= 1
    if n_train < len(docs):
        note = (f"no document fell in the hash split; held out the last {len(docs) - n_train} "
                "document(s) instead")
        return docs[:n_train], keys[:n_train], docs[n_train:], keys[n_train:], note
    take = min(want, total - min_train_tokens, len(docs[-1]) - 2)
    if take < 2:
        return docs, keys, [], [], "corpus too small to hold anything out: no held-out split"
    last = docs[-1]
    note = (f"no document fell in the hash split; held out the last {take} tokens of "
            f"{keys[-1]} instead")
    return (docs[:-1] + [last[:-take]], keys, [last[-take:]], [keys[-1] + ":tail"], note)


def build_corpus(*, source: str, path: str, jsonl_field: str, tokenizer: Tokenizer,
                 heldout_fraction: float, max_bytes: int, min_train_tokens: int) -> Corpus:
    """Read, tokenize and split a corpus; raises DataError for anything unusable.

    ``min_train_tokens`` (seq_len + 1) is the least the training split may hold.
    """
    if source not in SOURCES:
        raise DataError(f"data.source: unknown source {source!r} "
                        f"(allowed: {', '.join(repr(s) for s in SOURCES)})")
    budget = _Budget(max_bytes)
    if source == "stdlib":
        origin, files = _stdlib_files()
        if not files:
            raise DataError(f"data.source: no .py files found in the stdlib folder {origin}")
    else:
        origin, files = str(path), resolve_paths(path, EXTENSIONS[source])
    if source == "tokens":
        items = list(_token_docs(files, tokenizer.vocab_size, budget))
        keys, docs = [k for k, _ in items], [d for _, d in items]
    else:
        reader = (_jsonl_docs(files, jsonl_field, budget) if source == "jsonl"
                  else _text_docs(files, budget))
        items = list(reader)
        keys = [k for k, _ in items]
        docs = tokenizer.encode_batch([t for _, t in items])
    kept = [(k, d) for k, d in zip(keys, docs) if len(d) >= 2]
    if not kept:
        raise DataError(f"data.path: {len(files)} file(s) read from {origin!r} but no document "
                        "has two or more tokens (all empty or unreadable)")
    keys, docs = [k for k, _ in kept], [d for _, d in kept]
    held = [_hash_heldout(k, heldout_fraction) for k in keys]
    train_docs = [d for d, h in zip(docs, held) if not h]
    train_keys = [k for k, h in zip(keys, held) if not h]
    held_docs = [d for d, h in zip(docs, held) if h]
    held_keys = [k for k, h in zip(keys, held) if h]
    note = ""
    if not train_docs:
        # Every document hashed into the held-out split: train on them all, fall back below.
        train_docs, train_keys, held_docs, held_keys = docs, keys, [], []
    if not held_docs and heldout_fraction > 0:
        train_docs, train_keys, held_docs, held_keys, note = _fallback_heldout(
            train_docs, train_keys, heldout_fraction, min_train_tokens)
    elif heldout_fraction <= 0:
        note = "data.heldout_fraction is 0: no held-out split"
    train = Split.from_docs(train_docs, train_keys)
    if train.num_tokens < min_train_tokens:
        field = "data.max_bytes" if source == "stdlib" else "data.path"
        raise DataError(
            f"{field}: the training split holds {train.num_tokens} tokens, fewer than one "
            f"sequence (data.seq_len + 1 = {min_train_tokens}); give more data or a shorter "
            "data.seq_len")
    return Corpus(source=source, origin=origin, num_files=len(files), train=train,
                  heldout=Split.from_docs(held_docs, held_keys), heldout_note=note)
