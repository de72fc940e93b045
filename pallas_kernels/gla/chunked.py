"""gla in chunkwise-parallel pure JAX (the CPU default), with a hand-written backward.

Split T into chunks of C tokens. Inside a chunk let G_i = Σ_{u <= i} g_u [K] be the cumulative
log decay from the chunk start (per key channel, <= 0, non-increasing) and S⁻ [K, V] the state
entering the chunk. Unrolling S_t = Diag(e^{g_t}) S_{t-1} + k_t v_tᵀ over the chunk:

    o_i = scale · [ Σ_{j <= i} A_ij v_j  +  (q_i ∘ e^{G_i})ᵀ S⁻ ],
          A_ij = Σ_k q_ik k_jk e^{G_ik − G_jk}                     (common/decay.py)
    S⁺  = Diag(a) S⁻ + Σ_j (k_j ∘ e^{G_last − G_j}) v_jᵀ,    a = e^{G_last}.

Every exponent is a difference taken in the causal direction (G_i − G_j with j <= i,
G_last − G_j, G_i − 0), so no exponential exceeds 1 whatever the decay; ``decayed_scores``
builds A without ever forming e^{−G} (sub-chunks factored around their first row and pairwise
diagonal blocks, or one factored matmul when the chunk's decay spread is provably safe).

Blocks: a ``lax.scan`` runs over blocks of M chunks (about ``BLOCK_ROWS`` token×head rows, so a
block's working set stays in cache: batched matmuls over a whole long sequence are memory bound
on CPU) and carries the state; inside a block the M chunk states follow from the short
elementwise recurrence S_{m+1} = Diag(a_m) S_m + U_m and everything else is batched matmuls over
the block's chunks. [B, T, ...] -> [B·NB, L, ...] is a pure reshape, so the loop reads its inputs
in place; the carried state is re-seeded at every row start.

Packed documents (``segment_ids``): with d_t the document index (number of resets up to t;
padding continues the last document and is a no-op through q = k = 0, g = 0), A keeps only
pairs of one document, a token reads S⁻ only if it is still in the document entering the chunk
(``carry``), S⁺ keeps only tokens of the chunk's last document (``tail``), and a is zeroed when
the chunk holds a reset. Masks remove whole terms, so the formulas keep their form.

Backward (custom_vjp): residuals are the inputs and the state entering each block (no per-token
states, not even one per chunk). A reverse scan over blocks recomputes each block's scores and
chunk states and carries dS = ∂L/∂S and the running gate sum. Per chunk, with dO and dS⁺:

    dA = scale · dO vᵀ (masked like A)         dv = scale · Aᵀ dO + kg dS⁺
    dq = Σ_j dA_ij k_j ∘ e^{G_i − G_j} + scale · e^{G} ∘ (dO S⁻ᵀ)
    dk = Σ_i dA_ij q_i ∘ e^{G_i − G_j} + e^{G_last − G} ∘ (v dS⁺ᵀ)
    dS⁻ = a ∘ dS⁺ + scale · (q ∘ e^{G})ᵀ dO

(the two decayed sums are the VJP of ``decayed_scores`` in its first two arguments, with G held
fixed). The gates follow from an identity, per key channel: every term of L depends on the
global cumulative log decay B only through e^{B_t − B_s} with t on the query (or final-state)
side and s on the key side, or through e^{B_t} on the initial state, so

    ∂L/∂B_t = q_t ∘ dq_t − k_t ∘ dk_t  (+ Σ_v dF ∘ S_final at the last token),
    dg_t = Σ_{u >= t} ∂L/∂B_u.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import (causal_mask, einsum_f32, expand_groups, pad_axis,
                                   segment_masks)
from pallas_kernels.common.layout import block_merge, block_split
from pallas_kernels.common.decay import decayed_scores

__all__ = ["gla_chunked", "DEFAULT_CHUNK", "DEFAULT_SUB_CHUNK", "BLOCK_ROWS"]

DEFAULT_CHUNK = 64
DEFAULT_SUB_CHUNK = 16
BLOCK_ROWS = 1024            # token × head rows per block of chunks (keeps a block in cache)


_mm, _causal = einsum_f32, causal_mask


# ----------------------------------------------------------------------------------------------
# one block of M chunks of one batch row, layout [H, M, C, D]
# ----------------------------------------------------------------------------------------------
_block_split, _block_merge = block_split, block_merge


def _block_setup(xs, m, c, scale, sub, with_vjp=False):
    """Decays, masks and intra-chunk scores of one block.

    xs: q, k, g [L, H, K]; v [L, H, V]; doc, reset [L] or None (L = M·C).
    Returns q, k, v [H, M, C, *], G [H, M, C, K], A [H, M, C, C] (scale included, masked),
    the read and write factors eq = scale·e^{G}∘carry and ek = e^{G_last − G}∘tail
    [H, M, C, K], a [H, M, K], the same-document mask [1, M, C, C] or None, and with
    ``with_vjp`` the VJP of the unscaled scores in (q, k) with G held fixed (else None).
    """
    f32 = jnp.float32
    q, k, v, g, doc, reset = xs
    q, k, v, g = (_block_split(x, m, c) for x in (q, k, v, g))          # [H, M, C, *]
    G = _mm("hmjk,ij->hmik", g, _causal(c).astype(f32))                # cumsum over C
    G_last = G[..., -1, :]                                             # [H, M, K]
    scores = lambda x, y: decayed_scores(x, y, G, sub_chunk=sub)       # [H, M, C, C]
    A, scores_vjp = jax.vjp(scores, q, k) if with_vjp else (scores(q, k), None)
    A = A * scale
    eq = scale * jnp.exp(G)
    ek = jnp.exp(G_last[..., None, :] - G)
    a = jnp.exp(G_last)                                                # [H, M, K]
    same = None
    if doc is not None:
        doc = doc.reshape(1, m, c)                                     # [1, M, C]
        entering = doc[..., 0] - reset.reshape(1, m, c)[..., 0].astype(doc.dtype)  # [1, M]
        carry = doc == entering[..., None]                             # [1, M, C]
        tail = doc == doc[..., -1:]                                    # [1, M, C]
        same = doc[..., :, None] == doc[..., None, :]                  # [1, M, C, C]
        A = jnp.where(same, A, 0.0)
        eq = jnp.where(carry[..., None], eq, 0.0)
        ek = jnp.where(tail[..., None], ek, 0.0)
        a = jnp.where(carry[..., -1:], a, 0.0)
    return q, k, v, G, A, eq, ek, a, same, scores_vjp


def _chunk_states(s_in, kg, v, a):
    """States entering each chunk and leaving the block: ([H, M, K, V], [H, K, V]).

    S_{m+1} = Diag(a_m) S_m + kg_mᵀ v_m, unrolled over the block's M chunks (elementwise).
    """
    u = _mm("hmck,hmcv->hmkv", kg, v)                                  # [H, M, K, V]
    s, prev = s_in, []
    for i in range(u.shape[1]):
        prev.append(s)
        s = a[:, i, :, None] * s + u[:, i]
    return jnp.stack(prev, axis=1), s


def _block_forward(s_in, xs, m, c, scale, sub):
    """Forward of one block: (S_in [H, K, V], inputs) -> (S_out, o [L, H, V])."""
    q, k, v, G, A, eq, ek, a, _, _ = _block_setup(xs, m, c, scale, sub)
    s_prev, s_out = _chunk_states(s_in, k * ek, v, a)
    o = _mm("hmij,hmjv->hmiv", A, v) + _mm("hmck,hmkv->hmcv", q * eq, s_prev)
    return s_out, _block_merge(o)


def _block_backward(ds_out, dg_acc, s_in, xs, do, m, c, scale, sub):
    """Backward of one block: recompute it, return (∂L/∂S_in, dg carry, (dq, dk, dv, dg)).

    ds_out: [H, K, V] cotangent of the state leaving the block; dg_acc: [H, K] Σ of ∂L/∂B over
    the later tokens (and the final-state term); s_in: [H, K, V] the state entering the block
    (saved by the forward pass); do: [L, H, V].
    """
    f32 = jnp.float32
    q, k, v, G, A, eq, ek, a, same, scores_vjp = _block_setup(xs, m, c, scale, sub, True)
    qg, kg = q * eq, k * ek                                            # [H, M, C, K]
    s_prev, _ = _chunk_states(s_in, kg, v, a)                          # [H, M, K, V]
    do = _block_split(do, m, c)                                        # [H, M, C, V]
    # dS⁺ of every chunk: the reverse of the elementwise chunk recurrence
    dh = _mm("hmck,hmcv->hmkv", qg, do)                                # [H, M, K, V]
    ds, ds_next = ds_out, []
    for i in reversed(range(m)):
        ds_next.append(ds)
        ds = a[:, i, :, None] * ds + dh[:, i]
    ds_in, ds_next = ds, jnp.stack(ds_next[::-1], axis=1)              # [H, M, K, V]
    # intra-chunk scores: A = scale·D(q, k, G) masked; dA = dO vᵀ on the same support
    dA = _mm("hmiv,hmjv->hmij", do, v) * scale
    if same is not None:
        dA = jnp.where(same, dA, 0.0)
    dq, dk = scores_vjp(dA)
    dq = dq + _mm("hmcv,hmkv->hmck", do, s_prev) * eq
    dk = dk + _mm("hmcv,hmkv->hmck", v, ds_next) * ek
    dv = _mm("hmij,hmiv->hmjv", A, do) + _mm("hmck,hmkv->hmcv", kg, ds_next)
    # gates: ∂L/∂B = q∘dq − k∘dk, reverse-cumulated over the block, plus the later blocks' sum
    db = q * dq - k * dk                                               # [H, M, C, K]
    tot = jnp.sum(db, axis=2)                                          # [H, M, K]
    dg = _mm("hmik,ij->hmjk", db, _causal(c).astype(f32))             # Σ_{i >= j} in a chunk
    dg = dg + _mm("hmk,ml->hlk", tot, _causal(m, strict=True).astype(f32))[:, :, None]
    dg = dg + dg_acc[:, None, None]
    grads = tuple(_block_merge(x) for x in (dq, dk, dv, dg))
    return ds_in, dg_acc + jnp.sum(tot, axis=1), grads


# ----------------------------------------------------------------------------------------------
# scans over blocks, custom_vjp
# ----------------------------------------------------------------------------------------------
# The scans run over the B·NB blocks of all rows in order; the carried state is re-seeded at every
# row start. Operands of a while loop with a different physical layout are copied in full, so no
# transposes happen outside the loop.
def _to_blocks(x, nb):
    """[B, NB·L, ...] -> [B·NB, L, ...]."""
    if x is None:
        return None
    b, t = x.shape[:2]
    return x.reshape(b * nb, t // nb, *x.shape[2:])


def _from_blocks(x, b):
    """[B·NB, L, ...] -> [B, NB·L, ...]."""
    n, l = x.shape[:2]
    return x.reshape(b, (n // b) * l, *x.shape[2:])


def _forward_scan(q, k, v, g, s0, doc, reset, m, c, scale, sub):
    bsz = q.shape[0]
    nb = q.shape[1] // (m * c)
    xs = tuple(_to_blocks(x, nb) for x in (q, k, v, g, doc, reset))

    def step(s_carry, inputs):
        i, blk = inputs
        s_in = jnp.where(i % nb == 0, s0[i // nb], s_carry)            # [H, K, V]
        s_out, o = _block_forward(s_in, blk, m, c, scale, sub)
        return s_out, (o, s_in, s_out)

    _, (o, s_ins, s_outs) = lax.scan(step, jnp.zeros_like(s0[0]), (jnp.arange(bsz * nb), xs))
    s_final = s_outs.reshape(bsz, nb, *s_outs.shape[1:])[:, -1]        # [B, H, K, V]
    return _from_blocks(o, bsz), s_final, s_ins                        # s_ins: [B·NB, H, K, V]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _core(q, k, v, g, s0, doc, reset, m, c, scale, sub):
    o, s_final, _ = _forward_scan(q, k, v, g, s0, doc, reset, m, c, scale, sub)
    return o, s_final


def _core_fwd(q, k, v, g, s0, doc, reset, m, c, scale, sub):
    o, s_final, s_ins = _forward_scan(q, k, v, g, s0, doc, reset, m, c, scale, sub)
    return (o, s_final), (q, k, v, g, doc, reset, s_final, s_ins)


def _core_bwd(m, c, scale, sub, res, cts):
    q, k, v, g, doc, reset, s_final, s_ins = res
    do, dfinal = cts
    bsz = q.shape[0]
    nb = q.shape[1] // (m * c)
    xs = tuple(_to_blocks(x, nb) for x in (q, k, v, g, doc, reset))
    dg_final = jnp.sum(dfinal * s_final, axis=-1)                      # [B, H, K]

    def step(carry, inputs):
        i, s_in, blk, do_blk = inputs
        last = i % nb == nb - 1
        ds_out = jnp.where(last, dfinal[i // nb], carry[0])            # [H, K, V]
        dg_acc = jnp.where(last, dg_final[i // nb], carry[1])          # [H, K]
        ds_in, dg_acc, grads = _block_backward(ds_out, dg_acc, s_in, blk, do_blk, m, c, scale,
                                               sub)
        return (ds_in, dg_acc), grads + (ds_in,)

    init = (jnp.zeros_like(dfinal[0]), jnp.zeros_like(dg_final[0]))
    _, ys = lax.scan(step, init, (jnp.arange(bsz * nb), s_ins, xs, _to_blocks(do, nb)),
                     reverse=True)
    dq, dk, dv, dg = (_from_blocks(x, bsz) for x in ys[:4])
    ds0 = ys[4].reshape(bsz, nb, *ys[4].shape[1:])[:, 0]                # [B, H, K, V]
    return dq, dk, dv, dg, ds0, None, None


_core.defvjp(_core_fwd, _core_bwd)


def _blocking(n_chunks, rows_per_chunk, target_rows):
    """(NB, M): NB blocks of M chunks covering n_chunks, M·rows_per_chunk ≈ target_rows."""
    m = max(1, min(n_chunks, target_rows // max(1, rows_per_chunk)))
    n_blocks = -(-n_chunks // m)
    return n_blocks, -(-n_chunks // n_blocks)


def gla_chunked(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                segment_ids=None, chunk_size=DEFAULT_CHUNK, sub_chunk=DEFAULT_SUB_CHUNK,
                block_rows=BLOCK_ROWS):
    """Chunkwise-parallel GLA (see the module docstring for the math).

    Args:
      q, k: [B, T, H, K]; v: [B, T, HV, V]; g: [B, T, HV, K] log-decays (<= 0);
      initial_state: [B, HV, K, V] or None; segment_ids: [B, T] int or None;
      chunk_size: C; sub_chunk: the sub-chunk of ``decayed_scores``; block_rows: token×head
      rows per scan step (sets the chunks per block, M).
    Returns:
      (o [B, T, HV, V] in v.dtype, final_state [B, HV, K, V] float32 | None).
    """
    bsz, t, _, kd = q.shape
    hv, vd = v.shape[2], v.shape[3]
    scale = float(kd ** -0.5 if scale is None else scale)
    f32 = jnp.float32
    c = int(min(chunk_size, max(8, -(-t // 8) * 8)))                   # short inputs: one chunk
    _, m = _blocking(-(-t // c), hv * c, block_rows)
    qf = expand_groups(q.astype(f32), hv)                              # [B, T, HV, K]
    kf = expand_groups(k.astype(f32), hv)                              # [B, T, HV, K]
    vf = v.astype(f32)                                                 # [B, T, HV, V]
    gf = g.astype(f32)                                                 # [B, T, HV, K]
    doc = reset = None
    if segment_ids is not None:
        valid, reset = segment_masks(segment_ids)                      # [B, T] each
        qf = jnp.where(valid[:, :, None, None], qf, 0.0)
        kf = jnp.where(valid[:, :, None, None], kf, 0.0)
        gf = jnp.where(valid[:, :, None, None], gf, 0.0)
        reset = pad_axis(reset, 1, m * c, False)                       # [B, Tp]
        doc = jnp.cumsum(reset.astype(jnp.int32), axis=1)              # [B, Tp]
    s0 = jnp.zeros((bsz, hv, kd, vd), f32) if initial_state is None else initial_state.astype(f32)
    qf, kf, vf, gf = (pad_axis(x, 1, m * c) for x in (qf, kf, vf, gf))
    o, s_final = _core(qf, kf, vf, gf, s0, doc, reset, m, c, scale, int(sub_chunk))
    return o[:, :t].astype(v.dtype), (s_final if output_final_state else None)
