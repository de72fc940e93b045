"""Run as a script with 8 simulated CPU devices: compile the train step of a tiny gdn+attn hybrid
on (1, 8, 1) and (2, 2, 2) meshes and report its all-gathers (from `compiled.as_text()`) and
XLA's "Involuntary full rematerialization" warnings. Prints one JSON line:

    {mesh: {"all_gathers": n, "bytes": total result bytes, "activation": [shapes whose leading
            dim is the global batch], "remat_warnings": n}}

`--no-constraints` replaces `layers.partitioning.constrain` by the identity (the layout XLA
picks on its own) for a before/after comparison; `--scan` builds the scanned layout.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from train.sharding import batch_sharding, make_mesh, replicated  # noqa: E402
from train.state import TrainState  # noqa: E402
from train.step import make_train_step  # noqa: E402
from zoo.config import ModelConfig  # noqa: E402

# global batch and length chosen unlike every model dimension, so a [B, ...] result is an activation
B, T = 24, 40
MODEL = dict(vocab_size=128, d_model=64, num_heads=4, n_layers=4,
             layer_types=("gdn", "gdn", "gdn", "attn"), dtype="float32", impl="auto")
TRAIN = dict(steps=10, lr=1e-3, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9,
             b2=0.95, eps=1e-8, clip_norm=1.0)
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
          "f64": 8, "s64": 8}
# "%all-gather.3 = f32[24,40,64]{2,1,0} all-gather(" (CPU) or the "-start" form (GPU/TPU)
_AG = re.compile(r"=\s*\(?(\w+)\[([\d,]*)\][^=]*?\ball-gather(?:-start)?\(")


def all_gathers(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in hlo.splitlines():
        m = _AG.search(line)
        if m:
            out.append((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)))
    return out


class _Stderr:
    """Capture fd 2 (XLA's C++ warnings go there, not to sys.stderr)."""

    def __enter__(self):
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        sys.stderr.write(self.text)


def compile_step(mesh_shape, model_kw):
    mesh = make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh_shape))))
    cfg = ModelConfig.from_dict(model_kw)
    with jax.set_mesh(mesh):
        ts = TrainState(cfg, mesh, 0, ml_collections.ConfigDict(TRAIN))
        step = make_train_step(ts.graphdef, ts.tx, ts.state_shardings, batch_sharding(mesh),
                               replicated(mesh))
        tok = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch_sharding(mesh))
        batch = {k: tok for k in ("inputs", "targets", "segment_ids", "positions")}
        with _Stderr() as err:
            hlo = step.lower(ts.abstract_state(), batch).compile().as_text()
    return hlo, err.text


def report(mesh_shape, model_kw) -> dict:
    hlo, err = compile_step(mesh_shape, model_kw)
    ags = all_gathers(hlo)
    return {"all_gathers": len(ags),
            "bytes": sum(math.prod(s) * _BYTES.get(t, 4) for t, s in ags),
            "activation": [list(s) for _, s in ags if len(s) >= 2 and s[0] == B],
            "remat_warnings": err.count("Involuntary full rematerialization")}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-constraints", action="store_true")
    ap.add_argument("--scan", action="store_true")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--meshes", default="1,8,1;2,2,2")
    args = ap.parse_args()
    if args.no_constraints:
        import layers.common
        import zoo.model
        identity = lambda x, axes: x
        layers.common.constrain = zoo.model.constrain = identity
    model_kw = dict(MODEL, remat=args.remat)
    if args.scan:
        model_kw.update(n_layers=8, layer_types=MODEL["layer_types"] * 2, scan_layers=True)
    res = {}
    for mesh in args.meshes.split(";"):
        shape = tuple(int(s) for s in mesh.split(","))
        res["x".join(map(str, shape))] = report(shape, model_kw)
    print(json.dumps(res))
