"""RetNet mixer: multi-scale retention (Sun et al. 2023, "Retentive Network"), fla's
parametrisation (rotary in place of xPos, as fla does).

    q, k = RoPE(x W_q), RoPE(x W_k)            # [B, T, H, K], K = d·expand_k / H
    v = x W_v                                  # [B, T, H, V], V = d·expand_v / H
    S_t = γ_h S_{t−1} + k_t v_tᵀ,  o_t = K^−1/2 S_tᵀ q_t     (simple_gla, g = log γ_h)
    γ_h = 1 − 2^(−5−h),  h = 0 … H−1            # fixed per-head decays, not parameters
    y = (RMSNorm_head(o) ⊙ SiLU(x W_g)) W_o      # group norm per head, swish output gate

The quadratic (parallel) form is o_t = K^−1/2 Σ_{s≤t} γ_h^(t−s) (q_t·k_s) v_s. RetNet's heads
are wide: with expand_k = 1, expand_v = 2 the value head is twice the key head and the layer has
8·d² projection weights (q, k: d², v, gate: 2d² each, o: 2d²), twice attention's — the paper
shrinks the MLP to compensate; here the block keeps the model's MLP.

Rotary positions: `positions` (per-document positions, from the model) when given, else counted
from `segment_ids` (or 0 … T−1). With a cache the positions continue from the row's cached length
(kept in the cache), since rotary angles depend on absolute positions while retention itself
depends only on t − s. The cache is {"state": [B, H, K, V] float32, "length": [B] int32}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.common import Linear, RMSNorm, positions_from_segments, rotary_embedding, valid_lengths
from pallas_kernels.common.frame import sequence_or_step
from pallas_kernels.simple_gla import simple_gla, simple_gla_step

__all__ = ["RetNet", "retention_decays"]


def retention_decays(n_heads: int) -> np.ndarray:
    """γ_h = 1 − 2^(−5−h) for h = 0 … H−1 (RetNet's multi-scale decays), float64 NumPy:
    constants of the architecture, computed at construction (which may run under `jit`)."""
    return 1.0 - 2.0 ** (-5.0 - np.arange(n_heads, dtype=np.float64))


class RetNet(nnx.Module):
    def __init__(self, d_model: int, *, num_heads: int, expand_k: float = 1.0,
                 expand_v: float = 2.0, rope_theta: float = 10000.0, norm_eps: float = 1e-5,
                 impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"RetNet: key dim d_model·expand_k ({key_dim}) and value dim "
                             f"d_model·expand_v ({value_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        self.h, self.k_dim, self.v_dim = num_heads, key_dim // num_heads, value_dim // num_heads
        # [H] constant log decays log γ_h, static Python floats
        self.log_decay = tuple(float(np.log(g)) for g in retention_decays(num_heads))
        self.rope_theta, self.impl, self.dtype = rope_theta, impl, dtype
        lin = lambda n_out: Linear(d_model, n_out, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj = lin(key_dim), lin(key_dim)
        self.v_proj, self.g_proj = lin(value_dim), lin(value_dim)
        # One RMSNorm applied to each head (its weight shared by the heads, as fla's group norm).
        self.o_norm = RMSNorm(self.v_dim, eps=norm_eps, dtype=dtype)
        self.o_proj = Linear(value_dim, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return {"state": jnp.zeros((batch, self.h, self.k_dim, self.v_dim), jnp.float32),
                "length": jnp.zeros((batch,), jnp.int32)}

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """One row's decode cache, independent of context_len: the state 4·H·K·V (float32
        whatever `dtype`) + the row's length 4 (int32, for the rotary positions)."""
        return 4 * self.h * self.k_dim * self.v_dim + 4

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, independent of seq_len:
        2·d·(2·H·K + 2·H·V) (q, k, v, gate) + 2·H·V·d (o)
        + 5·H·K·V (recurrent form: decay γS K·V, update k vᵀ 2·K·V, readout Sᵀq 2·K·V).
        Rotary, the norm and the gate are O(d) and not counted."""
        projs = (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj)
        return float(sum(p.flops_per_token() for p in projs) + 5 * self.h * self.k_dim * self.v_dim)

    def _positions(self, b, t, segment_ids, positions, cache):
        if cache is not None:  # continue from each row's cached length
            return cache["length"][:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        if positions is not None:
            return positions
        if segment_ids is not None:
            return positions_from_segments(segment_ids)
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        """x [B, T, d_model] -> (y [B, T, d_model], cache)."""
        b, t, _ = x.shape
        pos = self._positions(b, t, segment_ids, positions, cache)  # [B, T]
        q = rotary_embedding(self.q_proj(x).reshape(b, t, self.h, self.k_dim), pos,
                             theta=self.rope_theta)
        k = rotary_embedding(self.k_proj(x).reshape(b, t, self.h, self.k_dim), pos,
                             theta=self.rope_theta)
        v = self.v_proj(x).reshape(b, t, self.h, self.v_dim)
        g = jnp.broadcast_to(jnp.asarray(self.log_decay, jnp.float32), (b, t, self.h))
        o, state = sequence_or_step(simple_gla, simple_gla_step, q, k, v, g,
                                    state=None if cache is None else cache["state"],
                                    segment_ids=segment_ids, impl=self.impl)  # [B, T, H, V]
        new_cache = None
        if cache is not None:
            new_cache = {"state": state,
                         "length": cache["length"] + valid_lengths(segment_ids, b, t)}
        o = self.o_norm(o).reshape(b, t, -1) * jax.nn.silu(self.g_proj(x))
        return self.o_proj(o), new_cache
