"""Sharded training checks on 8 simulated CPU devices: `python tests/scale_check.py MODE OUT`.

MODE "mixers": a tiny model holding one layer of every registered mixer (8 heads): loss and
    gradients on (2, 2, 2) and (1, 1, 8) equal one device's.
MODE "train": a small gdn/swa/mamba2 hybrid: loss and gradients on (8, 1, 1), (2, 4, 1), (1, 4, 2)
    equal one device's; optimizer-state shardings and per-device state bytes on every mesh;
    4 micro-batches with padding equal the big batch; a checkpoint saved on (2, 2, 2) resumes on
    (1, 4, 2) and on 4 devices with the same losses and the moments still sharded.
Writes a JSON of measured values to OUT; the pytest side (tests/test_scale.py) asserts them.
"""

import os
import sys

# Unoptimised CPU code: these checks compare numbers, and XLA's backend passes dominate the
# compile time of a model holding every mixer.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0"
                           + " --xla_llvm_disable_expensive_passes=true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from tests.train_utils import tiny_config  # noqa: E402
from train.checkpoint import Checkpointer  # noqa: E402
from train.data import load_data  # noqa: E402
from train.memory import tree_shard_bytes  # noqa: E402
from train.sharding import batch_sharding, make_mesh, replicated, to_global  # noqa: E402
from train.state import TrainState, build_model_config  # noqa: E402
from train.step import loss_and_grads, make_train_step  # noqa: E402
from zoo import LM  # noqa: E402
from zoo.registry import known_mixers  # noqa: E402


def mesh_of(shape, n=None):
    devices = jax.devices()[:n or math.prod(shape)]
    return make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), shape))),
                     devices)


def config(layer_types, **model):
    cfg = tiny_config()
    cfg.model.update({**dict(d_model=64, num_heads=8, window=8), **model,
                      "layer_types": tuple(layer_types), "n_layers": len(layer_types)})
    cfg.data.seq_len = 16
    return cfg


def eager_init(cfg):
    """The model's initial parameters (TrainState.init_params' initialisers and seed 0), drawn
    op by op: compiling the initialiser of the model holding every mixer takes ~2.5x as long."""
    with nnx.use_eager_sharding(False):
        model = LM(build_model_config(cfg.model, 256), rngs=nnx.Rngs(0))
        return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(model)[1]))


def grads_on(cfg, shape, batch, params=None, microbatches=1, n_devices=None):
    """(loss, grads as numpy, TrainState, params as numpy) of one batch on the mesh `shape`;
    `params` (numpy, from an earlier call) are placed on the mesh, else the model's initial
    ones."""
    mesh = mesh_of(shape, n_devices)
    params = eager_init(cfg) if params is None else params
    with jax.set_mesh(mesh):
        ts = TrainState(build_model_config(cfg.model, 256), mesh, 0, cfg.train)
        params = jax.device_put(params, ts.param_shardings)
        bsh = batch_sharding(mesh)
        fn = jax.jit(lambda p, b: loss_and_grads(ts.graphdef, p, b, microbatches=microbatches,
                                                 batch_sharding=bsh)[::2],
                     in_shardings=(ts.param_shardings, bsh))
        loss, grads = fn(params, to_global(batch, bsh))
        as_np = lambda t: jax.tree.map(np.asarray, jax.device_get(t))
        return float(loss), as_np(grads), ts, as_np(params)


def max_rel_err(a, b):
    """max over leaves of max|a - b| / max|b| (0 for an all-zero leaf pair)."""
    errs = [float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if np.any(y)]
    return max(errs)


def state_report(ts) -> dict:
    """Per-device vs total bytes of the whole state, and whether every moment has its param's
    sharding."""
    abstract = ts.abstract_state()
    leaves = jax.tree.leaves(abstract)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    per_device = tree_shard_bytes(abstract)
    adam = [s for s in jax.tree.leaves(ts.opt_shardings, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")]
    same = bool(adam) and all(
        jax.tree.all(jax.tree.map(lambda m, p: m == p, getattr(s, k), ts.param_shardings))
        for s in adam for k in ("mu", "nu"))
    mesh = ts.mesh
    return {"total_bytes": total, "per_device_bytes": per_device,
            "fsdp_tensor": mesh.shape["fsdp"] * mesh.shape["tensor"], "moments_like_params": same}


def check_mixers(out):
    cfg = config(known_mixers())
    batch = load_data(cfg.data, seed=0).batch(0, batch_size=8)
    t = time.time()
    ref_loss, ref_grads, _, params = grads_on(cfg, (1, 1, 1), batch)
    for shape in ((2, 2, 2), (1, 1, 8)):
        loss, grads, ts, _ = grads_on(cfg, shape, batch, params)
        out[str(shape)] = {"loss": loss, "ref_loss": ref_loss,
                           "grad_rel_err": max_rel_err(grads, ref_grads), **state_report(ts)}
    out["mixers"] = list(known_mixers())
    out["seconds"] = time.time() - t


def padded(batch, seed=0):
    """The batch with ~30% of its targets unscored and one row's tail as padding."""
    rng = np.random.default_rng(seed)
    b = {k: np.array(v) for k, v in batch.items()}
    b["targets"] = np.where(rng.random(b["targets"].shape) < 0.3, -100, b["targets"])
    b["segment_ids"][1, -5:] = 0
    b["targets"][1, -5:] = -100
    return b


def train_losses(cfg, mesh, state, data, steps, start):
    with jax.set_mesh(mesh):
        ts = TrainState(build_model_config(cfg.model, 256), mesh, 0, cfg.train)
        step = make_train_step(ts.graphdef, ts.tx, ts.state_shardings, batch_sharding(mesh),
                               replicated(mesh))
        losses = []
        for s in range(start, start + steps):
            state, m = step(state, to_global(data.batch(s, batch_size=8), batch_sharding(mesh)))
            losses.append(float(m["loss"]))
        return losses, state, ts


def check_train(out):
    cfg = config(("gdn", "swa", "mamba2"))
    # Mamba-2's B and C (n_groups = 1) are read by every head, so tensor parallelism keeps them
    # whole; a small d_state keeps that replicated share at a real model's proportion.
    cfg.model.mixer_options = ml_collections.ConfigDict({"mamba2": {"d_state": 8}})
    data = load_data(cfg.data, seed=0)
    batch = data.batch(0, batch_size=16)
    t = time.time()
    ref_loss, ref_grads, _, params = grads_on(cfg, (1, 1, 1), batch)
    for shape in ((8, 1, 1), (2, 4, 1), (1, 4, 2)):
        loss, grads, ts, _ = grads_on(cfg, shape, batch, params)
        out[str(shape)] = {"loss": loss, "ref_loss": ref_loss,
                           "grad_rel_err": max_rel_err(grads, ref_grads), **state_report(ts)}
    for shape in ((2, 2, 2), (1, 1, 8)):  # shardings only: the mixers mode compiles these
        mesh = mesh_of(shape)
        with jax.set_mesh(mesh):
            out[str(shape)] = state_report(TrainState(build_model_config(cfg.model, 256), mesh,
                                                      0, cfg.train))

    # Gradient accumulation: 4 micro-batches with padding == the big batch.
    pb = padded(batch)
    big_loss, big_grads, _, _ = grads_on(cfg, (2, 2, 1), pb, params, n_devices=4)
    acc_loss, acc_grads, _, _ = grads_on(cfg, (2, 2, 1), pb, params, microbatches=4, n_devices=4)
    out["accumulation"] = {"loss_err": abs(acc_loss - big_loss),
                           "grad_rel_err": max_rel_err(acc_grads, big_grads),
                           "grad_abs_err": max(float(np.max(np.abs(a - b))) for a, b in
                                               zip(jax.tree.leaves(acc_grads),
                                                   jax.tree.leaves(big_grads)))}

    # Save on (2, 2, 2); resume on (2, 2, 2), (1, 4, 2) and 4 devices (2, 1, 2).
    mesh = mesh_of((2, 2, 2))
    with jax.set_mesh(mesh):
        state = TrainState(build_model_config(cfg.model, 256), mesh, 0, cfg.train).init(params)
    first, state, _ = train_losses(cfg, mesh, state, data, 2, 0)
    with tempfile.TemporaryDirectory() as workdir:
        ckpt = Checkpointer(workdir)
        ckpt.save(2, state, {"step": 2})
        ckpt.wait()
        resumed = {}
        for shape, n in (((2, 2, 2), 8), ((1, 4, 2), 8), ((2, 1, 2), 4)):
            mesh = mesh_of(shape, n)
            with jax.set_mesh(mesh):
                ts = TrainState(build_model_config(cfg.model, 256), mesh, 0, cfg.train)
                _, restored, _ = ckpt.restore(2, ts.abstract_state())
                sharded_like = all(a.sharding == b for a, b in zip(
                    jax.tree.leaves(restored["opt_state"]), jax.tree.leaves(ts.opt_shardings)))
            losses, _, _ = train_losses(cfg, mesh, restored, data, 2, 2)
            resumed[str(shape)] = {"losses": losses, "moments_sharded": sharded_like}
        ckpt.close()
    out["resume"] = {"first": first, **resumed}
    out["seconds"] = time.time() - t


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    result = {}
    {"mixers": check_mixers, "train": check_train}[mode](result)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
