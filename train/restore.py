"""Load a trained model from a workdir: its config, tokenizer and parameters, on any mesh."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from train.checkpoint import Checkpointer
from train.sharding import make_mesh
from train.state import TrainState, build_model_config

__all__ = ["Restored", "restore_run"]


@dataclasses.dataclass
class Restored:
    step: int
    config: ml_collections.ConfigDict
    meta: dict
    tokenizer: object
    ts: TrainState
    params: dict

    def model(self):
        return self.ts.model(self.params)


def restore_run(workdir: str, step: int | None = None, mesh_cfg=None) -> Restored:
    """Restore the latest (or `step`) checkpoint of `workdir` onto `mesh_cfg` (default: all
    devices on the data axis). Raises CheckpointError when there is nothing to restore."""
    ckpt = Checkpointer(workdir, create=False)
    step, meta = ckpt.restore_meta(step)
    config = ml_collections.ConfigDict(meta["config"])
    tokenizer = ckpt.load_tokenizer(meta["tokenizer"])
    model_cfg = build_model_config(config.model, tokenizer.vocab_size)
    mesh = make_mesh(mesh_cfg or ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    with jax.set_mesh(mesh):
        ts = TrainState(model_cfg, mesh, int(config.seed), config.train)
        _, state, _ = ckpt.restore(step, ts.abstract_state())  # nothing allocated first
    ckpt.close()
    return Restored(step, config, meta, tokenizer, ts, state["params"])
