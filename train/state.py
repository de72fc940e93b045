"""Building the model and its training state on a mesh: shared by training and evaluation.

`build_model_config` turns `config.model` (+ the tokenizer's vocabulary) into a validated
`ModelConfig`; `TrainState` holds the graphdef, the parameter shardings and the optimizer, and
creates parameters directly sharded (initialisation runs under `jit` with out_shardings, so a
large model is never materialised on one device).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from train.optimizer import make_optimizer
from train.sharding import no_decay_mask, param_axes, param_specs, replicated
from zoo.config import ModelConfig
from zoo.model import LM

__all__ = ["build_model_config", "normalize_layer_types", "TrainState", "abstract_of"]


def normalize_layer_types(value) -> tuple[str, ...]:
    """'swa,gdn' or ('swa,gdn',) or ('swa', 'gdn') -> ('swa', 'gdn')."""
    items = [value] if isinstance(value, str) else list(value or ())
    return tuple(p.strip() for item in items for p in str(item).split(",") if p.strip())


def build_model_config(model_cfg, vocab_size: int) -> ModelConfig:
    d = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    d["layer_types"] = normalize_layer_types(d.get("layer_types", ()))
    if not d.get("vocab_size"):
        d["vocab_size"] = vocab_size
    elif d["vocab_size"] < vocab_size:
        raise ValueError(f"model.vocab_size ({d['vocab_size']}) is smaller than the tokenizer's "
                         f"vocabulary ({vocab_size})")
    return ModelConfig.from_dict(d)


def abstract_of(tree):
    """ShapeDtypeStructs carrying each array's sharding (a restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@dataclasses.dataclass
class TrainState:
    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    seed: int
    train_cfg: object = None

    def __post_init__(self):
        cfg, seed = self.model_cfg, self.seed
        abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(seed)))
        self.abstract_model = abstract   # shapes only: costs (FLOPs, cache bytes) read from it
        self.graphdef, abs_state = nnx.split(abstract)
        self.param_shapes = nnx.to_pure_dict(abs_state)
        self.param_shardings = param_specs(param_axes(abs_state), self.param_shapes, self.mesh)
        self.decay_mask = no_decay_mask(abs_state)
        self.n_params = sum(x.size for x in jax.tree.leaves(self.param_shapes))
        self.n_embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
        self.tx = make_optimizer(self.train_cfg, self.decay_mask) if self.train_cfg else None

    def init_params(self):
        cfg, seed = self.model_cfg, self.seed

        def init():
            with nnx.use_eager_sharding(False):
                return nnx.to_pure_dict(nnx.split(LM(cfg, rngs=nnx.Rngs(seed)))[1])
        return jax.jit(init, out_shardings=self.param_shardings)()

    def init(self) -> dict:
        """A fresh {"params", "opt_state", "step"}; optimizer moments follow the params' sharding."""
        params = self.init_params()
        opt_state = jax.jit(self.tx.init)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated(self.mesh))
        return {"params": params, "opt_state": opt_state, "step": step}

    def shardings(self, state: dict):
        return jax.tree.map(lambda x: x.sharding, state)

    def model(self, params) -> LM:
        return nnx.merge(self.graphdef, nnx.State(params))
