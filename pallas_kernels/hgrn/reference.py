"""HGRN's gated recurrence, token by token: the float32 specification every implementation matches.

Elementwise over the feature axis, with the forget gate f_t = exp(g_t) (g the log decay, <= 0):

    h_t = exp(g_t) ⊙ h_{t-1} + x_t,      o_t = h_t

x, g [B, T, D]; the state h is one float32 vector per sequence, [B, D].

``segment_ids [B, T]`` (packing): the state is set to zero before the first token of every
new non-zero id after token 0; padding tokens (id 0, trailing only) leave the state untouched and
output 0, so the final state is the state after the last real token. ``initial_state`` is the
state before token 0 and so applies to the first document only.

The scan keeps one [B, D] state per token for autodiff — the same size as the output here, but
it runs T sequential steps: it is the specification, not a training path.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import segment_masks

__all__ = ["recurrent_step", "hgrn_reference"]


def recurrent_step(x, g, state):
    """One token for every batch row (float32): x, g, state [B, D] -> new state [B, D]."""
    return jnp.exp(g) * state + x


def hgrn_reference(x, g, *, initial_state=None, output_final_state=False, segment_ids=None):
    """Float32 ``lax.scan`` over tokens.

    Returns (o [B, T, D] in x.dtype, final_state [B, D] float32 | None).
    """
    B, T, D = x.shape
    f32 = jnp.float32
    out_dtype = x.dtype
    x, g = x.astype(f32), g.astype(f32)
    if segment_ids is None:
        valid = jnp.ones((B, T), bool)
        reset = jnp.zeros((B, T), bool)
    else:
        valid, reset = segment_masks(segment_ids)                        # [B, T] each
    h0 = jnp.zeros((B, D), f32) if initial_state is None else initial_state.astype(f32)

    def body(state, xs):
        x_t, g_t, valid_t, reset_t = xs                                  # [B, D], [B, D], [B], [B]
        state = jnp.where(reset_t[:, None], 0.0, state)                  # new document
        new_state = jnp.where(valid_t[:, None], recurrent_step(x_t, g_t, state), state)
        o_t = jnp.where(valid_t[:, None], new_state, 0.0)                # padding: output 0
        return new_state, o_t

    time_major = lambda a: jnp.moveaxis(a, 1, 0)
    final, o = lax.scan(body, h0, tuple(map(time_major, (x, g, valid, reset))))
    o = jnp.moveaxis(o, 0, 1).astype(out_dtype)                          # [B, T, D]
    return o, (final if output_final_state else None)
