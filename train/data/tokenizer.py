"""Tokenizers for the input pipeline, and the package's error type.

Two tokenizers share one small interface:

* ``vocab_size: int``
* ``encode(text: str) -> np.ndarray``            int32 ids, shape [N]
* ``encode_batch(texts: list[str]) -> list[np.ndarray]``
* ``decode(ids) -> str``                         ids outside [0, vocab_size) (e.g. the -100 of
  unscored targets, or padding) are dropped
* ``to_dict() -> dict``                          JSON-able; ``tokenizer_from_dict(d)`` rebuilds it

``ByteTokenizer`` maps text to its UTF-8 bytes (vocab 256) and decodes with
``errors="replace"``. ``HFTokenizer`` wraps a HuggingFace ``tokenizers`` JSON file; the
``tokenizers`` package is imported only when such a tokenizer is asked for, and its absence is
reported as a ``DataError`` naming ``data.tokenizer``. Its ``to_dict`` embeds the whole JSON, so a
checkpoint that stores it can be decoded without the original file.

``DataError`` lives here because this is the package's leaf module (every other module imports
it); it is re-exported as ``train.data.DataError``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Protocol, Sequence

import numpy as np

__all__ = [
    "DataError",
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "tokenizer_from_dict",
    "tokenizer_digest",
]


class DataError(ValueError):
    """A data configuration or corpus that cannot be used; the message names the config field."""


class Tokenizer(Protocol):
    """The interface every tokenizer of this package implements."""

    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Any) -> str: ...

    def to_dict(self) -> dict: ...


def _valid_ids(ids: Any, vocab_size: int) -> np.ndarray:
    """ids as a flat int64 array, with everything outside [0, vocab_size) removed."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    return arr[(arr >= 0) & (arr < vocab_size)]


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte value, vocab 256, no special tokens."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        data = text.encode("utf-8", errors="replace")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Any) -> str:
        arr = _valid_ids(ids, 256).astype(np.uint8)
        return arr.tobytes().decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "bytes"}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class IdTokenizer:
    """Integer ids as tokens (synthetic tasks): text is the ids written in decimal, space-separated."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> np.ndarray:
        return np.array([int(t) for t in text.split()], np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Any) -> str:
        return " ".join(str(int(i)) for i in _valid_ids(ids, self.vocab_size))

    def to_dict(self) -> dict:
        return {"type": "ids", "vocab_size": self.vocab_size}

    def __repr__(self) -> str:
        return f"IdTokenizer(vocab_size={self.vocab_size})"


def _import_tokenizers(field: str):
    try:
        import tokenizers  # noqa: PLC0415  (optional dependency, imported lazily)
    except ImportError as e:
        raise DataError(
            f"{field}: a tokenizer JSON file needs the HuggingFace `tokenizers` package, "
            f"which is not installed (pip install tokenizers), or use {field}='bytes'"
        ) from e
    return tokenizers


class HFTokenizer:
    """A HuggingFace ``tokenizers`` tokenizer, built from its JSON serialisation.

    Encoding adds no special tokens (documents are separated by segment ids, not by BOS/EOS).
    ``vocab_size`` counts added tokens too.
    """

    def __init__(self, json_str: str, *, name: str = "", field: str = "data.tokenizer"):
        tokenizers = _import_tokenizers(field)
        try:
            self._tok = tokenizers.Tokenizer.from_str(json_str)
        except Exception as e:  # the Rust side raises its own exception types
            raise DataError(f"{field}: {name or 'tokenizer JSON'} is not a valid "
                            f"`tokenizers` JSON file: {e}") from e
        self._json = json_str
        self.name = name
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_file(cls, path: str, *, field: str = "data.tokenizer") -> "HFTokenizer":
        expanded = os.path.expanduser(path)
        if not os.path.isfile(expanded):
            raise DataError(f"{field}: {path!r} does not exist "
                            "(allowed: 'bytes' or a path to a HuggingFace tokenizer JSON file)")
        with open(expanded, encoding="utf-8") as f:
            json_str = f.read()
        return cls(json_str, name=os.path.basename(expanded), field=field)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids: Any) -> str:
        return self._tok.decode([int(i) for i in _valid_ids(ids, self.vocab_size)])

    def to_dict(self) -> dict:
        return {"type": "hf", "name": self.name, "json": self._json}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str, *, field: str = "data.tokenizer") -> Tokenizer:
    """``"bytes"`` -> ByteTokenizer; any other string is a path to a tokenizer JSON file."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"{field}: expected 'bytes' or a path to a HuggingFace tokenizer JSON "
                        f"file, got {spec!r}")
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer.from_file(spec, field=field)


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Inverse of ``tokenizer.to_dict()`` (e.g. a tokenizer stored with a checkpoint)."""
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer(d["json"], name=d.get("name", ""))
    if kind == "ids":
        return IdTokenizer(d["vocab_size"])
    raise DataError(f"tokenizer dict: unknown type {kind!r} (allowed: 'bytes', 'hf', 'ids')")


def tokenizer_digest(tok: Tokenizer) -> str:
    """A stable hash of the tokenizer's full definition (part of the corpus fingerprint)."""
    blob = json.dumps(tok.to_dict(), sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()
