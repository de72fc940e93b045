"""The jitted train and eval steps over the pure-dict parameter state.

The training state is a plain pytree {"params": pure dict, "opt_state": optax state, "step"};
the model is rebuilt inside the step with `nnx.merge(graphdef, nnx.State(params))`, so the
step is an ordinary `jax.jit` with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from zoo.model import cross_entropy

__all__ = ["make_train_step", "make_eval_step", "model_logits"]


def model_logits(graphdef, params, batch):
    model = nnx.merge(graphdef, nnx.State(params))
    logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"],
                      positions=batch["positions"])
    return logits


def make_train_step(graphdef, tx, state_shardings, batch_sharding, replicated):
    def loss_fn(params, batch):
        loss, n = cross_entropy(model_logits(graphdef, params, batch), batch["targets"])
        return loss, n

    def step(state, batch):
        (loss, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": n}

    batch_shardings = {k: batch_sharding for k in ("inputs", "targets", "segment_ids", "positions")}
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(graphdef, param_shardings, batch_sharding, replicated):
    """Sum of next-token NLL (nats) and number of scored tokens over one batch."""
    def step(params, batch):
        logits = model_logits(graphdef, params, batch)
        loss, n = cross_entropy(logits, batch["targets"])
        return {"nll_sum": loss * n, "tokens": n.astype(jnp.float32)}

    batch_shardings = {k: batch_sharding for k in ("inputs", "targets", "segment_ids", "positions")}
    return jax.jit(step, in_shardings=(param_shardings, batch_shardings), out_shardings=replicated)
