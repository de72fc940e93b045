"""simple_gla Pallas kernels for GPU through the Triton backend: forward, dq, and dk/dv passes.

Kernel layout (``ops.py`` adapts the public one): q, k ``[B, H, T, K]``; v ``[B, HV, T, V]``;
b ``[B, HV, T]`` the log-decay cumulated *inside each chunk* of C tokens (b_i = Σ_{u ≤ i} g_u from
the chunk start, computed outside the kernel); K, V powers of two ≥ 16, T a multiple of C.
One program per (batch, value head) walks the chunks in a ``fori_loop`` carrying the state in
registers (the Triton backend has no scratch memory and no value slicing, hence ``pl.ds`` ref
slices and masked sums instead of ``b[-1]``). Value head j reads q/k head j // (HV / H).

Per chunk, with D_ij = exp(b_i − b_j)·[j ≤ i], e_i = exp(b_i), f_j = exp(b_C − b_j), a = exp(b_C):
    forward   o = scale·((q kᵀ)∘D) v + scale·(e∘q) S,          S ← a S + (f∘k)ᵀ v
    dq pass   dq = scale·((dO vᵀ)∘D) k + scale·e∘(dO Sᵀ),      S ← a S + (f∘k)ᵀ v
    dk/dv     (chunks in reverse, G = ∂L/∂S after the chunk, G_init = ∂L/∂S_final)
              dk = scale·((dO vᵀ)∘D)ᵀ q + f∘(v Gᵀ),  dv = scale·((q kᵀ)∘D)ᵀ dO + (f∘k) G,
              G ← a G + scale·(e∘q)ᵀ dO;   ∂L/∂S_0 = G at the end.
With packed documents three per-token float masks (from ``ops.py``) keep the same formulas
exact: ``doc`` (document id: D also needs doc_i = doc_j), ``carry`` (token still in the document
that entered the chunk: multiplies e, and a through the chunk's last token) and ``tail`` (token
in the chunk's last document: multiplies f). dq/dk come out per value head (summed over groups
outside); the gate gradient is derived outside from dq, dk (see ``chunked.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

__all__ = ["simple_gla_fwd_triton", "simple_gla_bwd_triton", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 64
_F32 = jnp.float32


def _dot(a, b, ta=False, tb=False):
    """a @ b with optional transposes, float32 accumulation."""
    a = a.T if ta else a
    b = b.T if tb else b
    prec = lax.Precision.HIGHEST if a.dtype == _F32 else None
    return jnp.dot(a, b, precision=prec, preferred_element_type=_F32)


def _chunk_decays(b, seg, c):
    """Decay factors of one chunk from b [C] (and seg = (doc, carry, tail) [C] each, or None)."""
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    keep = col <= row
    if seg is not None:
        doc, carry, tail = seg
        keep = keep & (doc[:, None] == doc[None, :])
    dmat = jnp.exp(jnp.where(keep, b[:, None] - b[None, :], -jnp.inf))  # [C, C]
    is_last = lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1
    b_last = jnp.sum(jnp.where(is_last, b, 0.0))                       # scalar b_C
    e = jnp.exp(b)                                                     # [C]
    f = jnp.exp(b_last - b)                                            # [C]
    a = jnp.exp(b_last)
    if seg is not None:
        e = e * carry
        f = f * tail
        a = a * jnp.sum(jnp.where(is_last, carry, 0.0))
    return dmat, e, f, a


def _load_chunk(refs, n, c, seg_refs):
    """Chunk n of q, k, v, b (and the segment masks) as values."""
    sl = pl.ds(pl.multiple_of(n * c, c), c)
    q_ref, k_ref, v_ref, b_ref = refs
    q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]                 # [C, K], [C, K], [C, V]
    b = b_ref[sl].astype(_F32)                                         # [C]
    seg = None if seg_refs is None else tuple(r[sl] for r in seg_refs)
    return sl, q, k, v, b, seg


def _split_refs(refs, n_in, has_seg):
    """(q, k, v, b refs), segment-mask refs or None, the other inputs, the outputs."""
    ins, outs = refs[:n_in], refs[n_in:]
    n_fixed = 4 + 3 * has_seg
    return ins[:4], (ins[4:n_fixed] if has_seg else None), ins[n_fixed:], outs


def _fwd_kernel(*refs, n_chunks, c, scale, has_seg):
    n_in = 5 + 3 * has_seg
    qkvb, seg_refs, (s0_ref,), (o_ref, sf_ref) = _split_refs(refs, n_in, has_seg)

    def body(n, s):                                                    # s: [K, V] float32
        sl, q, k, v, b, seg = _load_chunk(qkvb, n, c, seg_refs)
        dmat, e, f, a = _chunk_decays(b, seg, c)
        p = _dot(q, k, tb=True) * (dmat * scale)                       # [C, C]
        o = _dot(p.astype(v.dtype), v)
        o = o + _dot((q.astype(_F32) * (scale * e)[:, None]).astype(q.dtype), s.astype(q.dtype))
        o_ref[sl, :] = o.astype(o_ref.dtype)
        kf = (k.astype(_F32) * f[:, None]).astype(k.dtype)
        return a * s + _dot(kf, v, ta=True)

    sf_ref[...] = lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(_F32))


def _dq_kernel(*refs, n_chunks, c, scale, has_seg):
    n_in = 6 + 3 * has_seg
    qkvb, seg_refs, (s0_ref, do_ref), (dq_ref,) = _split_refs(refs, n_in, has_seg)

    def body(n, s):
        sl, q, k, v, b, seg = _load_chunk(qkvb, n, c, seg_refs)
        do = do_ref[sl, :]                                             # [C, V]
        dmat, e, f, a = _chunk_decays(b, seg, c)
        ds = _dot(do, v, tb=True) * (dmat * scale)                     # [C, C]
        dq = _dot(ds.astype(k.dtype), k)
        dq = dq + _dot(do, s.astype(do.dtype), tb=True) * (scale * e)[:, None]
        dq_ref[sl, :] = dq.astype(dq_ref.dtype)
        kf = (k.astype(_F32) * f[:, None]).astype(k.dtype)
        return a * s + _dot(kf, v, ta=True)

    lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(_F32))


def _dkdv_kernel(*refs, n_chunks, c, scale, has_seg):
    n_in = 6 + 3 * has_seg
    qkvb, seg_refs, (dsf_ref, do_ref), (dk_ref, dv_ref, ds0_ref) = _split_refs(refs, n_in, has_seg)

    def body(i, gs):                                                   # gs: [K, V] = ∂L/∂S
        n = n_chunks - 1 - i
        sl, q, k, v, b, seg = _load_chunk(qkvb, n, c, seg_refs)
        do = do_ref[sl, :]                                             # [C, V]
        dmat, e, f, a = _chunk_decays(b, seg, c)
        p = _dot(q, k, tb=True) * (dmat * scale)                       # [C, C]
        ds = _dot(do, v, tb=True) * (dmat * scale)                     # [C, C]
        kf = k.astype(_F32) * f[:, None]                               # [C, K]
        gs_in = gs.astype(v.dtype)
        dk = _dot(ds.astype(q.dtype), q, ta=True) + _dot(v, gs_in, tb=True) * f[:, None]
        dv = _dot(p.astype(do.dtype), do, ta=True) + _dot(kf.astype(v.dtype), gs_in)
        dk_ref[sl, :] = dk.astype(dk_ref.dtype)
        dv_ref[sl, :] = dv.astype(dv_ref.dtype)
        qe = (q.astype(_F32) * (scale * e)[:, None]).astype(q.dtype)
        return a * gs + _dot(qe, do, ta=True)

    ds0_ref[...] = lax.fori_loop(0, n_chunks, body, dsf_ref[...].astype(_F32))


def _specs(bsz, h, hv, t, kd, vd, has_seg):
    """BlockSpecs over the grid (B, HV): whole sequences of one head per program."""
    grp = hv // h
    qk = pl.BlockSpec((None, None, t, kd), lambda i, j: (i, j // grp, 0, 0))
    val = pl.BlockSpec((None, None, t, vd), lambda i, j: (i, j, 0, 0))
    key = pl.BlockSpec((None, None, t, kd), lambda i, j: (i, j, 0, 0))
    gate = pl.BlockSpec((None, None, t), lambda i, j: (i, j, 0))
    seg = [pl.BlockSpec((None, t), lambda i, j: (i, 0))] * (3 * has_seg)
    state = pl.BlockSpec((None, None, kd, vd), lambda i, j: (i, j, 0, 0))
    return dict(qk=qk, val=val, key=key, gate=gate, seg=seg, state=state)


def _params(kd, vd):
    """4 warps hold a 64x64 float32 state comfortably in registers; larger states get 8."""
    return pltr.CompilerParams(num_warps=4 if kd * vd <= 64 * 64 else 8, num_stages=2)


def simple_gla_fwd_triton(q, k, v, b, seg, s0, *, scale, chunk=DEFAULT_CHUNK, interpret=False):
    """Forward: (o [B, HV, T, V] in v.dtype, final state [B, HV, K, V] float32).

    q, k: [B, H, T, K]; v: [B, HV, T, V]; b: [B, HV, T] chunk-local cumulative log-decay;
    seg: None or (doc, carry, tail), each [B, T] float32; s0: [B, HV, K, V] float32.
    """
    bsz, h, t, kd = q.shape
    hv, vd = v.shape[1], v.shape[3]
    has_seg = seg is not None
    sp = _specs(bsz, h, hv, t, kd, vd, has_seg)
    kernel = functools.partial(_fwd_kernel, n_chunks=t // chunk, c=chunk, scale=scale,
                               has_seg=has_seg)
    return pl.pallas_call(
        kernel,
        grid=(bsz, hv),
        in_specs=[sp["qk"], sp["qk"], sp["val"], sp["gate"], *sp["seg"], sp["state"]],
        out_specs=[sp["val"], sp["state"]],
        out_shape=[jax.ShapeDtypeStruct((bsz, hv, t, vd), v.dtype),
                   jax.ShapeDtypeStruct((bsz, hv, kd, vd), _F32)],
        compiler_params=_params(kd, vd),
        interpret=interpret,
        name="simple_gla_fwd",
    )(q, k, v, b, *(seg or ()), s0)


def simple_gla_bwd_triton(q, k, v, b, seg, s0, do, dfinal, *, scale, chunk=DEFAULT_CHUNK,
                          interpret=False):
    """Backward: (dq [B, HV, T, K], dk [B, HV, T, K], dv [B, HV, T, V], ds0 [B, HV, K, V]).

    dq and dk are per value head (sum over each group of HV / H heads for the q/k gradient);
    all in float32. do: [B, HV, T, V]; dfinal: [B, HV, K, V] float32.
    """
    bsz, h, t, kd = q.shape
    hv, vd = v.shape[1], v.shape[3]
    has_seg = seg is not None
    sp = _specs(bsz, h, hv, t, kd, vd, has_seg)
    common = dict(n_chunks=t // chunk, c=chunk, scale=scale, has_seg=has_seg)
    ins = [sp["qk"], sp["qk"], sp["val"], sp["gate"], *sp["seg"], sp["state"], sp["val"]]
    args = (q, k, v, b, *(seg or ()))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid=(bsz, hv), in_specs=ins, out_specs=sp["key"],
        out_shape=jax.ShapeDtypeStruct((bsz, hv, t, kd), _F32),
        compiler_params=_params(kd, vd), interpret=interpret, name="simple_gla_dq",
    )(*args, s0, do)
    dk, dv, ds0 = pl.pallas_call(
        functools.partial(_dkdv_kernel, **common),
        grid=(bsz, hv), in_specs=ins, out_specs=[sp["key"], sp["val"], sp["state"]],
        out_shape=[jax.ShapeDtypeStruct((bsz, hv, t, kd), _F32),
                   jax.ShapeDtypeStruct((bsz, hv, t, vd), _F32),
                   jax.ShapeDtypeStruct((bsz, hv, kd, vd), _F32)],
        compiler_params=_params(kd, vd), interpret=interpret, name="simple_gla_dkdv",
    )(*args, dfinal, do)
    return dq, dk, dv, ds0
