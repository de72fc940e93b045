"""Run as a script with 8 simulated CPU devices: the same train steps on a 1-device mesh and
on a (2, 2, 2) data/fsdp/tensor mesh must give the same losses. Prints JSON."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402

from tests.train_utils import tiny_config  # noqa: E402
from train.data import load_data  # noqa: E402
from train.sharding import to_global  # noqa: E402
from train.sharding import batch_sharding, make_mesh, replicated  # noqa: E402
from train.state import TrainState, build_model_config  # noqa: E402
from train.step import make_train_step  # noqa: E402


def losses(config, mesh_shape, devices, steps=3):
    mesh = make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh_shape))),
                     devices)
    data = load_data(config.data, seed=config.seed)
    with jax.set_mesh(mesh):
        ts = TrainState(build_model_config(config.model, data.tokenizer.vocab_size), mesh,
                        config.seed, config.train)
        state = ts.init()
        step = make_train_step(ts.graphdef, ts.tx, ts.shardings(state), batch_sharding(mesh),
                               replicated(mesh))
        out = []
        for s in range(steps):
            state, m = step(state, to_global(data.batch(s, batch_size=8), batch_sharding(mesh)))
            out.append(float(m["loss"]))
        kernel = state["params"]["blocks"][0]["mlp"]["up"]["w"]
        return out, str(kernel.sharding.spec)


if __name__ == "__main__":
    cfg = tiny_config()
    cfg.model.num_heads = 4
    devices = jax.devices()
    single, _ = losses(cfg, (1, 1, 1), devices[:1])
    multi, spec = losses(cfg, (2, 2, 2), devices)
    print(json.dumps({"n_devices": len(devices), "single": single, "multi": multi, "spec": spec}))
