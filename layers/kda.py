"""KDA mixer: Kimi Delta Attention (Kimi Team 2025, "Kimi Linear"), fla's parametrisation.

    q, k, v = SiLU(conv4(x W_q)), SiLU(conv4(x W_k)), SiLU(conv4(x W_v))   # separate causal convs
    q, k = q / ‖q‖, k / ‖k‖                              # per head (use_qk_l2norm)
    g = −exp(A_log_j) · softplus(x W_f1 W_f2 + dt_bias)   # [B, T, HV, K] per-channel log decay
    β = sigmoid(x W_β)                                   # [B, T, HV]
    S'_t = Diag(exp(g_t)) S_{t−1};  S_t = S'_t + k_t (β_t (v_t − S'_tᵀ k_t))ᵀ
    o_t = K^−1/2 S_tᵀ q_t
    y = (RMSNorm_head(o) ⊙ sigmoid(x W_r1 W_r2 + b_r)) W_o      # gated RMSNorm, sigmoid gate

The decay and the output gate come from low-rank projections d -> V -> HV·K (no bias) and
d -> V -> HV·V (with bias), V the value head width, as Kimi Linear. A_log [HV] (A ~ U(1, 16))
and dt_bias [HV, K] (inverse softplus of dt ~ logU(1e-3, 1e-1)) are excluded from weight decay.
More value heads than q/k heads are allowed (`num_v_heads`, grouped as in the op: value head j
reads q/k head j // (HV / H)); the gates have HV heads. The norm is one RMSNorm applied to every
value head (its weight shared by the heads, as fla). The cache holds the last conv_size − 1
inputs of each convolution and the state [B, HV, K, V] (float32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import CausalConv1d, Linear, RMSNorm, make_param
from pallas_kernels.common.frame import sequence_or_step
from pallas_kernels.kda import kda, kda_step

__all__ = ["KDA"]


class KDA(nnx.Module):
    def __init__(self, d_model: int, *, num_heads: int, head_dim: int | None = None,
                 num_v_heads: int | None = None, expand_v: float = 1.0, conv_size: int = 4,
                 norm_eps: float = 1e-5, impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        head_dim = head_dim or d_model // num_heads
        num_v_heads = num_v_heads or num_heads
        if num_v_heads % num_heads:
            raise ValueError(f"KDA: num_v_heads ({num_v_heads}) must be a multiple of "
                             f"num_heads ({num_heads})")
        v_dim = int(head_dim * expand_v)
        if v_dim != head_dim * expand_v or v_dim < 1:
            raise ValueError(f"KDA: head_dim·expand_v ({head_dim}·{expand_v}) must be a positive "
                             f"integer")
        if conv_size < 1:
            raise ValueError(f"KDA: conv_size must be >= 1, got {conv_size}")
        self.h, self.hv, self.k_dim, self.v_dim = num_heads, num_v_heads, head_dim, v_dim
        self.impl, self.dtype = impl, dtype
        qk, vv, gk = num_heads * head_dim, num_v_heads * v_dim, num_v_heads * head_dim
        lin = lambda n_out: Linear(d_model, n_out, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = lin(qk), lin(qk), lin(vv)
        conv = lambda c: CausalConv1d(c, conv_size, activation=True, axis_name="heads",
                                      dtype=dtype, rngs=rngs)
        self.q_conv, self.k_conv, self.v_conv = conv(qk), conv(qk), conv(vv)
        # Low-rank decay and output-gate projections; the rank dim V stays replicated.
        down = lambda: Linear(d_model, v_dim, axes=("embed", None), dtype=dtype, rngs=rngs)
        self.f_down = down()
        self.f_up = Linear(v_dim, gk, axes=(None, "heads"), dtype=dtype, rngs=rngs)
        self.b_proj = lin(num_v_heads)
        self.r_down = down()
        self.r_up = Linear(v_dim, vv, axes=(None, "heads"), use_bias=True, dtype=dtype, rngs=rngs)
        key_a, key_dt = jax.random.split(rngs.params())
        a = jax.random.uniform(key_a, (num_v_heads,), jnp.float32, 1.0, 16.0)
        dt = jnp.exp(jax.random.uniform(key_dt, (num_v_heads, head_dim), jnp.float32,
                                        math.log(1e-3), math.log(1e-1)))
        dt = jnp.maximum(dt, 1e-4)
        self.A_log = make_param(None, jnp.log(a), (num_v_heads,), ("heads",), no_decay=True)
        self.dt_bias = make_param(None, dt + jnp.log(-jnp.expm1(-dt)), (num_v_heads, head_dim),
                                  ("heads", None), no_decay=True)  # inverse softplus of dt
        self.o_norm = RMSNorm(v_dim, eps=norm_eps, dtype=dtype)
        self.o_proj = Linear(vv, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def _convs(self):
        return {"q": self.q_conv, "k": self.k_conv, "v": self.v_conv}

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        cache = {f"conv_{n}": c.init_cache(batch, dtype) for n, c in self._convs().items()}
        cache["state"] = jnp.zeros((batch, self.hv, self.k_dim, self.v_dim), jnp.float32)
        return cache

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """One row's decode cache, independent of context_len: the state 4·HV·K·V (float32
        whatever `dtype`) + the conv inputs (conv_size − 1)·(2·H·K + HV·V)·itemsize(dtype)."""
        conv = sum(c.cache_bytes(dtype) for c in self._convs().values())
        return 4 * self.hv * self.k_dim * self.v_dim + conv

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, independent of seq_len:
        2·d·(2·H·K + HV·V) (q, k, v) + 2·d·HV (β) + 2·(d·V + V·HV·K) (low-rank decay)
        + 2·(d·V + V·HV·V) (low-rank output gate) + 2·HV·V·d (o)
        + 2·(2·H·K + HV·V)·conv_size (convs)
        + 7·HV·K·V (recurrent form per value head: decay Diag(α)S K·V, prediction S'ᵀk 2·K·V,
        rank-1 update 2·K·V, readout Sᵀq 2·K·V). Gates, L2 norms and the norm are O(d)."""
        projs = (self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.f_down, self.f_up,
                 self.r_down, self.r_up, self.o_proj)
        conv = sum(c.flops_per_token() for c in self._convs().values())
        return float(sum(p.flops_per_token() for p in projs) + conv
                     + 7 * self.hv * self.k_dim * self.v_dim)

    def gates(self, x):
        """(g [B, T, HV, K] <= 0, β [B, T, HV] in (0, 1)), float32."""
        b, t, _ = x.shape
        f = self.f_up(self.f_down(x)).astype(jnp.float32).reshape(b, t, self.hv, self.k_dim)
        a = jnp.exp(self.A_log[...])[:, None]  # [HV, 1]
        g = -a * jax.nn.softplus(f + self.dt_bias[...])
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        return g, beta

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
        v = mixed["v"].reshape(b, t, self.hv, self.v_dim)
        g, beta = self.gates(x)
        o, state = sequence_or_step(kda, kda_step, q, k, v, g, beta,
                                    state=None if cache is None else cache["state"],
                                    segment_ids=segment_ids, impl=self.impl,
                                    use_qk_l2norm=True)  # [B, T, HV, V]
        gate = jax.nn.sigmoid(self.r_up(self.r_down(x)).astype(jnp.float32))  # [B, T, HV·V]
        o = (self.o_norm(o).reshape(b, t, -1).astype(jnp.float32) * gate).astype(self.dtype)
        new_cache = None if cache is None else {**new_cache, "state": state}
        return self.o_proj(o), new_cache
