"""Titans linear memory on GPU: Pallas kernels through the Triton backend, forward and backward.

For a linear memory (``{"w": [H, Dk, Dv]}``) with no packing and a fresh state, every grid block
of C = b tokens is one gradient block and its tokens' gradients are taken at the memory M the
block starts with: E = 2(K M − V) (rows e_s = 2(Mᵀk_s − v_s), G_s = k_s e_sᵀ). XLA builds the
per-block factors (``chunked.linear_kernel_factors``: the coefficients of ``chunked._plan``
folded into the operands), and the kernels run the sequential half, one program per (batch·head,
block of BV value columns) — value columns are independent — carrying (M, S) [K, BV] in a
``fori_loop`` over blocks:

    forward, block c:   E = 2(k M − v);   y = qa M + qc S − pm E
                        M <- a0e M + ce S − kdᵀ E;   S <- p0e S − kpᵀ E
    backward, c = N-1 .. 0, carrying (dM, dS) = ∂L/∂(M, S) leaving block c, with (M, S)
    entering it recomputed by the forward kernel (one state per block when asked):
        dE = −pmᵀ dy − kd dM − kp dS
        dqa = dy Mᵀ;  dqc = dy Sᵀ;  dpm = −dy Eᵀ;  dkd = −E dMᵀ;  dkp = −E dSᵀ;  dk = 2 dE Mᵀ
        dv = −2 dE;   da0e = Σ M ⊙ dM;   dce = Σ S ⊙ dM;   dp0e = Σ S ⊙ dS
        dM <- qaᵀ dy + a0e dM + 2 kᵀ dE;   dS <- qcᵀ dy + ce dM + p0e dS

The forward also returns the memory entering the last block (the state's ``block_start`` when
T is not a multiple of b); its cotangent joins dM there. Products summed over value columns come
out per value block and are summed in XLA. Triton needs power-of-two blocks: b must be a power
of two >= 16 (``supports``); K and V are zero-padded to powers of two (at least 16). Dots use
IEEE float32 (``Precision.HIGHEST``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.common import mm, mm_nt, mm_tn, next_pow2
from pallas_kernels.titans.chunked import run_linear_kernels
from pallas_kernels.titans.reference import TitansState

__all__ = ["supports", "fwd_call", "bwd_call", "recurrence", "titans_linear_triton"]

BLOCK_V = 32
NUM_WARPS = 4
NUM_STAGES = 1


BLOCK_RULE = "a power of two >= 16"  # Triton's tl.dot: power-of-two tiles of at least 16 rows


def supports(block_size: int) -> bool:
    """Whether the gradient block size is ``BLOCK_RULE``."""
    return block_size >= 16 and block_size & (block_size - 1) == 0


def _params():
    return pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _specs(tp, n_blocks, bv):
    """Block specs over a (batch·head, value block) grid: whole rows of width d, a value-column
    block of n rows, and the per-block scalars."""
    full = lambda d: pl.BlockSpec((None, tp, d), lambda b, j: (b, 0, 0))
    cols = lambda n: pl.BlockSpec((None, n, bv), lambda b, j: (b, 0, j))
    scal = pl.BlockSpec((None, n_blocks), lambda b, j: (b, 0))
    return full, cols, scal


# --------------------------------------------------------------------------- forward kernel
def _fwd_kernel(qa_ref, qc_ref, k_ref, v_ref, pm_ref, kd_ref, kp_ref, a0e_ref, ce_ref, p0e_ref,
                m0_ref, s0_ref, y_ref, m_ref, s_ref, mlast_ref, *states, n_blocks, chunk,
                k_size):
    def body(c, carry):
        m, s, _ = carry                                                   # [K, BV] each
        rows = pl.ds(c * chunk, chunk)
        if states:
            states[0][pl.ds(c * k_size, k_size), :] = m
            states[1][pl.ds(c * k_size, k_size), :] = s
        e = 2.0 * (mm(k_ref[rows, :], m) - v_ref[rows, :])              # [C, BV]
        y_ref[rows, :] = mm(qa_ref[rows, :], m) + mm(qc_ref[rows, :], s) - mm(
            pm_ref[rows, :], e)
        m_new = a0e_ref[c] * m + ce_ref[c] * s - mm_tn(kd_ref[rows, :], e)
        s_new = p0e_ref[c] * s - mm_tn(kp_ref[rows, :], e)
        return m_new, s_new, m

    m0 = m0_ref[...]
    m, s, m_last = lax.fori_loop(0, n_blocks, body, (m0, s0_ref[...], m0))
    m_ref[...] = m
    s_ref[...] = s
    mlast_ref[...] = m_last


def fwd_call(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0, *, chunk, block_v=BLOCK_V,
             with_states=False, interpret=False):
    """qa, qc, k, kd, kp: [BH, Tp, K]; v: [BH, Tp, V]; pm: [BH, Tp, C]; a0e, ce, p0e: [BH, N];
    m0, s0: [BH, K, V]. Returns (y [BH, Tp, V], M, S, M entering the last block [BH, K, V]) and,
    with ``with_states``, (M, S) entering every block [BH, N·K, V] each."""
    BH, Tp, K = qa.shape
    V = v.shape[-1]
    n_blocks = Tp // chunk
    bv = min(block_v, V)
    full, cols, scal = _specs(Tp, n_blocks, bv)
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    out_shape = [sds(BH, Tp, V), sds(BH, K, V), sds(BH, K, V), sds(BH, K, V)]
    out_specs = [cols(Tp), cols(K), cols(K), cols(K)]
    if with_states:
        out_shape += [sds(BH, n_blocks * K, V)] * 2
        out_specs += [cols(n_blocks * K)] * 2
    kernel = functools.partial(_fwd_kernel, n_blocks=n_blocks, chunk=chunk, k_size=K)
    return pl.pallas_call(
        kernel, grid=(BH, V // bv), out_shape=out_shape, out_specs=out_specs,
        in_specs=[full(K), full(K), full(K), cols(Tp), full(chunk), full(K), full(K),
                  scal, scal, scal, cols(K), cols(K)],
        compiler_params=_params(), interpret=interpret, name="titans_linear_fwd_triton",
    )(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0)


# --------------------------------------------------------------------------- backward kernel
def _bwd_kernel(qa_ref, qc_ref, k_ref, v_ref, pm_ref, kd_ref, kp_ref, a0e_ref, ce_ref, p0e_ref,
                ms_ref, ss_ref, dy_ref, dm_ref, ds_ref, dmlast_ref,
                dqa_ref, dqc_ref, dk_ref, dv_ref, dpm_ref, dkd_ref, dkp_ref, da0e_ref, dce_ref,
                dp0e_ref, dm0_ref, ds0_ref, *, n_blocks, chunk, k_size):
    dm_last = dmlast_ref[...]

    def body(j, carry):
        dm, ds = carry                                                    # leaving block c
        c = n_blocks - 1 - j
        rows = pl.ds(c * chunk, chunk)
        m = ms_ref[pl.ds(c * k_size, k_size), :]                          # entering block c
        s = ss_ref[pl.ds(c * k_size, k_size), :]
        k, qa, qc = k_ref[rows, :], qa_ref[rows, :], qc_ref[rows, :]
        kd, kp = kd_ref[rows, :], kp_ref[rows, :]
        e = 2.0 * (mm(k, m) - v_ref[rows, :])                            # [C, BV]
        dy = dy_ref[rows, :]
        de = -mm_tn(pm_ref[rows, :], dy) - mm(kd, dm) - mm(kp, ds)     # ∂L/∂E [C, BV]
        dqa_ref[rows, :] = mm_nt(dy, m)
        dqc_ref[rows, :] = mm_nt(dy, s)
        dpm_ref[rows, :] = -mm_nt(dy, e)
        dkd_ref[rows, :] = -mm_nt(e, dm)
        dkp_ref[rows, :] = -mm_nt(e, ds)
        dk_ref[rows, :] = 2.0 * mm_nt(de, m)
        dv_ref[rows, :] = -2.0 * de
        da0e_ref[c] = jnp.sum(jnp.sum(m * dm, axis=1), axis=0)
        dce_ref[c] = jnp.sum(jnp.sum(s * dm, axis=1), axis=0)
        dp0e_ref[c] = jnp.sum(jnp.sum(s * ds, axis=1), axis=0)
        dm_new = mm_tn(qa, dy) + a0e_ref[c] * dm + 2.0 * mm_tn(k, de)
        dm_new = dm_new + (c == n_blocks - 1).astype(jnp.float32) * dm_last
        ds_new = mm_tn(qc, dy) + ce_ref[c] * dm + p0e_ref[c] * ds
        return dm_new, ds_new

    dm0, ds0 = lax.fori_loop(0, n_blocks, body, (dm_ref[...], ds_ref[...]))
    dm0_ref[...] = dm0
    ds0_ref[...] = ds0


def bwd_call(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, ms, ss, dy, dm, ds, dmlast, *, chunk,
             block_v=BLOCK_V, interpret=False):
    """Backward of :func:`fwd_call` given its per-block states (ms, ss). Returns the cotangents
    of (qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0), value-block partials summed."""
    BH, Tp, K = qa.shape
    V = v.shape[-1]
    n_blocks = Tp // chunk
    bv = min(block_v, V)
    nvb = V // bv
    full, cols, scal = _specs(Tp, n_blocks, bv)
    part = lambda d: pl.BlockSpec((None, None, Tp, d), lambda b, j: (j, b, 0, 0))
    pscal = pl.BlockSpec((None, None, n_blocks), lambda b, j: (j, b, 0))
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    kernel = functools.partial(_bwd_kernel, n_blocks=n_blocks, chunk=chunk, k_size=K)
    outs = pl.pallas_call(
        kernel, grid=(BH, nvb),
        in_specs=[full(K), full(K), full(K), cols(Tp), full(chunk), full(K), full(K),
                  scal, scal, scal, cols(n_blocks * K), cols(n_blocks * K), cols(Tp),
                  cols(K), cols(K), cols(K)],
        out_specs=[part(K), part(K), part(K), cols(Tp), part(chunk), part(K), part(K),
                   pscal, pscal, pscal, cols(K), cols(K)],
        out_shape=[sds(nvb, BH, Tp, K), sds(nvb, BH, Tp, K), sds(nvb, BH, Tp, K),
                   sds(BH, Tp, V), sds(nvb, BH, Tp, chunk), sds(nvb, BH, Tp, K),
                   sds(nvb, BH, Tp, K), sds(nvb, BH, n_blocks), sds(nvb, BH, n_blocks),
                   sds(nvb, BH, n_blocks), sds(BH, K, V), sds(BH, K, V)],
        compiler_params=_params(), interpret=interpret, name="titans_linear_bwd_triton",
    )(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, ms, ss, dy, dm, ds, dmlast)
    dqa, dqc, dk, dv, dpm, dkd, dkp, da0e, dce, dp0e, dm0, ds0 = outs
    total = lambda x: jnp.sum(x, axis=0)
    return (total(dqa), total(dqc), total(dk), dv, total(dpm), total(dkd), total(dkp),
            total(da0e), total(dce), total(dp0e), dm0, ds0)


# --------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(12, 13))
def recurrence(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0, chunk, interpret):
    """(y, M, S, M entering the last block) of the block recurrence (shapes: :func:`fwd_call`)."""
    return tuple(fwd_call(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0, chunk=chunk,
                          interpret=interpret))


def _recurrence_fwd(*args):
    *inputs, chunk, interpret = args
    return recurrence(*args), tuple(inputs)          # inputs only: states are recomputed


def _recurrence_bwd(chunk, interpret, inputs, cts):
    dy, dm, ds, dmlast = cts
    _, _, _, _, ms, ss = fwd_call(*inputs, chunk=chunk, with_states=True, interpret=interpret)
    return bwd_call(*inputs[:10], ms, ss, dy, dm, ds, dmlast, chunk=chunk, interpret=interpret)


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def titans_linear_triton(q, k, v, theta, eta, alpha, state0: TitansState, *, block_size: int,
                         interpret=False) -> tuple[jax.Array, TitansState]:
    """Linear-memory Titans through the Triton kernels: no packing, a fresh state (pos 0).

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; gates [B, T, H]; state0 memory/momentum 1 x
    [B, H, Dk, Dv] float32. Returns (y [B, T, H, Dv] float32, final TitansState).
    """
    B, _, H, K = q.shape
    kp, vp = max(16, next_pow2(K)), max(16, next_pow2(v.shape[-1]))

    def run(f, m0, s0):
        n = f.a0e.shape[-1]
        flat = lambda x: x.reshape(B * H, n * block_size, x.shape[-1])   # [BH, Tp, D]
        scal = lambda x: x.reshape(B * H, n)
        state = lambda x: x.reshape(B * H, kp, vp)
        out = recurrence(flat(f.qa), flat(f.qc), flat(f.k), flat(f.v), flat(f.pm), flat(f.kd),
                         flat(f.kp), scal(f.a0e), scal(f.ce), scal(f.p0e), state(m0), state(s0),
                         block_size, interpret)
        return tuple(x.reshape((B, H) + x.shape[1:]) for x in out)

    return run_linear_kernels(q, k, v, theta, eta, alpha, state0, block_size=block_size,
                              k_size=kp, v_size=vp, recurrence=run)
