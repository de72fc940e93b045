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
wrapper pads), so no load or store is masked except the last block's extra cotangent. Each
program moves its pointers to its (batch·head[, block]) with int64 scalar offsets (BH·N·K·V
passes 2³¹ at long T) and addresses tiles with int32 offsets (fewer 64-bit registers). Dot
operands are the input dtype (bf16, or fp32 -> TF32 on a GPU), accumulation float32; carried
states float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["titans_fwd_h", "titans_fwd_o", "titans_bwd_dh", "titans_bwd_dk"]


@triton.jit
def titans_fwd_h(k_ptr, v_ptr, kd_ptr, kp_ptr, a0e_ptr, ce_ptr, p0e_ptr, m0_ptr, s0_ptr,
                 ms_ptr, ss_ptr, e_ptr, mf_ptr, sf_ptr, ml_ptr,
                 T: tl.constexpr, N: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                 V: tl.constexpr, BV: tl.constexpr, CS: tl.constexpr):
    """M, S [K, BV] carried over N blocks; per block: store (M, S), E = 2(k M − v),
    M <- a0e M + ce S − kdᵀ E, S <- p0e S − kpᵀ E. Ends with M, S and M entering block N-1.
    The rows of E are independent given M, so a block is taken CS rows at a time: the [CS, K]
    operands stay small in registers and shared memory whatever b and K."""
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    dt = ms_ptr.dtype.element_ty
    k_ptr += bh * T * K
    kd_ptr += bh * T * K
    kp_ptr += bh * T * K
    v_ptr += bh * T * V
    e_ptr += bh * T * V
    ms_ptr += bh * N * K * V
    ss_ptr += bh * N * K * V
    rc = tl.arange(0, CS)
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    st = rk[:, None] * V + rv[None, :]                                   # [K, BV] in a state
    tk = rc[:, None] * K + rk[None, :]                                   # [CS, K] rows 0..CS
    tv = rc[:, None] * V + rv[None, :]                                   # [CS, BV]
    m = tl.load(m0_ptr + bh * K * V + st)                                # f32 [K, BV]
    s = tl.load(s0_ptr + bh * K * V + st)
    for c in range(N):
        md = m.to(dt)
        tl.store(ms_ptr + c * K * V + st, md)
        tl.store(ss_ptr + c * K * V + st, s.to(dt))
        tl.store(ml_ptr + bh * K * V + st, m, mask=(rk[:, None] * 0 + c) == N - 1)
        a0e = tl.load(a0e_ptr + bh * N + c)
        ce = tl.load(ce_ptr + bh * N + c)
        p0e = tl.load(p0e_ptr + bh * N + c)
        m_new = a0e * m + ce * s                                         # [K, BV]
        s = p0e * s
        for j in range(C // CS):
            r0 = c * C + j * CS
            kb = tl.load(k_ptr + r0 * K + tk)                            # [CS, K]
            vb = tl.load(v_ptr + r0 * V + tv).to(tl.float32)             # [CS, BV]
            ed = (2.0 * (tl.dot(kb, md) - vb)).to(dt)                    # E rows [CS, BV]
            tl.store(e_ptr + r0 * V + tv, ed)
            kd = tl.load(kd_ptr + r0 * K + tk)                           # [CS, K]
            m_new -= tl.dot(tl.trans(kd), ed)
            kp = tl.load(kp_ptr + r0 * K + tk)
            s -= tl.dot(tl.trans(kp), ed)
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
    row0 = bh * T + c * C                                                # first token row
    qa_ptr += row0 * K
    qc_ptr += row0 * K
    blk = (bh * N + c) * K * V
    ms_ptr += blk
    ss_ptr += blk
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    tv = rc[:, None] * V + rv[None, :]                                   # [C, BV]
    pm = tl.load(pm_ptr + row0 * C + rc[:, None] * C + rc[None, :])      # [C, C]
    e = tl.load(e_ptr + row0 * V + tv)                                   # [C, BV]
    acc = -tl.dot(pm, e)                                                 # f32 [C, BV]
    for ik in range(K // BK):
        kk = ik * BK + rk
        tk = rc[:, None] * K + kk[None, :]                               # [C, BK]
        st = kk[:, None] * V + rv[None, :]                               # [BK, BV]
        acc += tl.dot(tl.load(qa_ptr + tk), tl.load(ms_ptr + st))
        acc += tl.dot(tl.load(qc_ptr + tk), tl.load(ss_ptr + st))
    tl.store(y_ptr + row0 * V + tv, acc.to(y_ptr.dtype.element_ty))


@triton.jit
def titans_bwd_dh(qa_ptr, qc_ptr, k_ptr, kd_ptr, kp_ptr, pm_ptr, dy_ptr, a0e_ptr, ce_ptr,
                  p0e_ptr, dmf_ptr, dsf_ptr, dml_ptr,
                  dms_ptr, dss_ptr, dv_ptr, dm0_ptr, ds0_ptr,
                  T: tl.constexpr, N: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, BV: tl.constexpr, CS: tl.constexpr):
    """(dM, dS) [K, BV] carried from the end back over N blocks; per block c (dM, dS leaving
    it): store them, dE = −pmᵀ dy − kd dM − kp dS, dv = −2 dE,
    dM <- qaᵀ dy + a0e dM + 2 kᵀ dE (+ the cotangent of M entering block N-1 at c = N-1),
    dS <- qcᵀ dy + ce dM + p0e dS. Ends with the cotangents of (M, S) entering block 0.
    Rows of dE are independent given (dM, dS, dy): CS rows at a time, as in the forward."""
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    dt = dms_ptr.dtype.element_ty
    qa_ptr += bh * T * K
    qc_ptr += bh * T * K
    k_ptr += bh * T * K
    kd_ptr += bh * T * K
    kp_ptr += bh * T * K
    pm_ptr += bh * T * C
    dy_ptr += bh * T * V
    dv_ptr += bh * T * V
    dms_ptr += bh * N * K * V
    dss_ptr += bh * N * K * V
    rs = tl.arange(0, CS)
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    st = rk[:, None] * V + rv[None, :]                                   # [K, BV]
    tk = rs[:, None] * K + rk[None, :]                                   # [CS, K] rows 0..CS
    tv = rs[:, None] * V + rv[None, :]                                   # [CS, BV]
    dm = tl.load(dmf_ptr + bh * K * V + st)                              # f32 [K, BV]
    ds = tl.load(dsf_ptr + bh * K * V + st)
    for j in range(N):
        c = N - 1 - j
        dmd = dm.to(dt)
        dsd = ds.to(dt)
        tl.store(dms_ptr + c * K * V + st, dmd)
        tl.store(dss_ptr + c * K * V + st, dsd)
        dy = tl.load(dy_ptr + (c * C + rc[:, None]) * V + rv[None, :])  # [C, BV]
        a0e = tl.load(a0e_ptr + bh * N + c)
        ce = tl.load(ce_ptr + bh * N + c)
        p0e = tl.load(p0e_ptr + bh * N + c)
        last = tl.load(dml_ptr + bh * K * V + st, mask=(rk[:, None] * 0 + c) == N - 1,
                       other=0.0)
        dm_new = a0e * dm + last                                         # [K, BV]
        ds = ce * dm + p0e * ds
        for i in range(C // CS):
            r0 = c * C + i * CS
            pm = tl.load(pm_ptr + (c * C + rc[:, None]) * C + i * CS + rs[None, :])  # [C, CS]
            kd = tl.load(kd_ptr + r0 * K + tk)                           # [CS, K]
            kp = tl.load(kp_ptr + r0 * K + tk)
            de = -tl.dot(tl.trans(pm), dy) - tl.dot(kd, dmd) - tl.dot(kp, dsd)  # [CS, BV]
            tl.store(dv_ptr + r0 * V + tv, (-2.0 * de).to(dv_ptr.dtype.element_ty))
            dys = tl.load(dy_ptr + r0 * V + tv)                          # [CS, BV]
            qa = tl.load(qa_ptr + r0 * K + tk)                           # [CS, K]
            kb = tl.load(k_ptr + r0 * K + tk)
            dm_new += tl.dot(tl.trans(qa), dys) + 2.0 * tl.dot(tl.trans(kb), de.to(dt))
            qc = tl.load(qc_ptr + r0 * K + tk)
            ds += tl.dot(tl.trans(qc), dys)
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
    row0 = bh * T + c * C                                                # first token row
    dy_ptr += row0 * V
    e_ptr += row0 * V
    dv_ptr += row0 * V
    blk = (bh * N + c) * K * V
    ms_ptr += blk
    ss_ptr += blk
    dms_ptr += blk
    dss_ptr += blk
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    dpm = tl.zeros((C, C), tl.float32)
    for iv in range(V // BV):
        tv = rc[:, None] * V + (iv * BV + rv)[None, :]                   # [C, BV]
        dpm -= tl.dot(tl.load(dy_ptr + tv), tl.trans(tl.load(e_ptr + tv)))
    tl.store(dpm_ptr + row0 * C + rc[:, None] * C + rc[None, :],
             dpm.to(dpm_ptr.dtype.element_ty))
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
            tv = rc[:, None] * V + vv[None, :]                           # [C, BV]
            st = kk[:, None] * V + vv[None, :]                           # [BK, BV]
            dy = tl.load(dy_ptr + tv)
            e = tl.load(e_ptr + tv)
            dv = tl.load(dv_ptr + tv)
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
        tk = row0 * K + rc[:, None] * K + kk[None, :]                    # [C, BK]
        dty = dqa_ptr.dtype.element_ty
        tl.store(dqa_ptr + tk, dqa.to(dty))
        tl.store(dqc_ptr + tk, dqc.to(dty))
        tl.store(dkd_ptr + tk, dkd.to(dty))
        tl.store(dkp_ptr + tk, dkp.to(dty))
        tl.store(dk_ptr + tk, dk.to(dty))
    tl.store(da0e_ptr + bh * N + c, a0_sum)
    tl.store(dce_ptr + bh * N + c, c_sum)
    tl.store(dp0e_ptr + bh * N + c, p0_sum)
