"""simple_gla Pallas TPU (Mosaic) kernels: forward, dq, and dk/dv passes.

Kernel layout (``ops.py`` adapts the public one): q, k ``[B, H, T, K]``; v ``[B, HV, T, V]``;
b ``[B, HV, T, 1]`` the log-decay cumulated inside each chunk of C tokens (computed outside:
no cumsum inside kernels); K, V multiples of 128 (lanes), T a multiple of C. The grid is
(B, HV, T / C) with the chunk axis sequential ("arbitrary"); the state lives in a VMEM scratch
accumulator across it. Value head j reads q/k head j // (HV / H) through the index maps.

Per chunk, with D_ij = exp(b_i − b_j)·[j ≤ i], e_i = exp(b_i), f_j = exp(b_C − b_j), a = exp(b_C):
    forward   o = scale·((q kᵀ)∘D) v + scale·(e∘q) S,          S ← a S + (f∘k)ᵀ v
    dq pass   dq = scale·((dO vᵀ)∘D) k + scale·e∘(dO Sᵀ),      S ← a S + (f∘k)ᵀ v
    dk/dv     (chunks in reverse through the index maps, G = ∂L/∂S after the chunk)
              dk = scale·((dO vᵀ)∘D)ᵀ q + f∘(v Gᵀ),  dv = scale·((q kᵀ)∘D)ᵀ dO + (f∘k) G,
              G ← a G + scale·(e∘q)ᵀ dO;   ∂L/∂S_0 = G after the first chunk.
b arrives as a column [C, 1]; its row form [1, C] (for b_i − b_j) is a masked sublane sum
(diag(b) summed over rows), so no transpose or cumsum runs in the kernel. Packed documents use
the per-token masks (doc, carry, tail) of ``ops.py`` as [B, T, 1] columns, exactly as in
``gpu.py``. ``vmem_bytes`` bounds each kernel's VMEM use from the same block shapes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["simple_gla_fwd_tpu", "simple_gla_bwd_tpu", "vmem_bytes", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 64
_F32 = jnp.float32
_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _dot(a, b, ta=False, tb=False):
    """a @ b with optional transposes (as contracting dims), float32 accumulation."""
    dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
    prec = lax.Precision.HIGHEST if a.dtype == _F32 else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=_F32)


def _as_row(col, eye):
    """[C, 1] column -> [1, C] row without a transpose: Σ_i diag(col)_ij."""
    return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def _chunk_decays(b, seg, c):
    """Decay factors of one chunk from the column b [C, 1] (seg: three [C, 1] masks or None)."""
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    eye = row == col
    keep = col <= row
    if seg is not None:
        doc, carry, tail = seg
        keep = keep & (doc == _as_row(doc, eye))
    dmat = jnp.exp(jnp.where(keep, b - _as_row(b, eye), -jnp.inf))    # [C, C]
    b_last = b[c - 1:c, :]                                             # [1, 1]
    e = jnp.exp(b)                                                     # [C, 1]
    f = jnp.exp(b_last - b)                                            # [C, 1]
    a = jnp.exp(b_last)                                                # [1, 1]
    if seg is not None:
        e = e * carry
        f = f * tail
        a = a * carry[c - 1:c, :]
    return dmat, e, f, a


def _unpack(refs, n_extra_in, has_seg):
    """(q, k, v, b values), seg values or None, extra input refs, output refs, scratch ref."""
    q_ref, k_ref, v_ref, b_ref = refs[:4]
    n_seg = 3 * has_seg
    seg = tuple(r[...] for r in refs[4:4 + n_seg]) if has_seg else None
    rest = refs[4 + n_seg:]
    extra, outs, scratch = rest[:n_extra_in], rest[n_extra_in:-1], rest[-1]
    vals = (q_ref[...], k_ref[...], v_ref[...], b_ref[...].astype(_F32))
    return vals, seg, extra, outs, scratch


def _fwd_kernel(*refs, c, scale, has_seg):
    (q, k, v, b), seg, (s0_ref,), (o_ref, sf_ref), s_scr = _unpack(refs, 1, has_seg)
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _init():
        s_scr[...] = s0_ref[...].astype(_F32)

    dmat, e, f, a = _chunk_decays(b, seg, c)
    s = s_scr[...]                                                     # [K, V]
    p = _dot(q, k, tb=True) * (dmat * scale)                           # [C, C]
    o = _dot(p.astype(v.dtype), v)
    o = o + _dot((q.astype(_F32) * (scale * e)).astype(q.dtype), s.astype(q.dtype))
    o_ref[...] = o.astype(o_ref.dtype)
    s_new = a * s + _dot((k.astype(_F32) * f).astype(k.dtype), v, ta=True)
    s_scr[...] = s_new

    @pl.when(t == pl.num_programs(2) - 1)
    def _final():
        sf_ref[...] = s_new


def _dq_kernel(*refs, c, scale, has_seg):
    (q, k, v, b), seg, (s0_ref, do_ref), (dq_ref,), s_scr = _unpack(refs, 2, has_seg)

    @pl.when(pl.program_id(2) == 0)
    def _init():
        s_scr[...] = s0_ref[...].astype(_F32)

    dmat, e, f, a = _chunk_decays(b, seg, c)
    s = s_scr[...]
    do = do_ref[...]                                                   # [C, V]
    ds = _dot(do, v, tb=True) * (dmat * scale)                         # [C, C]
    dq = _dot(ds.astype(k.dtype), k) + _dot(do, s.astype(do.dtype), tb=True) * (scale * e)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    s_scr[...] = a * s + _dot((k.astype(_F32) * f).astype(k.dtype), v, ta=True)


def _dkdv_kernel(*refs, c, scale, has_seg):
    (q, k, v, b), seg, (dsf_ref, do_ref), (dk_ref, dv_ref, ds0_ref), g_scr = _unpack(
        refs, 2, has_seg)
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _init():
        g_scr[...] = dsf_ref[...].astype(_F32)

    dmat, e, f, a = _chunk_decays(b, seg, c)
    gs = g_scr[...]                                                    # [K, V] = ∂L/∂S
    do = do_ref[...]
    p = _dot(q, k, tb=True) * (dmat * scale)                           # [C, C]
    ds = _dot(do, v, tb=True) * (dmat * scale)                         # [C, C]
    gs_in = gs.astype(v.dtype)
    dk = _dot(ds.astype(q.dtype), q, ta=True) + _dot(v, gs_in, tb=True) * f
    dv = _dot(p.astype(do.dtype), do, ta=True) + _dot((k.astype(_F32) * f).astype(v.dtype), gs_in)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    g_new = a * gs + _dot((q.astype(_F32) * (scale * e)).astype(q.dtype), do, ta=True)
    g_scr[...] = g_new

    @pl.when(t == pl.num_programs(2) - 1)
    def _final():
        ds0_ref[...] = g_new


# ----------------------------------------------------------------------------------------------
# block specs (shared by the pallas_calls and the VMEM bound)
# ----------------------------------------------------------------------------------------------
def _specs(kind, h, hv, n_t, c, kd, vd, has_seg):
    """(in_specs, out_specs, scratch shape) of kernel ``kind`` over the grid (B, HV, T / C)."""
    grp = hv // h
    if kind == "dkdv":                                                 # chunks in reverse
        chunk_of = lambda t: n_t - 1 - t                               # noqa: E731
    else:
        chunk_of = lambda t: t                                         # noqa: E731
    qk = pl.BlockSpec((None, None, c, kd), lambda i, j, t: (i, j // grp, chunk_of(t), 0))
    key = pl.BlockSpec((None, None, c, kd), lambda i, j, t: (i, j, chunk_of(t), 0))
    val = pl.BlockSpec((None, None, c, vd), lambda i, j, t: (i, j, chunk_of(t), 0))
    gate = pl.BlockSpec((None, None, c, 1), lambda i, j, t: (i, j, chunk_of(t), 0))
    seg = [pl.BlockSpec((None, c, 1), lambda i, j, t: (i, chunk_of(t), 0))] * (3 * has_seg)
    state = pl.BlockSpec((None, None, kd, vd), lambda i, j, t: (i, j, 0, 0))
    ins = [qk, qk, val, gate, *seg, state] + ([val] if kind != "fwd" else [])
    outs = {"fwd": [val, state], "dq": [key], "dkdv": [key, val, state]}[kind]
    return ins, outs, (kd, vd)


def vmem_bytes(kind, *, chunk=DEFAULT_CHUNK, k_dim=128, v_dim=128, dtype=jnp.float32,
               has_seg=True):
    """Upper bound of the VMEM one grid step of kernel ``kind`` uses, from its block shapes.

    Every input and output block is double-buffered (inputs in ``dtype``, outputs and the
    state blocks float32 — a bound), plus the float32 state scratch and the kernel's largest
    live temporaries: four [C, C] float32 matrices (masks, decays, scores, their gradient)
    and four [C, max(K, V)] float32 products.
    """
    ins, outs, scratch = _specs(kind, 1, 1, 1, chunk, k_dim, v_dim, has_seg)
    item = jnp.dtype(dtype).itemsize

    def size(spec):
        return math.prod(d for d in spec.block_shape if d is not None)

    total = 2 * sum(size(s) for s in ins) * max(item, 4) + 2 * sum(size(s) for s in outs) * 4
    total += math.prod(scratch) * 4
    total += 4 * chunk * chunk * 4 + 4 * chunk * max(k_dim, v_dim) * 4
    return total


def _call(kind, kernel, args, out_shape, h, hv, c, kd, vd, has_seg, scale, interpret):
    bsz, n_t = args[2].shape[0], args[2].shape[2] // c
    ins, outs, scratch = _specs(kind, h, hv, n_t, c, kd, vd, has_seg)
    return pl.pallas_call(
        functools.partial(kernel, c=c, scale=scale, has_seg=has_seg),
        grid=(bsz, hv, n_t),
        in_specs=ins,
        out_specs=outs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM(scratch, _F32)],
        compiler_params=_PARAMS,
        interpret=interpret,
        name=f"simple_gla_{kind}",
    )(*args)


def _columns(b, seg):
    """Gates and masks as [.., T, 1] columns (TPU blocks need (8, 128)-divisible or full dims)."""
    return b[..., None], tuple(x[..., None] for x in (seg or ()))


def simple_gla_fwd_tpu(q, k, v, b, seg, s0, *, scale, chunk=DEFAULT_CHUNK, interpret=False):
    """Forward: (o [B, HV, T, V] in v.dtype, final state [B, HV, K, V] float32).

    q, k: [B, H, T, K]; v: [B, HV, T, V]; b: [B, HV, T] chunk-local cumulative log-decay;
    seg: None or (doc, carry, tail), each [B, T] float32; s0: [B, HV, K, V] float32.
    """
    bsz, h, t, kd = q.shape
    hv, vd = v.shape[1], v.shape[3]
    bcol, segcol = _columns(b, seg)
    out_shape = [jax.ShapeDtypeStruct((bsz, hv, t, vd), v.dtype),
                 jax.ShapeDtypeStruct((bsz, hv, kd, vd), _F32)]
    return _call("fwd", _fwd_kernel, (q, k, v, bcol, *segcol, s0), out_shape, h, hv, chunk,
                 kd, vd, seg is not None, scale, interpret)


def simple_gla_bwd_tpu(q, k, v, b, seg, s0, do, dfinal, *, scale, chunk=DEFAULT_CHUNK,
                       interpret=False):
    """Backward: (dq [B, HV, T, K], dk [B, HV, T, K], dv [B, HV, T, V], ds0 [B, HV, K, V]).

    dq and dk are per value head (summed over each group outside), all float32.
    """
    bsz, h, t, kd = q.shape
    hv, vd = v.shape[1], v.shape[3]
    bcol, segcol = _columns(b, seg)
    has_seg = seg is not None
    args = (q, k, v, bcol, *segcol)
    dq = _call("dq", _dq_kernel, (*args, s0, do),
               [jax.ShapeDtypeStruct((bsz, hv, t, kd), _F32)],
               h, hv, chunk, kd, vd, has_seg, scale, interpret)[0]
    dk, dv, ds0 = _call("dkdv", _dkdv_kernel, (*args, dfinal, do),
                        [jax.ShapeDtypeStruct((bsz, hv, t, kd), _F32),
                         jax.ShapeDtypeStruct((bsz, hv, t, vd), _F32),
                         jax.ShapeDtypeStruct((bsz, hv, kd, vd), _F32)],
                        h, hv, chunk, kd, vd, has_seg, scale, interpret)
    return dq, dk, dv, ds0
