"""The jitted train and eval steps over the pure-dict parameter state.

The training state is a plain pytree {"params": pure dict, "opt_state": optax state, "step"};
the model is rebuilt inside the step with `nnx.merge(graphdef, nnx.State(params))`, so the
step is an ordinary `jax.jit` with explicit in/out shardings and the state donated.

Gradient accumulation (`microbatches` = m > 1) splits the global batch into m micro-batches and
scans over them, so activation memory is that of B / m rows. Every micro-batch is weighted by its
valid-token count: with N = Σ_i n_i scored tokens in the whole batch,

    loss = Σ_i nll_sum_i / N,    grad = Σ_i ∇ nll_sum_i / N,

exactly the big batch's mean loss and gradient, however the padding falls. Micro-batch i takes
rows i, i + m, i + 2m, ... of the global batch, so every micro-batch is spread over all batch
shards (each device keeps working on its own rows).

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

__all__ = ["make_train_step", "make_eval_step", "model_logits", "loss_and_grads",
           "split_microbatches"]

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


def model_logits(graphdef, params, batch):
    model = nnx.merge(graphdef, nnx.State(params))
    logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"],
                      positions=batch["positions"])
    return logits


def split_microbatches(batch: dict, m: int, batch_sharding=None) -> dict:
    """[B, ...] arrays -> [m, B / m, ...]; micro-batch i holds rows i, i + m, ... (module doc)."""
    sharding = (None if batch_sharding is None else jax.sharding.NamedSharding(
        batch_sharding.mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec)))

    def split(x):
        y = x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)  # [m, B/m, ...]
        return y if sharding is None else jax.lax.with_sharding_constraint(y, sharding)
    return {k: split(v) for k, v in batch.items()}


def loss_and_grads(graphdef, params, batch, *, microbatches: int = 1, batch_sharding=None):
    """(mean loss over scored tokens, scored tokens n, gradients) of one global batch; with
    microbatches = m > 1 a scan over m micro-batches, each weighted by its scored tokens."""
    def mean_loss(p, b):
        return cross_entropy(model_logits(graphdef, p, b), b["targets"])

    if microbatches == 1:
        (loss, n), grads = jax.value_and_grad(mean_loss, has_aux=True)(params, batch)
        return loss, n, grads

    def nll_sum(p, b):
        loss, n = mean_loss(p, b)
        return loss * n

    n = jnp.sum(batch["targets"] >= 0)
    denom = jnp.maximum(n, 1).astype(jnp.float32)

    def body(carry, mb):
        loss_acc, grad_acc = carry
        total, g = jax.value_and_grad(nll_sum)(params, mb)
        return (loss_acc + total / denom, jax.tree.map(lambda a, b: a + b / denom, grad_acc, g)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zeros,
                                    split_microbatches(batch, microbatches, batch_sharding))
    return loss, n, grads


def make_train_step(graphdef, tx, state_shardings, batch_sharding, replicated, *,
                    microbatches: int = 1):
    def step(state, batch):
        loss, n, grads = loss_and_grads(graphdef, state["params"], batch,
                                        microbatches=microbatches, batch_sharding=batch_sharding)
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

    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
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

    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    return jax.jit(step, in_shardings=(param_shardings, batch_shardings), out_shardings=replicated)
