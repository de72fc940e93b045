"""Causal softmax attention mixer (grouped-query, rotary, sliding window, packing, KV cache).

    x' = x + conv_K(x)   (optional, `conv_size` = K > 0; depthwise, causal, no activation)
    q = RoPE(x' W_q), k = RoPE(x' W_k), v = x' W_v         # [B, T, H(kv), D]
    y = attention(q, k, v; causal, window, same-document) W_o

The short convolution (a "Canon layer", Allen-Zhu 2025, Physics of LMs 4.1) mixes the previous
K − 1 tokens into every projection's input, so a key can carry the token before it without a
second layer: on MQAR (vocabulary 256, length 128, 16 pairs, lr 3e-3, 300 steps, d_model 64)
attention with K = 4 reached 0.69 accuracy where plain attention stayed at 0.06. It is residual (x + conv), so a randomly initialised conv perturbs
rather than replaces the token's own features; it is masked at document boundaries like the
linear layers' convolutions, and its decode cache (the last K − 1 inputs) sits in the attention
cache under "conv".

Rotary positions count from each document's start (`positions`, derived from `segment_ids` by
the model, or here when not given). The cache holds rotated keys and values with the absolute
position of every slot: a full cache has `max_len` slots (slot = position); a sliding-window
cache is a ring buffer of `window` slots (slot = position mod window). Each row keeps its own
length, so a batch of prompts of different lengths (right-padded, padding marked by
segment_ids = 0) prefills in one call and decodes one token per row per step.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from layers.common import (CausalConv1d, Linear, RMSNorm, itemsize, mean_causal_keys,
                           positions_from_segments, rotary_embedding, valid_lengths)
from pallas_kernels.attention import attention

__all__ = ["Attention", "init_kv_cache", "kv_cache_bytes", "write_kv_cache"]


def init_kv_cache(batch: int, slots: int, names, heads: int, dim: int, dtype) -> dict:
    """Empty KV slots: one [B, slots, heads, dim] array per name, and `slot_pos` [B, slots]
    (the absolute position held by each slot, −1 = empty)."""
    cache = {n: jnp.zeros((batch, slots, heads, dim), dtype) for n in names}
    cache["slot_pos"] = jnp.full((batch, slots), -1, jnp.int32)
    return cache


def kv_cache_bytes(slots: int, n_names: int, heads: int, dim: int, dtype) -> int:
    """Bytes of one row of `init_kv_cache`: n_names·slots·heads·dim·itemsize(dtype) for the
    key/value arrays plus 4·slots for `slot_pos` (int32)."""
    return n_names * slots * heads * dim * itemsize(dtype) + 4 * slots


def write_kv_cache(cache: dict, new: dict, q_pos, valid, n_new) -> dict:
    """Write the last `slots` real tokens of each row at slot = position mod slots: a ring
    buffer for sliding windows, and slot = position for a full cache (positions < slots).

    new: name -> [B, T, heads, dim]; q_pos [B, T] positions; valid [B, T]; n_new [B] real tokens.
    """
    b, t = q_pos.shape
    slots = cache["slot_pos"].shape[1]
    keep = valid & (jnp.arange(t)[None] >= n_new[:, None] - slots)
    slot = jnp.where(keep, q_pos % slots, slots)  # slot index `slots` is dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    out = {n: cache[n].at[rows, slot].set(x.astype(cache[n].dtype), mode="drop")
           for n, x in new.items()}
    out["slot_pos"] = cache["slot_pos"].at[rows, slot].set(q_pos, mode="drop")
    return out


class Attention(nnx.Module):
    """Grouped-query causal attention; `window=None` is full attention, an int is SWA."""

    def __init__(self, d_model: int, *, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, window: int | None = None,
                 rope_theta: float = 10000.0, qk_norm: bool = False, conv_size: int = 0,
                 impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        """conv_size: kernel of the short convolution before the projections (0 = none)."""
        if not isinstance(conv_size, int) or conv_size < 0:
            raise ValueError(f"Attention: conv_size must be an int >= 0, got {conv_size!r}")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"Attention: d_model ({d_model}) must be divisible by "
                                 f"num_heads ({num_heads})")
            head_dim = d_model // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window, self.rope_theta, self.impl, self.dtype = window, rope_theta, impl, dtype
        self.q_proj = Linear(d_model, num_heads * head_dim, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d_model, num_kv_heads * head_dim, axes=("embed", "kv_heads"), dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d_model, num_kv_heads * head_dim, axes=("embed", "kv_heads"), dtype=dtype, rngs=rngs)
        self.o_proj = Linear(num_heads * head_dim, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(head_dim, dtype=dtype) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, dtype=dtype) if qk_norm else None
        # Made last, so the projections draw the same initial weights with or without it.
        self.conv = (CausalConv1d(d_model, conv_size, activation=False, dtype=dtype, rngs=rngs)
                     if conv_size else None)

    def _slots(self, max_len: int) -> int:
        return min(self.window, max_len) if self.window else max_len

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        """Empty cache: `window` ring slots for SWA, `max_len` slots otherwise (and the conv's
        last K − 1 inputs when `conv_size` > 0)."""
        cache = {**init_kv_cache(batch, self._slots(max_len), ("k", "v"), self.num_kv_heads,
                                 self.head_dim, dtype),
                 "length": jnp.zeros((batch,), jnp.int32)}
        if self.conv is not None:
            cache["conv"] = self.conv.init_cache(batch, dtype)
        return cache

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """Decode cache of one row after `context_len` tokens, exactly as `init_cache` holds it:
        S = min(context_len, window or ∞) slots, 2·S·H_kv·D·itemsize(dtype) for k and v, plus
        the bookkeeping 4·S (slot_pos, int32) + 4 (length, int32), plus (K − 1)·d_model·itemsize
        for the conv inputs when conv_size = K > 0."""
        out = kv_cache_bytes(self._slots(context_len), 2, self.num_kv_heads, self.head_dim,
                             dtype) + 4
        if self.conv is not None:
            out += self.conv.cache_bytes(dtype)
        return out

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token over a causal sequence of T = seq_len tokens:
        2·d·(H + 2·H_kv)·D (q, k, v) + 2·H·D·d (o) + 2·d·K (conv, when K > 0)
        + 4·H·D·n̄, with n̄ = mean_causal_keys(T, window) the mean keys per query ((T + 1)/2 for
        full attention): 2·D per key for q·k and 2·D for p·v in each query head. Rotary, the
        softmax, qk-norm and the conv's residual add are O(d) and not counted."""
        proj = sum(p.flops_per_token() for p in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))
        conv = self.conv.flops_per_token() if self.conv is not None else 0
        mix = 4 * self.num_heads * self.head_dim * mean_causal_keys(seq_len, self.window)
        return float(proj + conv + mix)

    def _mix_inputs(self, x, segment_ids, cache):
        """x' = x + conv(x) (or x when conv_size = 0) and the new conv cache (or None)."""
        if self.conv is None:
            return x, None
        y, conv_cache = self.conv(x, segment_ids=segment_ids,
                                  cache=None if cache is None else cache["conv"])
        return x.astype(self.dtype) + y, conv_cache  # [B, T, d_model]

    def _project(self, x, positions):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotary_embedding(q, positions, theta=self.rope_theta)
        k = rotary_embedding(k, positions, theta=self.rope_theta)
        return q, k, v

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        """x [B, T, d_model] -> (y [B, T, d_model], cache). With a cache, segment_ids only marks
        trailing padding (0) of each row; positions continue from the row's cached length."""
        b, t, _ = x.shape
        if cache is not None:
            return self._call_cached(x, segment_ids, cache)
        if positions is None:
            positions = (positions_from_segments(segment_ids) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
        x, _ = self._mix_inputs(x, segment_ids, None)
        q, k, v = self._project(x, positions)
        o = attention(q, k, v, segment_ids=segment_ids, window=self.window, impl=self.impl)
        return self.o_proj(o.reshape(b, t, -1)), None

    def _call_cached(self, x, segment_ids, cache):
        b, t, _ = x.shape
        valid = (jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0)
        n_new = valid_lengths(segment_ids, b, t)  # [B]
        length = cache["length"]
        q_pos = length[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B, T]
        x, conv_cache = self._mix_inputs(x, segment_ids, cache)
        q, k, v = self._project(x, q_pos)
        # Keys: the cached slots followed by this call's tokens.
        k_all = jnp.concatenate([cache["k"].astype(k.dtype), k], axis=1)
        v_all = jnp.concatenate([cache["v"].astype(v.dtype), v], axis=1)
        kv_pos = jnp.concatenate([cache["slot_pos"], jnp.where(valid, q_pos, -1)], axis=1)
        o = attention(q, k_all, v_all, segment_ids=valid.astype(jnp.int32),
                      kv_segment_ids=(kv_pos >= 0).astype(jnp.int32), q_positions=q_pos,
                      kv_positions=kv_pos, window=self.window, impl=self.impl)
        y = self.o_proj(o.reshape(b, t, -1))

        new_cache = {**write_kv_cache(cache, {"k": k, "v": v}, q_pos, valid, n_new),
                     "length": length + n_new}
        if conv_cache is not None:
            new_cache["conv"] = conv_cache
        return y, new_cache
