"""The jitted train and eval steps over the pure-dict parameter state.

The training state is a plain pytree {"params": pure dict, "opt_state": optax state, "step"};
the model is rebuilt inside the step with `nnx.merge(graphdef, nnx.State(params))`, so the
step is an ordinary `jax.jit` with explicit in/out shardings and the state donated.

A step whose loss or gradient norm is not finite keeps the old params and optimizer state
(the step counter still advances, so the data order is unchanged) and reports which quantity
was bad; the loop logs it and stops after `train.max_skipped_steps` such steps in a row.
`optax.apply_if_finite` is not used: after its limit it applies the bad update.
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
        grad_norm = optax.tree.norm(grads)
        loss_ok, grad_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
        ok = loss_ok & grad_ok
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = {"params": keep(params, state["params"]),
                     "opt_state": keep(opt_state, state["opt_state"]), "step": state["step"] + 1}
        return new_state, {"loss": loss, "grad_norm": grad_norm, "tokens": n,
                           "loss_finite": loss_ok, "grad_finite": grad_ok}

    batch_shardings = {k: batch_sharding for k in ("inputs", "targets", "segment_ids", "positions")}
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(graphdef, param_shardings, batch_sharding, replicated):
    """Sum of next-token NLL (nats) and number of scored tokens over one batch, and the recall
    accuracy sums: Σ over rows with a scored token of (argmax hits / scored tokens) and the number
    of such rows (MQAR's per-example accuracy, `train.tasks.mqar.mqar_accuracy`)."""
    def step(params, batch):
        logits = model_logits(graphdef, params, batch)
        loss, n = cross_entropy(logits, batch["targets"])
        scored = batch["targets"] >= 0                                         # [B, T]
        hits = (jnp.argmax(logits, -1) == batch["targets"]) & scored
        per_row = scored.sum(1)
        has = per_row > 0
        row_acc = jnp.where(has, hits.sum(1) / jnp.maximum(per_row, 1), 0.0)
        return {"nll_sum": loss * n, "tokens": n.astype(jnp.float32),
                "acc_sum": row_acc.sum(), "acc_rows": has.sum().astype(jnp.float32)}

    batch_shardings = {k: batch_sharding for k in ("inputs", "targets", "segment_ids", "positions")}
    return jax.jit(step, in_shardings=(param_shardings, batch_shardings), out_shardings=replicated)
