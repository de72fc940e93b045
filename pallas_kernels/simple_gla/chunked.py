"""simple_gla in chunkwise-parallel pure JAX (the CPU default), with a hand-written backward.

Split T into chunks of C tokens. Inside a chunk let b_i = Σ_{u ≤ i} g_u (cumulative log-decay
from the chunk start: b ≤ 0, non-increasing) and S⁻ the state entering the chunk. Then

    o_i = scale · [ Σ_{j ≤ i} exp(b_i − b_j) (q_i·k_j) v_j  +  exp(b_i) S⁻ᵀ q_i ]
    S⁺  = a S⁻ + U,      a = exp(b_C),      U = Σ_j exp(b_C − b_j) k_j v_jᵀ

The recurrence over chunks S⁺ = a S⁻ + U is linear, so the states entering the M chunks of a
block of M·C tokens are one small matmul, S⁻_m = Σ_{j ≤ m} W_mj X_j with X = [S_in, U_0, …] and
W_mj = exp(λ_m − λ_j) (λ_m = Σ_{l<m} b_C,l). A ``lax.scan`` runs over blocks carrying the state;
all other work of a block is batched matmuls over its chunks. Blocks keep the working set in
cache: batched matmuls over a whole long sequence are memory bound on CPU (16k tokens ran
~2.5x slower per token than 1k). Every exponent is a difference of cumulative log-decays taken
in the causal direction (masked to −inf before ``exp`` otherwise), so no exponential exceeds 1.

Packed documents (``segment_ids``): with d_t the document index (number of resets up to t;
padding continues the last document and is a no-op through q = k = 0, g = 0), every matrix
above keeps only pairs in the same document: the intra-chunk scores (d_i = d_j), the carried-in
state (d_i = document entering the chunk), U (d_j = document at the chunk end) and W (document
of X_j = document entering chunk m). Masks remove whole terms, so the formulas keep their form.

Backward (custom_vjp): residuals are the inputs and the state entering each block (no per-token
states, not even one per chunk); a reverse scan over blocks recomputes a block's scores and
chunk states and carries G = ∂L/∂S and the running gate sum. (Saving every chunk's state
instead skips one matmul of ten but writes and reads a T·D-sized residual: faster at 1k tokens,
slower at 16k on this CPU when the other core is busy.) With dO and dF (final-state cotangent):
    dH_m = scale·(e∘q)ᵀ dO_m    (∂L/∂S⁻_m from the outputs),   e_i = exp(b_i)
    [∂L/∂S_in, ∂L/∂U_0, …] = Wᵀ [dH_0, …, dH_{M-1}, G_out]
    dq = scale·(dP∘D) k + scale·e∘(dO S⁻ᵀ),    dP = dO vᵀ,  D_ij = exp(b_i − b_j) [j ≤ i]
    dk = scale·(dP∘D)ᵀ q + f∘(v (∂L/∂U)ᵀ),       f_j = exp(b_C − b_j)
    dv = Pᵀ dO + (f∘k) ∂L/∂U,                   P = scale·(q kᵀ)∘D
and the gates through an identity: every term of L depends on the global cumulative log-decay
B only through exp(B_t − B_s) with t on the query (or final-state) side and s on the key side, so
    ∂L/∂B_t = q_t·dq_t − k_t·dk_t  (+ Σ dF∘S_final at the last token),  dg_t = Σ_{u ≥ t} ∂L/∂B_u.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import (causal_mask, einsum_f32, expand_groups, pad_axis,
                                   segment_masks)
from pallas_kernels.common.layout import block_merge, block_split

__all__ = ["simple_gla_chunked", "DEFAULT_CHUNK", "DEFAULT_BLOCK_CHUNKS"]

DEFAULT_CHUNK = 64
DEFAULT_BLOCK_CHUNKS = 8


_mm, _causal = einsum_f32, causal_mask


# ----------------------------------------------------------------------------------------------
# one block of M chunks of one batch row, layout [H, M, C, D]
# ----------------------------------------------------------------------------------------------
_block_split, _block_merge = block_split, block_merge


def _block_setup(q, k, v, g, doc, reset, m, c, scale):
    """Decays, masks and intra-chunk scores of one block.

    q, k: [L, H, K]; v: [L, H, V]; g: [L, H]; doc, reset: [L] or None (L = M·C).
    """
    f32 = jnp.float32
    q, k, v = (_block_split(x, m, c) for x in (q, k, v))               # [H, M, C, *]
    g = _block_split(g[..., None], m, c)[..., 0]                       # [H, M, C]
    b = _mm("hmc,cd->hmd", g, _causal(c).T.astype(f32))                # cumsum over C
    b_last = b[..., -1]                                                # [H, M]
    # λ_j = Σ_{l<j} b_last_l, j = 0..M: log-decay from the block start to chunk j's start
    lam = _mm("hm,ml->hl", b_last, _causal(m + 1, strict=True)[:, :m].T.astype(f32))
    keep_c = _causal(c)                                                # [C, C]
    keep_m = _causal(m + 1)                                            # [M+1, M+1]
    carry = tail = None
    if doc is not None:
        doc = doc.reshape(1, m, c)                                     # [1, M, C]
        entering = doc[..., 0] - reset.reshape(1, m, c)[..., 0].astype(doc.dtype)  # [1, M]
        exiting = doc[..., -1]                                         # [1, M]
        keep_c = keep_c & (doc[..., :, None] == doc[..., None, :])     # [1, M, C, C]
        carry = doc == entering[..., None]                             # [1, M, C]
        tail = doc == exiting[..., None]                               # [1, M, C]
        doc_s = jnp.concatenate([entering, exiting[..., -1:]], -1)     # [1, M+1] S⁻_m's document
        doc_x = jnp.concatenate([entering[..., :1], exiting], -1)      # [1, M+1] X_j's document
        keep_m = keep_m & (doc_s[..., :, None] == doc_x[..., None, :])
    dmat = jnp.exp(jnp.where(keep_c, b[..., :, None] - b[..., None, :], -jnp.inf))
    w = jnp.exp(jnp.where(keep_m, lam[..., :, None] - lam[..., None, :], -jnp.inf))
    e = jnp.exp(b)                                                     # [H, M, C]
    f = jnp.exp(b_last[..., None] - b)                                 # [H, M, C]
    if carry is not None:
        e = jnp.where(carry, e, 0.0)
        f = jnp.where(tail, f, 0.0)
    p = _mm("hmik,hmjk->hmij", q, k) * (scale * dmat)                  # [H, M, C, C]
    return q, k, v, e, f, p, dmat, w


def _block_states(s_in, kf, v, w):
    """States entering each chunk and leaving the block: ([H, M, K, V], [H, K, V])."""
    u = _mm("hmck,hmcv->hmkv", kf, v)                                  # [H, M, K, V]
    x = jnp.concatenate([s_in[:, None], u], axis=1)                    # [H, M+1, K, V]
    s_all = _mm("hij,hjkv->hikv", w, x)                                # [H, M+1, K, V]
    return s_all[:, :-1], s_all[:, -1]


def _block_forward(s_in, xs, m, c, scale):
    """Forward of one block: (S_in [H, K, V], inputs) -> (S_out, o [L, H, V])."""
    q, k, v, g, doc, reset = xs
    q, k, v, e, f, p, _, w = _block_setup(q, k, v, g, doc, reset, m, c, scale)
    s_prev, s_out = _block_states(s_in, k * f[..., None], v, w)
    o = _mm("hmij,hmjv->hmiv", p, v)
    o = o + _mm("hmck,hmkv->hmcv", q * (scale * e)[..., None], s_prev)
    return s_out, _block_merge(o)


def _block_backward(g_out, dg_acc, s_in, xs, do, m, c, scale):
    """Backward of one block: recompute it, return (∂L/∂S_in, dg carry, (dq, dk, dv, dg)).

    g_out: [H, K, V] cotangent of the state leaving the block; dg_acc: [H] Σ of ∂L/∂B over the
    later tokens (and the final-state term); s_in: [H, K, V] the state entering the block
    (saved by the forward pass); do: [L, H, V].
    """
    f32 = jnp.float32
    q, k, v, g, doc, reset = xs
    q, k, v, e, f, p, dmat, w = _block_setup(q, k, v, g, doc, reset, m, c, scale)
    kf = k * f[..., None]                                              # [H, M, C, K]
    s_prev, _ = _block_states(s_in, kf, v, w)                          # [H, M, K, V]
    do = _block_split(do, m, c)                                        # [H, M, C, V]
    dh = _mm("hmck,hmcv->hmkv", q * (scale * e)[..., None], do)        # [H, M, K, V]
    y = jnp.concatenate([dh, g_out[:, None]], axis=1)                  # [H, M+1, K, V]
    gx = _mm("hij,hikv->hjkv", w, y)                                   # [H, M+1, K, V]
    g_in, du = gx[:, 0], gx[:, 1:]                                     # du: [H, M, K, V]
    ds = _mm("hmiv,hmjv->hmij", do, v) * (scale * dmat)                # [H, M, C, C]
    dq = _mm("hmij,hmjk->hmik", ds, k)
    dq = dq + _mm("hmcv,hmkv->hmck", do, s_prev) * (scale * e)[..., None]
    dk = _mm("hmij,hmik->hmjk", ds, q)
    dk = dk + _mm("hmcv,hmkv->hmck", v, du) * f[..., None]
    dv = _mm("hmij,hmiv->hmjv", p, do) + _mm("hmck,hmkv->hmcv", kf, du)
    # gates: ∂L/∂B = q·dq − k·dk, reverse-cumulated over the block, plus the later blocks' sum
    db = jnp.sum(q * dq - k * dk, axis=-1)                             # [H, M, C]
    tot = jnp.sum(db, axis=-1)                                         # [H, M]
    dg = _mm("hmc,cd->hmd", db, _causal(c).astype(f32))
    dg = dg + _mm("hm,ml->hl", tot, _causal(m, strict=True).astype(f32))[..., None]
    dg = dg + dg_acc[:, None, None]
    grads = tuple(_block_merge(x) for x in (dq, dk, dv)) + (_block_merge(dg[..., None])[..., 0],)
    return g_in, dg_acc + jnp.sum(tot, axis=-1), grads


# ----------------------------------------------------------------------------------------------
# scans over blocks, custom_vjp
# ----------------------------------------------------------------------------------------------
# The scans run over the B·NB blocks of all rows in order ([B, T, ...] -> [B·NB, L, ...] is a pure
# reshape, so XLA feeds the loop without copying its inputs); the carried state is re-seeded at
# every row start. Operands of a while loop with a different physical layout are copied in full,
# so no transposes happen outside the loop.
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


def _forward_scan(q, k, v, g, s0, doc, reset, m, c, scale):
    bsz = q.shape[0]
    nb = q.shape[1] // (m * c)
    xs = tuple(_to_blocks(x, nb) for x in (q, k, v, g, doc, reset))

    def step(s_carry, inputs):
        i, blk = inputs
        s_in = jnp.where(i % nb == 0, s0[i // nb], s_carry)            # [H, K, V]
        s_out, o = _block_forward(s_in, blk, m, c, scale)
        return s_out, (o, s_in, s_out)

    _, (o, s_ins, s_outs) = lax.scan(step, jnp.zeros_like(s0[0]), (jnp.arange(bsz * nb), xs))
    s_final = s_outs.reshape(bsz, nb, *s_outs.shape[1:])[:, -1]        # [B, H, K, V]
    return _from_blocks(o, bsz), s_final, s_ins                        # s_ins: [B·NB, H, K, V]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _core(q, k, v, g, s0, doc, reset, m, c, scale):
    o, s_final, _ = _forward_scan(q, k, v, g, s0, doc, reset, m, c, scale)
    return o, s_final


def _core_fwd(q, k, v, g, s0, doc, reset, m, c, scale):
    o, s_final, s_ins = _forward_scan(q, k, v, g, s0, doc, reset, m, c, scale)
    return (o, s_final), (q, k, v, g, doc, reset, s_final, s_ins)


def _core_bwd(m, c, scale, res, cts):
    q, k, v, g, doc, reset, s_final, s_ins = res
    do, dfinal = cts
    bsz = q.shape[0]
    nb = q.shape[1] // (m * c)
    xs = tuple(_to_blocks(x, nb) for x in (q, k, v, g, doc, reset))
    dg_final = jnp.sum(dfinal * s_final, axis=(-2, -1))                # [B, H]

    def step(carry, inputs):
        i, s_in, blk, do_blk = inputs
        last = i % nb == nb - 1
        g_out = jnp.where(last, dfinal[i // nb], carry[0])             # [H, K, V]
        dg_acc = jnp.where(last, dg_final[i // nb], carry[1])          # [H]
        g_in, dg_acc, grads = _block_backward(g_out, dg_acc, s_in, blk, do_blk, m, c, scale)
        return (g_in, dg_acc), grads + (g_in,)

    init = (jnp.zeros_like(dfinal[0]), jnp.zeros_like(dg_final[0]))
    _, ys = lax.scan(step, init, (jnp.arange(bsz * nb), s_ins, xs, _to_blocks(do, nb)),
                     reverse=True)
    dq, dk, dv, dg = (_from_blocks(x, bsz) for x in ys[:4])
    ds0 = ys[4].reshape(bsz, nb, *ys[4].shape[1:])[:, 0]                # [B, H, K, V]
    return dq, dk, dv, dg, ds0, None, None


_core.defvjp(_core_fwd, _core_bwd)


def simple_gla_chunked(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None,
                       chunk_size=DEFAULT_CHUNK, block_chunks=DEFAULT_BLOCK_CHUNKS,
                       output_final_state=True):
    """Chunkwise-parallel simple GLA (see the module docstring for the math).

    Args:
      q, k: [B, T, H, K]; v: [B, T, HV, V]; g: [B, T, HV] log-decays (<= 0);
      initial_state: [B, HV, K, V] or None; segment_ids: [B, T] int or None;
      chunk_size: C; block_chunks: chunks per scan step (M);
      output_final_state: accepted for the op frame's contract (the state is carried anyway).
    Returns:
      (o [B, T, HV, V] in v.dtype, final_state [B, HV, K, V] float32).
    """
    bsz, t, _, kd = q.shape
    hv, vd = v.shape[2], v.shape[3]
    scale = float(kd ** -0.5 if scale is None else scale)
    f32 = jnp.float32
    c = int(min(chunk_size, max(8, -(-t // 8) * 8)))                   # short inputs: one chunk
    n_chunks = -(-t // c)
    n_blocks = -(-n_chunks // block_chunks)
    m = -(-n_chunks // n_blocks)                                       # balanced blocks
    qf = expand_groups(q.astype(f32), hv)                              # [B, T, HV, K]
    kf = expand_groups(k.astype(f32), hv)                              # [B, T, HV, K]
    vf = v.astype(f32)                                                 # [B, T, HV, V]
    gf = g.astype(f32)                                                 # [B, T, HV]
    doc = reset = None
    if segment_ids is not None:
        valid, reset = segment_masks(segment_ids)                      # [B, T] each
        qf = jnp.where(valid[:, :, None, None], qf, 0.0)
        kf = jnp.where(valid[:, :, None, None], kf, 0.0)
        gf = jnp.where(valid[:, :, None], gf, 0.0)
        reset = pad_axis(reset, 1, m * c, False)                       # [B, Tp]
        doc = jnp.cumsum(reset.astype(jnp.int32), axis=1)              # [B, Tp]
    s0 = jnp.zeros((bsz, hv, kd, vd), f32) if initial_state is None else initial_state.astype(f32)
    qf, kf, vf, gf = (pad_axis(x, 1, m * c) for x in (qf, kf, vf, gf))
    o, s_final = _core(qf, kf, vf, gf, s0, doc, reset, m, c, scale)
    return o[:, :t].astype(v.dtype), s_final
