"""GatedDeltaNet mixer (Yang et al., "Gated Delta Networks: Improving Mamba2 with Delta Rule").

    q, k, v = SiLU(conv4_q(x W_q)), SiLU(conv4_k(x W_k)), SiLU(conv4_v(x W_v))  # causal, depthwise
    β_t = sigmoid(x_t W_β),  g_t = −exp(A_log) · softplus(x_t W_a + dt_bias)   # [B, T, HV]
    o = gated_delta_rule(q, k, v, g, β; L2-normalised q/k, scale K^−1/2)      # [B, T, HV, V]
    y = (RMSNorm(o) ⊙ SiLU(x W_gate)) W_o                                     # per value head

More value heads than q/k heads are allowed (`num_v_heads`, grouped as in the op). A_log and
dt_bias are excluded from weight decay. Each of q, k, v has its own projection and its own short
convolution (the layer contract, `layers/common.py`). The cache holds the three convolutions'
inputs and the recurrent state [B, HV, K, V] (float32); decoding (T = 1) uses the op's
single-step form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import GatedRMSNorm, Linear, StreamConvs, make_param
from pallas_kernels.common.frame import sequence_or_step
from pallas_kernels.gated_delta import gated_delta_rule, gated_delta_rule_step

__all__ = ["GatedDeltaNet"]


class GatedDeltaNet(nnx.Module):
    def __init__(self, d_model: int, *, num_heads: int, head_dim: int | None = None,
                 num_v_heads: int | None = None, expand_v: float = 1.0, conv_size: int = 4,
                 use_gate: bool = True, norm_eps: float = 1e-5, impl: str = "auto",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        head_dim = head_dim or d_model // num_heads
        num_v_heads = num_v_heads or num_heads
        if num_v_heads % num_heads:
            raise ValueError(f"GatedDeltaNet: num_v_heads ({num_v_heads}) must be a multiple of "
                             f"num_heads ({num_heads})")
        v_dim = int(head_dim * expand_v)
        self.h, self.hv, self.k_dim, self.v_dim = num_heads, num_v_heads, head_dim, v_dim
        self.impl, self.dtype = impl, dtype
        qk, vv = num_heads * head_dim, num_v_heads * v_dim
        lin = lambda n_out, axes=("embed", "heads"): Linear(d_model, n_out, axes=axes, dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = lin(qk), lin(qk), lin(vv)
        self.a_proj, self.b_proj = lin(num_v_heads), lin(num_v_heads)
        self.g_proj = lin(vv) if use_gate else None
        self.conv = StreamConvs({"q": qk, "k": qk, "v": vv}, conv_size, activation=True,
                                dtype=dtype, rngs=rngs)
        # A ~ U(1, 16) and dt ~ logU(1e-3, 1e-1) at init, as in Mamba-2 / GatedDeltaNet.
        key_a, key_dt = jax.random.split(rngs.params())
        a = jax.random.uniform(key_a, (num_v_heads,), jnp.float32, 1.0, 16.0)
        dt = jnp.exp(jax.random.uniform(key_dt, (num_v_heads,), jnp.float32,
                                        math.log(1e-3), math.log(1e-1)))
        self.A_log = make_param(None, jnp.log(a), (num_v_heads,), ("heads",), no_decay=True)
        self.dt_bias = make_param(None, dt + jnp.log(-jnp.expm1(-dt)), (num_v_heads,), ("heads",),
                                  no_decay=True)  # inverse softplus of dt
        self.o_norm = GatedRMSNorm(vv, group_size=v_dim, eps=norm_eps, dtype=dtype) if use_gate else None
        self.o_proj = Linear(vv, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return {"conv": self.conv.init_cache(batch, dtype),
                "state": jnp.zeros((batch, self.hv, self.k_dim, self.v_dim), jnp.float32)}

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """One row's decode cache, independent of context_len: the state 4·HV·K·V (float32
        whatever `dtype`) + the q, k, v convs' inputs
        (conv_size − 1)·(2·H·K + HV·V)·itemsize(dtype)."""
        return 4 * self.hv * self.k_dim * self.v_dim + self.conv.cache_bytes(dtype)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, independent of seq_len:
        2·d·(2·H·K + HV·V) (q, k, v) + 2·d·2·HV (a, β) + 2·d·HV·V (gate) + 2·HV·V·d (o)
        + 2·(2·H·K + HV·V)·conv_size (the q, k and v convs)
        + 7·HV·K·V (recurrent form per value head: decay g·S K·V, prediction S'ᵀk 2·K·V,
        rank-1 update k (β(v − S'ᵀk))ᵀ 2·K·V, readout Sᵀq 2·K·V). Gates, L2 norms and the
        output norm are O(d) and not counted."""
        projs = [self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.o_proj]
        if self.g_proj is not None:
            projs.append(self.g_proj)
        state = 7 * self.hv * self.k_dim * self.v_dim
        return float(sum(p.flops_per_token() for p in projs) + self.conv.flops_per_token() + state)

    def _gates(self, x):
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))  # [B, T, HV]
        a = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...]
        g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(a)  # [B, T, HV], <= 0
        return g, beta

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        """x [B, T, d_model] -> (y [B, T, d_model], cache)."""
        b, t, _ = x.shape
        streams, conv_cache = self.conv(
            {"q": self.q_proj(x), "k": self.k_proj(x), "v": self.v_proj(x)},
            segment_ids=segment_ids, cache=None if cache is None else cache["conv"])
        q = streams["q"].reshape(b, t, self.h, self.k_dim)
        k = streams["k"].reshape(b, t, self.h, self.k_dim)
        v = streams["v"].reshape(b, t, self.hv, self.v_dim)
        g, beta = self._gates(x)
        o, state = sequence_or_step(gated_delta_rule, gated_delta_rule_step, q, k, v, g, beta,
                                    state=None if cache is None else cache["state"],
                                    segment_ids=segment_ids, impl=self.impl, use_qk_l2norm=True)
        new_cache = None if cache is None else {"conv": conv_cache, "state": state}
        o = o.reshape(b, t, self.hv * self.v_dim)
        if self.o_norm is not None:
            o = self.o_norm(o, self.g_proj(x))
        return self.o_proj(o), new_cache
