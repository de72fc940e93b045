"""Recall accuracy of a model's argmax predictions, shared by `train.eval`, the training loop
(end of an MQAR run) and the sweep runner (`train/sweep_jobs.py`).

For inputs/targets [N, L] (targets −100 where unscored), the prediction at position t is
argmax_v logits[n, t, v] of one forward pass over the whole row, and the score is
`mqar_accuracy`: the fraction of scored positions predicted exactly, per example, then averaged
over the examples that have a scored position.

This module imports neither `train.eval` nor `train.loop`, so both can import it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.sharding import batch_sharding, to_global
from train.state import TrainState
from train.tasks import mqar_accuracy

__all__ = ["recall_accuracy"]


@functools.partial(jax.jit, static_argnums=0)
def _argmax_tokens(graphdef, params, inputs):
    logits, _ = nnx.merge(graphdef, nnx.State(params))(inputs)
    return jnp.argmax(logits, -1)  # [B, L]


def recall_accuracy(ts: TrainState, params, inputs: np.ndarray, targets: np.ndarray,
                    batch_size: int) -> float:
    """MQAR accuracy (`mqar_accuracy`) of the model's argmax predictions on inputs/targets
    [N, L], in batches spread over the mesh's batch axes.

    The batch is rounded down to a multiple of the batch shards (data × fsdp), at least one per
    shard, so every chunk splits evenly; the last chunk is zero-padded to that size (one
    compiled shape) and its padding rows are dropped before scoring.
    """
    sh = batch_sharding(ts.mesh)
    n_shards = ts.mesh.shape["data"] * ts.mesh.shape["fsdp"]
    bs = max(n_shards, batch_size // n_shards * n_shards)
    preds = []
    with jax.set_mesh(ts.mesh):
        for i in range(0, len(inputs), bs):
            chunk = inputs[i:i + bs]
            pad = bs - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])
            out = _argmax_tokens(ts.graphdef, params, to_global({"x": chunk}, sh)["x"])
            preds.append(np.asarray(out)[:bs - pad])
    return mqar_accuracy(np.concatenate(preds), targets)
