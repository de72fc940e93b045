"""Titans linear memory on TPU: Pallas (Mosaic) kernels, forward and backward.

The same block recurrence as ``gpu.py`` (see there for the math; XLA builds the factors with
``chunked.linear_kernel_factors``). The grid is (batch·head, block) with the block axis
"arbitrary" (sequential); (M, S) live in VMEM scratch across it, all value columns in one program:

    forward, block c:   E = 2(k M − v);   y = qa M + qc S − pm E
                        M <- a0e M + ce S − kdᵀ E;   S <- p0e S − kpᵀ E
    backward, c = N-1 .. 0 (reverse index maps), (dM, dS) in scratch, (M, S) entering each block
    from the forward kernel run again with one state per block as extra outputs:
        dE = −pmᵀ dy − kd dM − kp dS;   dv = −2 dE;   dk = 2 dE Mᵀ
        dqa = dy Mᵀ;  dqc = dy Sᵀ;  dpm = −dy Eᵀ;  dkd = −E dMᵀ;  dkp = −E dSᵀ
        da0e = Σ M ⊙ dM;   dce = Σ S ⊙ dM;   dp0e = Σ S ⊙ dS
        dM <- qaᵀ dy + a0e dM + 2 kᵀ dE  (+ the cotangent of M entering the last block);
        dS <- qcᵀ dy + ce dM + p0e dS

Arrays are [BH, N, C, D] so every block's last two dims are full array dims; features are
zero-padded to multiples of 128 (lane width); b must be a multiple of 8 (sublanes). Operands that
would need a transposed left-hand side (kdᵀ, kpᵀ, pmᵀ, qaᵀ, qcᵀ, kᵀ) are transposed in XLA and
passed in, so the kernels only use plain (A·B) and A·Bᵀ matmuls. Per-block scalars come in as
[BH, N, 1, 1] blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import mm, mm_nt
from pallas_kernels.common.tpu_grid import chunk_spec, head_spec, sequential_params
from pallas_kernels.titans.chunked import run_linear_kernels
from pallas_kernels.titans.reference import TitansState

__all__ = ["supports", "fwd_call", "bwd_call", "recurrence", "titans_linear_tpu"]

LANE = 128


BLOCK_RULE = "a multiple of 8"  # blocks of b rows fill whole (8, 128) sublane tiles


def supports(block_size: int) -> bool:
    """Whether the gradient block size is ``BLOCK_RULE``."""
    return block_size % 8 == 0


# --------------------------------------------------------------------------- forward kernel
def _fwd_kernel(qa_ref, qc_ref, k_ref, v_ref, pm_ref, kdt_ref, kpt_ref, a0e_ref, ce_ref, p0e_ref,
                m0_ref, s0_ref, y_ref, m_out, s_out, mlast_out, *rest, with_states, n_blocks):
    if with_states:
        ms_ref, ss_ref, m_ref, s_ref = rest
    else:
        m_ref, s_ref = rest
    c = pl.program_id(1)

    @pl.when(c == 0)
    def _():
        m_ref[...] = m0_ref[...]
        s_ref[...] = s0_ref[...]

    m, s = m_ref[...], s_ref[...]                                         # [K, V]
    if with_states:
        ms_ref[...] = m
        ss_ref[...] = s
    e = 2.0 * (mm(k_ref[...], m) - v_ref[...])                           # [C, V]
    y_ref[...] = mm(qa_ref[...], m) + mm(qc_ref[...], s) - mm(pm_ref[...], e)
    m_new = a0e_ref[...] * m + ce_ref[...] * s - mm(kdt_ref[...], e)
    s_new = p0e_ref[...] * s - mm(kpt_ref[...], e)
    m_ref[...] = m_new
    s_ref[...] = s_new

    @pl.when(c == n_blocks - 1)
    def _():
        m_out[...] = m_new
        s_out[...] = s_new
        mlast_out[...] = m


def fwd_call(qa, qc, k, v, pm, kdt, kpt, a0e, ce, p0e, m0, s0, *, with_states=False,
             interpret=False):
    """qa, qc, k: [BH, N, C, K]; v: [BH, N, C, V]; pm: [BH, N, C, C]; kdt, kpt: [BH, N, K, C];
    a0e, ce, p0e: [BH, N, 1, 1]; m0, s0: [BH, K, V]. Returns (y [BH, N, C, V], M, S, M entering
    the last block [BH, K, V]) and, with ``with_states``, (M, S) entering every block
    [BH, N, K, V] each."""
    BH, N, C, K = qa.shape
    V = v.shape[-1]
    blk = chunk_spec
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    out_shape = [sds(BH, N, C, V)] + [sds(BH, K, V)] * 3
    out_specs = [blk(C, V)] + [head_spec(K, V)] * 3
    if with_states:
        out_shape += [sds(BH, N, K, V)] * 2
        out_specs += [blk(K, V)] * 2
    return pl.pallas_call(
        functools.partial(_fwd_kernel, with_states=with_states, n_blocks=N),
        grid=(BH, N), out_shape=out_shape, out_specs=out_specs,
        in_specs=[blk(C, K), blk(C, K), blk(C, K), blk(C, V), blk(C, C), blk(K, C), blk(K, C),
                  blk(1, 1), blk(1, 1), blk(1, 1), head_spec(K, V), head_spec(K, V)],
        scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)] * 2,
        compiler_params=sequential_params(), interpret=interpret, name="titans_linear_fwd_tpu",
    )(qa, qc, k, v, pm, kdt, kpt, a0e, ce, p0e, m0, s0)


# --------------------------------------------------------------------------- backward kernel
def _bwd_kernel(qat_ref, qct_ref, k_ref, kt_ref, v_ref, pmt_ref, kd_ref, kp_ref, a0e_ref, ce_ref,
                p0e_ref, ms_ref, ss_ref, dy_ref, dmf_ref, dsf_ref, dmlast_ref,
                dqa_ref, dqc_ref, dk_ref, dv_ref, dpm_ref, dkd_ref, dkp_ref, da0e_ref, dce_ref,
                dp0e_ref, dm0_ref, ds0_ref, dm_ref, ds_ref, *, n_blocks):
    j = pl.program_id(1)                       # block c = N-1-j

    @pl.when(j == 0)
    def _():
        dm_ref[...] = dmf_ref[...]
        ds_ref[...] = dsf_ref[...]

    dm, ds = dm_ref[...], ds_ref[...]                                     # leaving block c
    m, s = ms_ref[...], ss_ref[...]                                       # entering block c
    e = 2.0 * (mm(k_ref[...], m) - v_ref[...])                           # [C, V]
    dy = dy_ref[...]
    de = -mm(pmt_ref[...], dy) - mm(kd_ref[...], dm) - mm(kp_ref[...], ds)
    dqa_ref[...] = mm_nt(dy, m)
    dqc_ref[...] = mm_nt(dy, s)
    dpm_ref[...] = -mm_nt(dy, e)
    dkd_ref[...] = -mm_nt(e, dm)
    dkp_ref[...] = -mm_nt(e, ds)
    dk_ref[...] = 2.0 * mm_nt(de, m)
    dv_ref[...] = -2.0 * de
    total = lambda x: jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)
    da0e_ref[...] = total(m * dm)
    dce_ref[...] = total(s * dm)
    dp0e_ref[...] = total(s * ds)
    dm_ref[...] = mm(qat_ref[...], dy) + a0e_ref[...] * dm + 2.0 * mm(kt_ref[...], de)
    ds_ref[...] = mm(qct_ref[...], dy) + ce_ref[...] * dm + p0e_ref[...] * ds

    @pl.when(j == 0)                           # M entering the last block is also an output
    def _():
        dm_ref[...] = dm_ref[...] + dmlast_ref[...]

    @pl.when(j == n_blocks - 1)
    def _():
        dm0_ref[...] = dm_ref[...]
        ds0_ref[...] = ds_ref[...]


def bwd_call(qat, qct, k, kt, v, pmt, kd, kp, a0e, ce, p0e, ms, ss, dy, dmf, dsf, dmlast, *,
             interpret=False):
    """Backward of :func:`fwd_call` with the transposed operands qat, qct, kt [BH, N, K, C],
    pmt [BH, N, C, C] and kd, kp [BH, N, C, K]. Returns the cotangents of
    (qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0) shaped like their primals."""
    BH, N, C, K = k.shape
    V = v.shape[-1]
    rev = functools.partial(chunk_spec, reverse=True, n_chunks=N)
    head = head_spec(K, V)
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    return tuple(pl.pallas_call(
        functools.partial(_bwd_kernel, n_blocks=N), grid=(BH, N),
        in_specs=[rev(K, C), rev(K, C), rev(C, K), rev(K, C), rev(C, V), rev(C, C), rev(C, K),
                  rev(C, K), rev(1, 1), rev(1, 1), rev(1, 1), rev(K, V), rev(K, V), rev(C, V),
                  head, head, head],
        out_specs=[rev(C, K), rev(C, K), rev(C, K), rev(C, V), rev(C, C), rev(C, K), rev(C, K),
                   rev(1, 1), rev(1, 1), rev(1, 1), head, head],
        out_shape=[sds(BH, N, C, K)] * 3 + [sds(BH, N, C, V), sds(BH, N, C, C)]
        + [sds(BH, N, C, K)] * 2 + [sds(BH, N, 1, 1)] * 3 + [sds(BH, K, V)] * 2,
        scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)] * 2,
        compiler_params=sequential_params(), interpret=interpret, name="titans_linear_bwd_tpu",
    )(qat, qct, k, kt, v, pmt, kd, kp, a0e, ce, p0e, ms, ss, dy, dmf, dsf, dmlast))


# --------------------------------------------------------------------------- custom VJP
def _tr(x):
    return jnp.swapaxes(x, -1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(12,))
def recurrence(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0, interpret):
    """(y, M, S, M entering the last block); kd, kp [BH, N, C, K] (transposed here), the rest as
    in :func:`fwd_call`."""
    return tuple(fwd_call(qa, qc, k, v, pm, _tr(kd), _tr(kp), a0e, ce, p0e, m0, s0,
                          interpret=interpret))


def _recurrence_fwd(*args):
    *inputs, interpret = args
    return recurrence(*args), tuple(inputs)          # inputs only: states are recomputed


def _recurrence_bwd(interpret, inputs, cts):
    qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0 = inputs
    dy, dmf, dsf, dmlast = cts
    _, _, _, _, ms, ss = fwd_call(qa, qc, k, v, pm, _tr(kd), _tr(kp), a0e, ce, p0e, m0, s0,
                                  with_states=True, interpret=interpret)
    return bwd_call(_tr(qa), _tr(qc), k, _tr(k), v, _tr(pm), kd, kp, a0e, ce, p0e, ms, ss, dy,
                    dmf, dsf, dmlast, interpret=interpret)


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def titans_linear_tpu(q, k, v, theta, eta, alpha, state0: TitansState, *, block_size: int,
                      interpret=False) -> tuple[jax.Array, TitansState]:
    """Linear-memory Titans through the Mosaic TPU kernels: no packing, a fresh state (pos 0).
    Shapes as in ``gpu.titans_linear_triton``."""
    B, _, H, K = q.shape
    kp_, vp_ = -(-K // LANE) * LANE, -(-v.shape[-1] // LANE) * LANE

    def run(f, m0, s0):
        n = f.a0e.shape[-1]
        blocks = lambda x: x.reshape(B * H, n, block_size, x.shape[-1])   # [BH, N, C, D]
        scal = lambda x: x.reshape(B * H, n, 1, 1)
        state = lambda x: x.reshape(B * H, kp_, vp_)
        out = recurrence(blocks(f.qa), blocks(f.qc), blocks(f.k), blocks(f.v), blocks(f.pm),
                         blocks(f.kd), blocks(f.kp), scal(f.a0e), scal(f.ce), scal(f.p0e),
                         state(m0), state(s0), interpret)
        return tuple(x.reshape((B, H) + x.shape[1:]) for x in out)

    return run_linear_kernels(q, k, v, theta, eta, alpha, state0, block_size=block_size,
                              k_size=kp_, v_size=vp_, recurrence=run)
