"""DeltaNet mixer (Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear Transformers with
the Delta Rule over Sequence Length"), fla's parametrisation.

    q, k, v = SiLU(conv4(x W_q)), SiLU(conv4(x W_k)), SiLU(conv4(x W_v))   # separate causal convs
    q, k = q / ‖q‖, k / ‖k‖                     # per head (use_qk_l2norm)
    β_t = sigmoid(x_t W_β)                      # [B, T, H]
    S_t = S_{t−1} + k_t (β_t (v_t − S_{t−1}ᵀ k_t))ᵀ,  o_t = K^−1/2 S_tᵀ q_t
    y = RMSNorm_head(o) W_o                     # use_gate=False (fla's default)
    y = (RMSNorm_head(o) ⊙ SiLU(x W_g)) W_o     # use_gate=True

The delta rule is the gated delta rule with no decay: it runs on `gated_delta_rule` with g = 0.
K = d·expand_k / H, V = d·expand_v / H. The output norm is one RMSNorm applied to every head (its
weight shared by the heads, as fla). The cache holds the last conv_size − 1 inputs of each
convolution and the state [B, H, K, V] (float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import CausalConv1d, Linear, RMSNorm
from pallas_kernels.common.frame import sequence_or_step
from pallas_kernels.gated_delta import gated_delta_rule, gated_delta_rule_step

__all__ = ["DeltaNet"]

class DeltaNet(nnx.Module):
    def __init__(self, d_model: int, *, num_heads: int, expand_k: float = 1.0,
                 expand_v: float = 1.0, conv_size: int = 4, use_gate: bool = False,
                 norm_eps: float = 1e-5, impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"DeltaNet: key dim d_model·expand_k ({key_dim}) and value dim "
                             f"d_model·expand_v ({value_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if conv_size < 1:
            raise ValueError(f"DeltaNet: conv_size must be >= 1, got {conv_size}")
        self.h, self.k_dim, self.v_dim = num_heads, key_dim // num_heads, value_dim // num_heads
        self.impl, self.dtype = impl, dtype
        lin = lambda n_out: Linear(d_model, n_out, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = lin(key_dim), lin(key_dim), lin(value_dim)
        self.b_proj = lin(num_heads)
        conv = lambda c: CausalConv1d(c, conv_size, activation=True, axis_name="heads",
                                      dtype=dtype, rngs=rngs)
        self.q_conv, self.k_conv, self.v_conv = conv(key_dim), conv(key_dim), conv(value_dim)
        self.g_proj = lin(value_dim) if use_gate else None
        self.o_norm = RMSNorm(self.v_dim, eps=norm_eps, dtype=dtype)
        self.o_proj = Linear(value_dim, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def _convs(self):
        return {"q": self.q_conv, "k": self.k_conv, "v": self.v_conv}

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        cache = {f"conv_{n}": c.init_cache(batch, dtype) for n, c in self._convs().items()}
        cache["state"] = jnp.zeros((batch, self.h, self.k_dim, self.v_dim), jnp.float32)
        return cache

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """One row's decode cache, independent of context_len: the state 4·H·K·V (float32
        whatever `dtype`) + the conv inputs (conv_size − 1)·(2·H·K + H·V)·itemsize(dtype)."""
        conv = sum(c.cache_bytes(dtype) for c in self._convs().values())
        return 4 * self.h * self.k_dim * self.v_dim + conv

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, independent of seq_len:
        2·d·(2·H·K + H·V) (q, k, v) + 2·d·H (β) + 2·d·H·V (gate, when used) + 2·H·V·d (o)
        + 2·(2·H·K + H·V)·conv_size (convs)
        + 6·H·K·V (recurrent form: prediction Sᵀk 2·K·V, rank-1 update 2·K·V, readout Sᵀq
        2·K·V; no decay). β, the L2 norms and the output norm are O(d) and not counted."""
        projs = [self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.o_proj]
        if self.g_proj is not None:
            projs.append(self.g_proj)
        conv = sum(c.flops_per_token() for c in self._convs().values())
        return float(sum(p.flops_per_token() for p in projs) + conv
                     + 6 * self.h * self.k_dim * self.v_dim)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        """x [B, T, d_model] -> (y [B, T, d_model], cache)."""
        b, t, _ = x.shape
        projected = {"q": self.q_proj(x), "k": self.k_proj(x), "v": self.v_proj(x)}
        mixed, new_cache = {}, {}
        for n, conv in self._convs().items():
            mixed[n], new_cache[f"conv_{n}"] = conv(
                projected[n], segment_ids=segment_ids,
                cache=None if cache is None else cache[f"conv_{n}"])
        q = mixed["q"].reshape(b, t, self.h, self.k_dim)
        k = mixed["k"].reshape(b, t, self.h, self.k_dim)
        v = mixed["v"].reshape(b, t, self.h, self.v_dim)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))  # [B, T, H]
        g = jnp.zeros((b, t, self.h), jnp.float32)  # no decay
        o, state = sequence_or_step(gated_delta_rule, gated_delta_rule_step, q, k, v, g, beta,
                                    state=None if cache is None else cache["state"],
                                    segment_ids=segment_ids, impl=self.impl,
                                    use_qk_l2norm=True)  # [B, T, H, V]
        o = self.o_norm(o).reshape(b, t, -1)
        if self.g_proj is not None:
            o = o * jax.nn.silu(self.g_proj(x))
        new_cache = None if cache is None else {**new_cache, "state": state}
        return self.o_proj(o), new_cache
