"""Command line: `python -m train [--config configs/lm.py:mixer=gdn,ratio=3] [--workdir runs/x]
[--config.train.steps=300 ...]`. With no arguments it runs the main job (configs/default.py)."""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from train.checkpoint import CheckpointError
from train.cli_config import check_overrides
from train.data import DataError
from zoo.config import ConfigError

_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "default.py")

# config_flags reads the `--config.*` overrides as soon as the flag is defined: check them first.
try:
    check_overrides(sys.argv[1:], _DEFAULT_CONFIG)
except (ValueError, FileNotFoundError) as _e:
    sys.exit(f"error: {_e}")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                          "ml-collections config file[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "where checkpoints and logs go; "
                               "started again on the same workdir, a run resumes")

USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    if os.environ.get("ZOO_DISTRIBUTED"):
        import jax
        jax.distributed.initialize()
    from train.loop import train_and_evaluate
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
