"""Mamba-2 block (Dao & Gu, "Transformers are SSMs", 2024) with SSD through simple_gla.

    z, x', B, C, dt = x W_z, x W_x, x W_B, x W_C, x W_dt        # one projection per stream
    x', B, C = SiLU(conv4_x(x')), SiLU(conv4_B(B)), SiLU(conv4_C(C))   # one short conv each
    y = ssd(x', dt, A = −exp(A_log), B, C, D, dt_bias)   # h_t = exp(dt'A) h + dt' x' Bᵀ; y = hC + Dx'
    out = RMSNorm(y ⊙ SiLU(z)) W_out                       # gated norm, per group

x [B, T, H, P] (d_inner = expand·d_model = H·P), B/C [B, T, G, N] shared by H/G heads each.
mamba_ssm fuses the five projections into one `in_proj` and the three convolutions into one over
[x | B | C], then slices them apart; here each stream has its own projection and convolution (the
layer contract, `layers/common.py`) — the same math, as a depthwise conv is per channel. z, x
and dt are sharded with the heads; B and C (G·N wide, shared by the heads) are replicated.
A_log, D and dt_bias are excluded from weight decay. The cache holds the three convolutions'
inputs and the SSM state [B, H, P, N] (float32, mamba_ssm layout).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import GatedRMSNorm, Linear, StreamConvs, make_param
from pallas_kernels.common.frame import sequence_or_step
from pallas_kernels.simple_gla import ssd, ssd_step

__all__ = ["Mamba2"]


class Mamba2(nnx.Module):
    def __init__(self, d_model: int, *, num_heads: int, expand: int = 2, d_state: int = 64,
                 n_groups: int = 1, conv_size: int = 4, dt_min: float = 1e-3, dt_max: float = 0.1,
                 impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        d_inner = expand * d_model
        if d_inner % num_heads or num_heads % n_groups:
            raise ValueError(f"Mamba2: d_inner ({d_inner}) must be divisible by num_heads "
                             f"({num_heads}) and num_heads by n_groups ({n_groups})")
        self.d_inner, self.h, self.p = d_inner, num_heads, d_inner // num_heads
        self.g, self.n = n_groups, d_state
        self.impl, self.dtype = impl, dtype
        gn = n_groups * d_state
        lin = lambda n_out, axes=("embed", "heads"): Linear(d_model, n_out, axes=axes, dtype=dtype,
                                                            rngs=rngs)
        self.z_proj, self.x_proj = lin(d_inner), lin(d_inner)
        self.B_proj, self.C_proj = lin(gn, ("embed", None)), lin(gn, ("embed", None))
        self.dt_proj = lin(num_heads)
        self.conv = StreamConvs({"x": d_inner, "B": gn, "C": gn}, conv_size, activation=True,
                                use_bias=True, shared=("B", "C"), dtype=dtype, rngs=rngs)
        key_a, key_dt = jax.random.split(rngs.params())
        a = jax.random.uniform(key_a, (num_heads,), jnp.float32, 1.0, 16.0)
        dt = jnp.exp(jax.random.uniform(key_dt, (num_heads,), jnp.float32, math.log(dt_min),
                                        math.log(dt_max)))
        self.A_log = make_param(None, jnp.log(a), (num_heads,), ("heads",), no_decay=True)
        self.dt_bias = make_param(None, dt + jnp.log(-jnp.expm1(-dt)), (num_heads,), ("heads",),
                                  no_decay=True)
        self.D = make_param(None, jnp.ones((num_heads,), jnp.float32), (num_heads,), ("heads",),
                            no_decay=True)
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // n_groups, norm_before_gate=False,
                                 dtype=dtype)
        self.out_proj = Linear(d_inner, d_model, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return {"conv": self.conv.init_cache(batch, dtype),
                "state": jnp.zeros((batch, self.h, self.p, self.n), jnp.float32)}

    def cache_bytes(self, context_len: int, dtype=jnp.bfloat16) -> int:
        """One row's decode cache, independent of context_len: the SSM state 4·H·P·N (float32
        whatever `dtype`) + the x, B, C convs' inputs
        (conv_size − 1)·(d_inner + 2·G·N)·itemsize(dtype)."""
        return 4 * self.h * self.p * self.n + self.conv.cache_bytes(dtype)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, independent of seq_len:
        2·d·(2·d_inner + 2·G·N + H) (z, x, B, C, dt) + 2·d_inner·d (out_proj)
        + 2·(d_inner + 2·G·N)·conv_size (the x, B and C convs)
        + 5·H·P·N (recurrent form: decay exp(dt'A)·h P·N, update dt'·x Bᵀ 2·P·N, readout h C
        2·P·N). The D skip, softplus and the gated norm are O(d) and not counted."""
        state = 5 * self.h * self.p * self.n
        projs = (self.z_proj, self.x_proj, self.B_proj, self.C_proj, self.dt_proj, self.out_proj)
        return float(sum(p.flops_per_token() for p in projs) + self.conv.flops_per_token() + state)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        b, t, _ = x.shape
        streams, conv_cache = self.conv(
            {"x": self.x_proj(x), "B": self.B_proj(x), "C": self.C_proj(x)},
            segment_ids=segment_ids, cache=None if cache is None else cache["conv"])
        xs = streams["x"].reshape(b, t, self.h, self.p)
        bm = streams["B"].reshape(b, t, self.g, self.n)
        cm = streams["C"].reshape(b, t, self.g, self.n)
        dt = self.dt_proj(x)  # [B, T, H]
        a = -jnp.exp(self.A_log[...])  # [H]: a constant of the op, not a per-token array
        args = dict(D=self.D[...], dt_bias=self.dt_bias[...], dt_softplus=True)
        y, state = sequence_or_step(
            lambda xs, dt, bm, cm, **kw: ssd(xs, dt, a, bm, cm, **kw),
            lambda xs, dt, bm, cm, state, **kw: ssd_step(xs, dt, a, bm, cm, state, **kw),
            xs, dt, bm, cm, state=None if cache is None else cache["state"],
            segment_ids=segment_ids, impl=self.impl, **args)
        new_cache = None if cache is None else {"conv": conv_cache, "state": state}
        y = self.norm(y.reshape(b, t, self.d_inner), self.z_proj(x))
        return self.out_proj(y), new_cache
