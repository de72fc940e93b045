"""simple_gla's Triton kernels: two sequential state recurrences and three chunk-parallel passes.

Layout (``gpu.py`` builds it): q, k ``[B, H, T, K]``; v, o, dO ``[B, HV, T, V]``; b ``[B, HV, T]``
float32, the log-decay cumulated inside each chunk of C tokens (b_i = Σ_{u ≤ i} g_u from the chunk
start); per-chunk states ``[B, HV, NT, K, V]`` (NT = T / C) in the input dtype; states entering
and leaving the sequence ``[B, HV, K, V]`` float32. T is a multiple of C and K, V are powers of
two that the tiles BK, BV divide, so no load needs a mask. Value head j reads q/k head
j // (HV / H). Every pointer offset of a per-head array is taken in int64 (a [B, HV, NT, K, V]
buffer passes 2³¹ elements at B·HV = 256, T = 8k, K = V = 256).

Per chunk, with S the state entering it, D_ij = exp(b_i − b_j)·[j ≤ i], e_i = exp(b_i),
f_j = exp(b_C − b_j), a = exp(b_C):

    fwd_h    S ← a S + (f∘k)ᵀ v                   grid (K tiles, V tiles, B·HV), chunks in
             order; stores the state entering each chunk
    fwd_o    o = scale·(e∘q) S + scale·((q kᵀ)∘D) v          grid (V tiles, chunks, B·HV)
    bwd_dh   G ← a G + scale·(e∘q)ᵀ dO             grid (K tiles, V tiles, B·HV), chunks in
             reverse from G = ∂L/∂S_final; stores G leaving each chunk (= ∂L/∂U of the chunk)
    bwd_dv   dv = scale·((q kᵀ)∘D)ᵀ dO + (f∘k) G             grid (V tiles, chunks, B·HV)
    bwd_dqdk dq = scale·((dO vᵀ)∘D) k + scale·e∘(dO Sᵀ),
             dk = scale·((dO vᵀ)∘D)ᵀ q + f∘(v Gᵀ)             grid (K tiles, chunks, B·HV)

(each kernel is ``simple_gla_<name>``). The chunk-parallel kernels loop over the other feature
axis in tiles and own each reduction whole (dv sums over K inside its program, dq/dk over V), so
nothing is summed in XLA except the grouped heads' dq/dk (per value head here) and the gate
gradient. Masked exponents are taken as
exp(−inf) = 0: b is non-increasing, so b_i − b_j ≤ 0 on every kept pair and no factor exceeds 1.

Packed documents (HAS_SEG): three per-token float masks ``[B, T]`` keep the formulas exact —
``doc`` (document index: D also needs doc_i = doc_j), ``carry`` (token still in the document that
entered the chunk: multiplies e, and a through the chunk's last token) and ``tail`` (token in
the chunk's last document: multiplies f). Without them the mask pointers are not read.

Dots: operands in the input dtype (bf16 → tensor cores with float32 accumulation; float32 →
Triton's default tf32 on a GPU, exact in the interpreter), the float32 state cast to the input
dtype only as an operand (it is stored that way per chunk).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["simple_gla_fwd_h", "simple_gla_fwd_o", "simple_gla_bwd_dh", "simple_gla_bwd_dv",
           "simple_gla_bwd_dqdk"]


@triton.jit
def _heads(i_bh, H: tl.constexpr, HV: tl.constexpr):
    """(batch, q/k head) of program axis B·HV: value head j reads q/k head j // (HV / H)."""
    i_b = i_bh // HV
    i_h = (i_bh % HV) // (HV // H)
    return i_b, i_b * H + i_h


@triton.jit
def _chunk_gates(b_ptr, carry_ptr, tail_ptr, i_bh, i_b, n, T: tl.constexpr, C: tl.constexpr,
                 HAS_SEG: tl.constexpr):
    """b [C] of chunk n and its factors e [C], f [C], a (scalar), with the packing masks."""
    rc = tl.arange(0, C)
    t0 = n * C
    b = tl.load(b_ptr + i_bh * T + t0 + rc)                            # [C]
    b_last = tl.load(b_ptr + i_bh * T + t0 + C - 1)                    # scalar b_C
    e = tl.exp(b)
    f = tl.exp(b_last - b)
    a = tl.exp(b_last)
    if HAS_SEG:
        e = e * tl.load(carry_ptr + i_b * T + t0 + rc)
        f = f * tl.load(tail_ptr + i_b * T + t0 + rc)
        a = a * tl.load(carry_ptr + i_b * T + t0 + C - 1)
    return b, e, f, a


@triton.jit
def _decay_matrix(b, doc_ptr, i_b, n, T: tl.constexpr, C: tl.constexpr, HAS_SEG: tl.constexpr,
                  TRANSPOSED: tl.constexpr):
    """D [C, C] (row i, column j: exp(b_i − b_j) for j ≤ i in one document), or Dᵀ."""
    rc = tl.arange(0, C)
    row, col = rc[:, None], rc[None, :]
    if TRANSPOSED:                                                     # Dᵀ[j, i]
        keep = col >= row
        diff = b[None, :] - b[:, None]
    else:
        keep = row >= col
        diff = b[:, None] - b[None, :]
    if HAS_SEG:
        doc = tl.load(doc_ptr + i_b * T + n * C + rc)
        keep = keep & (doc[:, None] == doc[None, :])
    return tl.exp(tl.where(keep, diff, float("-inf")))


@triton.jit
def simple_gla_fwd_h(k_ptr, v_ptr, b_ptr, doc_ptr, carry_ptr, tail_ptr, s0_ptr, h_ptr, sf_ptr,
                     T: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     HAS_SEG: tl.constexpr):
    """States entering every chunk h [B, HV, NT, K, V] (input dtype) and the final one (f32).
    Grid (K / BK, V / BV, B·HV); one [BK, BV] float32 tile of S carried over the chunks."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_qh = _heads(i_bh, H, HV)
    NT: tl.constexpr = T // C
    rc = tl.arange(0, C)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    k_base = k_ptr + i_qh.to(tl.int64) * T * K
    v_base = v_ptr + i_bh.to(tl.int64) * T * V
    h_base = h_ptr + i_bh.to(tl.int64) * NT * K * V
    tile = rk[:, None] * V + rv[None, :]                               # [BK, BV]
    s = tl.load(s0_ptr + i_bh.to(tl.int64) * K * V + tile)            # [BK, BV] float32
    for n in range(NT):
        tl.store(h_base + n * K * V + tile, s.to(h_ptr.dtype.element_ty))
        kt = tl.load(k_base + (n * C + rc)[:, None] * K + rk[None, :])  # [C, BK]
        vt = tl.load(v_base + (n * C + rc)[:, None] * V + rv[None, :])  # [C, BV]
        _, _, f, a = _chunk_gates(b_ptr, carry_ptr, tail_ptr, i_bh, i_b, n, T, C, HAS_SEG)
        kf = (kt * f[:, None]).to(kt.dtype)
        s = s * a + tl.dot(tl.trans(kf), vt)
    tl.store(sf_ptr + i_bh.to(tl.int64) * K * V + tile, s)


@triton.jit
def simple_gla_fwd_o(q_ptr, k_ptr, v_ptr, b_ptr, doc_ptr, carry_ptr, tail_ptr, h_ptr, o_ptr,
                     T: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     SCALE: tl.constexpr, HAS_SEG: tl.constexpr):
    """o [B, HV, T, V] of chunk n, V tile i_v: scale·(e∘q) S + scale·((q kᵀ)∘D) v.
    Grid (V / BV, NT, B·HV); q kᵀ and q S accumulate over the K tiles."""
    i_v, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_qh = _heads(i_bh, H, HV)
    NT: tl.constexpr = T // C
    rows = n * C + tl.arange(0, C)
    rv = i_v * BV + tl.arange(0, BV)
    q_base = q_ptr + i_qh.to(tl.int64) * T * K
    k_base = k_ptr + i_qh.to(tl.int64) * T * K
    h_base = h_ptr + (i_bh.to(tl.int64) * NT + n) * K * V
    qs = tl.zeros([C, BV], dtype=tl.float32)                           # q S
    qk = tl.zeros([C, C], dtype=tl.float32)                            # q kᵀ
    for i_k in range(K // BK):
        rk = i_k * BK + tl.arange(0, BK)
        qt = tl.load(q_base + rows[:, None] * K + rk[None, :])         # [C, BK]
        kt = tl.load(k_base + rows[:, None] * K + rk[None, :])         # [C, BK]
        ht = tl.load(h_base + rk[:, None] * V + rv[None, :])           # [BK, BV]
        qs += tl.dot(qt, ht.to(qt.dtype))
        qk += tl.dot(qt, tl.trans(kt))
    b, e, _, _ = _chunk_gates(b_ptr, carry_ptr, tail_ptr, i_bh, i_b, n, T, C, HAS_SEG)
    p = qk * _decay_matrix(b, doc_ptr, i_b, n, T, C, HAS_SEG, False) * SCALE
    vt = tl.load(v_ptr + i_bh.to(tl.int64) * T * V + rows[:, None] * V + rv[None, :])
    o = qs * (e * SCALE)[:, None] + tl.dot(p.to(vt.dtype), vt)
    tl.store(o_ptr + i_bh.to(tl.int64) * T * V + rows[:, None] * V + rv[None, :],
             o.to(o_ptr.dtype.element_ty))


@triton.jit
def simple_gla_bwd_dh(q_ptr, do_ptr, b_ptr, doc_ptr, carry_ptr, tail_ptr, dsf_ptr, dh_ptr, ds0_ptr,
                      T: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                      V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      SCALE: tl.constexpr, HAS_SEG: tl.constexpr):
    """∂L/∂(state leaving chunk n) dh [B, HV, NT, K, V] (input dtype) and ∂L/∂S_0 (f32).
    Grid (K / BK, V / BV, B·HV); chunks in reverse from G = ∂L/∂S_final."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_qh = _heads(i_bh, H, HV)
    NT: tl.constexpr = T // C
    rc = tl.arange(0, C)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    q_base = q_ptr + i_qh.to(tl.int64) * T * K
    do_base = do_ptr + i_bh.to(tl.int64) * T * V
    dh_base = dh_ptr + i_bh.to(tl.int64) * NT * K * V
    tile = rk[:, None] * V + rv[None, :]                               # [BK, BV]
    g = tl.load(dsf_ptr + i_bh.to(tl.int64) * K * V + tile)           # [BK, BV] float32
    for i in range(NT):
        n = NT - 1 - i
        tl.store(dh_base + n * K * V + tile, g.to(dh_ptr.dtype.element_ty))
        qt = tl.load(q_base + (n * C + rc)[:, None] * K + rk[None, :])   # [C, BK]
        dob = tl.load(do_base + (n * C + rc)[:, None] * V + rv[None, :])  # [C, BV]
        _, e, _, a = _chunk_gates(b_ptr, carry_ptr, tail_ptr, i_bh, i_b, n, T, C, HAS_SEG)
        qe = (qt * (e * SCALE)[:, None]).to(qt.dtype)
        g = g * a + tl.dot(tl.trans(qe), dob.to(qt.dtype))
    tl.store(ds0_ptr + i_bh.to(tl.int64) * K * V + tile, g)


@triton.jit
def simple_gla_bwd_dv(q_ptr, k_ptr, do_ptr, b_ptr, doc_ptr, carry_ptr, tail_ptr, dh_ptr, dv_ptr,
                      T: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                      V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      SCALE: tl.constexpr, HAS_SEG: tl.constexpr):
    """dv [B, HV, T, V] (f32) of chunk n, V tile i_v: scale·((q kᵀ)∘D)ᵀ dO + (f∘k) G.
    Grid (V / BV, NT, B·HV); k qᵀ and k G accumulate over the K tiles."""
    i_v, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_qh = _heads(i_bh, H, HV)
    NT: tl.constexpr = T // C
    rows = n * C + tl.arange(0, C)
    rv = i_v * BV + tl.arange(0, BV)
    q_base = q_ptr + i_qh.to(tl.int64) * T * K
    k_base = k_ptr + i_qh.to(tl.int64) * T * K
    dh_base = dh_ptr + (i_bh.to(tl.int64) * NT + n) * K * V
    kg = tl.zeros([C, BV], dtype=tl.float32)                           # k G
    kq = tl.zeros([C, C], dtype=tl.float32)                            # k qᵀ = (q kᵀ)ᵀ
    for i_k in range(K // BK):
        rk = i_k * BK + tl.arange(0, BK)
        qt = tl.load(q_base + rows[:, None] * K + rk[None, :])         # [C, BK]
        kt = tl.load(k_base + rows[:, None] * K + rk[None, :])         # [C, BK]
        gt = tl.load(dh_base + rk[:, None] * V + rv[None, :])          # [BK, BV]
        kg += tl.dot(kt, gt.to(kt.dtype))
        kq += tl.dot(kt, tl.trans(qt))
    b, _, f, _ = _chunk_gates(b_ptr, carry_ptr, tail_ptr, i_bh, i_b, n, T, C, HAS_SEG)
    pt = kq * _decay_matrix(b, doc_ptr, i_b, n, T, C, HAS_SEG, True) * SCALE
    dob = tl.load(do_ptr + i_bh.to(tl.int64) * T * V + rows[:, None] * V + rv[None, :])
    dv = kg * f[:, None] + tl.dot(pt.to(dob.dtype), dob)
    tl.store(dv_ptr + i_bh.to(tl.int64) * T * V + rows[:, None] * V + rv[None, :],
             dv.to(dv_ptr.dtype.element_ty))


@triton.jit
def simple_gla_bwd_dqdk(q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, doc_ptr, carry_ptr, tail_ptr, h_ptr,
                        dh_ptr, dq_ptr, dk_ptr,
                        T: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                        V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        SCALE: tl.constexpr, HAS_SEG: tl.constexpr):
    """dq, dk [B, HV, T, K] (f32, per value head) of chunk n, K tile i_k:
    dq = scale·((dO vᵀ)∘D) k + scale·e∘(dO Sᵀ),  dk = scale·((dO vᵀ)∘D)ᵀ q + f∘(v Gᵀ).
    Grid (K / BK, NT, B·HV); dO vᵀ, dO Sᵀ and v Gᵀ accumulate over the V tiles."""
    i_k, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_qh = _heads(i_bh, H, HV)
    NT: tl.constexpr = T // C
    rows = n * C + tl.arange(0, C)
    rk = i_k * BK + tl.arange(0, BK)
    v_base = v_ptr + i_bh.to(tl.int64) * T * V
    do_base = do_ptr + i_bh.to(tl.int64) * T * V
    h_base = h_ptr + (i_bh.to(tl.int64) * NT + n) * K * V
    dh_base = dh_ptr + (i_bh.to(tl.int64) * NT + n) * K * V
    dov = tl.zeros([C, C], dtype=tl.float32)                           # dO vᵀ
    dos = tl.zeros([C, BK], dtype=tl.float32)                          # dO Sᵀ
    vg = tl.zeros([C, BK], dtype=tl.float32)                           # v Gᵀ
    for i_v in range(V // BV):
        rv = i_v * BV + tl.arange(0, BV)
        vt = tl.load(v_base + rows[:, None] * V + rv[None, :])         # [C, BV]
        dob = tl.load(do_base + rows[:, None] * V + rv[None, :])       # [C, BV]
        ht = tl.load(h_base + rk[:, None] * V + rv[None, :])           # [BK, BV]
        gt = tl.load(dh_base + rk[:, None] * V + rv[None, :])          # [BK, BV]
        dov += tl.dot(dob, tl.trans(vt))
        dos += tl.dot(dob, tl.trans(ht.to(dob.dtype)))
        vg += tl.dot(vt, tl.trans(gt.to(vt.dtype)))
    b, e, f, _ = _chunk_gates(b_ptr, carry_ptr, tail_ptr, i_bh, i_b, n, T, C, HAS_SEG)
    ds = dov * _decay_matrix(b, doc_ptr, i_b, n, T, C, HAS_SEG, False) * SCALE   # [C, C]
    q_base = q_ptr + i_qh.to(tl.int64) * T * K
    k_base = k_ptr + i_qh.to(tl.int64) * T * K
    qt = tl.load(q_base + rows[:, None] * K + rk[None, :])             # [C, BK]
    kt = tl.load(k_base + rows[:, None] * K + rk[None, :])             # [C, BK]
    dq = tl.dot(ds.to(kt.dtype), kt) + dos * (e * SCALE)[:, None]
    dk = tl.dot(tl.trans(ds).to(qt.dtype), qt) + vg * f[:, None]
    out = i_bh.to(tl.int64) * T * K + rows[:, None] * K + rk[None, :]
    tl.store(dq_ptr + out, dq.to(dq_ptr.dtype.element_ty))
    tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty))
