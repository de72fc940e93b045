"""Mamba-2 SSD (state-space duality) as a thin wrapper over simple_gla, mamba_ssm argument names.

    dt'_t = clip(softplus(dt_t + dt_bias), *dt_limit)          (softplus only if dt_softplus)
    h_t   = exp(dt'_t A) h_{t-1} + dt'_t x_t B_tᵀ              h: [P, N] per head
    y_t   = h_t C_t + D x_t,   then y_t · silu(z_t) when z is given

x ``[B, T, H, P]``, dt ``[B, T, H]``, A ``[H]`` (< 0), B/C ``[B, T, G, N]`` with head h using group
h // (H / G), D ``[H]`` or ``[H, P]``, z like x. Through simple_gla: q = C, k = B (grouped heads),
v = dt'·x, g = dt'·A, scale = 1, so its key-major state [N, P] is mamba's [P, N] transposed at
the boundary (``initial_state`` and the returned state use mamba's [B, H, P, N]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import check_float, check_shape
from pallas_kernels.simple_gla.ops import _check_rank, simple_gla, simple_gla_step

__all__ = ["ssd", "ssd_step"]

_OP = "ssd"


def _check(op, x, dt, a, b, c, d, z, dt_bias, state, state_name, time_axis):
    """Shape/dtype checks shared by ssd (time_axis=True) and ssd_step (no T axis)."""
    lead = ("B", "T") if time_axis else ("B",)
    check_float(op, x=x, dt=dt, A=a, B=b, C=c, D=d, z=z, dt_bias=dt_bias, **{state_name: state})
    _check_rank(op, "x", x, lead + ("H", "P"))
    _check_rank(op, "B", b, lead + ("G", "N"))
    bt = x.shape[:-2]
    h, p = x.shape[-2:]
    check_shape(op, "dt", dt, bt + (h,))
    check_shape(op, "A", a, (h,))
    check_shape(op, "B", b, bt + (None, None))
    grp, n = b.shape[-2:]
    if h % grp:
        raise ValueError(f"{op}: x has {h} heads, which is not a multiple of the {grp} B/C groups")
    check_shape(op, "C", c, bt + (grp, n))
    if d is not None and tuple(d.shape) not in ((h,), (h, p)):
        raise ValueError(f"{op}: D must have shape [{h}] or [{h}, {p}], got {list(d.shape)}")
    if z is not None:
        check_shape(op, "z", z, x.shape)
    if dt_bias is not None:
        check_shape(op, "dt_bias", dt_bias, (h,))
    if state is not None:
        check_shape(op, state_name, state, (x.shape[0], h, p, n))


def _discretize(x, dt, a, dt_bias, dt_softplus, dt_limit):
    """dt' = clip(softplus(dt + dt_bias)); returns (v = dt'·x in x.dtype, g = dt'·A) float32."""
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = jnp.clip(dt, lo, hi)
    v = (dt[..., None] * x.astype(jnp.float32)).astype(x.dtype)
    return v, dt * a.astype(jnp.float32)


def _finish(y, x, d, z):
    """y + D x, then y·silu(z); float32 in, x.dtype out."""
    if d is not None:
        dd = d.astype(jnp.float32)
        y = y + (dd[:, None] if dd.ndim == 1 else dd) * x.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(x.dtype)


def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=True,
        dt_limit=(0.0, float("inf")), initial_state=None, output_final_state=False,
        segment_ids=None, impl="auto", interpret=False):
    """Mamba-2 SSD over a sequence (see the module docstring for the math).

    Returns (y [B, T, H, P] in x.dtype, final_state [B, H, P, N] float32 or None).
    """
    _check(_OP, x, dt, A, B, C, D, z, dt_bias, initial_state, "initial_state", True)
    v, g = _discretize(x, dt, A, dt_bias, dt_softplus, dt_limit)       # [B,T,H,P], [B,T,H]
    s0 = None if initial_state is None else jnp.swapaxes(initial_state, -1, -2)  # [B, H, N, P]
    y, state = simple_gla(C, B, v, g, scale=1.0, initial_state=s0,
                          output_final_state=output_final_state, segment_ids=segment_ids,
                          impl=impl, interpret=interpret)
    y = _finish(y.astype(jnp.float32), x, D, z)
    return y, (None if state is None else jnp.swapaxes(state, -1, -2))


def ssd_step(x, dt, A, B, C, state, *, D=None, z=None, dt_bias=None, dt_softplus=True,
             dt_limit=(0.0, float("inf"))):
    """One decoding step: x [B, H, P], dt [B, H], B/C [B, G, N], state [B, H, P, N].

    Returns (y [B, H, P] in x.dtype, new_state [B, H, P, N] float32).
    """
    _check("ssd_step", x, dt, A, B, C, D, z, dt_bias, state, "state", False)
    v, g = _discretize(x, dt, A, dt_bias, dt_softplus, dt_limit)       # [B, H, P], [B, H]
    y, new_state = simple_gla_step(C, B, v.astype(jnp.float32), g, jnp.swapaxes(state, -1, -2),
                                   scale=1.0)
    y = _finish(y, x, D, z)
    return y, jnp.swapaxes(new_state, -1, -2)
