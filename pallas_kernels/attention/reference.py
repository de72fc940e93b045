"""Float32 causal softmax attention — the specification of the `attention` op.

    o_i = Σ_j softmax_j(scale · q_i·k_j + mask_ij) v_j

with mask_ij = 0 where key j is visible to query i and −inf elsewhere. Key j is visible when
  * it is valid (kv position ≥ 0, kv segment ≠ 0),
  * it is not in the future (kv_pos_j ≤ q_pos_i),
  * it lies in the window (q_pos_i − kv_pos_j < window; the window counts the token itself),
  * it is in the query's document (kv_seg_j == q_seg_i, both ≠ 0),
or it is one of the first `kv_sinks` keys (persistent / sink tokens, visible to every real query).
A query with no visible key (padding) outputs 0. Grouped-query: q head i reads kv head
i // (Hq / Hkv).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import expand_groups

__all__ = ["attention_mask", "attention_reference"]


def attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, window, kv_sinks=0):
    """Boolean visibility mask [B, Tq, Tk] from positions [B, T*] and segment ids [B, T*]."""
    qp = q_positions[:, :, None]  # [B, Tq, 1]
    kp = kv_positions[:, None, :]  # [B, 1, Tk]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= (qp - kp) < window
    qs = q_segment_ids[:, :, None]
    ks = kv_segment_ids[:, None, :]
    mask &= (qs == ks) & (qs != 0)
    if kv_sinks:
        sink = jnp.arange(kv_positions.shape[1]) < kv_sinks  # [Tk]
        mask |= sink[None, None, :] & (qs != 0)
    return mask


def attention_reference(q, k, v, mask, scale):
    """q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D*], mask [B, Tq, Tk] -> o [B, Tq, Hq, Dv] (q.dtype)."""
    hq = q.shape[2]
    kf = expand_groups(k.astype(jnp.float32), hq)  # [B, Tk, Hq, D]
    vf = expand_groups(v.astype(jnp.float32), hq)  # [B, Tk, Hq, Dv]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf) * scale
    logits = jnp.where(mask[:, None], logits, -jnp.inf)
    any_visible = mask.any(-1)[:, None, :, None]  # [B, 1, Tq, 1]
    logits = jnp.where(any_visible, logits, 0.0)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(any_visible, probs, 0.0)
    o = jnp.einsum("bhqk,bkhd->bqhd", probs, vf)
    return o.astype(q.dtype)
