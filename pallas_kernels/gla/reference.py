"""gla specification: a float32 ``lax.scan`` over tokens.

Gated Linear Attention (Yang et al., 2024) with a log-decay per key channel. For every value
head j (q/k head ``j // (HV / H)``) and token t:

    S_t = Diag(exp(g_t)) · S_{t-1} + k_t v_tᵀ     S: [K, V], key-major; g_t: [K], g <= 0
    o_t = scale · S_tᵀ q_t                        o: [V]

with S_{-1} = ``initial_state`` (zero when absent) and ``scale=None`` meaning K ** -0.5.

``segment_ids [B, T]`` (packing): a new non-zero id at t > 0 resets the state to zero just
before token t (S_{t-1} := 0); id 0 is trailing padding and a no-op (k = 0, g = 0, o_t = 0), so
the final state is the state after the last real token. ``initial_state`` applies to the first
document of each row only.

Everything runs in float32; gradients come from autodiff of the scan (this form stores one state
per token and is meant for tests and short sequences, not for training).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import expand_groups, segment_masks

__all__ = ["gla_reference", "gla_step_reference"]

_HI = lax.Precision.HIGHEST


def gla_step_reference(q, k, v, g, state, *, scale):
    """One token of the recurrence, float32.

    q, k: [B, H, K]; v: [B, HV, V]; g: [B, HV, K]; state: [B, HV, K, V].
    Returns (o [B, HV, V] float32, new_state [B, HV, K, V] float32).
    """
    hv = v.shape[1]
    f32 = jnp.float32
    q = expand_groups(q.astype(f32), hv, axis=1)                       # [B, HV, K]
    k = expand_groups(k.astype(f32), hv, axis=1)                       # [B, HV, K]
    decay = jnp.exp(g.astype(f32))[..., :, None]                       # [B, HV, K, 1]
    new_state = decay * state.astype(f32) + k[..., :, None] * v.astype(f32)[..., None, :]
    o = scale * jnp.einsum("bhk,bhkv->bhv", q, new_state, precision=_HI)
    return o, new_state


def gla_reference(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                  segment_ids=None):
    """Token-by-token GLA.

    Args:
      q, k: [B, T, H, K]; v: [B, T, HV, V]; g: [B, T, HV, K] log-decays (<= 0);
      initial_state: [B, HV, K, V] or None; segment_ids: [B, T] int or None.
    Returns:
      (o [B, T, HV, V] in v.dtype, final_state [B, HV, K, V] float32 | None).
    """
    b, t, _, kd = q.shape
    hv, vd = v.shape[2], v.shape[3]
    scale = kd ** -0.5 if scale is None else scale
    f32 = jnp.float32
    vf = v.astype(f32)                                                 # [B, T, HV, V]
    gf = g.astype(f32)                                                 # [B, T, HV, K]
    kf = k.astype(f32)                                                 # [B, T, H, K]
    if segment_ids is None:
        valid = jnp.ones((b, t), bool)
        reset = jnp.zeros((b, t), bool)
    else:
        valid, reset = segment_masks(segment_ids)                      # [B, T] each
    kf = jnp.where(valid[:, :, None, None], kf, 0.0)                   # padding: no write
    gf = jnp.where(valid[:, :, None, None], gf, 0.0)                   # padding: no decay
    s0 = (jnp.zeros((b, hv, kd, vd), f32) if initial_state is None
          else initial_state.astype(f32))                              # [B, HV, K, V]

    def step(state, xs):
        q_t, k_t, v_t, g_t, reset_t, valid_t = xs
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)   # new document
        o_t, state = gla_step_reference(q_t, k_t, v_t, g_t, state, scale=scale)
        o_t = jnp.where(valid_t[:, None, None], o_t, 0.0)
        return state, o_t

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, kf, vf, gf, reset, valid))
    final, o = lax.scan(step, s0, xs)                                  # o: [T, B, HV, V]
    o = jnp.moveaxis(o, 0, 1).astype(v.dtype)                          # [B, T, HV, V]
    return o, (final if output_final_state else None)
