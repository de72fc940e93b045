"""Titans linear memory on TPU: Pallas (Mosaic) kernels, forward and backward.

The same block recurrence as ``gpu.py`` (see there for the math; XLA builds the factors with
``chunked.linear_kernel_factors``). The grid is (batch·head, step) with the step axis
"arbitrary" (sequential), G gradient blocks per step (below); (M, S) live in VMEM scratch across
it, all value columns in one program:

    forward, block c:   E = 2(k M − v);   y = qa M + qc S − pm E
                        M <- a0e M + ce S − kdᵀ E;   S <- p0e S − kpᵀ E
    backward, c = N-1 .. 0 (reverse index maps), (dM, dS) in scratch, (M, S) entering each block
    from the forward kernel run again with one state pair per grid step as extra outputs
    (each step's blocks replayed from it, see below):
        dE = −pmᵀ dy − kd dM − kp dS;   dv = −2 dE;   dk = 2 dE Mᵀ
        dqa = dy Mᵀ;  dqc = dy Sᵀ;  dpm = −dy Eᵀ;  dkd = −E dMᵀ;  dkp = −E dSᵀ
        da0e = Σ M ⊙ dM;   dce = Σ S ⊙ dM;   dp0e = Σ S ⊙ dS
        dM <- qaᵀ dy + a0e dM + 2 kᵀ dE  (+ the cotangent of M entering the last block);
        dS <- qcᵀ dy + ce dM + p0e dS

Layout. The gradient block b (``block_size``, a multiple of 8 sublanes) is fixed by the math and
usually small (16), far below the MXU's 128 (v5e) / 256 (v6e) rows, so one grid step runs G
consecutive blocks (``blocks_per_step``: G = ``ROWS`` // b, 128 rows by default, ``rows=256``
for v6e), a ``fori_loop`` in the kernel with (M, S) carried as values between them: the per-step
overhead and the HBM round trips are paid once per G·b rows. The number of blocks N is padded
to a multiple of G with identity blocks (zero factors, a0e = p0e = 1, ce = 0: M and S pass
through unchanged, exact); "M entering the last block" is taken at the last real block.
Per-token arrays are [BH, N/G, G·b, D] (block j of a step = rows j·b .. j·b + b − 1, a static
sublane slice); the per-block [b, b] / [D, b] / [K, V] arrays are [BH, N/G, G, r, c] (block j =
leading index j). Features are zero-padded to multiples of 128 (lane width). The products with
a transposed left-hand side (kdᵀE, kpᵀE, pmᵀdy, qaᵀdy, qcᵀdy, kᵀdE) contract the rows of the
[b, D] blocks directly (a dot_general over dim 0, as simple_gla's kernels do): transposed [D, b]
copies would put b on the lanes, padded to 128 (8x the VMEM and HBM traffic at b = 16).

Per-block scalars (a0e, ce, p0e) are lane-dense: all N values of a head as one [1, N] row of a
[BH, 1, N] array, resident across the grid's block axis (one (8, N) tile read once per head
instead of N padded [1, 1] blocks); block i picks lane i, and their gradients accumulate into
the same layout.

Dtypes (``common.mxu``): bf16/fp16 inputs -> the factors (float32 from XLA) are cast to bf16 at
the kernel boundary and every matmul takes bf16 operands with float32 accumulation; float32
inputs -> float32 operands at DEFAULT precision (on a TPU one bf16 MXU pass, as XLA does for a
float32 matmul; exact in interpret mode on CPU). M, S (VMEM scratch), the final states, E, the
scalars and y stay float32; M, S, E and dE are cast to the operand dtype only as matmul operands;
the forward saves (M, S) once per grid step (float32) and the backward replays each step's
G block states from them into VMEM scratch (in the operand dtype, matmul operands only), so one
state pair per step, not per gradient block, goes through HBM; the factor gradients come out in
their primals' dtype (float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import tpu_grid
from pallas_kernels.common.mxu import mxu_dot, operand_dtype
from pallas_kernels.common.tpu_grid import (head_spec, lane_pick, lane_put, lane_row_spec,
                                            sequential_params)
from pallas_kernels.titans.chunked import run_linear_kernels
from pallas_kernels.titans.reference import TitansState

__all__ = ["supports", "blocks_per_step", "fit_rows", "fwd_call", "bwd_call", "recurrence",
           "vmem_bytes", "tpu_supports", "titans_linear_tpu", "ROWS", "ROWS_V6E", "VMEM_LIMIT"]

LANE = 128
ROWS = 128                   # token rows per grid step: one v5e MXU tile
ROWS_V6E = 256               # v6e / v7: the 256 x 256 MXU
VMEM_LIMIT = 16 * 2 ** 20    # v5e's default scoped VMEM (v6e: 32 MiB)


BLOCK_RULE = "a multiple of 8"  # blocks of b rows fill whole (8, 128) sublane tiles


def supports(block_size: int) -> bool:
    """Whether the gradient block size is ``BLOCK_RULE``."""
    return block_size % 8 == 0


def blocks_per_step(block_size: int, n_blocks: int, rows: int = ROWS) -> int:
    """G: gradient blocks per grid step, ~``rows`` token rows, at most the N blocks there are."""
    return max(1, min(rows // block_size, n_blocks))


def _tok(rows, cols, reverse=False, n=None):
    """Block [rows, cols] of step c (or n-1-c) of a per-token [BH, N/G, G·b, cols] array."""
    if reverse:
        return pl.BlockSpec((None, None, rows, cols), lambda b, c: (b, n - 1 - c, 0, 0))
    return pl.BlockSpec((None, None, rows, cols), lambda b, c: (b, c, 0, 0))


def _grp(g, rows, cols, reverse=False, n=None):
    """Block [G, rows, cols] of step c (or n-1-c) of a per-block [BH, N/G, G, rows, cols] array."""
    if reverse:
        return pl.BlockSpec((None, None, g, rows, cols), lambda b, c: (b, n - 1 - c, 0, 0, 0))
    return pl.BlockSpec((None, None, g, rows, cols), lambda b, c: (b, c, 0, 0, 0))


# --------------------------------------------------------------------------- forward kernel
def _fwd_kernel(qa_ref, qc_ref, k_ref, v_ref, pm_ref, kd_ref, kp_ref, a0e_ref, ce_ref, p0e_ref,
                m0_ref, s0_ref, y_ref, m_out, s_out, mlast_out, *rest, with_states, n_steps,
                n_real, group, b):
    if with_states:
        ms_ref, ss_ref, m_ref, s_ref = rest
    else:
        m_ref, s_ref = rest
    c = pl.program_id(1)

    @pl.when(c == 0)
    def _():
        m_ref[...] = m0_ref[...]
        s_ref[...] = s0_ref[...]

    op, f32 = qa_ref.dtype, jnp.float32
    a0e_row, ce_row, p0e_row = a0e_ref[...], ce_ref[...], p0e_ref[...]

    if with_states:                                                      # (M, S) entering
        ms_ref[...] = m_ref[...]                                         # the step, float32
        ss_ref[...] = s_ref[...]

    def block(j, carry):                                                 # block i = c·G + j
        m, s = carry                                                     # [K, V] f32
        i = c * group + j
        rows = pl.ds(pl.multiple_of(j * b, b), b)
        m_op, s_op = m.astype(op), s.astype(op)
        e = 2.0 * (mxu_dot(k_ref[rows, :], m_op) - v_ref[rows, :].astype(f32))   # [b, V]
        e_op = e.astype(op)
        y = (mxu_dot(qa_ref[rows, :], m_op) + mxu_dot(qc_ref[rows, :], s_op)
             - mxu_dot(pm_ref[j], e_op))
        y_ref[rows, :] = y.astype(y_ref.dtype)

        @pl.when(i == n_real - 1)                                        # the last real block
        def _():
            mlast_out[...] = m

        m_new = (lane_pick(a0e_row, i) * m + lane_pick(ce_row, i) * s
                 - mxu_dot(kd_ref[rows, :], e_op, ta=True))
        s_new = lane_pick(p0e_row, i) * s - mxu_dot(kp_ref[rows, :], e_op, ta=True)
        return m_new, s_new

    m, s = lax.fori_loop(0, group, block, (m_ref[...], s_ref[...]))
    m_ref[...] = m
    s_ref[...] = s

    @pl.when(c == n_steps - 1)
    def _():
        m_out[...] = m
        s_out[...] = s


def fwd_call(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0, *, n_real=None,
             with_states=False, interpret=False):
    """Per-token qa, qc, k, kd, kp: [BH, NS, G·b, K]; v: [BH, NS, G·b, V]; per-block pm:
    [BH, NS, G, b, b] (all in the operand dtype); a0e, ce, p0e: [BH, 1, NS·G] float32;
    m0, s0: [BH, K, V] float32; ``n_real`` <= NS·G real blocks (the rest identity padding).
    Returns (y [BH, NS, G·b, V] float32, M, S, M entering block n_real - 1 [BH, K, V]) and, with
    ``with_states``, (M, S) entering every grid step [BH, NS, K, V] each, float32."""
    BH, NS, R, K = qa.shape
    G, b = pm.shape[2], pm.shape[3]
    V = v.shape[-1]
    n_real = NS * G if n_real is None else n_real
    f32 = jnp.float32
    sds = jax.ShapeDtypeStruct
    out_shape = [sds((BH, NS, R, V), f32)] + [sds((BH, K, V), f32)] * 3
    out_specs = [_tok(R, V)] + [head_spec(K, V)] * 3
    if with_states:
        out_shape += [sds((BH, NS, K, V), f32)] * 2
        out_specs += [_tok(K, V)] * 2
    row = lane_row_spec(NS * G)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, with_states=with_states, n_steps=NS, n_real=n_real,
                          group=G, b=b),
        grid=(BH, NS), out_shape=out_shape, out_specs=out_specs,
        in_specs=[_tok(R, K), _tok(R, K), _tok(R, K), _tok(R, V), _grp(G, b, b), _tok(R, K),
                  _tok(R, K), row, row, row, head_spec(K, V), head_spec(K, V)],
        scratch_shapes=[pltpu.VMEM((K, V), f32)] * 2,
        compiler_params=sequential_params(), interpret=interpret, name="titans_linear_fwd_tpu",
    )(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0)


# --------------------------------------------------------------------------- backward kernel
def _bwd_kernel(qa_ref, qc_ref, k_ref, v_ref, pm_ref, kd_ref, kp_ref, a0e_ref, ce_ref,
                p0e_ref, ms_ref, ss_ref, dy_ref, dmf_ref, dsf_ref, dmlast_ref,
                dqa_ref, dqc_ref, dk_ref, dv_ref, dpm_ref, dkd_ref, dkp_ref, da0e_ref,
                dce_ref, dp0e_ref, dm0_ref, ds0_ref, dm_ref, ds_ref, mb_ref, sb_ref, *, n_steps,
                n_real, group, b):
    t = pl.program_id(1)                       # step c = NS-1-t, its blocks in reverse

    @pl.when(t == 0)
    def _():
        dm_ref[...] = dmf_ref[...]
        ds_ref[...] = dsf_ref[...]
        for r in (da0e_ref, dce_ref, dp0e_ref):
            r[...] = jnp.zeros_like(r)

    op, f32 = k_ref.dtype, jnp.float32
    total = lambda x: jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)
    a0e_row, ce_row, p0e_row = a0e_ref[...], ce_ref[...], p0e_ref[...]
    c = n_steps - 1 - t

    def replay(j, carry):                     # (M, S) entering each block of the step, again
        m, s = carry
        i = c * group + j
        rows = pl.ds(pl.multiple_of(j * b, b), b)
        m_op = m.astype(op)
        mb_ref[j] = m_op
        sb_ref[j] = s.astype(op)
        e_op = (2.0 * (mxu_dot(k_ref[rows, :], m_op) - v_ref[rows, :].astype(f32))).astype(op)
        m_new = (lane_pick(a0e_row, i) * m + lane_pick(ce_row, i) * s
                 - mxu_dot(kd_ref[rows, :], e_op, ta=True))
        return m_new, lane_pick(p0e_row, i) * s - mxu_dot(kp_ref[rows, :], e_op, ta=True)

    lax.fori_loop(0, group, replay, (ms_ref[...], ss_ref[...]))

    def block(jj, carry):                                                # blocks in reverse
        dm, ds = carry                                                   # leaving block i
        j = group - 1 - jj
        i = c * group + j
        rows = pl.ds(pl.multiple_of(j * b, b), b)
        m, s = mb_ref[j], sb_ref[j]                                       # entering block i
        dm_op, ds_op = dm.astype(op), ds.astype(op)
        e = 2.0 * (mxu_dot(k_ref[rows, :], m) - v_ref[rows, :].astype(f32))      # [b, V]
        e_op = e.astype(op)
        dy = dy_ref[rows, :].astype(op)
        de = (-mxu_dot(pm_ref[j], dy, ta=True) - mxu_dot(kd_ref[rows, :], dm_op)
              - mxu_dot(kp_ref[rows, :], ds_op))
        de_op = de.astype(op)
        dqa_ref[rows, :] = mxu_dot(dy, m, tb=True).astype(dqa_ref.dtype)
        dqc_ref[rows, :] = mxu_dot(dy, s, tb=True).astype(dqc_ref.dtype)
        dpm_ref[j] = (-mxu_dot(dy, e_op, tb=True)).astype(dpm_ref.dtype)
        dkd_ref[rows, :] = (-mxu_dot(e_op, dm_op, tb=True)).astype(dkd_ref.dtype)
        dkp_ref[rows, :] = (-mxu_dot(e_op, ds_op, tb=True)).astype(dkp_ref.dtype)
        dk_ref[rows, :] = (2.0 * mxu_dot(de_op, m, tb=True)).astype(dk_ref.dtype)
        dv_ref[rows, :] = (-2.0 * de).astype(dv_ref.dtype)
        mf, sf = m.astype(f32), s.astype(f32)
        lane_put(da0e_ref, i, total(mf * dm))
        lane_put(dce_ref, i, total(sf * dm))
        lane_put(dp0e_ref, i, total(sf * ds))
        dm_new = (mxu_dot(qa_ref[rows, :], dy, ta=True) + lane_pick(a0e_row, i) * dm
                  + 2.0 * mxu_dot(k_ref[rows, :], de_op, ta=True))
        ds_new = (mxu_dot(qc_ref[rows, :], dy, ta=True) + lane_pick(ce_row, i) * dm
                  + lane_pick(p0e_row, i) * ds)
        # M entering the last real block is also an output: its cotangent joins here.
        dm_new = dm_new + jnp.where(i == n_real - 1, 1.0, 0.0) * dmlast_ref[...]
        return dm_new, ds_new

    dm, ds = lax.fori_loop(0, group, block, (dm_ref[...], ds_ref[...]))
    dm_ref[...] = dm
    ds_ref[...] = ds

    @pl.when(t == n_steps - 1)
    def _():
        dm0_ref[...] = dm
        ds0_ref[...] = ds


def bwd_call(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, ms, ss, dy, dmf, dsf, dmlast, *,
             n_real=None, grad_dtypes=None, interpret=False):
    """Backward of :func:`fwd_call`: its inputs (less m0, s0), (M, S) entering each step (ms, ss
    [BH, NS, K, V] float32; each step replays its G blocks' states from them into VMEM scratch,
    so only one state pair per step goes through HBM), dy [BH, NS, G·b, V] and the cotangents of
    (M, S, M entering the last real block) [BH, K, V]. Returns the cotangents of
    (qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0) shaped like their primals, the first seven
    in ``grad_dtypes`` (default float32), the rest float32."""
    BH, NS, R, K = k.shape
    G, b = pm.shape[2], pm.shape[3]
    V = v.shape[-1]
    n_real = NS * G if n_real is None else n_real
    f32 = jnp.float32
    gd = grad_dtypes or (f32,) * 7
    tok = functools.partial(_tok, reverse=True, n=NS)
    grp = functools.partial(_grp, G, reverse=True, n=NS)
    head, row = head_spec(K, V), lane_row_spec(NS * G)
    sds = jax.ShapeDtypeStruct
    return tuple(pl.pallas_call(
        functools.partial(_bwd_kernel, n_steps=NS, n_real=n_real, group=G, b=b), grid=(BH, NS),
        in_specs=[tok(R, K), tok(R, K), tok(R, K), tok(R, V), grp(b, b), tok(R, K), tok(R, K),
                  row, row, row, tok(K, V), tok(K, V), tok(R, V), head, head, head],
        out_specs=[tok(R, K), tok(R, K), tok(R, K), tok(R, V), grp(b, b), tok(R, K), tok(R, K),
                   row, row, row, head, head],
        out_shape=[sds((BH, NS, R, K), gd[0]), sds((BH, NS, R, K), gd[1]),
                   sds((BH, NS, R, K), gd[2]), sds((BH, NS, R, V), gd[3]),
                   sds((BH, NS, G, b, b), gd[4]), sds((BH, NS, R, K), gd[5]),
                   sds((BH, NS, R, K), gd[6])]
        + [sds((BH, 1, NS * G), f32)] * 3 + [sds((BH, K, V), f32)] * 2,
        scratch_shapes=[pltpu.VMEM((K, V), f32)] * 2 + [pltpu.VMEM((G, K, V), k.dtype)] * 2,
        compiler_params=sequential_params(), interpret=interpret, name="titans_linear_bwd_tpu",
    )(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, ms, ss, dy, dmf, dsf, dmlast))


@functools.lru_cache(maxsize=None)           # pure in its (hashable) arguments
def vmem_bytes(kernel, rows, b, K, V, dtype=jnp.float32, n_blocks=256):
    """VMEM bytes one grid step of ``kernel`` ("fwd" with states, or "bwd") needs: G = rows // b
    blocks of b rows per step, inputs of ``dtype``; every in/out block double-buffered plus the
    (M, S) scratch (``tpu_grid.vmem_bytes`` on the traced call), plus the live float32
    temporaries of one block (E, y / dE and the four [b, *] products, M, S and their updates)."""
    op, f32, sds = operand_dtype(dtype), jnp.float32, jax.ShapeDtypeStruct
    G = max(1, rows // b)
    NS = max(1, n_blocks // G)
    tok = lambda d, dt=op: sds((1, NS, G * b, d), dt)
    grp = lambda r, c, dt=op: sds((1, NS, G, r, c), dt)
    row, head = sds((1, 1, NS * G), f32), sds((1, K, V), f32)
    step = sds((1, NS, K, V), f32)
    if kernel == "fwd":
        fn = functools.partial(fwd_call, with_states=True)
        args = (tok(K), tok(K), tok(K), tok(V), grp(b, b), tok(K), tok(K), row, row, row,
                head, head)
    elif kernel == "bwd":
        fn = bwd_call
        args = (tok(K), tok(K), tok(K), tok(V), grp(b, b), tok(K), tok(K), row, row, row,
                step, step, tok(V, f32), head, head, head)
    else:
        raise ValueError(f"kernel must be 'fwd' or 'bwd', got {kernel!r}")
    temps = 6 * b * max(K, V, 128) * 4 + 6 * K * V * 4
    return tpu_grid.vmem_bytes(fn, *args) + temps


def tpu_supports(dtype, K, V, chunk=ROWS, block_size=16):
    """None when both kernels fit ``VMEM_LIMIT`` for inputs of ``dtype``, features K, V (padded to
    128 lanes), ``chunk`` token rows per grid step and gradient blocks of ``block_size``; else
    the reason (a one-line string)."""
    if not supports(block_size):
        return f"titans mosaic_tpu: block_size must be {BLOCK_RULE}, got {block_size}"
    kp, vp = -(-K // LANE) * LANE, -(-V // LANE) * LANE
    for kernel in ("fwd", "bwd"):
        used = vmem_bytes(kernel, chunk, block_size, kp, vp, dtype)
        if used > VMEM_LIMIT:
            return (f"titans mosaic_tpu: the {kernel} kernel needs {used} B of VMEM at "
                    f"{chunk} rows per step, block {block_size}, K={kp}, V={vp}, "
                    f"{jnp.dtype(dtype).name} (limit {VMEM_LIMIT})")
    return None


def fit_rows(dtype, K, V, rows, block_size):
    """The largest of rows, rows/2, ... (>= one gradient block) at which both kernels fit
    ``VMEM_LIMIT`` (128 rows always fit up to K = V = 256; 256 rows at K = V = 256 in float32
    do not: the backward's replayed block states alone are 2 x 4 MiB)."""
    if rows <= ROWS and K * V <= 256 * 256:
        return rows                                    # within the tested table: no trace
    while rows // 2 >= block_size and tpu_supports(dtype, K, V, rows, block_size) is not None:
        rows //= 2
    return rows


# --------------------------------------------------------------------------- custom VJP
def _tok_layout(x, g):
    """[BH, N, b, D] -> [BH, N/G, G·b, D] (free)."""
    bh, n, b, d = x.shape
    return x.reshape(bh, n // g, g * b, d)


def _grp_layout(x, g):
    """[BH, N, r, c] -> [BH, N/G, G, r, c] (free)."""
    bh, n, r, c = x.shape
    return x.reshape(bh, n // g, g, r, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(12, 13, 14, 15))
def recurrence(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0, group, n_real, op, interpret):
    """(y, M, S, M entering block n_real - 1). Factors [BH, N, b, D] / [BH, N, b, b] per block
    (N a multiple of ``group``, blocks from n_real on identity padding), any float dtype (cast
    to the operand dtype ``op`` here; their gradients come back in their own dtype); scalars
    [BH, 1, N]; m0, s0 [BH, K, V]."""
    return _recurrence_fwd(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0, group, n_real, op,
                           interpret)[0]


def _recurrence_fwd(qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0, group, n_real, op,
                    interpret):
    # Zero-size arrays carry the primals' dtypes to the backward (residuals must be arrays).
    tags = tuple(jnp.zeros((0,), x.dtype) for x in (qa, qc, k, v, pm, kd, kp))
    qa, qc, k, v, pm, kd, kp = (x.astype(op) for x in (qa, qc, k, v, pm, kd, kp))
    f32 = jnp.float32
    a0e, ce, p0e, m0, s0 = (x.astype(f32) for x in (a0e, ce, p0e, m0, s0))
    inputs = (qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0)
    out = _fwd(inputs, group, n_real, interpret, with_states=False)
    return tuple(out), (inputs, tags)


def _fwd(inputs, g, n_real, interpret, with_states):
    qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0 = inputs
    tok, grp = (lambda x: _tok_layout(x, g)), (lambda x: _grp_layout(x, g))
    return fwd_call(tok(qa), tok(qc), tok(k), tok(v), grp(pm), tok(kd), tok(kp), a0e,
                    ce, p0e, m0, s0, n_real=n_real, with_states=with_states,
                    interpret=interpret)


def _recurrence_bwd(g, n_real, op, interpret, res, cts):
    inputs, tags = res
    qa, qc, k, v, pm, kd, kp, a0e, ce, p0e, m0, s0 = inputs
    dy, dmf, dsf, dmlast = cts                       # dy in the step layout [BH, N/G, G·b, V]
    _, _, _, _, ms, ss = _fwd(inputs, g, n_real, interpret, with_states=True)
    tok, grp = (lambda x: _tok_layout(x, g)), (lambda x: _grp_layout(x, g))
    f32 = jnp.float32
    grads = bwd_call(tok(qa), tok(qc), tok(k), tok(v), grp(pm), tok(kd), tok(kp), a0e, ce, p0e,
                     ms, ss, dy.astype(f32), dmf.astype(f32), dsf.astype(f32),
                     dmlast.astype(f32), n_real=n_real,
                     grad_dtypes=tuple(t.dtype for t in tags), interpret=interpret)
    dqa, dqc, dk, dv, dpm, dkd, dkp = (x.reshape(p.shape) for x, p in zip(grads[:7], inputs))
    return (dqa, dqc, dk, dv, dpm, dkd, dkp) + tuple(grads[7:])


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def titans_linear_tpu(q, k, v, theta, eta, alpha, state0: TitansState, *, block_size: int,
                      interpret=False, rows=None) -> tuple[jax.Array, TitansState]:
    """Linear-memory Titans through the Mosaic TPU kernels: no packing, a fresh state (pos 0).
    Shapes as in ``gpu.titans_linear_triton``; ``rows``: token rows per grid step (None: the
    module's ``ROWS`` = 128 for v5e at call time; ``ROWS_V6E`` = 256 for v6e), rounded down to
    whole gradient blocks."""
    rows = ROWS if rows is None else int(rows)
    if rows < block_size:
        raise ValueError(f"titans_linear_tpu: rows must be >= block_size={block_size}, got {rows}")
    B, _, H, K = q.shape
    kp_, vp_ = -(-K // LANE) * LANE, -(-v.shape[-1] // LANE) * LANE
    op = operand_dtype(q.dtype)
    rows = fit_rows(q.dtype, kp_, vp_, rows, block_size)

    def run(f, m0, s0):
        n = f.a0e.shape[-1]
        g = blocks_per_step(block_size, n, rows)
        pad = (-n) % g                                  # identity blocks up to a multiple of G
        padn = lambda x, value=0.0: jnp.pad(x, [(0, 0)] * 2 + [(0, pad)]
                                            + [(0, 0)] * (x.ndim - 3), constant_values=value)
        blocks = lambda x: padn(x).reshape(B * H, n + pad, block_size, x.shape[-1])
        scal = lambda x, one: padn(x, one).reshape(B * H, 1, n + pad)
        state = lambda x: x.reshape(B * H, kp_, vp_)
        y, m, s, m_last = recurrence(
            blocks(f.qa), blocks(f.qc), blocks(f.k), blocks(f.v), blocks(f.pm), blocks(f.kd),
            blocks(f.kp), scal(f.a0e, 1.0), scal(f.ce, 0.0), scal(f.p0e, 1.0), state(m0),
            state(s0), g, n, op, interpret)
        y = y.reshape(B, H, n + pad, block_size, vp_)[:, :, :n]
        return (y,) + tuple(x.reshape(B, H, kp_, vp_) for x in (m, s, m_last))

    return run_linear_kernels(q, k, v, theta, eta, alpha, state0, block_size=block_size,
                              k_size=kp_, v_size=vp_, recurrence=run)
