"""Mamba-2 block (Dao & Gu, "Transformers are SSMs", 2024) with SSD through simple_gla.

    [z, xBC, dt] = x W_in;   xBC = SiLU(conv4(xBC));   [x, B, C] = split(xBC)
    y = ssd(x, dt, A = −exp(A_log), B, C, D, dt_bias)      # h_t = exp(dt'A) h + dt' x Bᵀ ; y = hC + Dx
    out = RMSNorm(y ⊙ SiLU(z)) W_out                         # gated norm, per group

x [B, T, H, P] (d_inner = expand·d_model = H·P), B/C [B, T, G, N] shared by H/G heads each.
A_log, D and dt_bias are excluded from weight decay. The cache holds the convolution inputs and
the SSM state [B, H, P, N] (float32, mamba_ssm layout).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import CausalConv1d, GatedRMSNorm, Linear, make_param
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
        conv_dim = d_inner + 2 * n_groups * d_state
        self.in_proj = Linear(d_model, d_inner + conv_dim + num_heads, axes=("embed", "heads"),
                              dtype=dtype, rngs=rngs)
        self.conv = CausalConv1d(conv_dim, conv_size, activation=True, use_bias=True, dtype=dtype,
                                 rngs=rngs)
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
        whatever `dtype`) + the conv inputs (conv_size − 1)·(d_inner + 2·G·N)·itemsize(dtype)."""
        return 4 * self.h * self.p * self.n + self.conv.cache_bytes(dtype)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, independent of seq_len:
        2·d·(2·d_inner + 2·G·N + H) (in_proj: z, xBC, dt) + 2·d_inner·d (out_proj)
        + 2·(d_inner + 2·G·N)·conv_size (conv)
        + 5·H·P·N (recurrent form: decay exp(dt'A)·h P·N, update dt'·x Bᵀ 2·P·N, readout h C
        2·P·N). The D skip, softplus and the gated norm are O(d) and not counted."""
        state = 5 * self.h * self.p * self.n
        return float(self.in_proj.flops_per_token() + self.out_proj.flops_per_token()
                     + self.conv.flops_per_token() + state)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        b, t, _ = x.shape
        zxbcdt = self.in_proj(x)
        di, gn = self.d_inner, self.g * self.n
        z, xbc, dt = zxbcdt[..., :di], zxbcdt[..., di:2 * di + 2 * gn], zxbcdt[..., 2 * di + 2 * gn:]
        xbc, conv_cache = self.conv(xbc, segment_ids=segment_ids,
                                    cache=None if cache is None else cache["conv"])
        xs = xbc[..., :di].reshape(b, t, self.h, self.p)
        bm = xbc[..., di:di + gn].reshape(b, t, self.g, self.n)
        cm = xbc[..., di + gn:].reshape(b, t, self.g, self.n)
        a = -jnp.exp(self.A_log[...])
        args = dict(D=self.D[...], dt_bias=self.dt_bias[...], dt_softplus=True)
        new_cache = None
        if cache is not None and t == 1 and segment_ids is None:
            y, state = ssd_step(xs[:, 0], dt[:, 0], a, bm[:, 0], cm[:, 0], cache["state"], **args)
            y = y[:, None]
        else:
            y, state = ssd(xs, dt, a, bm, cm, initial_state=None if cache is None else cache["state"],
                           output_final_state=cache is not None, segment_ids=segment_ids,
                           impl=self.impl, **args)
        if cache is not None:
            new_cache = {"conv": conv_cache, "state": state}
        y = self.norm(y.reshape(b, t, di), z)
        return self.out_proj(y), new_cache
