"""Gated delta rule on GPU: Pallas kernels through the Triton backend, forward and backward.

The chunk-parallel half (decay matrices, the unit-triangular inverse T = (I + A)^{-1}, the WY
factors w = T(β e^G k), u = T(β v), the masked intra-chunk scores P) is built in XLA by
``chunked.kernel_factors`` (see ``chunked.py`` for the math; ``segment_ids`` become masks there,
so the kernels never see document boundaries). The kernels run the sequential half, one program
per (batch·head, block of BV value columns) — value columns are independent in the recurrence —
with the state S [K, BV] carried in a ``fori_loop`` over chunks (Triton has no scratch memory):

    forward, chunk c:   δ = u_c − w_c S;   o_c = qg_c S + P_c δ;   S <- λ_c S + kg_cᵀ δ
    backward, c = NC-1 .. 0, carrying dS = ∂L/∂S_{c+1} (S_c recomputed by the forward kernel,
    which stores one state per chunk when asked):
        dδ = P_cᵀ do_c + kg_c dS;   dqg = do_c S_cᵀ;   dP = do_c δᵀ;   dkg = δ dSᵀ;
        dw = −dδ S_cᵀ;   du = dδ;   dλ = Σ S_c ⊙ dS;   dS <- qg_cᵀ do_c + λ_c dS − w_cᵀ dδ

Products that sum over value columns (dqg, dP, dw, dkg, dλ) come out per value block and are
summed in XLA. Triton needs power-of-two blocks: C is 64, K and V are zero-padded to powers of
two (at least 16, the smallest ``tl.dot``), T to a multiple of C. Dots use IEEE float32
(``Precision.HIGHEST``): Triton's default would be TF32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.common import mm, mm_nt, mm_tn, next_pow2
from pallas_kernels.gated_delta.chunked import run_kernels

__all__ = ["CHUNK", "fwd_call", "bwd_call", "recurrence", "gated_delta_rule_triton"]

CHUNK = 64
BLOCK_V_FWD = 64
BLOCK_V_BWD = 32
NUM_WARPS = 4
NUM_STAGES = 1


def _params():
    return pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


# --------------------------------------------------------------------------- forward kernel
def _fwd_kernel(qg_ref, p_ref, w_ref, u_ref, kg_ref, lam_ref, s0_ref, o_ref, final_ref,
                *states_ref, n_chunks, chunk, k_size):
    def body(c, s):                                                      # s: [K, BV]
        rows = pl.ds(c * chunk, chunk)
        if states_ref:
            states_ref[0][pl.ds(c * k_size, k_size), :] = s
        delta = u_ref[rows, :] - mm(w_ref[rows, :], s)                  # [C, BV]
        o_ref[rows, :] = mm(qg_ref[rows, :], s) + mm(p_ref[rows, :], delta)
        return lam_ref[c] * s + mm_tn(kg_ref[rows, :], delta)

    final_ref[...] = lax.fori_loop(0, n_chunks, body, s0_ref[...])


def fwd_call(qg, p, w, u, kg, lam, s0, *, chunk=CHUNK, block_v=BLOCK_V_FWD, with_states=False,
             interpret=False):
    """qg, w, kg: [BH, Tp, K]; p: [BH, Tp, C]; u: [BH, Tp, V]; lam: [BH, NC]; s0: [BH, K, V].

    Returns (o [BH, Tp, V], final [BH, K, V]) and, with ``with_states``, the states entering
    every chunk [BH, NC·K, V].
    """
    BH, Tp, K = qg.shape
    V = u.shape[-1]
    n_chunks = Tp // chunk
    bv = min(block_v, V)
    grid = (BH, V // bv)
    full = lambda d: pl.BlockSpec((None, Tp, d), lambda b, j: (b, 0, 0))
    cols = lambda n: pl.BlockSpec((None, n, bv), lambda b, j: (b, 0, j))
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct((BH, Tp, V), f32), jax.ShapeDtypeStruct((BH, K, V), f32)]
    out_specs = [cols(Tp), cols(K)]
    if with_states:
        out_shape.append(jax.ShapeDtypeStruct((BH, n_chunks * K, V), f32))
        out_specs.append(cols(n_chunks * K))
    kernel = functools.partial(_fwd_kernel, n_chunks=n_chunks, chunk=chunk, k_size=K)
    return pl.pallas_call(
        kernel, grid=grid, out_shape=out_shape, out_specs=out_specs,
        in_specs=[full(K), full(chunk), full(K), cols(Tp), full(K),
                  pl.BlockSpec((None, n_chunks), lambda b, j: (b, 0)), cols(K)],
        compiler_params=_params(), interpret=interpret, name="gated_delta_fwd_triton",
    )(qg, p, w, u, kg, lam, s0)


# --------------------------------------------------------------------------- backward kernel
def _bwd_kernel(qg_ref, p_ref, w_ref, u_ref, kg_ref, lam_ref, states_ref, do_ref, dfinal_ref,
                dqg_ref, dp_ref, dw_ref, du_ref, dkg_ref, dlam_ref, ds0_ref,
                *, n_chunks, chunk, k_size):
    def body(j, ds):                                                     # ds: [K, BV]
        c = n_chunks - 1 - j
        rows = pl.ds(c * chunk, chunk)
        s = states_ref[pl.ds(c * k_size, k_size), :]                     # S_c [K, BV]
        w = w_ref[rows, :]
        delta = u_ref[rows, :] - mm(w, s)
        do = do_ref[rows, :]
        dd = mm_tn(p_ref[rows, :], do) + mm(kg_ref[rows, :], ds)       # ∂L/∂δ [C, BV]
        dqg_ref[rows, :] = mm_nt(do, s)
        dp_ref[rows, :] = mm_nt(do, delta)
        dkg_ref[rows, :] = mm_nt(delta, ds)
        dw_ref[rows, :] = -mm_nt(dd, s)
        du_ref[rows, :] = dd
        dlam_ref[c] = jnp.sum(jnp.sum(s * ds, axis=1), axis=0)
        return mm_tn(qg_ref[rows, :], do) + lam_ref[c] * ds - mm_tn(w, dd)

    ds0_ref[...] = lax.fori_loop(0, n_chunks, body, dfinal_ref[...])


def bwd_call(qg, p, w, u, kg, lam, states, do, dfinal, *, chunk=CHUNK, block_v=BLOCK_V_BWD,
             interpret=False):
    """Backward of :func:`fwd_call` given its chunk states. Returns (dqg, dp, dw, du, dkg, dlam,
    ds0) with the value-summed ones (dqg, dp, dw, dkg, dlam) already summed over value blocks."""
    BH, Tp, K = qg.shape
    V = u.shape[-1]
    n_chunks = Tp // chunk
    bv = min(block_v, V)
    nvb = V // bv
    full = lambda d: pl.BlockSpec((None, Tp, d), lambda b, j: (b, 0, 0))
    cols = lambda n: pl.BlockSpec((None, n, bv), lambda b, j: (b, 0, j))
    part = lambda d: pl.BlockSpec((None, None, Tp, d), lambda b, j: (j, b, 0, 0))
    f32 = jnp.float32
    sds = jax.ShapeDtypeStruct
    kernel = functools.partial(_bwd_kernel, n_chunks=n_chunks, chunk=chunk, k_size=K)
    dqg, dp, dw, du, dkg, dlam, ds0 = pl.pallas_call(
        kernel, grid=(BH, nvb),
        in_specs=[full(K), full(chunk), full(K), cols(Tp), full(K),
                  pl.BlockSpec((None, n_chunks), lambda b, j: (b, 0)), cols(n_chunks * K),
                  cols(Tp), cols(K)],
        out_specs=[part(K), part(chunk), part(K), cols(Tp), part(K),
                   pl.BlockSpec((None, None, n_chunks), lambda b, j: (j, b, 0)), cols(K)],
        out_shape=[sds((nvb, BH, Tp, K), f32), sds((nvb, BH, Tp, chunk), f32),
                   sds((nvb, BH, Tp, K), f32), sds((BH, Tp, V), f32),
                   sds((nvb, BH, Tp, K), f32), sds((nvb, BH, n_chunks), f32),
                   sds((BH, K, V), f32)],
        compiler_params=_params(), interpret=interpret, name="gated_delta_bwd_triton",
    )(qg, p, w, u, kg, lam, states, do, dfinal)
    total = lambda x: jnp.sum(x, axis=0)
    return total(dqg), total(dp), total(dw), du, total(dkg), total(dlam), ds0


# --------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def recurrence(qg, p, w, u, kg, lam, s0, chunk, interpret):
    """(o, final) of the chunk recurrence (shapes as in :func:`fwd_call`)."""
    return fwd_call(qg, p, w, u, kg, lam, s0, chunk=chunk, interpret=interpret)


def _recurrence_fwd(qg, p, w, u, kg, lam, s0, chunk, interpret):
    out = fwd_call(qg, p, w, u, kg, lam, s0, chunk=chunk, interpret=interpret)
    return out, (qg, p, w, u, kg, lam, s0)          # inputs only: states are recomputed


def _recurrence_bwd(chunk, interpret, res, cts):
    qg, p, w, u, kg, lam, s0 = res
    do, dfinal = cts
    _, _, states = fwd_call(qg, p, w, u, kg, lam, s0, chunk=chunk, with_states=True,
                            interpret=interpret)
    return bwd_call(qg, p, w, u, kg, lam, states, do, dfinal, chunk=chunk, interpret=interpret)


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def gated_delta_rule_triton(q, k, v, g, beta, *, scale=None, initial_state=None,
                            output_final_state=False, use_qk_l2norm=False, segment_ids=None,
                            interpret=False):
    """Gated delta rule through the Triton kernels. Shapes as in ``reference.py``."""
    kp, vp = max(16, next_pow2(q.shape[-1])), max(16, next_pow2(v.shape[-1]))

    def run(f, s0):
        B, HV, NC = f.lam.shape
        flat = lambda x: x.reshape(B * HV, NC * CHUNK, x.shape[-1])      # [BH, Tp, D]
        o, final = recurrence(flat(f.qg), flat(f.p), flat(f.w), flat(f.u), flat(f.kg),
                              f.lam.reshape(B * HV, NC), s0.reshape(B * HV, kp, vp), CHUNK,
                              interpret)
        return o.reshape(B, HV, NC, CHUNK, vp), final.reshape(B, HV, kp, vp)

    return run_kernels(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                       segment_ids=segment_ids, chunk=CHUNK, k_size=kp, v_size=vp,
                       recurrence=run)
