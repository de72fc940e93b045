"""Command line: `python -m train [--config configs/lm.py:mixer=gdn,ratio=3] [--workdir runs/x]
[--config.train.steps=300 ...]`. With no arguments it runs the main job (configs/default.py).

Multi-process: on SLURM, Open MPI or a Cloud TPU pod, start the same command on every host (jax
reads the process layout from the cluster); by hand, add `--coordinator_address host:port
--num_processes P --process_id i` on each process (`train.distributed`).

`--fields` prints every config field with its value, allowed values and meaning; `--mixers`
lists the mixers with their options. Exit codes: 0 done, 1 a bad input or a run that cannot
go on (one line `error: ...`), 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint
(rerun the same command to resume).
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from train.checkpoint import CheckpointError
from train.cli_config import check_overrides, override_paths
from train.data import DataError
from train.distributed import DistributedError
from zoo.config import ConfigError

_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "default.py")

# config_flags reads the `--config.*` overrides as soon as the flag is defined: check them first.
try:
    check_overrides(sys.argv[1:], _DEFAULT_CONFIG)
except (ValueError, FileNotFoundError) as _e:
    sys.exit(f"error: {_e}")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                          "ml-collections config file[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "where checkpoints and logs go: a "
                               "folder or a bucket (gs://bucket/run, `pip install -e .[gcs]`); "
                               "started again on the same workdir, a run resumes")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-process run started by hand: process 0's host:port "
    "(a free port), the same on every process; default $JAX_COORDINATOR_ADDRESS. Not needed on "
    "SLURM, Open MPI or a Cloud TPU pod, whose layout jax detects")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process run started by "
                                      "hand: the number of processes (default: the cluster's)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process run started by hand: "
                                   "this process's index in [0, num_processes)")
_FIELDS = flags.DEFINE_bool("fields", False, "print every config field of --config (with the "
                            "overrides applied): value, allowed values, meaning; then exit")
_MIXERS = flags.DEFINE_bool("mixers", False, "list the mixers usable in model.layer_types / "
                            "model.mixer with the model fields they read and their "
                            "model.mixer_options; then exit")


def describe_mixers() -> str:
    from zoo.registry import known_mixers, mixer_info  # noqa: PLC0415
    lines = []
    for name in known_mixers():
        info = mixer_info(name)
        opts = ", ".join(f"{k}={v!r}" if not isinstance(v, str) or not v.startswith(("model.", "min("))
                         else f"{k}={v}" for k, v in info.options().items())
        lines.append(f"{name:12s} {info.doc}")
        if info.reads:
            lines.append(f"{'':12s}   reads: {', '.join('model.' + f for f in info.reads)}")
        lines.append(f"{'':12s}   mixer_options: {opts or '(none)'}")
    return "\n".join(lines)


def _interrupted_early(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    explicit = override_paths(sys.argv[1:])
    if _FIELDS.value:
        from train.fields import describe_fields  # noqa: PLC0415
        from train.loop import resolve_config  # noqa: PLC0415
        print(describe_fields(resolve_config(_CONFIG.value, explicit)))
        return
    if _MIXERS.value:
        print(describe_mixers())
        return
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    signal.signal(signal.SIGTERM, _interrupted_early)  # before the loop installs its own
    from train.distributed import initialize  # noqa: PLC0415
    try:  # before anything starts a jax backend
        where = initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           force=bool(os.environ.get("ZOO_DISTRIBUTED")))  # former switch
    except (ConfigError, DistributedError) as e:
        sys.exit(f"error: {e}")
    if where != "one process":
        logging.warning("distributed: %s", where)
    from train.guard import NonFiniteError  # noqa: PLC0415
    from train.loop import Interrupted, train_and_evaluate  # noqa: PLC0415
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value, explicit=explicit)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, NonFiniteError) as e:
        sys.exit(f"error: {e}")
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        code = 128 + getattr(signal, name, signal.SIGINT)
        print(f"stopped: {name} before the first training step; nothing new to save "
              f"(exit {code})", file=sys.stderr)
        sys.exit(code)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
