"""Input pipeline: corpus -> tokens -> packed rows -> per-host batches.

The trainer's entry point is ``load_data(data_cfg, seed, *, tokenizer=None)``, which returns a ``PackedData``:
``tokenizer``, ``fingerprint``, ``batch(step, ...)``, ``iterator(start_step, ...)``,
``eval_batches(...)``, ``num_tokens(split)``, ``describe()``. Every configuration or corpus
problem raises ``DataError`` (a ``ValueError``) naming the config field.

Modules: ``tokenizer`` (byte / HuggingFace tokenizers, ``DataError``), ``corpus`` (files ->
documents -> train / held-out token splits), ``packing`` (document pieces -> rows),
``pipeline`` (plans per epoch, batches, grain iterator).
"""

from train.data.corpus import SOURCES, Corpus, Split, build_corpus
from train.data.packing import IGNORE, PackPlan, fill_rows, pack
from train.data.pipeline import SPLITS, PackedData, load_data
from train.data.tokenizer import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

__all__ = [
    "load_data",
    "PackedData",
    "DataError",
    "SOURCES",
    "SPLITS",
    "IGNORE",
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "tokenizer_from_dict",
    "Corpus",
    "Split",
    "build_corpus",
    "PackPlan",
    "pack",
    "fill_rows",
]
