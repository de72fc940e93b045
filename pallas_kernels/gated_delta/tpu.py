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
zero-padded to multiples of 128 (lane width) and T to a multiple of C = 64. Operands that would
need a transposed left-hand side (kgᵀ, Pᵀ, qgᵀ, wᵀ) are transposed in XLA and passed in, so the
kernels only use plain (A·B) and A·Bᵀ matmuls. λ comes in as [BH, NC, 1, 1] blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import mm, mm_nt
from pallas_kernels.common import tpu_grid
from pallas_kernels.common.tpu_grid import chunk_spec, head_spec, sequential_params
from pallas_kernels.gated_delta.chunked import run_kernels

__all__ = ["CHUNK", "LANE", "fwd_call", "bwd_call", "vmem_bytes", "recurrence",
           "gated_delta_rule_tpu"]

CHUNK = 64
LANE = 128


# --------------------------------------------------------------------------- forward kernel
def _fwd_kernel(qg_ref, p_ref, w_ref, u_ref, kgt_ref, lam_ref, s0_ref, o_ref, final_ref,
                *rest, with_states, n_chunks):
    states_ref, s_ref = rest if with_states else (None, rest[0])
    c = pl.program_id(1)

    @pl.when(c == 0)
    def _():
        s_ref[...] = s0_ref[...]

    s = s_ref[...]                                                       # S_c [K, V]
    if with_states:
        states_ref[...] = s
    delta = u_ref[...] - mm(w_ref[...], s)                              # [C, V]
    o_ref[...] = mm(qg_ref[...], s) + mm(p_ref[...], delta)
    s_new = lam_ref[...] * s + mm(kgt_ref[...], delta)
    s_ref[...] = s_new

    @pl.when(c == n_chunks - 1)           # static count: pl.num_programs went stale in jax
    def _():                              # 0.11's interpreter across calls with other grids
        final_ref[...] = s_new


def fwd_call(qg, p, w, u, kgt, lam, s0, *, with_states=False, interpret=False):
    """qg, w: [BH, NC, C, K]; p: [BH, NC, C, C]; u: [BH, NC, C, V]; kgt: [BH, NC, K, C];
    lam: [BH, NC, 1, 1]; s0: [BH, K, V]. Returns (o [BH, NC, C, V], final [BH, K, V]) and, with
    ``with_states``, the states entering each chunk [BH, NC, K, V]."""
    BH, NC, C, K = qg.shape
    V = u.shape[-1]
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct((BH, NC, C, V), f32), jax.ShapeDtypeStruct((BH, K, V), f32)]
    out_specs = [chunk_spec(C, V), head_spec(K, V)]
    if with_states:
        out_shape.append(jax.ShapeDtypeStruct((BH, NC, K, V), f32))
        out_specs.append(chunk_spec(K, V))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, with_states=with_states, n_chunks=NC),
        grid=(BH, NC), out_shape=out_shape, out_specs=out_specs,
        in_specs=[chunk_spec(C, K), chunk_spec(C, C), chunk_spec(C, K), chunk_spec(C, V),
                  chunk_spec(K, C), chunk_spec(1, 1), head_spec(K, V)],
        scratch_shapes=[pltpu.VMEM((K, V), f32)],
        compiler_params=sequential_params(), interpret=interpret, name="gated_delta_fwd_tpu",
    )(qg, p, w, u, kgt, lam, s0)


# --------------------------------------------------------------------------- backward kernel
def _bwd_kernel(qgt_ref, pt_ref, w_ref, wt_ref, u_ref, kg_ref, lam_ref, states_ref, do_ref,
                dfinal_ref, dqg_ref, dp_ref, dw_ref, du_ref, dkg_ref, dlam_ref, ds0_ref, ds_ref,
                *, n_chunks):
    c = pl.program_id(1)

    @pl.when(c == 0)
    def _():
        ds_ref[...] = dfinal_ref[...]

    ds = ds_ref[...]                                                     # ∂L/∂S_{c+1} [K, V]
    s = states_ref[...]                                                  # S_c
    delta = u_ref[...] - mm(w_ref[...], s)                              # [C, V]
    do = do_ref[...]
    dd = mm(pt_ref[...], do) + mm(kg_ref[...], ds)                     # ∂L/∂δ [C, V]
    dqg_ref[...] = mm_nt(do, s)
    dp_ref[...] = mm_nt(do, delta)
    dkg_ref[...] = mm_nt(delta, ds)
    dw_ref[...] = -mm_nt(dd, s)
    du_ref[...] = dd
    dlam_ref[...] = jnp.sum(jnp.sum(s * ds, axis=1, keepdims=True), axis=0, keepdims=True)
    ds_new = mm(qgt_ref[...], do) + lam_ref[...] * ds - mm(wt_ref[...], dd)
    ds_ref[...] = ds_new

    @pl.when(c == n_chunks - 1)
    def _():
        ds0_ref[...] = ds_new


def bwd_call(qgt, pt, w, wt, u, kg, lam, states, do, dfinal, *, interpret=False):
    """Backward of :func:`fwd_call`. Transposed operands: qgt, wt [BH, NC, K, C], pt [BH, NC, C, C].
    Returns (dqg, dp, dw, du, dkg, dlam, ds0) shaped like their primals."""
    BH, NC, C, K = w.shape
    V = u.shape[-1]
    rev = functools.partial(chunk_spec, reverse=True, n_chunks=NC)
    f32 = jnp.float32
    sds = jax.ShapeDtypeStruct
    return pl.pallas_call(
        functools.partial(_bwd_kernel, n_chunks=NC), grid=(BH, NC),
        in_specs=[rev(K, C), rev(C, C), rev(C, K), rev(K, C), rev(C, V), rev(C, K), rev(1, 1),
                  rev(K, V), rev(C, V), head_spec(K, V)],
        out_specs=[rev(C, K), rev(C, C), rev(C, K), rev(C, V), rev(C, K), rev(1, 1),
                   head_spec(K, V)],
        out_shape=[sds((BH, NC, C, K), f32), sds((BH, NC, C, C), f32), sds((BH, NC, C, K), f32),
                   sds((BH, NC, C, V), f32), sds((BH, NC, C, K), f32), sds((BH, NC, 1, 1), f32),
                   sds((BH, K, V), f32)],
        scratch_shapes=[pltpu.VMEM((K, V), f32)],
        compiler_params=sequential_params(), interpret=interpret, name="gated_delta_bwd_tpu",
    )(qgt, pt, w, wt, u, kg, lam, states, do, dfinal)


def vmem_bytes(kernel, C, K, V):
    """VMEM bytes one grid step of ``kernel`` ("fwd" with states, or "bwd") needs: every in/out
    block double-buffered plus the scratch state, read off the traced ``pallas_call``'s own block
    specs (so the count follows the kernel), each padded to (8, 128) tiles."""
    f32, sds = jnp.float32, jax.ShapeDtypeStruct
    BH, NC = 1, 2
    blk = lambda r, c: sds((BH, NC, r, c), f32)
    if kernel == "fwd":
        fn = functools.partial(fwd_call, with_states=True)
        args = (blk(C, K), blk(C, C), blk(C, K), blk(C, V), blk(K, C), blk(1, 1),
                sds((BH, K, V), f32))
    elif kernel == "bwd":
        fn = bwd_call
        args = (blk(K, C), blk(C, C), blk(C, K), blk(K, C), blk(C, V), blk(C, K), blk(1, 1),
                blk(K, V), blk(C, V), sds((BH, K, V), f32))
    else:
        raise ValueError(f"kernel must be 'fwd' or 'bwd', got {kernel!r}")
    return tpu_grid.vmem_bytes(fn, *args)


# --------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def recurrence(qg, p, w, u, kg, lam, s0, interpret):
    """(o, final) of the chunk recurrence; kg: [BH, NC, C, K] (transposed here), rest as in
    :func:`fwd_call`."""
    return fwd_call(qg, p, w, u, jnp.swapaxes(kg, -1, -2), lam, s0, interpret=interpret)


def _recurrence_fwd(qg, p, w, u, kg, lam, s0, interpret):
    return recurrence(qg, p, w, u, kg, lam, s0, interpret), (qg, p, w, u, kg, lam, s0)


def _recurrence_bwd(interpret, res, cts):
    qg, p, w, u, kg, lam, s0 = res
    do, dfinal = cts
    tr = lambda x: jnp.swapaxes(x, -1, -2)
    _, _, states = fwd_call(qg, p, w, u, tr(kg), lam, s0, with_states=True, interpret=interpret)
    return bwd_call(tr(qg), tr(p), w, tr(w), u, kg, lam, states, do, dfinal, interpret=interpret)


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def gated_delta_rule_tpu(q, k, v, g, beta, *, scale=None, initial_state=None,
                         output_final_state=False, use_qk_l2norm=False, segment_ids=None,
                         interpret=False):
    """Gated delta rule through the Mosaic TPU kernels. Shapes as in ``reference.py``."""
    kp, vp = -(-q.shape[-1] // LANE) * LANE, -(-v.shape[-1] // LANE) * LANE

    def run(f, s0):
        B, HV, NC = f.lam.shape
        flat = lambda x: x.reshape(B * HV, NC, CHUNK, x.shape[-1])       # [BH, NC, C, D]
        o, final = recurrence(flat(f.qg), flat(f.p), flat(f.w), flat(f.u), flat(f.kg),
                              f.lam.reshape(B * HV, NC, 1, 1), s0.reshape(B * HV, kp, vp),
                              interpret)
        return o.reshape(B, HV, NC, CHUNK, vp), final.reshape(B, HV, kp, vp)

    return run_kernels(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                       segment_ids=segment_ids, chunk=CHUNK, k_size=kp, v_size=vp,
                       recurrence=run)
