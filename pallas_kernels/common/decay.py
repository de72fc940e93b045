"""Intra-chunk scores under a per-key-channel decay, stable for any decay strength.

The chunked forms of the vector-gated ops (gla, kda) need, inside a chunk of C tokens with
cumulative log decay G [C, K] (G_i = Σ_{u <= i} g_u, non-increasing along C),

    A[i, j] = Σ_k a[i, k] b[j, k] exp(G[i, k] − G[j, k])      for j <= i (j < i when strict).

The obvious matmul (a ∘ e^{G}) (b ∘ e^{−G})ᵀ overflows: e^{−G} is e^{100} and more once the
cumulative decay reaches −100 inside a chunk, and e^{G} underflows to 0 in the same place, so
the product is inf · 0. Every factor used here is instead e^{x} with x <= 0:

* Split C into sub-chunks of s tokens. A block of A whose query rows lie in sub-chunk p and key
  columns in an earlier sub-chunk is a matmul factored around r = the first row of sub-chunk p:

      A[i, j] = Σ_k (a[i, k] e^{G[i, k] − G[r, k]}) (b[j, k] e^{G[r, k] − G[j, k]}),

  with i >= r > j, so G_i <= G_r <= G_j and both exponents are <= 0. If either factor underflows,
  the true term is at most that small: the error is absolute and below float32's tiny.
* The diagonal s×s blocks (i and j in the same sub-chunk) take exp of the pairwise differences
  [s, s, K] directly, masked to j <= i *before* exp, so masked entries never overflow and their
  gradients are exactly 0.

Work: the off-diagonal matmuls cost C²K (as the unstable form), the pairwise part C·s·K exps
and multiplies, plus C·K·(C/s) exps for the key factors.

Fast path: when the decay spread of the chunk (max − min of G along C, over every channel and
every chunk of the call) is at most ``FACTOR_SPREAD``, one matmul factored around the chunk's
first row, (a ∘ e^{G − G_0}) (b ∘ e^{G_0 − G})ᵀ, is exact to float32 rounding: every factor lies
in [e^{−spread}, e^{spread}], far from overflow and underflow, and the relative error of a factor
is at most spread · 2⁻²⁴ (≈ 1e-6), the size of G's own rounding. A ``lax.cond`` picks the path
at run time, so strong decays take the sub-chunk path and only pay for it where they occur.
Everything is differentiable by autodiff with finite gradients.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

__all__ = ["decayed_scores", "FACTOR_SPREAD"]

_HI = lax.Precision.HIGHEST
FACTOR_SPREAD = 20.0         # largest decay spread in a chunk for the one-matmul path (doc)


def _pad_rows(x, rows, mode):
    """Pad axis -2 of x to ``rows`` (zeros, or the last row repeated: G stays non-increasing)."""
    extra = rows - x.shape[-2]
    if extra == 0:
        return x
    widths = [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)]
    return jnp.pad(x, widths, mode=mode)


def _masked_exp(x, mask):
    """exp(x) where mask, else 0; x is replaced by −inf before exp (no overflow, zero gradient)."""
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


def _causal(n, strict):
    i = jnp.arange(n)
    return (i[None, :] < i[:, None]) if strict else (i[None, :] <= i[:, None])   # [n, n]


def _factored(a, b, G, strict):
    """One matmul around the chunk's first row; exact only for a small spread (module doc)."""
    G_0 = G[..., :1, :]                                                    # [..., 1, K]
    a_f = a * jnp.exp(G - G_0)                                             # [..., C, K]
    b_f = b * jnp.exp(G_0 - G)
    A = jnp.einsum("...ik,...jk->...ij", a_f, b_f, precision=_HI,
                   preferred_element_type=jnp.float32)                     # [..., C, C]
    return jnp.where(_causal(a.shape[-2], strict), A, 0.0)


def decayed_scores(a, b, G, *, sub_chunk=16, strict=False):
    """a, b [..., C, K]; G [..., C, K] the within-chunk cumulative log decay (non-increasing along C).

    Returns A [..., C, C] float32: A[i, j] = Σ_k a[i,k] b[j,k] exp(G[i,k] − G[j,k]) for j <= i
    (j < i when strict), 0 above. Stable for any decay strength (module docstring).
    """
    if a.shape != b.shape or a.shape != G.shape or a.ndim < 2:
        raise ValueError(f"decayed_scores: a, b and G must share one shape [..., C, K], got "
                         f"{list(a.shape)}, {list(b.shape)}, {list(G.shape)}")
    if int(sub_chunk) < 1:
        raise ValueError(f"decayed_scores: sub_chunk must be a positive int, got {sub_chunk}")
    f32 = jnp.float32
    a, b, G = a.astype(f32), b.astype(f32), G.astype(f32)
    if min(int(sub_chunk), a.shape[-2]) == a.shape[-2]:
        return _sub_chunked(a, b, G, sub_chunk, strict)                    # pairwise anyway
    spread = jnp.max(jnp.max(G, axis=-2) - jnp.min(G, axis=-2))
    return lax.cond(spread <= FACTOR_SPREAD,
                    lambda x, y, z: _factored(x, y, z, strict),
                    lambda x, y, z: _sub_chunked(x, y, z, sub_chunk, strict), a, b, G)


def _sub_chunked(a, b, G, sub_chunk, strict):
    """Sub-chunk path, stable for any decay (module docstring)."""
    f32 = jnp.float32
    *lead, C, K = a.shape
    s = min(int(sub_chunk), C)
    n = -(-C // s)
    cp = n * s
    a, b = _pad_rows(a, cp, "constant"), _pad_rows(b, cp, "constant")    # [..., Cp, K]
    G = _pad_rows(G, cp, "edge")
    split = lambda x: x.reshape(*lead, n, s, K)                            # [..., n, s, K]
    a_s, b_s, G_s = split(a), split(b), split(G)

    # diagonal s×s blocks, pairwise: [..., n, s(i), s(j), K]
    keep = _causal(s, strict)                                              # [s, s]
    e = _masked_exp(G_s[..., :, None, :] - G_s[..., None, :, :], keep[:, :, None])
    diag = jnp.sum(a_s[..., :, None, :] * b_s[..., None, :, :] * e, axis=-1)   # [..., n, s, s]
    eye = jnp.eye(n, dtype=f32)
    A = (diag[..., :, :, None, :] * eye[:, None, :, None]).reshape(*lead, cp, cp)
    if n == 1:
        return A[..., :C, :C]

    # off-diagonal blocks, factored around each query sub-chunk's first row r = p·s
    G_r = G_s[..., :, 0, :]                                                # [..., n, K]
    a_f = a_s * jnp.exp(G_s - G_r[..., :, None, :])                        # [..., n, s, K]
    earlier = jnp.arange(cp)[None, :] < (jnp.arange(n) * s)[:, None]      # [n, Cp]: j < p·s
    b_f = b[..., None, :, :] * _masked_exp(G_r[..., :, None, :] - G[..., None, :, :],
                                           earlier[:, :, None])           # [..., n, Cp, K]
    off = jnp.einsum("...pik,...pjk->...pij", a_f, b_f, precision=_HI,
                     preferred_element_type=f32)                           # [..., n, s, Cp]
    A = A + off.reshape(*lead, cp, cp)
    return A[..., :C, :C]
