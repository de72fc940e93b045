"""Kimi Delta Attention (KDA), token by token: the float32 specification every form matches.

KDA is the gated delta rule with a decay per key channel. Per value head, with key-major state
S [K, V] and α_t = exp(g_t) [K]:

    S'_t = Diag(α_t) · S_{t-1}                         (channel-wise decay, g_t <= 0)
    S_t  = S'_t + k_t (β_t (v_t − S'_tᵀ k_t))ᵀ         (delta-rule write, β_t in [0, 1])
    o_t  = scale · S_tᵀ q_t                            (read after the update)

Equivalently S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t-1} + β_t k_t v_tᵀ. Inputs are
q, k [B, T, H, K], v [B, T, HV, V], g [B, T, HV, K], β [B, T, HV] with HV % H == 0 (value head j
reads q/k head j // (HV / H)), state [B, HV, K, V] float32. With ``use_qk_l2norm`` q and k become
x / sqrt(Σx² + 1e-6) first (gated_delta_rule's ``l2norm``).

``segment_ids [B, T]`` (packing): the state is set to zero before the first token of every
new non-zero id after token 0; padding tokens (id 0, trailing only) leave the state untouched and
output 0, so the final state is the state after the last real token. ``initial_state`` is the
state before token 0 and so applies to the first document only.

The scan stores one state per token for autodiff: it is the specification, not a training path.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import expand_groups, segment_masks
from pallas_kernels.gated_delta.reference import l2norm

__all__ = ["recurrent_step", "kda_reference"]

_HI = lax.Precision.HIGHEST


def recurrent_step(q, k, v, g, beta, state, scale):
    """One token of the recurrence for all batch rows and value heads (float32).

    q, k, g: [B, HV, K]; v: [B, HV, V]; beta: [B, HV]; state: [B, HV, K, V].
    Returns (o [B, HV, V], new_state [B, HV, K, V]).
    """
    decayed = jnp.exp(g)[..., :, None] * state                           # S'_t = Diag(α_t) S
    pred = jnp.einsum("bhk,bhkv->bhv", k, decayed, precision=_HI)        # S'_tᵀ k_t
    delta = beta[..., None] * (v - pred)                                 # [B, HV, V]
    new_state = decayed + k[..., :, None] * delta[..., None, :]          # [B, HV, K, V]
    o = scale * jnp.einsum("bhk,bhkv->bhv", q, new_state, precision=_HI)
    return o, new_state


def kda_reference(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                  use_qk_l2norm=False, segment_ids=None):
    """Float32 ``lax.scan`` over tokens.

    Returns (o [B, T, HV, V] in v.dtype, final_state [B, HV, K, V] float32 | None).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    f32 = jnp.float32
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = expand_groups(q.astype(f32), HV)                                 # [B, T, HV, K]
    k = expand_groups(k.astype(f32), HV)                                 # [B, T, HV, K]
    out_dtype = v.dtype
    v, g, beta = v.astype(f32), g.astype(f32), beta.astype(f32)
    if segment_ids is None:
        valid = jnp.ones((B, T), bool)
        reset = jnp.zeros((B, T), bool)
    else:
        valid, reset = segment_masks(segment_ids)                        # [B, T] each
    s0 = (jnp.zeros((B, HV, K, V), f32) if initial_state is None
          else initial_state.astype(f32))

    def body(state, xs):
        q_t, k_t, v_t, g_t, b_t, valid_t, reset_t = xs
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)     # new document
        o_t, new_state = recurrent_step(q_t, k_t, v_t, g_t, b_t, state, scale)
        new_state = jnp.where(valid_t[:, None, None, None], new_state, state)   # padding: no-op
        o_t = jnp.where(valid_t[:, None, None], o_t, 0.0)
        return new_state, o_t

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    xs = tuple(map(time_major, (q, k, v, g, beta, valid, reset)))
    final, o = lax.scan(body, s0, xs)
    o = jnp.moveaxis(o, 0, 1).astype(out_dtype)                         # [B, T, HV, V]
    return o, (final if output_final_state else None)
