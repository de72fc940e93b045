"""A tiny run through `train_and_evaluate` on 8 CPU devices, as one process or as one of two
processes of 4 devices each (gloo collectives): `python multihost_train.py single WORKDIR` or
`python multihost_train.py multi WORKDIR PID PORT`.

Both modes train on a (2, 2, 2) data/fsdp/tensor mesh with the workdir given as an
`epath.Path`, while `os.path` / `os.makedirs` / `os.replace` / `open` raise when code in train/
calls them on a path inside the workdir. The multi mode then checks that a mesh whose tensor
groups span both processes is refused, deletes the last checkpoint and runs again, which
resumes from the one before. Process 0 prints `RESULT <json>`: the losses per logged step,
eval_loss / eval_tokens, the resumed run's (multi), the refusal's message (multi).
"""

import builtins
import functools
import json
import os
import sys

MODE, WORKDIR = sys.argv[1], sys.argv[2]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_"
                           f"count={8 if MODE == 'single' else 4}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train.distributed import initialize  # noqa: E402  (before jax starts a backend)

if MODE == "multi":
    print(initialize(f"127.0.0.1:{sys.argv[4]}", 2, int(sys.argv[3])), flush=True)

import jax  # noqa: E402
from etils import epath  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

# The resumed run compiles the same programs again: a per-process persistent cache skips that.
jax.config.update("jax_compilation_cache_dir", f"{WORKDIR}.jit{jax.process_index()}")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

from tests.train_utils import tiny_config  # noqa: E402
from train import train_and_evaluate  # noqa: E402
from zoo.config import ConfigError  # noqa: E402

TRAIN = os.path.join(ROOT, "train") + os.sep


def _forbid_on_workdir(fn, name):
    """`fn`, raising when called from a train/ file with an argument inside WORKDIR."""
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(TRAIN) and any(
                isinstance(a, (str, os.PathLike)) and os.fspath(a).startswith(WORKDIR)
                for a in args):
            raise AssertionError(f"{caller} called {name}{args} on the workdir: use epath")
        return fn(*args, **kwargs)
    return guarded


for _name in ("abspath", "join", "exists", "isdir", "isfile", "dirname"):
    setattr(os.path, _name, _forbid_on_workdir(getattr(os.path, _name), f"os.path.{_name}"))
os.makedirs = _forbid_on_workdir(os.makedirs, "os.makedirs")
os.replace = _forbid_on_workdir(os.replace, "os.replace")
builtins.open = _forbid_on_workdir(builtins.open, "open")


def config(**mesh):
    cfg = tiny_config(steps=4, log_every=1)
    cfg.checkpoint.every = 2
    cfg.mesh.update({"data": 2, "fsdp": 2, "tensor": 2, **mesh})
    return cfg


def losses() -> dict:
    path = epath.Path(WORKDIR) / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


out = {"processes": jax.process_count(), "devices": jax.device_count()}
final = train_and_evaluate(config(), epath.Path(WORKDIR))
out.update(losses=losses(), eval_loss=final["eval_loss"], eval_tokens=final["eval_tokens"])
if MODE == "multi":
    try:
        train_and_evaluate(config(data=1, fsdp=1, tensor=8), epath.Path(WORKDIR))
    except ConfigError as e:
        out["refused"] = str(e)
    steps = sorted(int(p.name) for p in (epath.Path(WORKDIR) / "checkpoints").iterdir()
                   if p.name.isdigit())
    if jax.process_index() == 0:
        (epath.Path(WORKDIR) / "checkpoints" / str(steps[-1])).rmtree()
    multihost_utils.sync_global_devices("last checkpoint deleted")
    again = train_and_evaluate(config(), epath.Path(WORKDIR))
    out.update(checkpoints=steps, resumed_losses=losses(), resumed_eval_loss=again["eval_loss"],
               resumed_first_loss=again["first_loss"])
if jax.process_index() == 0:
    print("RESULT " + json.dumps(out), flush=True)
