"""Attention through `jax.nn.dot_product_attention` with its default implementation.

That default is XLA's dense softmax(QKᵀ)V on every backend, GPU included (jax 0.10-0.11 select
cuDNN only when asked with `implementation="cudnn"`), so memory grows with T². The plain causal
case (no packing, no cache) is passed as `is_causal` + `local_window_size`, the form a fused
kernel takes; every other case passes the explicit visibility mask. Rows with no
visible key are zeroed afterwards, since the fused softmax over an all-masked row is uniform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["attention_xla"]


def attention_xla(q, k, v, mask, scale, *, plain_causal: bool, window):
    """q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D]; mask [B, Tq, Tk] bool (used unless plain_causal)."""
    if plain_causal:
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                            local_window_size=local)
    o = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask[:, None])
    any_visible = mask.any(-1)[:, :, None, None]  # [B, Tq, 1, 1]
    return jnp.where(any_visible, o, jnp.zeros_like(o))
