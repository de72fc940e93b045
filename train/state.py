"""Building the model and its training state on a mesh: shared by training and evaluation.

`build_model_config` turns `config.model` (+ the tokenizer's vocabulary) into a validated
`ModelConfig`; `TrainState` holds the graphdef, the shardings of the whole training state and
the optimizer, and creates the state directly sharded (initialisation runs under `jit` with
out_shardings, so a large model is never materialised on one device).

Every optimizer moment is sharded exactly like its parameter: the optimizer state's shardings
come from `optax.tree_map_params` over the abstract optimizer state (`jax.eval_shape` of
`tx.init`), mapping each parameter-shaped leaf to its parameter's sharding and everything else
(step counts) to replicated. `jax.jit(tx.init)(params)` alone would replicate every moment.
`abstract_state()` is that whole state as ShapeDtypeStructs with shardings, nothing allocated:
the restore target of a checkpoint and the input of ahead-of-time compilation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train.optimizer import make_optimizer
from train.sharding import no_decay_mask, param_axes, param_specs, replicated
from zoo.config import ModelConfig
from zoo.model import LM

__all__ = ["build_model_config", "normalize_layer_types", "TrainState"]


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


def _with_shardings(shapes, shardings):
    """ShapeDtypeStructs of `shapes` (arrays or structs) carrying `shardings` (same tree)."""
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        shapes, shardings)


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
        self.opt_shardings = self._opt_shardings() if self.tx is not None else None
        self.state_shardings = {"params": self.param_shardings, "opt_state": self.opt_shardings,
                                "step": replicated(self.mesh)}

    def abstract_params(self) -> dict:
        """The parameters as ShapeDtypeStructs carrying their shardings."""
        return _with_shardings(self.param_shapes, self.param_shardings)

    def _opt_shardings(self):
        """Each moment gets its parameter's sharding; non-parameter leaves are replicated."""
        self._abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params())
        rep = replicated(self.mesh)
        return optax.tree_map_params(self.tx, lambda _, sh: sh, self._abstract_opt,
                                     self.param_shardings, transform_non_params=lambda _: rep)

    def abstract_state(self) -> dict:
        """{"params", "opt_state", "step"} as ShapeDtypeStructs with their shardings."""
        params = self.abstract_params()
        opt = _with_shardings(self._abstract_opt, self.opt_shardings)
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(self.mesh))
        return {"params": params, "opt_state": opt, "step": step}

    def init_params(self):
        cfg, seed = self.model_cfg, self.seed

        def init():
            with nnx.use_eager_sharding(False):
                return nnx.to_pure_dict(nnx.split(LM(cfg, rngs=nnx.Rngs(seed)))[1])
        return jax.jit(init, out_shardings=self.param_shardings)()

    def init(self, params=None) -> dict:
        """A fresh {"params", "opt_state", "step"} from newly initialised parameters (or from
        `params`, placed on the mesh); the optimizer moments get the params' shardings."""
        params = (self.init_params() if params is None
                  else jax.device_put(params, self.param_shardings))
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated(self.mesh))
        return {"params": params, "opt_state": opt_state, "step": step}

    def shardings(self, state: dict | None = None):
        """The state's shardings (those of `state` when given: they are the same tree)."""
        if state is None:
            return self.state_shardings
        return jax.tree.map(lambda x: x.sharding, state)

    def model(self, params) -> LM:
        return nnx.merge(self.graphdef, nnx.State(params))
