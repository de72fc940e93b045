"""Kernel layouts: what a Pallas kernel needs, built from and undone into the public layout.

Public arrays are time-major per head, ``[B, T, H, D]`` (gates ``[B, T, H]``); the kernels work
heads-major, ``[B, H, Tp, Dp]`` (gates ``[B, H, Tp]``), with T zero-padded to a multiple of the
chunk (a zero token with zero log decay leaves every state alone, so the padding is exact) and
features zero-padded to the kernel's width rule (exact: a zero feature adds nothing to a dot
product). Every op's ``ops.py`` uses these two functions and ``chunk_cumsum``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import next_pow2, pad_axis

__all__ = ["to_kernel_layout", "from_kernel_layout", "chunk_cumsum", "triton_width", "tpu_width",
           "block_split", "block_merge"]


def triton_width(d: int) -> int:
    """Feature width of a Triton tile: a power of two >= 16 (tl.dot's minimum)."""
    return next_pow2(max(d, 16))


def tpu_width(d: int) -> int:
    """Feature width of a TPU block: a multiple of 128 lanes."""
    return -(-d // 128) * 128


def to_kernel_layout(x: jax.Array, chunk: int, width: int | None = None) -> jax.Array:
    """[B, T, H, D] -> [B, H, Tp, Dp] (or [B, T, H] -> [B, H, Tp]), zero-padded (module doc)."""
    x = pad_axis(x, 1, chunk)
    if width is not None and x.ndim == 4:
        x = pad_axis(x, 3, width)
    return jnp.moveaxis(x, 2, 1)


def from_kernel_layout(x: jax.Array, length: int, features: int | None = None) -> jax.Array:
    """[B, H, Tp, Dp] -> [B, T, H, D]: the inverse of :func:`to_kernel_layout`."""
    x = jnp.moveaxis(x, 1, 2)[:, :length]
    return x[..., :features] if features is not None and x.ndim == 4 else x


def chunk_cumsum(g: jax.Array, chunk: int) -> jax.Array:
    """[B, H, Tp(, K)] -> the cumulative sum of g inside each chunk of ``chunk`` tokens."""
    b, h, t = g.shape[:3]
    return jnp.cumsum(g.reshape(b, h, t // chunk, chunk, *g.shape[3:]), axis=3).reshape(g.shape)


def block_split(x: jax.Array, m: int, c: int) -> jax.Array:
    """[M*C, H, *F] -> [H, M, C, *F]: one block of M chunks of C tokens, heads leading (the
    chunked forms' layout inside a scan over blocks)."""
    x = x.reshape(m, c, *x.shape[1:])
    return jnp.moveaxis(x, 2, 0)


def block_merge(x: jax.Array) -> jax.Array:
    """[H, M, C, *F] -> [M*C, H, *F]: the inverse of :func:`block_split`."""
    h, m, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 2).reshape(m * c, h, *x.shape[3:])
