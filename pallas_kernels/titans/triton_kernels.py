"""Titans linear memory: the ``@triton.jit`` kernels (math and data flow in ``gpu.py``).

Four kernels, per (batch·head) ``bh``; C = the gradient block (a power of two in 16..64), K, V
the padded feature sizes (powers of two >= 16), BK / BV their tiles, N = T / C blocks:

* ``titans_fwd_h``  grid (V / BV, BH), sequential over blocks: (M, S) [K, BV] in registers,
  stores M, S entering every block (input dtype) and E = 2(k M − v) of every block.
* ``titans_fwd_o``  grid (V / BV, N, BH): y = qa M + qc S − pm E, looping over K tiles.
* ``titans_bwd_dh`` grid (V / BV, BH), reverse over blocks: (dM, dS) [K, BV] in registers,
  stores them leaving every block, and dv = −2 dE.
* ``titans_bwd_dk`` grid (N, BH): one block's products over the whole (K, V) state — dpm, then
  per K tile dqa, dqc, dkd, dkp, dk summed over V tiles — and the three decay scalars.

Layouts (row-major, contiguous): sequences [BH, T, D]; pm [BH, T, C]; per-block states
[BH, N, K, V]; per-block scalars [BH, N]; states [BH, K, V]. Every tile divides its array (the
wrapper pads), so no load or store is masked except the last block's extra cotangent. Offsets of
the batch·head and block axes are int64 (N·K·V·BH passes 2³¹ at long T). Dot operands are the
input dtype (bf16, or fp32 -> TF32 on a GPU), accumulation float32; carried states float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["titans_fwd_h", "titans_fwd_o", "titans_bwd_dh", "titans_bwd_dk"]


@triton.jit
def titans_fwd_h(k_ptr, v_ptr, kd_ptr, kp_ptr, a0e_ptr, ce_ptr, p0e_ptr, m0_ptr, s0_ptr,
                 ms_ptr, ss_ptr, e_ptr, mf_ptr, sf_ptr, ml_ptr,
                 T: tl.constexpr, N: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                 V: tl.constexpr, BV: tl.constexpr):
    """M, S [K, BV] carried over N blocks; per block: store (M, S), E = 2(k M − v),
    M <- a0e M + ce S − kdᵀ E, S <- p0e S − kpᵀ E. Ends with M, S and M entering block N-1."""
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    dt = ms_ptr.dtype.element_ty
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    st = rk[:, None] * V + rv[None, :]                                   # [K, BV] in a state
    seq_k = bh * T * K + rc[:, None] * K + rk[None, :]                   # [C, K] of block 0
    seq_v = bh * T * V + rc[:, None] * V + rv[None, :]                   # [C, BV]
    m = tl.load(m0_ptr + bh * K * V + st)                                # f32 [K, BV]
    s = tl.load(s0_ptr + bh * K * V + st)
    for c in range(N):
        blk = (bh * N + c) * K * V
        md = m.to(dt)
        tl.store(ms_ptr + blk + st, md)
        tl.store(ss_ptr + blk + st, s.to(dt))
        tl.store(ml_ptr + bh * K * V + st, m, mask=(rk[:, None] * 0 + c) == N - 1)
        kb = tl.load(k_ptr + seq_k + c * C * K)                          # [C, K]
        vb = tl.load(v_ptr + seq_v + c * C * V).to(tl.float32)           # [C, BV]
        e = 2.0 * (tl.dot(kb, md) - vb)                                  # [C, BV] f32
        ed = e.to(dt)
        tl.store(e_ptr + seq_v + c * C * V, ed)
        kd = tl.load(kd_ptr + seq_k + c * C * K)                         # [C, K]
        kp = tl.load(kp_ptr + seq_k + c * C * K)
        a0e = tl.load(a0e_ptr + bh * N + c)
        ce = tl.load(ce_ptr + bh * N + c)
        p0e = tl.load(p0e_ptr + bh * N + c)
        m_new = a0e * m + ce * s - tl.dot(tl.trans(kd), ed)             # [K, BV]
        s = p0e * s - tl.dot(tl.trans(kp), ed)
        m = m_new
    tl.store(mf_ptr + bh * K * V + st, m)
    tl.store(sf_ptr + bh * K * V + st, s)


@triton.jit
def titans_fwd_o(qa_ptr, qc_ptr, pm_ptr, ms_ptr, ss_ptr, e_ptr, y_ptr,
                 T: tl.constexpr, N: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                 V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """y = qa M + qc S − pm E for one (value tile, block): the states entering the block."""
    iv = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    row = bh * T + c * C + rc                                            # [C] token rows
    seq_v = row[:, None] * V + rv[None, :]                               # [C, BV]
    blk = (bh * N + c) * K * V
    pm = tl.load(pm_ptr + row[:, None] * C + rc[None, :])                # [C, C]
    e = tl.load(e_ptr + seq_v)                                           # [C, BV]
    acc = -tl.dot(pm, e)                                                 # f32 [C, BV]
    for ik in range(K // BK):
        kk = ik * BK + rk
        qa = tl.load(qa_ptr + row[:, None] * K + kk[None, :])            # [C, BK]
        qc = tl.load(qc_ptr + row[:, None] * K + kk[None, :])
        st = blk + kk[:, None] * V + rv[None, :]                         # [BK, BV]
        acc += tl.dot(qa, tl.load(ms_ptr + st))
        acc += tl.dot(qc, tl.load(ss_ptr + st))
    tl.store(y_ptr + seq_v, acc.to(y_ptr.dtype.element_ty))


@triton.jit
def titans_bwd_dh(qa_ptr, qc_ptr, k_ptr, kd_ptr, kp_ptr, pm_ptr, dy_ptr, a0e_ptr, ce_ptr,
                  p0e_ptr, dmf_ptr, dsf_ptr, dml_ptr,
                  dms_ptr, dss_ptr, dv_ptr, dm0_ptr, ds0_ptr,
                  T: tl.constexpr, N: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, BV: tl.constexpr):
    """(dM, dS) [K, BV] carried from the end back over N blocks; per block c (dM, dS leaving
    it): store them, dE = −pmᵀ dy − kd dM − kp dS, dv = −2 dE,
    dM <- qaᵀ dy + a0e dM + 2 kᵀ dE (+ the cotangent of M entering block N-1 at c = N-1),
    dS <- qcᵀ dy + ce dM + p0e dS. Ends with the cotangents of (M, S) entering block 0."""
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    dt = dms_ptr.dtype.element_ty
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    st = rk[:, None] * V + rv[None, :]                                   # [K, BV]
    seq_k = bh * T * K + rc[:, None] * K + rk[None, :]                   # [C, K] of block 0
    seq_v = bh * T * V + rc[:, None] * V + rv[None, :]                   # [C, BV]
    dm = tl.load(dmf_ptr + bh * K * V + st)                              # f32 [K, BV]
    ds = tl.load(dsf_ptr + bh * K * V + st)
    for j in range(N):
        c = N - 1 - j
        blk = (bh * N + c) * K * V
        dmd = dm.to(dt)
        dsd = ds.to(dt)
        tl.store(dms_ptr + blk + st, dmd)
        tl.store(dss_ptr + blk + st, dsd)
        dy = tl.load(dy_ptr + seq_v + c * C * V)                         # [C, BV]
        pm = tl.load(pm_ptr + bh * T * C + (c * C + rc[:, None]) * C + rc[None, :])  # [C, C]
        kd = tl.load(kd_ptr + seq_k + c * C * K)                         # [C, K]
        kp = tl.load(kp_ptr + seq_k + c * C * K)
        de = -tl.dot(tl.trans(pm), dy) - tl.dot(kd, dmd) - tl.dot(kp, dsd)   # f32 [C, BV]
        tl.store(dv_ptr + seq_v + c * C * V, (-2.0 * de).to(dv_ptr.dtype.element_ty))
        qa = tl.load(qa_ptr + seq_k + c * C * K)                         # [C, K]
        qc = tl.load(qc_ptr + seq_k + c * C * K)
        kb = tl.load(k_ptr + seq_k + c * C * K)
        a0e = tl.load(a0e_ptr + bh * N + c)
        ce = tl.load(ce_ptr + bh * N + c)
        p0e = tl.load(p0e_ptr + bh * N + c)
        last = tl.load(dml_ptr + bh * K * V + st, mask=(rk[:, None] * 0 + c) == N - 1,
                       other=0.0)
        dm_new = (tl.dot(tl.trans(qa), dy) + a0e * dm
                  + 2.0 * tl.dot(tl.trans(kb), de.to(dt)) + last)
        ds = tl.dot(tl.trans(qc), dy) + ce * dm + p0e * ds
        dm = dm_new
    tl.store(dm0_ptr + bh * K * V + st, dm)
    tl.store(ds0_ptr + bh * K * V + st, ds)


@triton.jit
def titans_bwd_dk(dy_ptr, e_ptr, dv_ptr, ms_ptr, ss_ptr, dms_ptr, dss_ptr,
                  dqa_ptr, dqc_ptr, dkd_ptr, dkp_ptr, dk_ptr, dpm_ptr, da0e_ptr, dce_ptr,
                  dp0e_ptr,
                  T: tl.constexpr, N: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """One block's cotangents, (M, S) entering it and (dM, dS) leaving it, dE = −dv / 2:
    dpm = −dy Eᵀ; dqa = dy Mᵀ; dqc = dy Sᵀ; dkd = −E dMᵀ; dkp = −E dSᵀ; dk = 2 dE Mᵀ = −dv Mᵀ;
    da0e = Σ M ⊙ dM; dce = Σ S ⊙ dM; dp0e = Σ S ⊙ dS (over the whole [K, V] state)."""
    c = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    row = bh * T + c * C + rc                                            # [C] token rows
    blk = (bh * N + c) * K * V
    dpm = tl.zeros((C, C), tl.float32)
    for iv in range(V // BV):
        seq_v = row[:, None] * V + (iv * BV + rv)[None, :]               # [C, BV]
        dpm -= tl.dot(tl.load(dy_ptr + seq_v), tl.trans(tl.load(e_ptr + seq_v)))
    tl.store(dpm_ptr + row[:, None] * C + rc[None, :], dpm.to(dpm_ptr.dtype.element_ty))
    a0_sum = tl.zeros((), tl.float32)
    c_sum = tl.zeros((), tl.float32)
    p0_sum = tl.zeros((), tl.float32)
    for ik in range(K // BK):
        kk = ik * BK + rk
        dqa = tl.zeros((C, BK), tl.float32)
        dqc = tl.zeros((C, BK), tl.float32)
        dkd = tl.zeros((C, BK), tl.float32)
        dkp = tl.zeros((C, BK), tl.float32)
        dk = tl.zeros((C, BK), tl.float32)
        for iv in range(V // BV):
            vv = iv * BV + rv
            seq_v = row[:, None] * V + vv[None, :]                       # [C, BV]
            st = blk + kk[:, None] * V + vv[None, :]                     # [BK, BV]
            dy = tl.load(dy_ptr + seq_v)
            e = tl.load(e_ptr + seq_v)
            dv = tl.load(dv_ptr + seq_v)
            m = tl.load(ms_ptr + st)
            s = tl.load(ss_ptr + st)
            dm = tl.load(dms_ptr + st)
            ds = tl.load(dss_ptr + st)
            dqa += tl.dot(dy, tl.trans(m))
            dqc += tl.dot(dy, tl.trans(s))
            dkd -= tl.dot(e, tl.trans(dm))
            dkp -= tl.dot(e, tl.trans(ds))
            dk -= tl.dot(dv, tl.trans(m))
            mf, sf, dmf = m.to(tl.float32), s.to(tl.float32), dm.to(tl.float32)
            a0_sum += tl.sum(mf * dmf)
            c_sum += tl.sum(sf * dmf)
            p0_sum += tl.sum(sf * ds.to(tl.float32))
        seq_k = row[:, None] * K + kk[None, :]                           # [C, BK]
        dty = dqa_ptr.dtype.element_ty
        tl.store(dqa_ptr + seq_k, dqa.to(dty))
        tl.store(dqc_ptr + seq_k, dqc.to(dty))
        tl.store(dkd_ptr + seq_k, dkd.to(dty))
        tl.store(dkp_ptr + seq_k, dkp.to(dty))
        tl.store(dk_ptr + seq_k, dk.to(dty))
    tl.store(da0e_ptr + bh * N + c, a0_sum)
    tl.store(dce_ptr + bh * N + c, c_sum)
    tl.store(dp0e_ptr + bh * N + c, p0_sum)
