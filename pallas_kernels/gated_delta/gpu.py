"""Gated delta rule on GPU: Triton kernels (``triton_kernels.py``) through jax_triton, fwd + bwd.

Math (``chunked.py`` derives it). Chunks of C = 64 tokens; inside a chunk (i, j = 0..C-1) G is
the cumulative log decay, β the write strength, S_c the state entering chunk c:

    A = strict_lower(β_i e^{G_i − G_j} k_i·k_j),   T = (I + A)^{-1}  (unit lower triangular),
    w = T (β e^{G} k),   u = T (β v),   δ = u − w S_c            ("v_new"),
    S_{c+1} = e^{G_{C-1}} S_c + (e^{G_{C-1} − G} k)ᵀ δ,
    o = scale (e^{G} q) S_c + scale [causal (q kᵀ ⊙ e^{G_i − G_j})] δ.

Kernels (grids fill an H100 at B·HV = 32: the parallel ones put chunks on a grid axis):

    forward   gated_delta_fwd_wy    (NC, B·HV)        A, T by 16×16 blocked substitution, w, u
              gated_delta_fwd_h     (V/BV, B·HV)      the recurrence: h_c, δ, final state
              gated_delta_fwd_o     (V/BV, NC, B·HV)  o
    backward  gated_delta_bwd_dv_local (NC, B·HV)     Pᵀ do (the intra-chunk share of dδ)
              gated_delta_bwd_dh    (V/BV, B·HV)      reverse recurrence: dh_c, dδ, ds0
              gated_delta_bwd_dqkw  (K/BK, NC, B·HV)  dqg = do hᵀ, dkg = δ dhᵀ, dw = −dδ hᵀ
              gated_delta_bwd_wy_v  (NC, B·HV)        back through u = T(βv): dv, dT's V share, dP
              gated_delta_bwd_wy    (NC, B·HV)        back through T, A, P and the gates:
                                                      dβ, dG, score gradients dkk, dqk
              gated_delta_bwd_dqdk  (K/BK, NC, B·HV)  dq, dk

Every reduction over K or V runs inside one kernel (a kernel loops over the tiles); the only
XLA work is the input handling and the chunk-local cumsum of g (forward) and its transpose
(the backward's dG -> dg, by autodiff of the same cumsum).

Input handling is the existing path's (``chunked.canonicalize``): float32 l2norm when asked,
grouped heads expanded, padding tokens (segment id 0) made no-ops (g = 0, β = 0, output zeroed),
T padded to a multiple of 64 with zero tokens; K, V zero-padded to powers of two >= 16 (exact:
padded columns add nothing to k·k, q·k and stay zero in the state). ``segment_ids`` reach the
kernels as per-token document numbers ``docs``, ``carry`` (``chunked.doc_carry``: still in the
document open before the chunk, so it reads S_c) and ``tail`` (in the chunk's last document, so
it writes S_{c+1}); with no segment_ids docs = 0, carry = tail = 1. ``docs`` are float32,
compared only for equality: under the interpreter an int32 input made other pointers' element
types int32 at random (likely the adapter's per-array dtype objects recycled at one address
and mixed up by Triton's native type specialiser).

Dtypes: q, k, v go to the kernels in their input dtype (bf16 or f32) and are the dot operands
(bf16 -> bf16 tensor-core dots with f32 accumulation, f32 -> Triton's default TF32 on a GPU);
G, β, the carried state and the final state are float32; per-chunk states h, dh, T, w, u and δ
are stored in the input dtype, the backward's intermediate gradients in float32. Outputs are in
the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import pad_axis
from pallas_kernels.common.triton_call import launch
from pallas_kernels.common.triton_support import KernelTable, dtype_name, padded
from pallas_kernels.gated_delta.chunked import canonicalize, doc_carry

__all__ = ["CHUNK", "KERNELS", "TABLE", "config", "gated_delta_rule_triton"]

CHUNK = 64
KERNELS = ("gated_delta_fwd_wy", "gated_delta_fwd_h", "gated_delta_fwd_o",
           "gated_delta_bwd_dv_local", "gated_delta_bwd_dh", "gated_delta_bwd_dqkw",
           "gated_delta_bwd_wy_v", "gated_delta_bwd_wy", "gated_delta_bwd_dqdk")
F32 = jnp.float32


def config(dtype: str, K: int, V: int) -> dict:
    """Tile sizes and launch options for padded sizes K, V (tuned on the compile gate's
    register / spill / shared-memory report).

    BK / BV tile the chunk-parallel kernels: 64 in bf16, 32 in f32 (sm_80 holds mma.sync
    operands in registers). BS is the V tile of the two sequential kernels, whose state
    [K, BS] stays in registers (K whole), so it shrinks as K grows; their loop over chunks is
    double-buffered only while the chunk's [C, K] tiles (q, k, w) are small (K · itemsize <=
    256 bytes), and f32 K = 256 splits the state into NKS = 2 row slices of 128 with BS = 16.
    gated_delta_bwd_wy_v / _wy hold several C×C float32 matrices at once, and
    gated_delta_bwd_dqdk several C×C operands: 8 warps (the two wy kernels) and 32-wide tiles.
    """
    item = jnp.dtype(dtype).itemsize
    tile = 64 if item == 2 else 32
    nks = 2 if K * item >= 1024 else 1
    return dict(BK=min(K, tile), BV=min(V, tile), BS=min(V, 64 if K <= 64 else 32 // nks),
                warps=4, state_warps=4 if K * item <= 256 else 8, wy_warps=8, wy_tile=32,
                stages=2, state_stages=2 if K * item <= 256 else 1, NKS=nks)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


# ------------------------------------------------------------------------------ kernel calls
def _forward(q, k, v, G, beta, docs, carry, tail, s0, scale, interpret):
    """q, k [B, Tp, HV, K], v [B, Tp, HV, V] (dtype DT); G, β [B, Tp, HV] f32; docs, carry,
    tail [B, Tp]; s0 [B·HV, K, V] f32. Returns (o, final, residuals T, w, h, v_new)."""
    from pallas_kernels.gated_delta import triton_kernels as tk
    B, Tp, HV, K = q.shape
    V = v.shape[-1]
    NC, C, dt = Tp // CHUNK, CHUNK, q.dtype
    cf = config(dtype_name(q), K, V)
    dims = dict(HV=HV, Tp=Tp, K=K, V=V, C=C)
    common = dict(interpret=interpret, num_warps=cf["warps"], num_stages=cf["stages"])
    masks = (G, docs, carry, tail)
    t, w, u, _ = launch(tk.gated_delta_fwd_wy, k, v, G, beta, *masks[1:],
                        out_shape=[_sds((B, Tp, HV, C), dt), _sds(q.shape, dt),
                                   _sds(v.shape, dt), _sds((B, Tp, HV, C), F32)],
                        grid=(NC, B * HV), name="gated_delta_fwd_wy", **common,
                        BK=cf["BK"], BV=cf["BV"], **dims)
    h, v_new, final = launch(tk.gated_delta_fwd_h, k, w, u, *masks, s0,
                             out_shape=[_sds((B * HV, NC, K, V), dt), _sds(v.shape, dt),
                                        _sds((B * HV, K, V), F32)],
                             grid=(V // cf["BS"], B * HV), name="gated_delta_fwd_h",
                             interpret=interpret, num_warps=cf["state_warps"],
                             num_stages=cf["state_stages"], NC=NC, BV=cf["BS"], NKS=cf["NKS"],
                             **dims)
    (o,) = launch(tk.gated_delta_fwd_o, q, k, v_new, h, *masks,
                  out_shape=[_sds(v.shape, dt)], grid=(V // cf["BV"], NC, B * HV),
                  name="gated_delta_fwd_o", **common, NC=NC, BK=cf["BK"], BV=cf["BV"],
                  scale=scale, **dims)
    return o, final, (t, w, h, v_new)


def _backward(q, k, v, G, beta, docs, carry, tail, res, do, dfinal, scale, interpret):
    """Gradients (dq, dk, dv, dG, dβ, ds0), float32, of :func:`_forward`'s (o, final)."""
    from pallas_kernels.gated_delta import triton_kernels as tk
    t, w, h, v_new = res
    B, Tp, HV, K = q.shape
    V = v.shape[-1]
    NC, C = Tp // CHUNK, CHUNK
    cf = config(dtype_name(q), K, V)
    dims = dict(HV=HV, Tp=Tp, K=K, V=V, C=C)
    common = dict(interpret=interpret, num_warps=cf["warps"], num_stages=cf["stages"])
    masks = (G, docs, carry, tail)
    do = do.astype(q.dtype)
    (dvl,) = launch(tk.gated_delta_bwd_dv_local, q, k, do, *masks,
                    out_shape=[_sds(v.shape, F32)], grid=(NC, B * HV),
                    name="gated_delta_bwd_dv_local", **common, BK=cf["BK"], BV=cf["BV"],
                    scale=scale, **dims)
    dh, dd, ds0 = launch(tk.gated_delta_bwd_dh, q, k, w, do, dvl, *masks, dfinal,
                         out_shape=[_sds(h.shape, q.dtype), _sds(v.shape, F32),
                                    _sds((B * HV, K, V), F32)],
                         grid=(V // cf["BS"], B * HV), name="gated_delta_bwd_dh",
                         interpret=interpret, num_warps=cf["state_warps"],
                         num_stages=cf["state_stages"], NC=NC, BV=cf["BS"], scale=scale,
                         NKS=cf["NKS"], **dims)
    dqg, dkg, dw = launch(tk.gated_delta_bwd_dqkw, do, v_new, dd, h, dh,
                          out_shape=[_sds(q.shape, F32)] * 3, grid=(K // cf["BK"], NC, B * HV),
                          name="gated_delta_bwd_dqkw", **common, NC=NC, BK=cf["BK"],
                          BV=cf["BV"], **dims)
    sq, vec = _sds((B, Tp, HV, C), F32), _sds(beta.shape, F32)
    wt = dict(interpret=interpret, num_warps=cf["wy_warps"], num_stages=cf["stages"])
    dv, s_bv, dtv, dp = launch(tk.gated_delta_bwd_wy_v, v, beta, t, v_new, do, dd,
                               out_shape=[_sds(v.shape, F32), vec, sq, sq], grid=(NC, B * HV),
                               name="gated_delta_bwd_wy_v", **wt, BV=min(V, cf["wy_tile"]),
                               HV=HV, Tp=Tp, V=V, C=C)
    dbeta, dG, dkk, dqk = launch(
        tk.gated_delta_bwd_wy, q, k, beta, *masks, t, h, dh, dqg, dkg, dw, dtv, dp, s_bv,
        out_shape=[vec, vec, sq, sq], grid=(NC, B * HV), name="gated_delta_bwd_wy", **wt,
        NC=NC, BK=min(K, cf["wy_tile"]), BV=min(V, cf["wy_tile"]), scale=scale, **dims)
    dq, dk = launch(tk.gated_delta_bwd_dqdk, q, k, beta, *masks, t, dkk, dqk, dqg, dkg, dw,
                    out_shape=[_sds(q.shape, F32)] * 2,
                    grid=(K // min(K, cf["wy_tile"]), NC, B * HV),
                    name="gated_delta_bwd_dqdk", **common, BK=min(K, cf["wy_tile"]), scale=scale,
                    HV=HV, Tp=Tp, K=K, C=C)
    return dq, dk, dv, dG, dbeta, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _core(q, k, v, G, beta, docs, carry, tail, s0, scale, interpret):
    o, final, _ = _forward(q, k, v, G, beta, docs, carry, tail, s0, scale, interpret)
    return o, final


def _core_fwd(q, k, v, G, beta, docs, carry, tail, s0, scale, interpret):
    o, final, res = _forward(q, k, v, G, beta, docs, carry, tail, s0, scale, interpret)
    return (o, final), (q, k, v, G, beta, docs, carry, tail, res)


def _core_bwd(scale, interpret, saved, cts):
    q, k, v, G, beta, docs, carry, tail, res = saved
    do, dfinal = cts
    dq, dk, dv, dG, dbeta, ds0 = _backward(q, k, v, G, beta, docs, carry, tail, res, do,
                                           dfinal.astype(F32), scale, interpret)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dG, dbeta, None,
            None, None, ds0)


_core.defvjp(_core_fwd, _core_bwd)


# ------------------------------------------------------------------------------ entry point
def _compute_dtype(q, k, v):
    return jnp.result_type(q.dtype, k.dtype, v.dtype)


def gated_delta_rule_triton(q, k, v, g, beta, *, scale=None, initial_state=None,
                            output_final_state=False, use_qk_l2norm=False, segment_ids=None,
                            interpret=False):
    """Gated delta rule through the Triton kernels. Shapes as in ``reference.py``; returns
    (o [B, T, HV, V] in v.dtype, final state [B, HV, K, V] float32 or None)."""
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    dt, out_dtype = _compute_dtype(q, k, v), v.dtype
    scale = float(K ** -0.5 if scale is None else scale)
    kp, vp = padded(K), padded(V)
    q, k, v, g, beta, docs, valid = canonicalize(q, k, v, g, beta, segment_ids=segment_ids,
                                                 use_qk_l2norm=use_qk_l2norm, chunk=CHUNK)
    Tp = q.shape[1]
    feat = lambda x, n: (x if x.shape[-1] == n else pad_axis(x, x.ndim - 1, n)).astype(dt)
    q, k, v = feat(q, kp), feat(k, kp), feat(v, vp)
    # G: the cumulative log decay within each chunk (its transpose is the backward's dG -> dg)
    G = jnp.cumsum(g.reshape(B, Tp // CHUNK, CHUNK, HV), axis=2).reshape(B, Tp, HV)
    if docs is None:
        docs = jnp.zeros((B, Tp), F32)
        carry = tail = jnp.ones((B, Tp), F32)
    else:
        carry = doc_carry(docs, CHUNK)
        chunks = docs.reshape(B, Tp // CHUNK, CHUNK)
        tail = (chunks == chunks[..., -1:]).astype(F32).reshape(B, Tp)
        docs = docs.astype(F32)          # exact below 2^24 documents per row (see below)
    s0 = jnp.zeros((B, HV, kp, vp), F32)
    if initial_state is not None:
        s0 = s0.at[:, :, :K, :V].set(initial_state.astype(F32))
    o, final = _core(q, k, v, G, beta, docs, carry, tail, s0.reshape(B * HV, kp, vp), scale,
                     interpret)
    o = o[:, :T, :, :V]
    if valid is not None:
        o = jnp.where(valid[..., None, None], o, 0)
    final = final.reshape(B, HV, kp, vp)[:, :, :K, :V]
    return o.astype(out_dtype), (final if output_final_state else None)


# ------------------------------------------------------------------------------ kernel table
def _request(arrays, static):
    q, k, v = arrays[:3]
    return jnp.dtype(_compute_dtype(q, k, v)).name, {"K": padded(q.shape[-1]),
                                                     "V": padded(v.shape[-1])}


def _shared_bytes(dtype, sizes):
    """Shared memory of the largest kernel, an upper bound of what Triton allocates (the compile
    gate measured at most 148 KB, f32 K = 64 gated_delta_bwd_dh, under this 160 KB): the
    chunk-parallel kernels stage, per pipeline stage, at most six dot-operand tiles of C × 128
    bytes plus one C×C float32 matrix; the sequential ones, per stage, the chunk's q, k, w
    [C, K / NKS] and do, dδ [C, BS]."""
    item = jnp.dtype(dtype).itemsize
    cf = config(dtype, sizes["K"], sizes["V"])
    parallel = cf["stages"] * 6 * CHUNK * 128 + CHUNK * CHUNK * 4
    state = cf["state_stages"] * (3 * CHUNK * sizes["K"] // cf["NKS"] + 2 * CHUNK * cf["BS"]) * item
    return max(parallel, state)


def _gate_case(dtype, sizes):
    """value_and_grad over the public op (impl="triton", initial state, final state): every
    kernel of the family, forward and backward, at B=1, H=2, T=256."""
    from pallas_kernels.gated_delta.ops import gated_delta_rule
    B, T, H, K, V = 1, 256, 2, sizes["K"], sizes["V"]
    dt = jnp.dtype(dtype)

    def loss(q, k, v, g, beta, s0):
        o, final = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                    impl="triton")
        return jnp.sum(o.astype(F32) ** 2) + jnp.sum(final ** 2)

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))
    args = (_sds((B, T, H, K), dt), _sds((B, T, H, K), dt), _sds((B, T, H, V), dt),
            _sds((B, T, H), dt), _sds((B, T, H), dt), _sds((B, H, K, V), F32))
    return fn, args


# Backward kernels with a few registers' worth of spills on some configurations (the gate's
# stores + loads): the sequential dh kernel (f32 K = 256, sm_90a/sm_100a), dqkw (sm_80 bf16
# V = 256, sm_100a f32), and the two wy kernels on sm_80 bf16. The forward kernels get none.
SPILL_ALLOWANCE = {"gated_delta_bwd_dh": 256, "gated_delta_bwd_dqkw": 64,
                   "gated_delta_bwd_wy_v": 256, "gated_delta_bwd_wy": 256}

# float32 on sm_80: ptxas spills 1.4 KB (K = 64) to 21 KB (K = 128, 256) in gated_delta_bwd_wy
# at 4 and 8 warps; A100s run float32 through "chunked" (bf16 passes the gate there).
UNSUPPORTED = {("float32", 80): "gated_delta_bwd_wy spills 1.4-21 KB of registers there (the "
                                "compile gate); bfloat16 runs"}

TABLE = KernelTable(op="gated_delta_rule", max_sizes={"K": 256, "V": 256}, request=_request,
                    shared_bytes=_shared_bytes, gate_case=_gate_case,
                    spill_allowance=SPILL_ALLOWANCE, unsupported=UNSUPPORTED)
