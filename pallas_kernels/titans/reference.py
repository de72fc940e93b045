"""Titans neural long-term memory: token-level reference (the specification), float32.

Per head the memory ``M`` is a map R^Dk -> R^Dv given by weights ``(W_0, ..., W_{L-1})``:

    L = 1 (linear):  M(x) = x W_0                                   W_0 [Dk, Dv]
    L >= 2 (MLP):    M(x) = act(... act(x W_0) W_1 ...) W_{L-1}   W_0 [Dk, Dh] ... W_{L-1} [Dh, Dv]

(no biases; ``act`` defaults to silu). The associative loss of a token is
``l(M; k, v) = ||M(k) - v||^2`` (summed over features). With gradient block size ``b``:

    G_t = grad_M l(R_t; k_t, v_t)          R_t = memory at the start of t's gradient block
    S_t = eta_t S_{t-1} - theta_t G_t      momentum ("surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t      forgetting
    y_t = M_t(q_t)

Gradient blocks cover positions 0, b, 2b, ... of each document: ``R_t = M_{t-1}`` at the first
token of a block and stays fixed for the block's other tokens (b = 1: plain online gradient
descent, R_t = M_{t-1}). Every weight matrix follows the same recurrence with its own gradient.

The recurrent state is ``(memory M, momentum S, block_start R, pos)``, with ``pos`` the number of
tokens already taken in the current block. Invariant: ``R`` is always the reference for the
*next* token; when a block fills up (``pos`` reaches b) ``R`` becomes the current memory and
``pos`` goes back to 0, so ``pos == 0`` implies ``R == M``.

Packing (``segment_ids``): at the first token of a new document the state is reset to
(memory0, 0, memory0, 0) -- the learned initial memory, zero momentum, a fresh block; padding
tokens leave the state unchanged and output 0.

This module is the executable specification: a ``lax.scan`` over tokens whose gradient is taken
with ``jax.grad`` of the loss above (not the closed form the chunked form uses). Everything is
float32. It also holds the helpers both implementations share (activations, applying a memory).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "ACTIVATIONS",
    "TitansState",
    "get_activation",
    "memory_apply",
    "token_step",
    "titans_reference",
]

Weights = tuple  # tuple of L arrays, layer l: [B, H, d_l, d_{l+1}] float32

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise activation between MLP-memory layers, by name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"titans: activation={name!r} is not one of {tuple(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class TitansState(NamedTuple):
    """Internal recurrent state, per batch row (see the module docstring)."""
    memory: Weights      # L x [B, H, d_l, d_{l+1}] f32, M
    momentum: Weights    # L x [B, H, d_l, d_{l+1}] f32, S
    block_start: Weights  # L x [B, H, d_l, d_{l+1}] f32, R (reference of the next token)
    pos: jax.Array       # [B] int32, tokens already taken in the current block, in [0, b)


def memory_apply(ws: Sequence[jax.Array], x: jax.Array, act) -> jax.Array:
    """M(x) for per-head weights ``ws`` (L x [B, H, d_l, d_{l+1}]) and x [B, H, ..., d_0]."""
    n = len(ws)
    for l, w in enumerate(ws):
        x = jnp.einsum("bh...i,bhio->bh...o", x, w)  # [B, H, ..., d_{l+1}]
        if l < n - 1:
            x = act(x)
    return x


def _where_rows(cond: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``where`` with a per-row condition ``cond [B]`` broadcast over the trailing dims of a/b."""
    c = cond.reshape(cond.shape + (1,) * (max(a.ndim, b.ndim) - 1))
    return jnp.where(c, a, b)


def token_step(state: TitansState, q, k, v, theta, eta, alpha, valid, reset, memory0: Weights,
               *, block_size: int, act) -> tuple[TitansState, jax.Array]:
    """One token of the recurrence for every row and head.

    q, k [B, H, Dk]; v [B, H, Dv]; theta, eta, alpha [B, H]; valid, reset [B] bool;
    memory0: L x [B, H, d_l, d_{l+1}] (the reset target). Returns (new_state, y [B, H, Dv]).
    """
    q, k, v, theta, eta, alpha = (x.astype(jnp.float32) for x in (q, k, v, theta, eta, alpha))
    mem = tuple(_where_rows(reset, m0, m) for m0, m in zip(memory0, state.memory))
    mom = tuple(_where_rows(reset, jnp.zeros_like(s), s) for s in state.momentum)
    ref = tuple(_where_rows(reset, m0, r) for m0, r in zip(memory0, state.block_start))
    pos = jnp.where(reset, 0, state.pos)

    def loss(ws):  # sum over rows and heads of ||M(k) - v||^2: the grad is per (row, head)
        return jnp.sum((memory_apply(ws, k, act) - v) ** 2)

    grads = jax.grad(loss)(ref)  # L x [B, H, d_l, d_{l+1}]
    th, et, keep = theta[..., None, None], eta[..., None, None], (1.0 - alpha)[..., None, None]
    new_mom = tuple(et * s - th * g for s, g in zip(mom, grads))
    new_mem = tuple(keep * m + s for m, s in zip(mem, new_mom))
    y = memory_apply(new_mem, q, act)  # [B, H, Dv]

    new_pos = pos + 1
    full = new_pos >= block_size
    new_ref = tuple(_where_rows(full, m, r) for m, r in zip(new_mem, ref))
    new_pos = jnp.where(full, 0, new_pos)

    out = TitansState(
        memory=tuple(_where_rows(valid, a, b) for a, b in zip(new_mem, state.memory)),
        momentum=tuple(_where_rows(valid, a, b) for a, b in zip(new_mom, state.momentum)),
        block_start=tuple(_where_rows(valid, a, b) for a, b in zip(new_ref, state.block_start)),
        pos=jnp.where(valid, new_pos, state.pos).astype(jnp.int32),
    )
    return out, _where_rows(valid, y, jnp.zeros_like(y))


def titans_reference(q, k, v, theta, eta, alpha, memory0: Weights, state0: TitansState,
                     valid=None, reset=None, *, block_size: int,
                     act) -> tuple[jax.Array, TitansState]:
    """Token-by-token ``lax.scan`` of :func:`token_step` (float32).

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; theta, eta, alpha [B, T, H];
    memory0: L x [B, H, d_l, d_{l+1}] f32 (reset target); state0: the state before token 0
    (``pos`` may be None for 0); valid, reset [B, T] bool or None (no packing).
    Returns (y [B, T, H, Dv] f32, final state).
    """
    bsz, t = q.shape[:2]
    if valid is None:
        valid = jnp.ones((bsz, t), bool)
    if reset is None:
        reset = jnp.zeros((bsz, t), bool)
    pos0 = jnp.zeros((bsz,), jnp.int32) if state0.pos is None else state0.pos.astype(jnp.int32)
    state0 = TitansState(tuple(state0.memory), tuple(state0.momentum), tuple(state0.block_start),
                         pos0)

    def time_major(x):  # [B, T, ...] -> [T, B, ...]
        return jnp.moveaxis(x, 1, 0)

    xs = tuple(time_major(x) for x in (q, k, v, theta, eta, alpha, valid, reset))

    def body(state, x):
        qt, kt, vt, tht, ett, alt, vat, rst = x
        return token_step(state, qt, kt, vt, tht, ett, alt, vat, rst, memory0,
                          block_size=block_size, act=act)

    final, ys = jax.lax.scan(body, state0, xs)  # ys [T, B, H, Dv]
    return jnp.moveaxis(ys, 0, 1), final
