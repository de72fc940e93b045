"""Hedgehog mixer (Zhang et al., "The Hedgehog & the Porcupine", ICLR 2024): linear attention
with learnable feature maps that mimic softmax attention.

Per head, separate (untied) maps for q and k, W initialised to the identity:
    u = x W + b,   φ(x) = [softmax(u), softmax(−u)]     (two softmaxes over the feature axis)
    o_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s / (Σ_{s≤t} φ(q_t)·φ(k_s) + 1e−12)
The numerator and the denominator come from one simple_gla call (g = 0, scale 1) on v with a
ones column appended. `distillation_loss` is the attention-distillation objective used to turn
a softmax layer into a Hedgehog layer: cross-entropy of the normalised linear weights against
the softmax weights of the same q, k. `Hedgehog.from_attention` copies a softmax layer's
projections so that only the feature maps need training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import Linear, make_param, positions_from_segments, rotary_embedding
from pallas_kernels.common.frame import sequence_or_step
from pallas_kernels.simple_gla import simple_gla, simple_gla_step

__all__ = ["Hedgehog", "HedgehogFeatureMap"]


class HedgehogFeatureMap(nnx.Module):
    """φ(x) = [softmax(xW + b), softmax(−(xW + b))] per head; x [..., H, D] -> [..., H, 2D]."""

    def __init__(self, num_heads: int, head_dim: int):
        eye = jnp.broadcast_to(jnp.eye(head_dim, dtype=jnp.float32), (num_heads, head_dim, head_dim))
        self.w = make_param(None, eye, eye.shape, ("heads", None, None), no_decay=True)
        self.b = make_param(None, jnp.zeros((num_heads, head_dim), jnp.float32),
                            (num_heads, head_dim), ("heads", None), no_decay=True)

    def __call__(self, x):
        u = jnp.einsum("...hd,hdf->...hf", x.astype(jnp.float32), self.w[...]) + self.b[...]
        return jnp.concatenate([jax.nn.softmax(u, axis=-1), jax.nn.softmax(-u, axis=-1)], axis=-1)


class Hedgehog(nnx.Module):
    def __init__(self, d_model: int, *, num_heads: int, impl: str = "auto", rope: bool = False,
                 rope_theta: float = 10000.0, dtype=jnp.float32, rngs: nnx.Rngs):
        if d_model % num_heads:
            raise ValueError(f"Hedgehog: d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.h, self.d = num_heads, d_model // num_heads
        self.impl, self.dtype, self.rope, self.rope_theta = impl, dtype, rope, rope_theta
        lin = lambda: Linear(d_model, d_model, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = lin(), lin(), lin()
        self.o_proj = Linear(d_model, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.q_map = HedgehogFeatureMap(num_heads, self.d)
        self.k_map = HedgehogFeatureMap(num_heads, self.d)

    @classmethod
    def from_attention(cls, attn, *, impl: str = "auto", rngs: nnx.Rngs) -> "Hedgehog":
        """A Hedgehog layer with the projections of a softmax `layers.attention.Attention`."""
        if attn.num_kv_heads != attn.num_heads:
            raise ValueError("Hedgehog.from_attention: grouped-query attention is not supported")
        d_model = attn.q_proj.w.shape[0]
        layer = cls(d_model, num_heads=attn.num_heads, impl=impl, rope=True,
                    rope_theta=attn.rope_theta, dtype=attn.dtype, rngs=rngs)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer, name).w[...] = getattr(attn, name).w[...]
        return layer

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return {"state": jnp.zeros((batch, self.h, 2 * self.d, self.d + 1), jnp.float32),
                "length": jnp.zeros((batch,), jnp.int32)}

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """Independent of context_len: the state 4·H·2D·(D + 1) (float32 whatever `dtype`; the
        extra value column carries the normaliser) + 4 for the length counter (int32)."""
        return 4 * self.h * 2 * self.d * (self.d + 1) + 4

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, independent of seq_len: 3·2·d·d (q, k, v) + 2·d·d (o)
        + 2·2·H·D·D (the q and k feature maps u = xW) + 4·H·2D·(D + 1) (recurrent form over
        2D features and D + 1 value columns: update φ(k) vᵀ and readout Sᵀφ(q), no decay as
        g = 0). The softmaxes of the maps, rotary and the division are O(d), not counted."""
        projs = (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        maps = 2 * 2 * self.h * self.d * self.d
        state = 4 * self.h * 2 * self.d * (self.d + 1)
        return float(sum(p.flops_per_token() for p in projs) + maps + state)

    def _qkv(self, x, positions):
        b, t, _ = x.shape
        shape = (b, t, self.h, self.d)
        q, k, v = (p(x).reshape(shape) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.rope:
            q = rotary_embedding(q, positions, theta=self.rope_theta)
            k = rotary_embedding(k, positions, theta=self.rope_theta)
        return q, k, v

    def _positions(self, x, segment_ids, positions, cache):
        b, t, _ = x.shape
        if cache is not None:
            return cache["length"][:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        if positions is not None:
            return positions
        if segment_ids is not None:
            return positions_from_segments(segment_ids)
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        b, t, _ = x.shape
        q, k, v = self._qkv(x, self._positions(x, segment_ids, positions, cache))
        fq, fk = self.q_map(q), self.k_map(k)  # [B, T, H, 2D] float32
        v1 = jnp.concatenate([v.astype(jnp.float32), jnp.ones((b, t, self.h, 1), jnp.float32)], -1)
        g = jnp.zeros((b, t, self.h), jnp.float32)
        o, state = sequence_or_step(simple_gla, simple_gla_step, fq, fk, v1, g,
                                    state=None if cache is None else cache["state"],
                                    segment_ids=segment_ids, impl=self.impl, scale=1.0)
        new_cache = None
        if cache is not None:
            n = t if segment_ids is None else jnp.sum(segment_ids != 0, axis=1)
            new_cache = {"state": state, "length": cache["length"] + n}
        o = o.astype(jnp.float32)
        o = o[..., :-1] / (o[..., -1:] + 1e-12)
        return self.o_proj(o.reshape(b, t, -1).astype(self.dtype)), new_cache

    def distillation_loss(self, x, *, segment_ids=None):
        """Mean over queries of −Σ_s A_soft[t, s] log A_lin[t, s] (causal, same document), with
        A_soft = softmax(q·k / √D) and A_lin the normalised feature-map weights."""
        b, t, _ = x.shape
        q, k, _ = self._qkv(x, self._positions(x, segment_ids, None, None))
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids != 0)[:, :, None]
        mask = mask[:, None]  # [B, 1, T, T]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * self.d ** -0.5
        soft = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
        soft = jnp.where(mask, soft, 0.0)
        lin = jnp.einsum("bqhf,bkhf->bhqk", self.q_map(q), self.k_map(k))
        lin = jnp.where(mask, lin, 0.0)
        lin = lin / (lin.sum(-1, keepdims=True) + 1e-12)
        ce = -jnp.sum(soft * jnp.log(lin + 1e-12), axis=-1)  # [B, H, T]
        rows = mask.any(-1)
        return jnp.sum(jnp.where(rows, ce, 0.0)) / jnp.maximum(jnp.sum(rows), 1)
