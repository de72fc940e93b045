"""GLA mixer: Gated Linear Attention (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), fla's parametrisation.

    q, k = x W_q, x W_k                         # [B, T, H, K], K = d·expand_k / H (expand_k 0.5)
    v = x W_v                                   # [B, T, H, V], V = d·expand_v / H (expand_v 1)
    g = logsigmoid(x W_1 W_2 + b) / 16          # [B, T, H, K], low-rank (d -> 16 -> H·K) gate
    S_t = Diag(exp(g_t)) S_{t−1} + k_t v_tᵀ,  o_t = K^−1/2 S_tᵀ q_t      (gla)
    y = (RMSNorm_head(o) ⊙ SiLU(x W_r)) W_o      # swish output gate, per-head RMSNorm

The normaliser 16 (`gate_logit_normalizer`) keeps the per-step decay exp(g) = σ(z)^(1/16) in
(0, 1) but close to 1, so each channel forgets slowly: g = −log(2)/16 ≈ −0.043 at z = 0.
The norm is one RMSNorm applied to every head (its weight shared by the heads, as fla). The
cache is the state [B, H, K, V] (float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import Linear, RMSNorm
from pallas_kernels.common.frame import sequence_or_step
from pallas_kernels.gla import gla, gla_step

__all__ = ["GLA"]


class GLA(nnx.Module):
    def __init__(self, d_model: int, *, num_heads: int, expand_k: float = 0.5,
                 expand_v: float = 1.0, gate_low_rank_dim: int = 16,
                 gate_logit_normalizer: float = 16.0, norm_eps: float = 1e-5,
                 impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"GLA: key dim d_model·expand_k ({key_dim}) and value dim "
                             f"d_model·expand_v ({value_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if gate_logit_normalizer <= 0:
            raise ValueError(f"GLA: gate_logit_normalizer must be > 0, got {gate_logit_normalizer}")
        self.h, self.k_dim, self.v_dim = num_heads, key_dim // num_heads, value_dim // num_heads
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.impl, self.dtype = impl, dtype
        lin = lambda n_out: Linear(d_model, n_out, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = lin(key_dim), lin(key_dim), lin(value_dim)
        # Low-rank gate: the rank dim is small and stays replicated; the bias is no_decay.
        self.gk_down = Linear(d_model, gate_low_rank_dim, axes=("embed", None), dtype=dtype,
                              rngs=rngs)
        self.gk_up = Linear(gate_low_rank_dim, key_dim, axes=(None, "heads"), use_bias=True,
                            dtype=dtype, rngs=rngs)
        self.r_proj = lin(value_dim)  # output gate
        self.o_norm = RMSNorm(self.v_dim, eps=norm_eps, dtype=dtype)
        self.o_proj = Linear(value_dim, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return {"state": jnp.zeros((batch, self.h, self.k_dim, self.v_dim), jnp.float32)}

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """The state 4·H·K·V bytes (float32 whatever `dtype`), independent of context_len."""
        return 4 * self.h * self.k_dim * self.v_dim

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, independent of seq_len:
        2·d·(2·H·K + 2·H·V) (q, k, v, output gate) + 2·(d·r + r·H·K) (low-rank gate, r = 16)
        + 2·H·V·d (o) + 5·H·K·V (recurrent form: decay Diag(α)S K·V, update k vᵀ 2·K·V,
        readout Sᵀq 2·K·V). The logsigmoid, the norm and the gate are O(d) and not counted."""
        projs = (self.q_proj, self.k_proj, self.v_proj, self.gk_down, self.gk_up, self.r_proj,
                 self.o_proj)
        return float(sum(p.flops_per_token() for p in projs) + 5 * self.h * self.k_dim * self.v_dim)

    def gate(self, x):
        """g = logsigmoid(x W_1 W_2 + b) / gate_logit_normalizer: [B, T, H, K] float32, < 0."""
        b, t, _ = x.shape
        z = self.gk_up(self.gk_down(x)).astype(jnp.float32)
        g = jax.nn.log_sigmoid(z) / self.gate_logit_normalizer
        return g.reshape(b, t, self.h, self.k_dim)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        """x [B, T, d_model] -> (y [B, T, d_model], cache)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.h, self.k_dim)
        k = self.k_proj(x).reshape(b, t, self.h, self.k_dim)
        v = self.v_proj(x).reshape(b, t, self.h, self.v_dim)
        o, state = sequence_or_step(gla, gla_step, q, k, v, self.gate(x),
                                    state=None if cache is None else cache["state"],
                                    segment_ids=segment_ids, impl=self.impl)  # [B, T, H, V]
        o = self.o_norm(o).reshape(b, t, -1) * jax.nn.silu(self.r_proj(x))
        return self.o_proj(o), None if cache is None else {"state": state}
