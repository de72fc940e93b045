"""The one table of config fields: meaning, allowed values, and who reads each field.

Every field of the run config (`configs/lm.py` and the files built on it) has one row here.
`check_config` runs first in `train_and_evaluate`, before any data is read or anything compiles:

* a field that no row describes is an error (a setting is never silently ignored);
* every value is checked against its row: type, numeric range, allowed choices;
* a field the run will not read is an error naming the source or mixer that would read it:
  data fields by `data.source` (each source declares the fields it reads), `mixer_options` of a
  mixer the model does not use, the optional model fields (`window`, ...) by the mixers that
  declare them (`zoo.registry`), and `model.mixer`/`model.ratio` when `model.layer_types` is
  given. A data field counts as set when it differs from its default; a model field when the
  command line set it (`explicit`), since size presets change those defaults.

`python -m train --fields` prints the table with the run's values (`describe_fields`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from train.data.corpus import SOURCE_FIELDS
from train.data.synthetic import MQAR_FIELDS
from pallas_kernels.common import IMPLS
from train.state import normalize_layer_types
from zoo.config import DTYPES, REMAT_POLICIES, ConfigError, hybrid_pattern
from zoo.registry import OPTIONAL_MODEL_FIELDS, known_mixers, mixer_info

__all__ = ["FIELDS", "Field", "check_config", "describe_fields"]

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field. `kind`: int, float, bool, str, tuple, dict. Numbers lie in [lo, hi]
    (`lo_open` makes the lower bound exclusive); `choices` lists the allowed values; `special`
    are values allowed outside the range (e.g. -1 = "all remaining devices")."""
    path: str
    kind: str
    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None
    special: tuple = ()
    default: Any = _MISSING      # for data fields: the value that means "not set"

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        text = f"{self.kind} " + " and ".join(parts) if parts else self.kind
        return text + "".join(f" (or {s})" for s in self.special)


F = Field
FIELDS: tuple[Field, ...] = (
    F("seed", "int", "seed of parameter init and of the data order (batch of step s = f(seed, s))",
      lo=0),
    # model
    F("model.vocab_size", "int", "vocabulary size; 0 = the tokenizer's", lo=0),
    F("model.d_model", "int", "residual stream width", lo=1),
    F("model.n_layers", "int", "number of blocks (inferred from an explicit layer_types on the "
      "command line)", lo=1),
    F("model.num_heads", "int", "heads of every mixer (q/k heads for grouped layers)", lo=1),
    F("model.num_kv_heads", "int", "attention key/value heads (GQA); 0 = num_heads", lo=0),
    F("model.head_dim", "int", "per-head width of attention and Titans; 0 = d_model / num_heads",
      lo=0),
    F("model.d_ff", "int", "SwiGLU hidden width; 0 = 8/3 d_model rounded up to 64", lo=0),
    F("model.layer_types", "tuple", "one mixer name per layer, e.g. swa,gdn,swa,gdn (`--mixers` "
      "lists them); empty = hybrid_pattern(n_layers, mixer, ratio)"),
    F("model.mixer", "str", "the mixer of a pattern built from n_layers and ratio (read when "
      "layer_types is empty)"),
    F("model.ratio", "int", "mixer layers per attention layer (3 = a 3:1 hybrid; 0 = all mixer); "
      "read when layer_types is empty", lo=0),
    F("model.window", "int", "sliding window of swa layers (and Titans' attention window)", lo=1),
    F("model.rope_theta", "float", "rotary embedding base of attention layers", lo=0,
      lo_open=True),
    F("model.tie_embeddings", "bool", "share the input embedding with the output head"),
    F("model.dtype", "str", "compute dtype (parameters stay float32); auto = bfloat16 on GPU/TPU, "
      "float32 on CPU", choices=DTYPES),
    F("model.impl", "str", "op implementation of every layer; auto = the backend's kernel",
      choices=IMPLS),
    F("model.remat", "str", "per-block recompute in the backward pass: none (save everything), "
      "save_dots (keep projection outputs, recompute the rest), full (keep block inputs only)",
      choices=REMAT_POLICIES),
    F("model.scan_layers", "bool", "a periodic layer_types runs as one group scanned over its "
      "repeats (compile time flat in depth; parameters stacked over a 'layers' axis)"),
    F("model.mixer_options", "dict", "per-mixer layer options, {'gdn': {'expand_v': 2}} "
      "(`--mixers` lists them)"),
    # data
    F("data.source", "str", "stdlib (the Python standard library's source), text, jsonl, tokens "
      "(.npy ids) or mqar (synthetic recall)",
      choices=("stdlib", "text", "jsonl", "tokens", "mqar")),
    F("data.path", "str", "file, folder, glob or comma list of them (text, jsonl, tokens)",
      default=""),
    F("data.jsonl_field", "str", "the field of each jsonl line holding the document",
      default="text"),
    F("data.tokenizer", "str", "'bytes' or a HuggingFace tokenizers JSON file", default="bytes"),
    F("data.seq_len", "int", "tokens per row (MQAR: the example length)", lo=2),
    F("data.heldout_fraction", "float", "share of documents held out for evaluation", lo=0,
      hi=1, hi_open=True, default=0.02),
    F("data.max_bytes", "int", "read at most this many bytes of the corpus; 0 = all", lo=0,
      default=0),
    F("data.mqar.vocab_size", "int", "MQAR vocabulary (keys in the lower half, values the upper)",
      lo=8, default=256),
    F("data.mqar.num_kv_pairs", "int", "key-value pairs per MQAR example", lo=1, default=4),
    F("data.mqar.power_a", "float", "power-law exponent of the query gaps", lo=0, lo_open=True,
      default=0.01),
    F("data.mqar.random_non_queries", "bool", "fill non-query slots with random value tokens",
      default=True),
    F("data.mqar.heldout_examples", "int", "MQAR examples in the held-out set", lo=1,
      default=512),
    F("data.mqar.cells", "str", "MQAR training mixture 'L:K,L:K,...' (length:pairs; row g takes "
      "cell g mod n, padded to data.seq_len = the longest L); empty = the one cell (data.seq_len,"
      " data.mqar.num_kv_pairs)", default=""),
    # train
    F("train.steps", "int", "optimizer steps (the schedule's length)", lo=1),
    F("train.batch_size", "int", "global batch size in rows", lo=1),
    F("train.lr", "float", "peak learning rate", lo=0, lo_open=True),
    F("train.warmup_steps", "int", "linear warmup steps", lo=0),
    F("train.min_lr_ratio", "float", "final lr of the cosine decay / peak lr", lo=0, hi=1),
    F("train.weight_decay", "float", "AdamW decoupled weight decay (not on norms, biases, gates)",
      lo=0),
    F("train.b1", "float", "AdamW beta1", lo=0, hi=1, hi_open=True),
    F("train.b2", "float", "AdamW beta2", lo=0, hi=1, hi_open=True),
    F("train.eps", "float", "AdamW epsilon", lo=0, lo_open=True),
    F("train.clip_norm", "float", "global gradient-norm clip", lo=0, lo_open=True),
    F("train.log_every", "int", "log every this many steps", lo=1),
    F("train.eval_batches", "int", "held-out batches evaluated at the end", lo=1),
    F("train.max_skipped_steps", "int", "stop after this many consecutive updates skipped for a "
      "non-finite loss or gradient", lo=1),
    F("train.microbatches", "int", "gradient accumulation: micro-batches per step (each of "
      "batch_size / microbatches rows, weighted by its scored tokens)", lo=1),
    # profile
    F("profile.steps", "str", "'A:B' traces steps A..B-1 into <workdir>/profile (TensorBoard's "
      "profile plugin, Perfetto); empty = off"),
    # checkpoint
    F("checkpoint.every", "int", "save every this many steps (and at the end and on interrupt)",
      lo=1),
    F("checkpoint.keep", "int", "checkpoints kept", lo=1),
    # mesh
    F("mesh.data", "int", "data-parallel axis size (-1 = all remaining devices)", lo=1,
      special=(-1,)),
    F("mesh.fsdp", "int", "parameter-sharding axis size (-1 = all remaining devices)", lo=1,
      special=(-1,)),
    F("mesh.tensor", "int", "tensor-parallel (heads, mlp) axis size (-1 = all remaining)", lo=1,
      special=(-1,)),
)
_BY_PATH = {f.path: f for f in FIELDS}


def _leaves(config, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> value; mixer_options stays one value."""
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and path != "model.mixer_options":
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def _check_value(field: Field, value) -> None:
    def fail(why: str):
        raise ConfigError(f"config.{field.path} = {value!r}: {why}; allowed: {field.allowed()}")
    if field.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            fail("not an integer")
    elif field.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail("not a finite number")
    elif field.kind == "bool":
        if not isinstance(value, bool):
            fail("not a boolean")
    elif field.kind == "str":
        if not isinstance(value, str):
            fail("not a string")
    elif field.kind == "tuple":
        if not isinstance(value, (tuple, list, str)):
            fail("not a list")
        return
    elif field.kind == "dict":
        if not hasattr(value, "items"):
            fail("not a mapping")
        return
    if field.choices is not None and value not in field.choices:
        fail("not allowed")
    if field.kind in ("int", "float") and value not in field.special:
        if field.lo is not None and (value < field.lo or (field.lo_open and value == field.lo)):
            fail("out of range")
        if field.hi is not None and (value > field.hi or (field.hi_open and value == field.hi)):
            fail("out of range")


def check_config(config, explicit=()) -> None:
    """Raise ConfigError for an unknown field, a value outside its range, or a field set that the
    run will not read. `explicit`: dotted paths the user set on the command line."""
    leaves = _leaves(config)
    for path, value in leaves.items():
        if path not in _BY_PATH:
            section = path.rsplit(".", 1)[0] if "." in path else "<top level>"
            known = sorted(p for p in _BY_PATH if p.rsplit(".", 1)[0] == section) or sorted(_BY_PATH)
            raise ConfigError(f"config.{path}: no such field (nothing reads it); fields of "
                              f"{section}: {known}")
        _check_value(_BY_PATH[path], value)
    _check_data_fields_read(leaves)
    _check_model_fields_read(config.model, set(explicit))


def _check_data_fields_read(leaves: dict) -> None:
    source = leaves["data.source"]
    reads = MQAR_FIELDS if source == "mqar" else SOURCE_FIELDS[source]
    readers = {**{s: fs for s, fs in SOURCE_FIELDS.items()}, "mqar": MQAR_FIELDS}
    if source == "mqar" and leaves.get("data.mqar.cells") and (
            leaves["data.mqar.num_kv_pairs"] != _BY_PATH["data.mqar.num_kv_pairs"].default):
        raise ConfigError(f"config.data.mqar.num_kv_pairs = {leaves['data.mqar.num_kv_pairs']} "
                          f"is set but data.mqar.cells ({leaves['data.mqar.cells']}) gives every "
                          f"cell its pairs; drop one")
    for path, value in leaves.items():
        if not path.startswith("data.") or path == "data.source":
            continue
        name = path[len("data."):]
        field = _BY_PATH[path]
        if name in reads or field.default is _MISSING or value == field.default:
            continue
        who = [s for s, fs in readers.items() if name in fs]
        raise ConfigError(f"config.{path} = {value!r} is set but data.source={source!r} does not "
                          f"read it (read by data.source in {who}); set the source or drop the "
                          f"field")


def _check_model_fields_read(model, explicit: set[str]) -> None:
    layer_types = normalize_layer_types(model.layer_types)
    if layer_types:
        for name in ("mixer", "ratio"):
            if f"model.{name}" in explicit:
                raise ConfigError(f"config.model.{name} is set but model.layer_types is given "
                                  f"({','.join(layer_types)}), which fixes every layer; drop one")
        used = set(layer_types)
    else:
        used = set(hybrid_pattern(int(model.n_layers), model.mixer, int(model.ratio)))
    used = {m for m in used if m in known_mixers()}  # unknown names fail in ModelConfig
    for name in model.mixer_options.keys() if hasattr(model.mixer_options, "keys") else ():
        if name in known_mixers() and name not in used:
            raise ConfigError(f"config.model.mixer_options[{name!r}] is set but the model has no "
                              f"{name!r} layer (layers: {sorted(used)})")
    for field in OPTIONAL_MODEL_FIELDS:
        if f"model.{field}" not in explicit:
            continue
        if not any(field in mixer_info(m).reads for m in used):
            who = [m for m in known_mixers() if field in mixer_info(m).reads]
            raise ConfigError(f"config.model.{field} is set but no layer of this model reads it "
                              f"(layers: {sorted(used)}; read by: {who})")


def describe_fields(config) -> str:
    """Every field with its value, allowed values and meaning, one per line."""
    leaves = _leaves(config)
    width = max(len(p) for p in leaves) + 8
    lines = []
    order = [f.path for f in FIELDS if f.path in leaves] + [p for p in leaves if p not in _BY_PATH]
    for path in order:
        value, field = leaves[path], _BY_PATH.get(path)
        shown = repr(value.to_dict() if hasattr(value, "to_dict") else value)
        doc = f"{field.doc} [{field.allowed()}]" if field else "(unknown field)"
        lines.append(f"config.{path:<{width - 7}} = {shown:<14} {doc}")
    return "\n".join(lines)
