"""Gated delta rule on TPU: Pallas (Mosaic) kernels, forward and backward.

As in ``gpu.py``, XLA builds the per-chunk factors (``chunked.kernel_factors``: decay matrices,
T = (I + A)^{-1}, w = T(β e^G k), u = T(β v), P; ``segment_ids`` become masks there) and the
kernels run the sequential half. The grid is (batch·head, chunk) with the chunk axis
"arbitrary" (sequential); the state lives in a VMEM scratch accumulator across it:

    forward, chunk c:   δ = u_c − w_c S;   o_c = qg_c S + P_c δ;   S <- λ_c S + kg_cᵀ δ
    backward, c = NC-1 .. 0 (reverse index maps), dS = ∂L/∂S_{c+1} in scratch, S_c from the
    forward kernel run again with one state per chunk as an extra output:
        dδ = P_cᵀ do_c + kg_c dS;   dqg = do_c S_cᵀ;   dP = do_c δᵀ;   dkg = δ dSᵀ;
        dw = −dδ S_cᵀ;   du = dδ;   dλ = Σ S_c ⊙ dS;   dS <- qg_cᵀ do_c + λ_c dS − w_cᵀ dδ

Arrays are [BH, NC, C, D] so every block's last two dims are full array dims; features are
zero-padded to multiples of 128 (lane width) and T to a multiple of the chunk C (zero tokens:
exact). C = ``CHUNK`` = 128 by default (one v5e MXU tile; pass ``chunk=256`` for v6e's 256-wide
MXU, any multiple of 8 works). Operands that would need a transposed left-hand side (kgᵀ, Pᵀ,
qgᵀ, wᵀ) are transposed in XLA and passed in, so the kernels only use plain (A·B) and A·Bᵀ
matmuls.

Dtypes (``common.mxu``): bf16/fp16 inputs -> the factors (built in float32 by XLA) are cast to
bf16 at the kernel boundary and every matmul takes bf16 operands with float32 accumulation;
float32 inputs -> float32 operands at DEFAULT precision (on a TPU one bf16 MXU pass, as XLA does
for a float32 matmul; exact float32 in interpret mode on CPU). The carried state S (VMEM
scratch), the final state and λ stay float32; S is cast to the operand dtype only as a matmul
operand; δ and dδ are cast likewise after their float32 accumulation. o and the per-chunk states
S_c saved for the backward are stored in the operand dtype; the factor gradients come out in
their primals' dtype (float32).

Layout of λ (one decay per chunk and head): lane-dense, all NC values of a head as one [1, NC]
row of a [BH, 1, NC] array, resident across the chunk axis (read once per head, one (8, NC) tile
instead of NC padded [1, 1] blocks); chunk c picks lane c. dλ accumulates into the same layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import tpu_grid
from pallas_kernels.common.mxu import mxu_dot, operand_dtype
from pallas_kernels.common.tpu_grid import (chunk_spec, head_spec, lane_pick, lane_put,
                                            lane_row_spec, sequential_params)
from pallas_kernels.gated_delta.chunked import run_kernels

__all__ = ["CHUNK", "CHUNK_V6E", "LANE", "VMEM_LIMIT", "fwd_call", "bwd_call", "vmem_bytes",
           "tpu_supports", "recurrence", "gated_delta_rule_tpu"]

CHUNK = 128                  # v5e: one 128 x 128 MXU tile per chunk
CHUNK_V6E = 256              # v6e / v7: the 256 x 256 MXU
LANE = 128
VMEM_LIMIT = 16 * 2 ** 20    # v5e's default scoped VMEM (v6e: 32 MiB)


# --------------------------------------------------------------------------- forward kernel
def _fwd_kernel(qg_ref, p_ref, w_ref, u_ref, kgt_ref, lam_ref, s0_ref, o_ref, final_ref,
                *rest, with_states, n_chunks):
    states_ref, s_ref = rest if with_states else (None, rest[0])
    c = pl.program_id(1)

    @pl.when(c == 0)
    def _():
        s_ref[...] = s0_ref[...]

    op = qg_ref.dtype                                                    # MXU operand dtype
    s = s_ref[...]                                                       # S_c [K, V] f32
    s_op = s.astype(op)
    if with_states:
        states_ref[...] = s_op.astype(states_ref.dtype)
    delta = u_ref[...].astype(jnp.float32) - mxu_dot(w_ref[...], s_op)  # [C, V] f32
    delta_op = delta.astype(op)
    o = mxu_dot(qg_ref[...], s_op) + mxu_dot(p_ref[...], delta_op)
    o_ref[...] = o.astype(o_ref.dtype)
    s_new = lane_pick(lam_ref[...], c) * s + mxu_dot(kgt_ref[...], delta_op)
    s_ref[...] = s_new

    @pl.when(c == n_chunks - 1)           # static count: pl.num_programs went stale in jax
    def _():                              # 0.11's interpreter across calls with other grids
        final_ref[...] = s_new


def fwd_call(qg, p, w, u, kgt, lam, s0, *, with_states=False, interpret=False):
    """qg, w: [BH, NC, C, K]; p: [BH, NC, C, C]; u: [BH, NC, C, V]; kgt: [BH, NC, K, C] (all in
    the operand dtype); lam: [BH, 1, NC] float32; s0: [BH, K, V] float32. Returns (o [BH, NC, C, V]
    in the operand dtype, final [BH, K, V] float32) and, with ``with_states``, the states entering
    each chunk [BH, NC, K, V] in the operand dtype."""
    BH, NC, C, K = qg.shape
    V = u.shape[-1]
    op, f32 = qg.dtype, jnp.float32
    out_shape = [jax.ShapeDtypeStruct((BH, NC, C, V), op), jax.ShapeDtypeStruct((BH, K, V), f32)]
    out_specs = [chunk_spec(C, V), head_spec(K, V)]
    if with_states:
        out_shape.append(jax.ShapeDtypeStruct((BH, NC, K, V), op))
        out_specs.append(chunk_spec(K, V))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, with_states=with_states, n_chunks=NC),
        grid=(BH, NC), out_shape=out_shape, out_specs=out_specs,
        in_specs=[chunk_spec(C, K), chunk_spec(C, C), chunk_spec(C, K), chunk_spec(C, V),
                  chunk_spec(K, C), lane_row_spec(NC), head_spec(K, V)],
        scratch_shapes=[pltpu.VMEM((K, V), f32)],
        compiler_params=sequential_params(), interpret=interpret, name="gated_delta_fwd_tpu",
    )(qg, p, w, u, kgt, lam, s0)


# --------------------------------------------------------------------------- backward kernel
def _bwd_kernel(qgt_ref, pt_ref, w_ref, wt_ref, u_ref, kg_ref, lam_ref, states_ref, do_ref,
                dfinal_ref, dqg_ref, dp_ref, dw_ref, du_ref, dkg_ref, dlam_ref, ds0_ref, ds_ref,
                *, n_chunks):
    j = pl.program_id(1)
    c = n_chunks - 1 - j                                                 # chunk of this step

    @pl.when(j == 0)
    def _():
        ds_ref[...] = dfinal_ref[...]
        dlam_ref[...] = jnp.zeros_like(dlam_ref)

    op, f32 = w_ref.dtype, jnp.float32
    ds = ds_ref[...]                                                     # ∂L/∂S_{c+1} [K, V]
    ds_op = ds.astype(op)
    s = states_ref[...].astype(op)                                       # S_c
    delta = u_ref[...].astype(f32) - mxu_dot(w_ref[...], s)             # [C, V]
    delta_op = delta.astype(op)
    do = do_ref[...].astype(op)
    dd = mxu_dot(pt_ref[...], do) + mxu_dot(kg_ref[...], ds_op)        # ∂L/∂δ [C, V] f32
    dd_op = dd.astype(op)
    dqg_ref[...] = mxu_dot(do, s, tb=True).astype(dqg_ref.dtype)
    dp_ref[...] = mxu_dot(do, delta_op, tb=True).astype(dp_ref.dtype)
    dkg_ref[...] = mxu_dot(delta_op, ds_op, tb=True).astype(dkg_ref.dtype)
    dw_ref[...] = (-mxu_dot(dd_op, s, tb=True)).astype(dw_ref.dtype)
    du_ref[...] = dd.astype(du_ref.dtype)
    sd = s.astype(f32) * ds
    lane_put(dlam_ref, c, jnp.sum(jnp.sum(sd, axis=1, keepdims=True), axis=0, keepdims=True))
    ds_new = (mxu_dot(qgt_ref[...], do) + lane_pick(lam_ref[...], c) * ds
              - mxu_dot(wt_ref[...], dd_op))
    ds_ref[...] = ds_new

    @pl.when(j == n_chunks - 1)
    def _():
        ds0_ref[...] = ds_new


def bwd_call(qgt, pt, w, wt, u, kg, lam, states, do, dfinal, *, grad_dtypes=None,
             interpret=False):
    """Backward of :func:`fwd_call`. Transposed operands: qgt, wt [BH, NC, K, C], pt [BH, NC, C, C].
    Returns (dqg, dp, dw, du, dkg, dlam [BH, 1, NC], ds0) shaped like their primals, the first
    five in ``grad_dtypes`` (default float32), dlam and ds0 float32."""
    BH, NC, C, K = w.shape
    V = u.shape[-1]
    rev = functools.partial(chunk_spec, reverse=True, n_chunks=NC)
    f32 = jnp.float32
    gd = grad_dtypes or (f32,) * 5
    sds = jax.ShapeDtypeStruct
    return pl.pallas_call(
        functools.partial(_bwd_kernel, n_chunks=NC), grid=(BH, NC),
        in_specs=[rev(K, C), rev(C, C), rev(C, K), rev(K, C), rev(C, V), rev(C, K),
                  lane_row_spec(NC), rev(K, V), rev(C, V), head_spec(K, V)],
        out_specs=[rev(C, K), rev(C, C), rev(C, K), rev(C, V), rev(C, K), lane_row_spec(NC),
                   head_spec(K, V)],
        out_shape=[sds((BH, NC, C, K), gd[0]), sds((BH, NC, C, C), gd[1]),
                   sds((BH, NC, C, K), gd[2]), sds((BH, NC, C, V), gd[3]),
                   sds((BH, NC, C, K), gd[4]), sds((BH, 1, NC), f32), sds((BH, K, V), f32)],
        scratch_shapes=[pltpu.VMEM((K, V), f32)],
        compiler_params=sequential_params(), interpret=interpret, name="gated_delta_bwd_tpu",
    )(qgt, pt, w, wt, u, kg, lam, states, do, dfinal)


@functools.lru_cache(maxsize=None)           # pure in its (hashable) arguments
def vmem_bytes(kernel, C, K, V, dtype=jnp.float32, n_chunks=64):
    """VMEM bytes one grid step of ``kernel`` ("fwd" with states, or "bwd") needs for inputs of
    ``dtype`` at chunk ``C``: every in/out block double-buffered plus the scratch state, read off
    the traced ``pallas_call``'s own block specs (so the count follows the kernel), each padded to
    (8, 128) tiles, plus the kernel's live float32 temporaries (fwd: δ, o, S_new and the operand
    copy of S; bwd: δ, dδ, the four [C, *] products and S·dS, dS_new). ``n_chunks`` sizes the
    resident λ row (T = n_chunks·C)."""
    op, f32, sds = operand_dtype(dtype), jnp.float32, jax.ShapeDtypeStruct
    BH, NC = 1, n_chunks
    blk = lambda r, c, dt=op: sds((BH, NC, r, c), dt)
    lam, state = sds((BH, 1, NC), f32), sds((BH, K, V), f32)
    if kernel == "fwd":
        fn = functools.partial(fwd_call, with_states=True)
        args = (blk(C, K), blk(C, C), blk(C, K), blk(C, V), blk(K, C), lam, state)
        temps = 2 * C * V * 4 + 2 * K * V * 4
    elif kernel == "bwd":
        fn = bwd_call
        args = (blk(K, C), blk(C, C), blk(C, K), blk(K, C), blk(C, V), blk(C, K), lam,
                blk(K, V), blk(C, V), state)
        temps = (2 * C * V + 2 * C * max(K, C)) * 4 + 2 * K * V * 4
    else:
        raise ValueError(f"kernel must be 'fwd' or 'bwd', got {kernel!r}")
    return tpu_grid.vmem_bytes(fn, *args) + temps


def tpu_supports(dtype, K, V, chunk=CHUNK):
    """None when both kernels fit ``VMEM_LIMIT`` for inputs of ``dtype``, features K, V (padded to
    128 lanes) and ``chunk``; else the reason (a one-line string)."""
    if chunk % 8:
        return f"gated_delta mosaic_tpu: chunk must be a multiple of 8, got {chunk}"
    kp, vp = -(-K // LANE) * LANE, -(-V // LANE) * LANE
    for kernel in ("fwd", "bwd"):
        used = vmem_bytes(kernel, chunk, kp, vp, dtype)
        if used > VMEM_LIMIT:
            return (f"gated_delta mosaic_tpu: the {kernel} kernel needs {used} B of VMEM at "
                    f"chunk {chunk}, K={kp}, V={vp}, {jnp.dtype(dtype).name} (limit {VMEM_LIMIT})")
    return None


# --------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def recurrence(qg, p, w, u, kg, lam, s0, op, interpret):
    """(o, final) of the chunk recurrence; kg: [BH, NC, C, K] (transposed here), the factors in
    any float dtype (cast to the operand dtype ``op`` here; their gradients come back in their
    own dtype), lam [BH, 1, NC], rest as in :func:`fwd_call`."""
    return _recurrence_fwd(qg, p, w, u, kg, lam, s0, op, interpret)[0]


def _recurrence_fwd(qg, p, w, u, kg, lam, s0, op, interpret):
    # Zero-size arrays carry the primals' dtypes to the backward (residuals must be arrays).
    tags = tuple(jnp.zeros((0,), x.dtype) for x in (qg, p, w, u, kg))
    qg, p, w, u, kg = (x.astype(op) for x in (qg, p, w, u, kg))
    lam, s0 = lam.astype(jnp.float32), s0.astype(jnp.float32)
    out = fwd_call(qg, p, w, u, jnp.swapaxes(kg, -1, -2), lam, s0, interpret=interpret)
    return tuple(out), (qg, p, w, u, kg, lam, s0, tags)


def _recurrence_bwd(op, interpret, res, cts):
    qg, p, w, u, kg, lam, s0, tags = res
    do, dfinal = cts
    tr = lambda x: jnp.swapaxes(x, -1, -2)
    _, _, states = fwd_call(qg, p, w, u, tr(kg), lam, s0, with_states=True, interpret=interpret)
    return bwd_call(tr(qg), tr(p), w, tr(w), u, kg, lam, states, do.astype(op),
                    dfinal.astype(jnp.float32), grad_dtypes=tuple(t.dtype for t in tags),
                    interpret=interpret)


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def gated_delta_rule_tpu(q, k, v, g, beta, *, scale=None, initial_state=None,
                         output_final_state=False, use_qk_l2norm=False, segment_ids=None,
                         interpret=False, chunk=CHUNK):
    """Gated delta rule through the Mosaic TPU kernels. Shapes as in ``reference.py``;
    ``chunk``: tokens per grid step (``CHUNK`` = 128 for v5e, ``CHUNK_V6E`` = 256 for v6e)."""
    if chunk % 8 or chunk <= 0:
        raise ValueError(f"gated_delta_rule_tpu: chunk must be a positive multiple of 8, "
                         f"got {chunk}")
    kp, vp = -(-q.shape[-1] // LANE) * LANE, -(-v.shape[-1] // LANE) * LANE
    op = operand_dtype(q.dtype)

    def run(f, s0):
        B, HV, NC = f.lam.shape
        flat = lambda x: x.reshape(B * HV, NC, chunk, x.shape[-1])       # [BH, NC, C, D]
        o, final = recurrence(flat(f.qg), flat(f.p), flat(f.w), flat(f.u), flat(f.kg),
                              f.lam.reshape(B * HV, 1, NC), s0.reshape(B * HV, kp, vp), op,
                              interpret)
        return o.reshape(B, HV, NC, chunk, vp), final.reshape(B, HV, kp, vp)

    return run_kernels(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                       segment_ids=segment_ids, chunk=chunk, k_size=kp, v_size=vp,
                       recurrence=run)
