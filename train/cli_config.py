"""Checks `--config.a.b=value` overrides against the config file before absl parses them, so an
unknown field fails with its name and the fields that do exist (not an AttributeError trace),
and reports which fields the command line set (`train_and_evaluate(..., explicit=...)`)."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

__all__ = ["load_config_file", "check_overrides", "override_paths"]

# Keys of a config file's `arg` (configs/lm.py) that set one field each.
_ARG_FIELDS = {"mixer": "model.mixer", "ratio": "model.ratio", "data": "data.source"}


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/file.py[:arg]` -> get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no config file {path!r}")
    module_spec = importlib.util.spec_from_file_location("_zoo_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _config_spec(argv: list[str], default: str) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def override_paths(argv: list[str]) -> set[str]:
    """The dotted fields set on the command line: `--config.a.b[=v]` overrides and the keys of
    the config argument (`--config configs/lm.py:mixer=gdn` sets model.mixer)."""
    out = {a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")}
    spec = _config_spec(argv, "")
    for item in filter(None, spec.partition(":")[2].split(",")):
        key = item.split("=", 1)[0]
        if key in _ARG_FIELDS:
            out.add(_ARG_FIELDS[key])
    return out


def check_overrides(argv: list[str], default_config: str) -> None:
    """Raise ValueError naming the first `--config.<field>` that the config does not have."""
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not overrides:
        return
    config = load_config_file(_config_spec(argv, default_config))
    for dotted in overrides:
        node, walked = config, []
        for part in dotted.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(walked) or "<top level>"
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                hint = ("; to list every field: python -m train --fields"
                        if dotted in ("help", "fields", "mixers") else "")
                raise ValueError(f"unknown config field 'config.{dotted}': {where} has no field "
                                 f"{part!r}; known fields: {known}{hint}")
            node, walked = node[part], walked + [part]
