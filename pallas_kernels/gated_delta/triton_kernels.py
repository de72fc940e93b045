"""The gated delta rule's Triton kernels (``@triton.jit``); the JAX side is ``gpu.py``.

Layouts (all contiguous row-major, every size a ``tl.constexpr``; b = batch, h = value head,
bh = b·HV + h, t = token, c = chunk of C = 64 tokens, NC chunks, Tp = NC·C):

    per token   q, k, w, dq, dk, dqg, dkg, dw   [B, Tp, HV, K]   (row stride HV·K)
                v, u, v_new, do, dv_local, dd   [B, Tp, HV, V]
                T (= (I + A)^{-1}), A scratch   [B, Tp, HV, C]   (row i of a chunk's C×C matrix)
                G (chunk-local cumsum of g), β, dG, dβ   [B, Tp, HV]
                docs, carry, tail (float32)     [B, Tp]          (shared by the heads of a row)
    per chunk   h (state entering chunk c), dh (∂L/∂ state leaving chunk c)   [B·HV, NC, K, V]
    per row     s0, final, dfinal, ds0          [B·HV, K, V]

Masks (``_masks``): ``same_ij`` = j <= i and docs_i == docs_j; decay_ij = e^{G_i − G_j} on
same_ij else 0 (the exponent is masked before ``exp``); γ_i = e^{G_i} carry_i (token i still in the
document open before the chunk: it reads the incoming state); γo_i = e^{G_last − G_i} tail_i
(token i is in the chunk's last document: it writes the outgoing state); λ = e^{G_last} carry_last.

Dot operands are cast to the input dtype ``DT`` (q's element type): bf16 -> bf16 tensor-core dots,
f32 -> Triton's default (TF32 on a GPU, exact in the interpreter); accumulation is float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["gated_delta_fwd_wy", "gated_delta_fwd_h", "gated_delta_fwd_o",
           "gated_delta_bwd_dv_local", "gated_delta_bwd_dh", "gated_delta_bwd_dqkw",
           "gated_delta_bwd_wy_v", "gated_delta_bwd_wy", "gated_delta_bwd_dqdk"]


# ------------------------------------------------------------------------------------ helpers
@triton.jit
def _masks(g_ptr, docs_ptr, carry_ptr, tail_ptr, b, hh, c, HV: tl.constexpr, C: tl.constexpr,
           Tp: tl.constexpr):
    """(G [C], decay [C, C] on j <= i same document, γ [C], γo [C], λ) of chunk c."""
    r = tl.arange(0, C)
    t = c * C + r
    G = tl.load(g_ptr + (b * Tp + t) * HV + hh)
    g_last = tl.load(g_ptr + (b * Tp + c * C + C - 1) * HV + hh)
    doc = tl.load(docs_ptr + b * Tp + t)
    carry = tl.load(carry_ptr + b * Tp + t)
    tail = tl.load(tail_ptr + b * Tp + t)
    carry_last = tl.load(carry_ptr + b * Tp + c * C + C - 1)
    same = (r[:, None] >= r[None, :]) & (doc[:, None] == doc[None, :])
    diff = tl.where(same, G[:, None] - G[None, :], 0.0)
    decay = tl.where(same, tl.exp(diff), 0.0)
    gamma = tl.exp(G) * carry
    gamma_o = tl.exp(g_last - G) * tail
    lam = tl.exp(g_last) * carry_last
    return G, decay, gamma, gamma_o, lam


@triton.jit
def _decay(g_ptr, docs_ptr, b, hh, c, HV: tl.constexpr, C: tl.constexpr, Tp: tl.constexpr):
    """decay [C, C] of chunk c alone (as in :func:`_masks`): called after a kernel's loops, so
    the C×C float32 matrix is not held in registers through them."""
    r = tl.arange(0, C)
    t = c * C + r
    G = tl.load(g_ptr + (b * Tp + t) * HV + hh)
    doc = tl.load(docs_ptr + b * Tp + t)
    same = (r[:, None] >= r[None, :]) & (doc[:, None] == doc[None, :])
    return tl.where(same, tl.exp(tl.where(same, G[:, None] - G[None, :], 0.0)), 0.0)


@triton.jit
def _tile(ptr, b, hh, c, col0, HV: tl.constexpr, C: tl.constexpr, Tp: tl.constexpr,
          D: tl.constexpr, BD: tl.constexpr):
    """Pointers of the [C, BD] tile at columns col0.. of chunk c in a [B, Tp, HV, D] array."""
    r = tl.arange(0, C)
    cols = col0 + tl.arange(0, BD)
    return ptr + ((b * Tp + c * C + r[:, None]) * HV + hh) * D + cols[None, :]


@triton.jit
def _state_tile(ptr, bh, c, row0, col0, NC: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr):
    """Pointers of the [BK, BV] tile of chunk c's state in a [B·HV, NC, K, V] array."""
    rows = row0 + tl.arange(0, BK)
    cols = col0 + tl.arange(0, BV)
    return ptr + ((bh * NC + c) * K + rows[:, None]) * V + cols[None, :]


@triton.jit
def _unit_lower_inverse16(a):
    """(I + a)^{-1} of a strictly lower [16, 16] block by forward substitution in registers:
    row i of the inverse is e_i − Σ_{j<i} a_ij (row j), rows taken in order."""
    r = tl.arange(0, 16)
    inv = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for i in range(1, 16):
        a_i = tl.sum(tl.where(r[:, None] == i, a, 0.0), axis=0)          # a_ij  [16] over j
        row = tl.where(r == i, 1.0, 0.0) - tl.sum(a_i[:, None] * inv, axis=0)
        inv = tl.where(r[:, None] == i, row[None, :], inv)
    return inv


@triton.jit
def _block16(ptr, row_stride, i: tl.constexpr, j: tl.constexpr):
    """The [16, 16] block (i, j) of a C×C matrix stored with ``row_stride``."""
    r = tl.arange(0, 16)
    return tl.load(ptr + (16 * i + r[:, None]) * row_stride + 16 * j + r[None, :])


@triton.jit
def _store16(ptr, row_stride, i: tl.constexpr, j: tl.constexpr, x):
    r = tl.arange(0, 16)
    tl.store(ptr + (16 * i + r[:, None]) * row_stride + 16 * j + r[None, :],
             x.to(ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------ forward
@triton.jit
def gated_delta_fwd_wy(k_ptr, v_ptr, g_ptr, beta_ptr, docs_ptr, carry_ptr, tail_ptr,
                       t_ptr, w_ptr, u_ptr, a_ptr,
                       HV: tl.constexpr, Tp: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Grid (NC, B·HV). A = strict(β_i (k_i·k_j) decay_ij), T = (I + A)^{-1} (C = 64: four
    16×16 diagonal blocks inverted in registers, then T_ab = −T_aa Σ_{b<=m<a} A_am T_mb),
    w = T (β γ k), u = T (β v). A goes through the f32 scratch ``a_ptr`` (its 16×16 blocks are
    read back after a block barrier), T is stored, then read back whole for the w/u dots."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HV
    hh = bh % HV
    DT = k_ptr.dtype.element_ty
    r = tl.arange(0, C)
    G, decay, gamma, gamma_o, lam = _masks(g_ptr, docs_ptr, carry_ptr, tail_ptr, b, hh, c,
                                           HV, C, Tp)
    beta = tl.load(beta_ptr + (b * Tp + c * C + r) * HV + hh)
    kk = tl.zeros((C, C), tl.float32)
    for kt in range(K // BK):
        kb = tl.load(_tile(k_ptr, b, hh, c, kt * BK, HV, C, Tp, K, BK))
        kk += tl.dot(kb, tl.trans(kb))
    decay = _decay(g_ptr, docs_ptr, b, hh, c, HV, C, Tp)
    a = tl.where(r[:, None] > r[None, :], beta[:, None] * kk * decay, 0.0)
    rs = HV * C                                                          # row stride of A and T
    a_base = a_ptr + ((b * Tp + c * C) * HV + hh) * C
    t_base = t_ptr + ((b * Tp + c * C) * HV + hh) * C
    tl.store(a_base + r[:, None] * rs + r[None, :], a)
    tl.debug_barrier()
    t00 = _unit_lower_inverse16(_block16(a_base, rs, 0, 0))
    t11 = _unit_lower_inverse16(_block16(a_base, rs, 1, 1))
    t22 = _unit_lower_inverse16(_block16(a_base, rs, 2, 2))
    t33 = _unit_lower_inverse16(_block16(a_base, rs, 3, 3))
    a10 = _block16(a_base, rs, 1, 0)
    a20 = _block16(a_base, rs, 2, 0)
    a21 = _block16(a_base, rs, 2, 1)
    a30 = _block16(a_base, rs, 3, 0)
    a31 = _block16(a_base, rs, 3, 1)
    a32 = _block16(a_base, rs, 3, 2)
    t10 = -tl.dot(t11, tl.dot(a10, t00))
    t21 = -tl.dot(t22, tl.dot(a21, t11))
    t20 = -tl.dot(t22, tl.dot(a20, t00) + tl.dot(a21, t10))
    t32 = -tl.dot(t33, tl.dot(a32, t22))
    t31 = -tl.dot(t33, tl.dot(a31, t11) + tl.dot(a32, t21))
    t30 = -tl.dot(t33, tl.dot(a30, t00) + tl.dot(a31, t10) + tl.dot(a32, t20))
    zero = tl.zeros((16, 16), tl.float32)
    _store16(t_base, rs, 0, 0, t00)
    _store16(t_base, rs, 0, 1, zero)
    _store16(t_base, rs, 0, 2, zero)
    _store16(t_base, rs, 0, 3, zero)
    _store16(t_base, rs, 1, 0, t10)
    _store16(t_base, rs, 1, 1, t11)
    _store16(t_base, rs, 1, 2, zero)
    _store16(t_base, rs, 1, 3, zero)
    _store16(t_base, rs, 2, 0, t20)
    _store16(t_base, rs, 2, 1, t21)
    _store16(t_base, rs, 2, 2, t22)
    _store16(t_base, rs, 2, 3, zero)
    _store16(t_base, rs, 3, 0, t30)
    _store16(t_base, rs, 3, 1, t31)
    _store16(t_base, rs, 3, 2, t32)
    _store16(t_base, rs, 3, 3, t33)
    tl.debug_barrier()
    t = tl.load(t_base + r[:, None] * rs + r[None, :])                   # [C, C] in DT
    for kt in range(K // BK):
        kb = tl.load(_tile(k_ptr, b, hh, c, kt * BK, HV, C, Tp, K, BK)).to(tl.float32)
        x = (kb * (beta * gamma)[:, None]).to(DT)
        tl.store(_tile(w_ptr, b, hh, c, kt * BK, HV, C, Tp, K, BK), tl.dot(t, x).to(DT))
    for vt in range(V // BV):
        vb = tl.load(_tile(v_ptr, b, hh, c, vt * BV, HV, C, Tp, V, BV)).to(tl.float32)
        x = (vb * beta[:, None]).to(DT)
        tl.store(_tile(u_ptr, b, hh, c, vt * BV, HV, C, Tp, V, BV), tl.dot(t, x).to(DT))


@triton.jit
def gated_delta_fwd_h(k_ptr, w_ptr, u_ptr, g_ptr, docs_ptr, carry_ptr, tail_ptr, s0_ptr,
                      h_ptr, vnew_ptr, final_ptr,
                      HV: tl.constexpr, Tp: tl.constexpr, NC: tl.constexpr, K: tl.constexpr,
                      V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, NKS: tl.constexpr):
    """Grid (V / BV, B·HV); the only sequential forward kernel. S [K, BV] float32 in registers,
    as NKS (1 or 2) row slices of K / NKS (two keep K = 256 float32 out of spills):
    for c = 0..NC-1: h_c = S;  δ = u_c − w_c S;  S <- λ_c S + (γo_c k_c)ᵀ δ.  Stores h_c (DT),
    v_new = δ (DT) and the final S (f32)."""
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HV
    hh = bh % HV
    DT = k_ptr.dtype.element_ty
    KS: tl.constexpr = K // NKS
    s1 = tl.load(_state_tile(s0_ptr, bh, 0, 0, iv * BV, 1, K, V, KS, BV))    # [KS, BV] f32
    s2 = tl.zeros((KS, BV), tl.float32)
    if NKS == 2:
        s2 = tl.load(_state_tile(s0_ptr, bh, 0, KS, iv * BV, 1, K, V, KS, BV))
    for c in range(NC):
        tl.store(_state_tile(h_ptr, bh, c, 0, iv * BV, NC, K, V, KS, BV), s1.to(DT))
        G, decay, gamma, gamma_o, lam = _masks(g_ptr, docs_ptr, carry_ptr, tail_ptr, b, hh, c,
                                               HV, C, Tp)
        u = tl.load(_tile(u_ptr, b, hh, c, iv * BV, HV, C, Tp, V, BV)).to(tl.float32)
        w1 = tl.load(_tile(w_ptr, b, hh, c, 0, HV, C, Tp, K, KS))
        delta = u - tl.dot(w1, s1.to(DT))                                # [C, BV]
        if NKS == 2:
            tl.store(_state_tile(h_ptr, bh, c, KS, iv * BV, NC, K, V, KS, BV), s2.to(DT))
            w2 = tl.load(_tile(w_ptr, b, hh, c, KS, HV, C, Tp, K, KS))
            delta -= tl.dot(w2, s2.to(DT))
        tl.store(_tile(vnew_ptr, b, hh, c, iv * BV, HV, C, Tp, V, BV), delta.to(DT))
        dl = delta.to(DT)
        k1 = tl.load(_tile(k_ptr, b, hh, c, 0, HV, C, Tp, K, KS)).to(tl.float32)
        s1 = lam * s1 + tl.dot(tl.trans((k1 * gamma_o[:, None]).to(DT)), dl)
        if NKS == 2:
            k2 = tl.load(_tile(k_ptr, b, hh, c, KS, HV, C, Tp, K, KS)).to(tl.float32)
            s2 = lam * s2 + tl.dot(tl.trans((k2 * gamma_o[:, None]).to(DT)), dl)
    tl.store(_state_tile(final_ptr, bh, 0, 0, iv * BV, 1, K, V, KS, BV), s1)
    if NKS == 2:
        tl.store(_state_tile(final_ptr, bh, 0, KS, iv * BV, 1, K, V, KS, BV), s2)


@triton.jit
def gated_delta_fwd_o(q_ptr, k_ptr, vnew_ptr, h_ptr, g_ptr, docs_ptr, carry_ptr, tail_ptr,
                      o_ptr,
                      HV: tl.constexpr, Tp: tl.constexpr, NC: tl.constexpr, K: tl.constexpr,
                      V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      scale: tl.constexpr):
    """Grid (V / BV, NC, B·HV): o = scale γ ⊙ (q h_c) + P δ,  P = scale (q kᵀ) ⊙ decay."""
    iv = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HV
    hh = bh % HV
    DT = q_ptr.dtype.element_ty
    G, decay, gamma, gamma_o, lam = _masks(g_ptr, docs_ptr, carry_ptr, tail_ptr, b, hh, c,
                                           HV, C, Tp)
    o = tl.zeros((C, BV), tl.float32)
    qk = tl.zeros((C, C), tl.float32)
    for kt in range(K // BK):
        qb = tl.load(_tile(q_ptr, b, hh, c, kt * BK, HV, C, Tp, K, BK))
        kb = tl.load(_tile(k_ptr, b, hh, c, kt * BK, HV, C, Tp, K, BK))
        hb = tl.load(_state_tile(h_ptr, bh, c, kt * BK, iv * BV, NC, K, V, BK, BV))
        o += tl.dot(qb, hb)
        qk += tl.dot(qb, tl.trans(kb))
    p = (scale * qk * _decay(g_ptr, docs_ptr, b, hh, c, HV, C, Tp)).to(DT)
    dl = tl.load(_tile(vnew_ptr, b, hh, c, iv * BV, HV, C, Tp, V, BV))
    o = o * (scale * gamma)[:, None] + tl.dot(p, dl)
    tl.store(_tile(o_ptr, b, hh, c, iv * BV, HV, C, Tp, V, BV), o.to(o_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------- backward
@triton.jit
def gated_delta_bwd_dv_local(q_ptr, k_ptr, do_ptr, g_ptr, docs_ptr, carry_ptr, tail_ptr,
                             dvl_ptr,
                             HV: tl.constexpr, Tp: tl.constexpr, K: tl.constexpr,
                             V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr, scale: tl.constexpr):
    """Grid (NC, B·HV): the intra-chunk part of ∂L/∂δ, Pᵀ do (f32), over every V tile."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HV
    hh = bh % HV
    DT = q_ptr.dtype.element_ty
    G, decay, gamma, gamma_o, lam = _masks(g_ptr, docs_ptr, carry_ptr, tail_ptr, b, hh, c,
                                           HV, C, Tp)
    qk = tl.zeros((C, C), tl.float32)
    for kt in range(K // BK):
        qb = tl.load(_tile(q_ptr, b, hh, c, kt * BK, HV, C, Tp, K, BK))
        kb = tl.load(_tile(k_ptr, b, hh, c, kt * BK, HV, C, Tp, K, BK))
        qk += tl.dot(qb, tl.trans(kb))
    pt = tl.trans(scale * qk * _decay(g_ptr, docs_ptr, b, hh, c, HV, C, Tp)).to(DT)   # Pᵀ
    for vt in range(V // BV):
        do = tl.load(_tile(do_ptr, b, hh, c, vt * BV, HV, C, Tp, V, BV))
        tl.store(_tile(dvl_ptr, b, hh, c, vt * BV, HV, C, Tp, V, BV), tl.dot(pt, do))


@triton.jit
def gated_delta_bwd_dh(q_ptr, k_ptr, w_ptr, do_ptr, dvl_ptr, g_ptr, docs_ptr, carry_ptr,
                       tail_ptr, dfinal_ptr,
                       dh_ptr, dd_ptr, ds0_ptr,
                       HV: tl.constexpr, Tp: tl.constexpr, NC: tl.constexpr, K: tl.constexpr,
                       V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                       scale: tl.constexpr, NKS: tl.constexpr):
    """Grid (V / BV, B·HV); the only sequential backward kernel. D = ∂L/∂S [K, BV] f32 (NKS row
    slices, as in :func:`gated_delta_fwd_h`), from dfinal, for c = NC-1..0:  dh_c = D (DT);
    dδ_c = Pᵀdo_c + (γo k)_c D (f32);  D <- (scale γ q)_cᵀ do_c + λ_c D − w_cᵀ dδ_c.
    Stores ds0 = D."""
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HV
    hh = bh % HV
    DT = q_ptr.dtype.element_ty
    KS: tl.constexpr = K // NKS
    d1 = tl.load(_state_tile(dfinal_ptr, bh, 0, 0, iv * BV, 1, K, V, KS, BV))  # [KS, BV] f32
    d2 = tl.zeros((KS, BV), tl.float32)
    if NKS == 2:
        d2 = tl.load(_state_tile(dfinal_ptr, bh, 0, KS, iv * BV, 1, K, V, KS, BV))
    for j in range(NC):
        c = NC - 1 - j
        tl.store(_state_tile(dh_ptr, bh, c, 0, iv * BV, NC, K, V, KS, BV), d1.to(DT))
        G, decay, gamma, gamma_o, lam = _masks(g_ptr, docs_ptr, carry_ptr, tail_ptr, b, hh, c,
                                               HV, C, Tp)
        k1 = tl.load(_tile(k_ptr, b, hh, c, 0, HV, C, Tp, K, KS)).to(tl.float32)
        dd = tl.load(_tile(dvl_ptr, b, hh, c, iv * BV, HV, C, Tp, V, BV))
        dd += tl.dot((k1 * gamma_o[:, None]).to(DT), d1.to(DT))
        if NKS == 2:
            tl.store(_state_tile(dh_ptr, bh, c, KS, iv * BV, NC, K, V, KS, BV), d2.to(DT))
            k2 = tl.load(_tile(k_ptr, b, hh, c, KS, HV, C, Tp, K, KS)).to(tl.float32)
            dd += tl.dot((k2 * gamma_o[:, None]).to(DT), d2.to(DT))
        tl.store(_tile(dd_ptr, b, hh, c, iv * BV, HV, C, Tp, V, BV), dd)
        do = tl.load(_tile(do_ptr, b, hh, c, iv * BV, HV, C, Tp, V, BV))
        ddt = dd.to(DT)
        q1 = tl.load(_tile(q_ptr, b, hh, c, 0, HV, C, Tp, K, KS)).to(tl.float32)
        w1 = tl.load(_tile(w_ptr, b, hh, c, 0, HV, C, Tp, K, KS))
        d1 = (lam * d1 + tl.dot(tl.trans((q1 * (scale * gamma)[:, None]).to(DT)), do)
              - tl.dot(tl.trans(w1), ddt))
        if NKS == 2:
            q2 = tl.load(_tile(q_ptr, b, hh, c, KS, HV, C, Tp, K, KS)).to(tl.float32)
            w2 = tl.load(_tile(w_ptr, b, hh, c, KS, HV, C, Tp, K, KS))
            d2 = (lam * d2 + tl.dot(tl.trans((q2 * (scale * gamma)[:, None]).to(DT)), do)
                  - tl.dot(tl.trans(w2), ddt))
    tl.store(_state_tile(ds0_ptr, bh, 0, 0, iv * BV, 1, K, V, KS, BV), d1)
    if NKS == 2:
        tl.store(_state_tile(ds0_ptr, bh, 0, KS, iv * BV, 1, K, V, KS, BV), d2)


@triton.jit
def gated_delta_bwd_dqkw(do_ptr, vnew_ptr, dd_ptr, h_ptr, dh_ptr,
                         dqg_ptr, dkg_ptr, dw_ptr,
                         HV: tl.constexpr, Tp: tl.constexpr, NC: tl.constexpr, K: tl.constexpr,
                         V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Grid (K / BK, NC, B·HV): the state's share of the K-sized gradients, summed over every V
    tile here:  dqg = do h_cᵀ,  dkg = δ dh_cᵀ,  dw = −dδ h_cᵀ  (f32, [C, BK] each)."""
    ik = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HV
    hh = bh % HV
    DT = do_ptr.dtype.element_ty
    dqg = tl.zeros((C, BK), tl.float32)
    dkg = tl.zeros((C, BK), tl.float32)
    dw = tl.zeros((C, BK), tl.float32)
    for vt in range(V // BV):
        do = tl.load(_tile(do_ptr, b, hh, c, vt * BV, HV, C, Tp, V, BV))
        dl = tl.load(_tile(vnew_ptr, b, hh, c, vt * BV, HV, C, Tp, V, BV))
        dd = tl.load(_tile(dd_ptr, b, hh, c, vt * BV, HV, C, Tp, V, BV)).to(DT)
        hb = tl.load(_state_tile(h_ptr, bh, c, ik * BK, vt * BV, NC, K, V, BK, BV))
        dhb = tl.load(_state_tile(dh_ptr, bh, c, ik * BK, vt * BV, NC, K, V, BK, BV))
        dqg += tl.dot(do, tl.trans(hb))
        dkg += tl.dot(dl, tl.trans(dhb))
        dw -= tl.dot(dd, tl.trans(hb))
    tl.store(_tile(dqg_ptr, b, hh, c, ik * BK, HV, C, Tp, K, BK), dqg)
    tl.store(_tile(dkg_ptr, b, hh, c, ik * BK, HV, C, Tp, K, BK), dkg)
    tl.store(_tile(dw_ptr, b, hh, c, ik * BK, HV, C, Tp, K, BK), dw)


@triton.jit
def gated_delta_bwd_wy_v(v_ptr, beta_ptr, t_ptr, vnew_ptr, do_ptr, dd_ptr,
                         dv_ptr, sbv_ptr, dtv_ptr, dp_ptr,
                         HV: tl.constexpr, Tp: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                         BV: tl.constexpr):
    """Grid (NC, B·HV): the value side of the backward through the chunk's factors, over every
    V tile (u = T bv, bv = β v, du = dδ):  dT_v = du bvᵀ,  dP = do δᵀ (f32 [C, C] each),
    dbv = Tᵀ du -> dv = β dbv,  and dbv·v (f32 [C]) for dβ."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HV
    hh = bh % HV
    DT = v_ptr.dtype.element_ty
    f32 = tl.float32
    r = tl.arange(0, C)
    beta = tl.load(beta_ptr + (b * Tp + c * C + r) * HV + hh)
    sq = ((b * Tp + c * C + r[:, None]) * HV + hh) * C + r[None, :]
    dt = tl.zeros((C, C), f32)
    dp = tl.zeros((C, C), f32)
    s_bv = tl.zeros((C,), f32)
    for vt in range(V // BV):
        vb = tl.load(_tile(v_ptr, b, hh, c, vt * BV, HV, C, Tp, V, BV))
        du = tl.load(_tile(dd_ptr, b, hh, c, vt * BV, HV, C, Tp, V, BV)).to(DT)
        do = tl.load(_tile(do_ptr, b, hh, c, vt * BV, HV, C, Tp, V, BV))
        dl = tl.load(_tile(vnew_ptr, b, hh, c, vt * BV, HV, C, Tp, V, BV))
        vf = vb.to(f32)
        dt += tl.dot(du, tl.trans((vf * beta[:, None]).to(DT)))
        dp += tl.dot(do, tl.trans(dl))
        dbv = tl.dot(tl.trans(tl.load(t_ptr + sq)), du)                  # Tᵀ du
        tl.store(_tile(dv_ptr, b, hh, c, vt * BV, HV, C, Tp, V, BV), dbv * beta[:, None])
        s_bv += tl.sum(dbv * vf, axis=1)
    tl.store(dtv_ptr + sq, dt)
    tl.store(dp_ptr + sq, dp)
    tl.store(sbv_ptr + (b * Tp + c * C + r) * HV + hh, s_bv)


@triton.jit
def gated_delta_bwd_wy(q_ptr, k_ptr, beta_ptr, g_ptr, docs_ptr, carry_ptr, tail_ptr,
                       t_ptr, h_ptr, dh_ptr, dqg_ptr, dkg_ptr, dw_ptr, dtv_ptr, dp_ptr, sbv_ptr,
                       dbeta_ptr, dg_ptr, dkk_ptr, dqk_ptr,
                       HV: tl.constexpr, Tp: tl.constexpr, NC: tl.constexpr, K: tl.constexpr,
                       V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       scale: tl.constexpr):
    """Grid (NC, B·HV): the key side of the backward through the chunk's factors (the math of
    ``chunked._prepare_bwd``), every K reduction owned here, after
    :func:`gated_delta_bwd_wy_v`; dq, dk follow in :func:`gated_delta_bwd_dqdk` from the score
    gradients dkk, dqk stored here (f32 [C, C]).

    w = T bk, u = T bv (bk = β γ k, bv = β v):  dT = dw bkᵀ + du bvᵀ,  dbk = Tᵀ dw,
    dA = −Tᵀ dT Tᵀ;  dP = do δᵀ;  dm = β_i dA ⊙ strict;
    dkk = dm ⊙ decay;  dqk = scale dP ⊙ decay;  ddecay = dm ⊙ kkᵀ + scale dP ⊙ qkᵀ;
    dβ_i = Σ_j dA ⊙ kk ⊙ decay ⊙ strict + γ (dbk·k) + dbv·v;
    dG_i = Σ_j (ddecay ⊙ decay)_ij − Σ_j (ddecay ⊙ decay)_ji + γ dγ − γo dγo (+ the last row's
    share: Σ γo dγo + λ dλ, dλ = Σ h_c ⊙ dh_c),  dγ = β (dbk·k) + scale dqg·q,  dγo = dkg·k.
    dg = the reverse cumsum of dG within each chunk (in XLA)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HV
    hh = bh % HV
    DT = q_ptr.dtype.element_ty
    f32 = tl.float32
    r = tl.arange(0, C)
    beta = tl.load(beta_ptr + (b * Tp + c * C + r) * HV + hh)
    t_ptrs = t_ptr + ((b * Tp + c * C + r[:, None]) * HV + hh) * C + r[None, :]
    sq = ((b * Tp + c * C + r[:, None]) * HV + hh) * C + r[None, :]
    dt = tl.load(dtv_ptr + sq)                                           # dT's bv share
    # K pass: kk, qk, dT's bk share, dbk·k, dqg·q, dkg·k
    G, decay, gamma, gamma_o, lam = _masks(g_ptr, docs_ptr, carry_ptr, tail_ptr, b, hh, c,
                                           HV, C, Tp)
    kk = tl.zeros((C, C), f32)
    qk = tl.zeros((C, C), f32)
    s_bk = tl.zeros((C,), f32)
    s_qg = tl.zeros((C,), f32)
    s_kg = tl.zeros((C,), f32)
    for kt in range(K // BK):
        qb = tl.load(_tile(q_ptr, b, hh, c, kt * BK, HV, C, Tp, K, BK))
        kb = tl.load(_tile(k_ptr, b, hh, c, kt * BK, HV, C, Tp, K, BK))
        dw = tl.load(_tile(dw_ptr, b, hh, c, kt * BK, HV, C, Tp, K, BK))
        dqg = tl.load(_tile(dqg_ptr, b, hh, c, kt * BK, HV, C, Tp, K, BK))
        dkg = tl.load(_tile(dkg_ptr, b, hh, c, kt * BK, HV, C, Tp, K, BK))
        kf = kb.to(f32)
        kk += tl.dot(kb, tl.trans(kb))
        qk += tl.dot(qb, tl.trans(kb))
        bk = (kf * (beta * gamma)[:, None]).to(DT)
        dt += tl.dot(dw.to(DT), tl.trans(bk))
        dbk = tl.dot(tl.trans(tl.load(t_ptrs)), dw.to(DT))
        s_bk += tl.sum(dbk * kf, axis=1)
        s_qg += tl.sum(dqg * qb.to(f32), axis=1)
        s_kg += tl.sum(dkg * kf, axis=1)
    # dλ = Σ h_c ⊙ dh_c over the whole state
    hdh = tl.zeros((BK, BV), f32)
    for kt in range(K // BK):
        for vt in range(V // BV):
            hb = tl.load(_state_tile(h_ptr, bh, c, kt * BK, vt * BV, NC, K, V, BK, BV))
            dhb = tl.load(_state_tile(dh_ptr, bh, c, kt * BK, vt * BV, NC, K, V, BK, BV))
            hdh += hb.to(f32) * dhb.to(f32)
    dlam = tl.sum(tl.sum(hdh, axis=1), axis=0)
    # the epilogue in an order that lets each C×C matrix die early: the score part first
    decay = _decay(g_ptr, docs_ptr, b, hh, c, HV, C, Tp)
    dqk = scale * tl.load(dp_ptr + sq) * decay
    tl.store(dqk_ptr + sq, dqk)
    dd_qk = dqk * qk                                                     # ddecay ⊙ decay, P's
    dG = tl.sum(dd_qk, axis=1) - tl.sum(dd_qk, axis=0)
    tt = tl.trans(tl.load(t_ptrs))                                       # Tᵀ [C, C] DT
    da = -tl.dot(tl.dot(tt, dt.to(DT)).to(DT), tt)                        # −Tᵀ dT Tᵀ
    strict = r[:, None] > r[None, :]
    kkd = tl.where(strict, kk * decay, 0.0)
    s_bv = tl.load(sbv_ptr + (b * Tp + c * C + r) * HV + hh)
    dbeta = tl.sum(da * kkd, axis=1) + gamma * s_bk + s_bv
    dkk = tl.where(strict, beta[:, None] * da, 0.0) * decay
    tl.store(dkk_ptr + sq, dkk)
    dd_kk = dkk * kk                                                     # ddecay ⊙ decay, A's
    dG += tl.sum(dd_kk, axis=1) - tl.sum(dd_kk, axis=0)
    dgamma = beta * s_bk + scale * s_qg
    dG += dgamma * gamma - s_kg * gamma_o
    d_last = tl.sum(s_kg * gamma_o, axis=0) + dlam * lam
    dG += tl.where(r == C - 1, d_last, 0.0)
    tl.store(dbeta_ptr + (b * Tp + c * C + r) * HV + hh, dbeta)
    tl.store(dg_ptr + (b * Tp + c * C + r) * HV + hh, dG)


@triton.jit
def gated_delta_bwd_dqdk(q_ptr, k_ptr, beta_ptr, g_ptr, docs_ptr, carry_ptr, tail_ptr, t_ptr,
                         dkk_ptr, dqk_ptr, dqg_ptr, dkg_ptr, dw_ptr,
                         dq_ptr, dk_ptr,
                         HV: tl.constexpr, Tp: tl.constexpr, K: tl.constexpr,
                         C: tl.constexpr, BK: tl.constexpr, scale: tl.constexpr):
    """Grid (K / BK, NC, B·HV):  dq = dqk k + scale γ dqg,
    dk = dkk k + dkkᵀ k + dqkᵀ q + β γ Tᵀ dw + γo dkg  (f32 [C, BK])."""
    ik = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HV
    hh = bh % HV
    DT = q_ptr.dtype.element_ty
    r = tl.arange(0, C)
    G, decay, gamma, gamma_o, lam = _masks(g_ptr, docs_ptr, carry_ptr, tail_ptr, b, hh, c,
                                           HV, C, Tp)
    beta = tl.load(beta_ptr + (b * Tp + c * C + r) * HV + hh)
    sq = ((b * Tp + c * C + r[:, None]) * HV + hh) * C + r[None, :]
    kb = tl.load(_tile(k_ptr, b, hh, c, ik * BK, HV, C, Tp, K, BK))
    # one C×C operand at a time (each read when its dots come)
    dqk = tl.load(dqk_ptr + sq).to(DT)
    dqg = tl.load(_tile(dqg_ptr, b, hh, c, ik * BK, HV, C, Tp, K, BK))
    dq = tl.dot(dqk, kb) + (scale * gamma)[:, None] * dqg
    tl.store(_tile(dq_ptr, b, hh, c, ik * BK, HV, C, Tp, K, BK), dq)
    qb = tl.load(_tile(q_ptr, b, hh, c, ik * BK, HV, C, Tp, K, BK))
    dk = tl.dot(tl.trans(dqk), qb)
    dkk = tl.load(dkk_ptr + sq).to(DT)
    dk += tl.dot(dkk, kb) + tl.dot(tl.trans(dkk), kb)
    dw = tl.load(_tile(dw_ptr, b, hh, c, ik * BK, HV, C, Tp, K, BK)).to(DT)
    dk = dk + (beta * gamma)[:, None] * tl.dot(tl.trans(tl.load(t_ptr + sq)), dw)
    dkg = tl.load(_tile(dkg_ptr, b, hh, c, ik * BK, HV, C, Tp, K, BK))
    tl.store(_tile(dk_ptr, b, hh, c, ik * BK, HV, C, Tp, K, BK), dk + gamma_o[:, None] * dkg)
