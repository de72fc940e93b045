"""The language model: embedding -> blocks[layer_types] -> final RMSNorm -> (tied) head.

Each block is pre-norm mixer + residual, then pre-norm SwiGLU MLP + residual:
    h = x + mixer(RMSNorm(x)),   y = h + MLP(RMSNorm(h)).
Positions for rotary embedding are counted from each document's start (from `segment_ids`).
The cache is a list with one entry per layer (each layer's own cache) — decoding continues
every layer from where prefill left it.

Costs come from the layers (DESIGN.md §3), never from matching mixer names:
    flops_per_token(T) = Σ_blocks [mixer.flops_per_token(T) + 3·2·d·d_ff] + 2·d·V
(the embedding lookup is free; norms are O(d) and not counted), training ≈ 3× that (the
backward pass is ≈ 2× the forward), and cache_bytes(L) = Σ_blocks mixer.cache_bytes(L).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import RMSNorm, SwiGLU, make_param, positions_from_segments
from zoo.config import ModelConfig
from zoo.registry import get_mixer

__all__ = ["Block", "LM", "count_params", "cross_entropy"]


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.mixer_name = cfg.layer_types[layer_idx]
        self.norm1 = RMSNorm(cfg.d_model, dtype=dtype)
        self.mixer = get_mixer(self.mixer_name)(cfg, layer_idx, rngs)
        self.norm2 = RMSNorm(cfg.d_model, dtype=dtype)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        h, cache = self.mixer(self.norm1(x), segment_ids=segment_ids, positions=positions,
                              cache=cache)
        x = x + h.astype(x.dtype)
        x = x + self.mlp(self.norm2(x)).astype(x.dtype)
        return x, cache


class LM(nnx.Module):
    """A decoder-only LM over `cfg.layer_types`. Logits are float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # std d^-1/2 keeps tied-head logits O(1); inputs are scaled by sqrt(d) back to unit RMS.
        self.embed = make_param(rngs, nnx.initializers.normal(cfg.d_model ** -0.5),
                                (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, dtype=jnp.dtype(cfg.dtype))
        self.head = (None if cfg.tie_embeddings else
                     make_param(rngs, nnx.initializers.normal(cfg.d_model ** -0.5),
                                (cfg.d_model, cfg.vocab_size), ("embed", "vocab")))

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> list:
        return [blk.mixer.init_cache(batch, max_len, dtype) for blk in self.blocks]

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token at sequence length seq_len: every block's mixer and SwiGLU
        MLP (3·2·d·d_ff) and the output head 2·d·V (module docstring)."""
        blocks = sum(blk.mixer.flops_per_token(seq_len) + blk.mlp.flops_per_token()
                     for blk in self.blocks)
        return float(blocks + 2 * self.cfg.d_model * self.cfg.vocab_size)

    def train_flops_per_token(self, seq_len: int) -> float:
        """3 × forward: the backward pass costs ≈ 2× the forward (input and weight gradients)."""
        return 3.0 * self.flops_per_token(seq_len)

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """Decode cache bytes of one sequence after context_len tokens: Σ over layers of
        mixer.cache_bytes (= the nbytes of `init_cache(1, context_len, dtype)`)."""
        return sum(blk.mixer.cache_bytes(context_len, dtype) for blk in self.blocks)

    def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None):
        """tokens [B, T] int -> (logits [B, T, V] float32, cache or None)."""
        dtype = jnp.dtype(self.cfg.dtype)
        x = (jnp.take(self.embed[...], tokens, axis=0) * self.cfg.d_model ** 0.5).astype(dtype)  # [B, T, D]
        if positions is None and segment_ids is not None and cache is None:
            positions = positions_from_segments(segment_ids)
        new_cache = [] if cache is not None else None
        for i, blk in enumerate(self.blocks):
            layer_cache = cache[i] if cache is not None else None
            if self.cfg.remat and cache is None:
                x, layer_cache = nnx.remat(lambda b, x: b(x, segment_ids=segment_ids,
                                                          positions=positions))(blk, x)
            else:
                x, layer_cache = blk(x, segment_ids=segment_ids, positions=positions,
                                     cache=layer_cache)
            if new_cache is not None:
                new_cache.append(layer_cache)
        x = self.final_norm(x)
        w = self.embed[...].T if self.head is None else self.head[...]
        logits = jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
        return logits, new_cache


def cross_entropy(logits, targets):
    """Mean next-token loss over scored positions (targets >= 0; −100 marks unscored).

    Returns (mean loss, number of scored tokens)."""
    mask = targets >= 0
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, logz - picked, 0.0)
    n = jnp.sum(mask)
    return jnp.sum(nll) / jnp.maximum(n, 1), n


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
