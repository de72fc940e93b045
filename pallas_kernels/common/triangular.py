"""Inverse of a unit lower-triangular matrix, batched, from matmuls only.

The chunked delta-rule forms (gated_delta_rule, kda) build, per chunk of C tokens, a strictly
lower-triangular A [C, C] and need T = (I + A)^{-1} (the WY / UT transform). XLA's
``triangular_solve`` is several times slower on CPU for many small systems than the batched
matmuls below, and matmuls are what accelerators run fastest.

Gradient: T = (I + A)^{-1} gives dA = −Tᵀ dT Tᵀ (restricted to the strict lower triangle by the
caller); plain autodiff through :func:`unit_lower_inverse` also works (it is matmuls and slices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["BASE_BLOCK", "diag_blocks", "unit_lower_inverse"]

_HI = lax.Precision.HIGHEST
BASE_BLOCK = 16             # diagonal blocks inverted by the product formula


def diag_blocks(a: jax.Array, b: int) -> jax.Array:
    """[..., C, C] -> [..., C // b, b, b]: the diagonal b×b blocks (static slices; a
    ``jnp.diagonal`` formulation trips an XLA:CPU layout RET_CHECK in some batch layouts)."""
    n = a.shape[-1] // b
    return jnp.stack([a[..., i * b:(i + 1) * b, i * b:(i + 1) * b] for i in range(n)], axis=-3)


def _inverse_product(a: jax.Array) -> jax.Array:
    """(I + A)^{-1} = ∏_i (I + (−A)^{2^i}) for strictly lower A [..., b, b] (A^b = 0)."""
    b = a.shape[-1]
    t = jnp.eye(b, dtype=a.dtype) - a
    p = -a
    for _ in range(max(0, (b - 1).bit_length() - 1)):
        p = jnp.matmul(p, p, precision=_HI)
        t = t + jnp.matmul(t, p, precision=_HI)
    return t


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """T = (I + A)^{-1} for strictly lower-triangular A [..., C, C].

    Diagonal blocks of up to 16 by the product formula, then block doubling: splitting into 2×2
    blocks, T = [[T11, 0], [−T22 A21 T11, T22]]. Batched matmuls only.
    """
    C = a.shape[-1]
    b = min(BASE_BLOCK, C)
    while C % b or (C // b) & (C // b - 1):                              # C / b a power of two
        b -= 1
    t = _inverse_product(diag_blocks(a, b))                              # [..., C/b, b, b]
    while b < C:
        a21 = diag_blocks(a, 2 * b)[..., b:, :b]                          # [..., C/2b, b, b]
        t = t.reshape(*t.shape[:-3], t.shape[-3] // 2, 2, b, b)
        t11, t22 = t[..., 0, :, :], t[..., 1, :, :]
        t21 = -jnp.matmul(t22, jnp.matmul(a21, t11, precision=_HI), precision=_HI)
        t = jnp.concatenate([jnp.concatenate([t11, jnp.zeros_like(t11)], -1),
                             jnp.concatenate([t21, t22], -1)], -2)
        b *= 2
    return t[..., 0, :, :]
