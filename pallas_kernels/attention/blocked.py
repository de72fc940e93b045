"""Blocked (flash-style) causal softmax attention in plain JAX: O(T·block) memory, fwd and bwd.

    o_i = Σ_j softmax_j(scale · q_i·k_j + mask_ij) v_j          (the math of `reference.py`)

Queries are cut into blocks of `block_q` rows and keys into blocks of `block_kv`. For one query
block the key blocks are visited in order with an online softmax: a running row max m, the
normaliser l = Σ exp(s − m) and the accumulator acc = Σ exp(s − m) v are rescaled by exp(m_old −
m_new) whenever the max grows, so o = acc / l and the log-sum-exp L = m + log l are exact after
the last block. The visibility mask of a (query block, key block) pair is built from that pair's
positions, segment ids, window and sinks only — never as a [B, Tq, Tk] array.

Block skipping: a pair is *live* when the per-block ranges of positions and segment ids could let
some query see some key (valid keys no later than the block's last query, within the window of
its first, overlapping segment-id ranges, or a sink block). The test is conservative (the exact
mask is still applied inside), computed once as a [nq, nk] table from the block summaries, and
it covers every form: plain causal (blocks after the diagonal), sliding windows (blocks before
the window), packed documents (blocks of other documents) and caches in any slot order. Each
query block loops over its first..last live key block, `lax.cond` skips dead ones in between.

Backward (`jax.custom_vjp`, flash-attention 2): with δ_i = Σ_d dO_id O_id and the saved L,
    P_ij = exp(s_ij − L_i) (masked),  dV_j += Pᵀ dO,  dS = P ∘ (dO Vᵀ − δ),
    dK_j += scale · dSᵀ Q,  dQ_i += scale · dS K,
recomputed per live block pair: an outer scan over key blocks, an inner loop over their live
query blocks. Nothing of size Tq × Tk is stored in either direction.

Grouped-query attention reads each kv head once for its G = Hq / Hkv query heads (q is viewed as
[B, Hkv, G, T, D]; k/v are never repeated), and dK/dV sum over the group. Matmul operands keep
the input dtype (bf16 runs on tensor cores / the MXU), every accumulation is float32. Rows with
no visible key (padding) give 0 and no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import pad_axis

__all__ = ["attention_blocked", "DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_KV"]

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512
_BIG = 2 ** 30  # larger than any position; small enough that `pos - window` cannot overflow


def _dot(spec, a, b):
    """einsum with a float32 result (operands stay in their dtype)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------
# Layouts: block index leading so the loops slice one block with a dynamic index.

def _q_blocks(x, hkv, bq):
    """[B, T, Hq, D] -> [nq, B, Hkv, G, bq, D] (T zero-padded to a multiple of bq)."""
    b, _, hq, d = x.shape
    x = pad_axis(x, 1, bq)
    nq = x.shape[1] // bq
    return x.reshape(b, nq, bq, hkv, hq // hkv, d).transpose(1, 0, 3, 4, 2, 5)


def _q_unblock(x, t):
    """[nq, B, Hkv, G, bq, D] -> [B, t, Hq, D]."""
    nq, b, hkv, g, bq, d = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, hkv * g, d)[:, :t]


def _kv_blocks(x, bk):
    """[B, T, Hkv, D] -> [nk, B, Hkv, bk, D]."""
    b, _, h, d = x.shape
    x = pad_axis(x, 1, bk)
    return x.reshape(b, x.shape[1] // bk, bk, h, d).transpose(1, 0, 3, 2, 4)


def _kv_unblock(x, t):
    """[nk, B, Hkv, bk, D] -> [B, t, Hkv, D]."""
    nk, b, h, bk, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nk * bk, h, d)[:, :t]


def _row_blocks(x, size, fill):
    """[B, T] -> [n, B, size], padded with `fill`."""
    x = pad_axis(x, 1, size, value=fill)
    return x.reshape(x.shape[0], -1, size).transpose(1, 0, 2)


# ---------------------------------------------------------------------------------------------
# Masks

def _block_mask(qp, qs, kp, ks, j, bk, window, kv_sinks):
    """Visibility of one block pair: qp/qs [B, bq], kp/ks [B, bk] -> [B, 1, 1, bq, bk] bool."""
    qp, qs = qp[:, :, None], qs[:, :, None]  # [B, bq, 1]
    kp, ks = kp[:, None, :], ks[:, None, :]  # [B, 1, bk]
    mask = (kp >= 0) & (kp <= qp) & (qs == ks) & (qs != 0)
    if window is not None:
        mask &= (qp - kp) < window
    if kv_sinks:
        sink = (j * bk + jnp.arange(kp.shape[-1])) < kv_sinks  # [bk]
        mask |= sink[None, None, :] & (qs != 0)
    return mask[:, None, None]


def _live_blocks(qp, qs, kp, ks, bk, window, kv_sinks):
    """[nq, nk] bool: may any query of block i see any key of block j (for some batch row)?

    qp/qs [nq, B, bq], kp/ks [nk, B, bk]. Built from per-block min/max of positions and segment
    ids over real queries (segment ≠ 0) and valid keys (position ≥ 0, segment ≠ 0)."""
    real = qs != 0
    q_pos_lo = jnp.min(jnp.where(real, qp, _BIG), -1)[:, None]  # [nq, 1, B]
    q_pos_hi = jnp.max(jnp.where(real, qp, -_BIG), -1)[:, None]
    q_seg_lo = jnp.min(jnp.where(real, qs, _BIG), -1)[:, None]
    q_seg_hi = jnp.max(jnp.where(real, qs, -_BIG), -1)[:, None]
    valid = (kp >= 0) & (ks != 0)
    k_pos_lo = jnp.min(jnp.where(valid, kp, _BIG), -1)[None]  # [1, nk, B]
    k_pos_hi = jnp.max(jnp.where(valid, kp, -_BIG), -1)[None]
    k_seg_lo = jnp.min(jnp.where(valid, ks, _BIG), -1)[None]
    k_seg_hi = jnp.max(jnp.where(valid, ks, -_BIG), -1)[None]
    live = (k_pos_lo <= q_pos_hi) & (k_seg_lo <= q_seg_hi) & (q_seg_lo <= k_seg_hi)
    if window is not None:
        live &= k_pos_hi > q_pos_lo - window
    if kv_sinks:
        sink_block = (jnp.arange(kp.shape[0]) * bk < kv_sinks)[None, :, None]  # [1, nk, 1]
        live |= sink_block & real.any(-1)[:, None]
    return live.any(-1)


def _live_range(live_row):
    """First and one-past-last True index of a [n] bool row ((0, 0) when none)."""
    n = live_row.shape[0]
    any_ = live_row.any()
    first = jnp.argmax(live_row)
    last = n - jnp.argmax(live_row[::-1])
    return jnp.where(any_, first, 0), jnp.where(any_, last, 0)


def _visit_live(live_row, visit, step, init):
    """Run ``step`` (``visit`` behind a ``lax.cond`` on liveness) over the live range of a [n]
    row. A single block is visited directly: short sequences (tests, decoding) compile no loop,
    and visiting a dead block is still exact (its keys are masked, p = 0)."""
    if live_row.shape[0] == 1:
        return visit(0, init)
    lo, hi = _live_range(live_row)
    return lax.fori_loop(lo, hi, step, init)


def _map_blocks(fn, n):
    """``lax.map(fn, arange(n))``, or a direct call when n == 1."""
    if n == 1:
        return jax.tree.map(lambda x: x[None], fn(0))
    return lax.map(fn, jnp.arange(n))


# ---------------------------------------------------------------------------------------------
# Forward and backward

def _forward(q, k, v, qp, kp, qs, ks, window, kv_sinks, scale, bq, bk):
    """-> o [B, Tq, Hq, Dv] (q.dtype), lse [nq, B, Hkv, G, bq] float32 (+inf on empty rows)."""
    tq, hkv = q.shape[1], k.shape[2]
    qb = _q_blocks(q, hkv, bq)  # [nq, B, Hkv, G, bq, D]
    kb, vb = _kv_blocks(k, bk), _kv_blocks(v, bk)  # [nk, B, Hkv, bk, D*]
    qpb, qsb = _row_blocks(qp, bq, 0), _row_blocks(qs, bq, 0)  # [nq, B, bq]
    kpb, ksb = _row_blocks(kp, bk, -1), _row_blocks(ks, bk, 0)  # [nk, B, bk]
    live = _live_blocks(qpb, qsb, kpb, ksb, bk, window, kv_sinks)  # [nq, nk]
    rows = qb.shape[1:5]  # (B, Hkv, G, bq)
    dv = v.shape[-1]

    def q_block(i):
        qi = qb[i]

        def visit(j, carry):
            m, l, acc = carry
            s = _dot("bhgqd,bhkd->bhgqk", qi, kb[j]) * scale  # [B, Hkv, G, bq, bk]
            mask = _block_mask(qpb[i], qsb[i], kpb[j], ksb[j], j, bk, window, kv_sinks)
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all-masked so far: no shift
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + p.sum(-1)
            acc = alpha[..., None] * acc + _dot("bhgqk,bhkv->bhgqv", p.astype(v.dtype), vb[j])
            return m_new, l, acc

        def step(j, carry):
            return lax.cond(live[i, j], visit, lambda _, c: c, j, carry)

        init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
                jnp.zeros(rows + (dv,), jnp.float32))
        m, l, acc = _visit_live(live[i], visit, step, init)
        seen = l > 0
        o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return o.astype(q.dtype), lse

    ob, lse = _map_blocks(q_block, qb.shape[0])
    return _q_unblock(ob, tq), lse


def _backward(q, k, v, qp, kp, qs, ks, o, lse, do, window, kv_sinks, scale, bq, bk):
    """-> dq, dk, dv in the dtypes of q, k, v."""
    tq, tk, hkv = q.shape[1], k.shape[1], k.shape[2]
    qb, dob = _q_blocks(q, hkv, bq), _q_blocks(do, hkv, bq)  # [nq, B, Hkv, G, bq, D*]
    delta = jnp.sum(dob.astype(jnp.float32) * _q_blocks(o, hkv, bq).astype(jnp.float32), -1)
    kb, vb = _kv_blocks(k, bk), _kv_blocks(v, bk)  # [nk, B, Hkv, bk, D*]
    qpb, qsb = _row_blocks(qp, bq, 0), _row_blocks(qs, bq, 0)
    kpb, ksb = _row_blocks(kp, bk, -1), _row_blocks(ks, bk, 0)
    live = _live_blocks(qpb, qsb, kpb, ksb, bk, window, kv_sinks)  # [nq, nk]

    def kv_block(dq, j):
        kj, vj = kb[j], vb[j]

        def visit(i, carry):
            dk, dv, dq = carry
            qi, doi = qb[i], dob[i]
            s = _dot("bhgqd,bhkd->bhgqk", qi, kj) * scale  # [B, Hkv, G, bq, bk]
            mask = _block_mask(qpb[i], qsb[i], kpb[j], ksb[j], j, bk, window, kv_sinks)
            p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
            dv = dv + _dot("bhgqk,bhgqv->bhkv", p.astype(do.dtype), doi)
            dp = _dot("bhgqv,bhkv->bhgqk", doi, vj)
            ds = p * (dp - delta[i][..., None])
            dk = dk + _dot("bhgqk,bhgqd->bhkd", ds.astype(q.dtype), qi) * scale
            dq = dq.at[i].add(_dot("bhgqk,bhkd->bhgqd", ds.astype(k.dtype), kj) * scale)
            return dk, dv, dq

        def step(i, carry):
            return lax.cond(live[i, j], visit, lambda _, c: c, i, carry)

        init = (jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32), dq)
        dk, dv, dq = _visit_live(live[:, j], visit, step, init)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    if kb.shape[0] == 1:  # one key block: no loop to compile (see _visit_live)
        dq, (dk, dv) = kv_block(dq0, 0)
        dkb, dvb = dk[None], dv[None]
    else:
        dq, (dkb, dvb) = lax.scan(kv_block, dq0, jnp.arange(kb.shape[0]))
    return (_q_unblock(dq, tq).astype(q.dtype), _kv_unblock(dkb, tk), _kv_unblock(dvb, tk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _blocked(q, k, v, qp, kp, qs, ks, window, kv_sinks, scale, bq, bk):
    return _forward(q, k, v, qp, kp, qs, ks, window, kv_sinks, scale, bq, bk)[0]


def _blocked_fwd(q, k, v, qp, kp, qs, ks, window, kv_sinks, scale, bq, bk):
    o, lse = _forward(q, k, v, qp, kp, qs, ks, window, kv_sinks, scale, bq, bk)
    return o, (q, k, v, qp, kp, qs, ks, o, lse)


def _blocked_bwd(window, kv_sinks, scale, bq, bk, res, do):
    q, k, v, qp, kp, qs, ks, o, lse = res
    dq, dk, dv = _backward(q, k, v, qp, kp, qs, ks, o, lse, do, window, kv_sinks, scale, bq, bk)
    return dq, dk, dv, None, None, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def attention_blocked(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *,
                      scale: float, window: int | None = None, kv_sinks: int = 0,
                      block_q: int = DEFAULT_BLOCK_Q, block_kv: int = DEFAULT_BLOCK_KV):
    """q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv]; positions / segment ids [B, T*]
    int -> o [B, Tq, Hq, Dv] (q.dtype). Block sizes are clipped to the lengths; a length that is
    not a multiple is padded (padded queries and keys are invisible)."""
    for name, blk in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(blk, int) or isinstance(blk, bool) or blk < 1:
            raise ValueError(f"attention: {name} must be a positive int, got {blk!r}")
    bq, bk = min(block_q, q.shape[1]), min(block_kv, k.shape[1])
    ints = [x.astype(jnp.int32) for x in (q_positions, kv_positions, q_segment_ids, kv_segment_ids)]
    return _blocked(q, k, v, *ints, window, int(kv_sinks), float(scale), bq, bk)
