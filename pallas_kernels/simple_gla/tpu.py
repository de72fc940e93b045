"""simple_gla Pallas TPU (Mosaic) kernels: forward, dq, and dk/dv passes.

Kernel layout (``kernels.py`` adapts the public one): q, k ``[B, H, T, K]``; v ``[B, HV, T, V]``;
b ``[B, HV, T]`` the log-decay cumulated inside each chunk of C tokens (computed outside: no
cumsum inside kernels); K, V multiples of 128 (lanes), T a multiple of C. On the TPU grid of
``common.tpu_grid`` these become [BH, NC, C, D] arrays (free reshapes) and the grid is
(B·HV, T / C), the chunk axis sequential ("arbitrary"); the state lives in a VMEM scratch
accumulator across it. Value head j reads q/k head j // (HV / H) through the index maps.

Per chunk, with D_ij = exp(b_i − b_j)·[j ≤ i], e_i = exp(b_i), f_j = exp(b_C − b_j), a = exp(b_C):
    forward   o = scale·((q kᵀ)∘D) v + scale·(e∘q) S,          S ← a S + (f∘k)ᵀ v
    dq pass   dq = scale·((dO vᵀ)∘D) k + scale·e∘(dO Sᵀ),      S ← a S + (f∘k)ᵀ v
    dk/dv     (chunks in reverse through the index maps, G = ∂L/∂S after the chunk)
              dk = scale·((dO vᵀ)∘D)ᵀ q + f∘(v Gᵀ),  dv = scale·((q kᵀ)∘D)ᵀ dO + (f∘k) G,
              G ← a G + scale·(e∘q)ᵀ dO;   ∂L/∂S_0 = G after the first chunk.
Gates are lane-dense: b arrives as one [1, C] row per chunk ([BH, NC, 1, C] arrays: a block
pads to one (8, C) tile, where a [C, 1] column padded to C/8 (8, 128) tiles, 64 KiB at C = 128,
double-buffered); the packing masks (doc, carry, tail) of ``kernels.py`` likewise, one [1, C]
row per batch row and chunk. The column form [C, 1] that scales rows (e, f, the b_i of
b_i − b_j) is one masked lane sum of the row (Σ_j diag(b)_ij), so no transpose or cumsum runs in
the kernel. ``vmem_bytes`` bounds each kernel's VMEM use from the same block shapes.

Chunk: C = ``DEFAULT_CHUNK`` = 128 (one v5e MXU tile), ``CHUNK_V6E`` = 256 for v6e's 256-wide
MXU (the ``chunk`` argument); T is padded to a multiple of C outside (exact). The in-chunk
decays exp(b_i − b_j) of 256 tokens stay in range: b_i − b_j <= 0 for j <= i and only the
masked upper triangle sees positive differences (set to −inf before the exp).

Dtypes (``common.mxu``): bf16/fp16 inputs -> bf16 MXU operands (fp16 is cast to bf16 before the
kernel), float32 accumulation; float32 inputs -> float32 operands at DEFAULT precision (on a TPU
one bf16 MXU pass, as XLA does for a float32 matmul; exact in interpret mode on CPU). The state
(VMEM scratch), the final state, b, the masks and every elementwise product stay float32; the
state, the decayed q/k and the [C, C] scores are cast to the operand dtype only as matmul
operands. o is written in the operand dtype, the gradients in float32.
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
from pallas_kernels.common.tpu_grid import chunk_spec, head_spec, sequential_params

__all__ = ["simple_gla_fwd_tpu", "simple_gla_bwd_tpu", "vmem_bytes", "tpu_supports",
           "DEFAULT_CHUNK", "CHUNK_V6E", "VMEM_LIMIT"]

DEFAULT_CHUNK = 128          # v5e: one 128 x 128 MXU tile per chunk
CHUNK_V6E = 256              # v6e / v7: the 256 x 256 MXU
VMEM_LIMIT = 16 * 2 ** 20    # v5e's default scoped VMEM (v6e: 32 MiB)
_F32 = jnp.float32


def _as_col(row, eye):
    """[1, C] row -> [C, 1] column without a transpose: Σ_j diag(row)_ij (a lane sum)."""
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _chunk_decays(b, seg, c):
    """Decay factors of one chunk from the row b [1, C] (seg: three [1, C] rows or None):
    (D [C, C], e [C, 1], f [C, 1], a [1, 1])."""
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    eye = row == col
    keep = col <= row
    b_col = _as_col(b, eye)                                            # [C, 1]
    if seg is not None:
        doc, carry, tail = seg
        keep = keep & (_as_col(doc, eye) == doc)
    dmat = jnp.exp(jnp.where(keep, b_col - b, -jnp.inf))               # [C, C]
    b_last = b[:, c - 1:c]                                             # [1, 1]
    e = jnp.exp(b_col)                                                 # [C, 1]
    f = jnp.exp(b_last - b_col)                                        # [C, 1]
    a = jnp.exp(b_last)                                                # [1, 1]
    if seg is not None:
        e = e * _as_col(carry, eye)
        f = f * _as_col(tail, eye)
        a = a * carry[:, c - 1:c]
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


def _fwd_kernel(*refs, c, scale, has_seg, n_chunks):
    (q, k, v, b), seg, (s0_ref,), (o_ref, sf_ref), s_scr = _unpack(refs, 1, has_seg)
    t = pl.program_id(1)

    @pl.when(t == 0)
    def _init():
        s_scr[...] = s0_ref[...].astype(_F32)

    op = q.dtype
    dmat, e, f, a = _chunk_decays(b, seg, c)
    s = s_scr[...]                                                     # [K, V] f32
    p = mxu_dot(q, k, tb=True) * (dmat * scale)                        # [C, C]
    o = mxu_dot(p, v, op) + mxu_dot(q.astype(_F32) * (scale * e), s, op)
    o_ref[...] = o.astype(o_ref.dtype)
    s_new = a * s + mxu_dot(k.astype(_F32) * f, v, op, ta=True)
    s_scr[...] = s_new

    @pl.when(t == n_chunks - 1)           # static count (pl.num_programs went stale in jax
    def _final():                         # 0.11's interpreter across calls with other grids)
        sf_ref[...] = s_new


def _dq_kernel(*refs, c, scale, has_seg, n_chunks):
    (q, k, v, b), seg, (s0_ref, do_ref), (dq_ref,), s_scr = _unpack(refs, 2, has_seg)

    @pl.when(pl.program_id(1) == 0)
    def _init():
        s_scr[...] = s0_ref[...].astype(_F32)

    op = q.dtype
    dmat, e, f, a = _chunk_decays(b, seg, c)
    s = s_scr[...]
    do = do_ref[...]                                                   # [C, V]
    ds = mxu_dot(do, v, op, tb=True) * (dmat * scale)                  # [C, C]
    dq = mxu_dot(ds, k, op) + mxu_dot(do, s, op, tb=True) * (scale * e)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    s_scr[...] = a * s + mxu_dot(k.astype(_F32) * f, v, op, ta=True)


def _dkdv_kernel(*refs, c, scale, has_seg, n_chunks):
    (q, k, v, b), seg, (dsf_ref, do_ref), (dk_ref, dv_ref, ds0_ref), g_scr = _unpack(
        refs, 2, has_seg)
    t = pl.program_id(1)

    @pl.when(t == 0)
    def _init():
        g_scr[...] = dsf_ref[...].astype(_F32)

    op = q.dtype
    dmat, e, f, a = _chunk_decays(b, seg, c)
    gs = g_scr[...]                                                    # [K, V] = ∂L/∂S
    do = do_ref[...]
    p = mxu_dot(q, k, tb=True) * (dmat * scale)                        # [C, C]
    ds = mxu_dot(do, v, op, tb=True) * (dmat * scale)                  # [C, C]
    dk = mxu_dot(ds, q, op, ta=True) + mxu_dot(v, gs, op, tb=True) * f
    dv = mxu_dot(p, do, op, ta=True) + mxu_dot(k.astype(_F32) * f, gs, op)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    g_new = a * gs + mxu_dot(q.astype(_F32) * (scale * e), do, op, ta=True)
    g_scr[...] = g_new

    @pl.when(t == n_chunks - 1)
    def _final():
        ds0_ref[...] = g_new


# ----------------------------------------------------------------------------------------------
# block specs on the (B·HV, chunk) grid (shared by the pallas_calls and the VMEM bound)
# ----------------------------------------------------------------------------------------------
def _specs(kind, h, hv, n_t, c, kd, vd, has_seg):
    """(in_specs, out_specs, scratch shape) of kernel ``kind``; arrays [B·heads, NC, rows, cols],
    the dk/dv pass walks the chunks in reverse."""
    grp = hv // h
    spec = functools.partial(chunk_spec, reverse=kind == "dkdv", n_chunks=n_t)
    qk_row = lambda i: (i // hv) * h + (i % hv) // grp                 # noqa: E731
    qk = spec(c, kd, row=qk_row)                                       # grouped q/k heads
    key, val, gate = spec(c, kd), spec(c, vd), spec(1, c)              # gates: [1, C] rows
    seg = [spec(1, c, row=lambda i: i // hv)] * (3 * has_seg)          # per batch row
    state = head_spec(kd, vd)
    ins = [qk, qk, val, gate, *seg, state] + ([val] if kind != "fwd" else [])
    outs = {"fwd": [val, state], "dq": [key], "dkdv": [key, val, state]}[kind]
    return ins, outs, (kd, vd)


@functools.lru_cache(maxsize=None)           # pure in its (hashable) arguments
def vmem_bytes(kind, *, chunk=DEFAULT_CHUNK, k_dim=128, v_dim=128, dtype=jnp.float32,
               has_seg=True):
    """Upper bound of the VMEM one grid step of kernel ``kind`` uses for inputs of ``dtype``.

    The blocks (double-buffered) and the state scratch, read off the traced ``pallas_call``
    (``tpu_grid.vmem_bytes``; q/k/v/dO in the operand dtype), plus the kernel's largest live
    temporaries: four [C, C] float32 matrices (masks, decays, scores, their gradient) with their
    operand-dtype copies, and four [C, max(K, V)] float32 products.
    """
    if kind not in _KERNELS:
        raise ValueError(f"kind must be one of {tuple(_KERNELS)}, got {kind!r}")
    op = operand_dtype(dtype)
    sds = jax.ShapeDtypeStruct
    q = sds((1, 1, 2 * chunk, k_dim), op)
    v = sds((1, 1, 2 * chunk, v_dim), op)
    b = sds((1, 1, 2 * chunk), _F32)
    state = sds((1, 1, k_dim, v_dim), _F32)
    seg = (sds((1, 2 * chunk), _F32),) * 3 if has_seg else None
    fn = lambda q, k, v, b, seg, s0, do, dfinal: _run(kind, q, k, v, b, seg, s0, do, dfinal,
                                                       scale=1.0, chunk=chunk, interpret=False)
    total = tpu_grid.vmem_bytes(fn, q, q, v, b, seg, state, v, state)
    temps = 4 * chunk * chunk * (4 + op.itemsize) + 4 * chunk * max(k_dim, v_dim) * 4
    return total + temps


def tpu_supports(dtype, K, V, chunk=DEFAULT_CHUNK):
    """None when all three kernels fit ``VMEM_LIMIT`` for inputs of ``dtype``, features K, V
    (padded to 128 lanes) and ``chunk`` (with packing masks); else the reason (one line)."""
    if chunk % 8:
        return f"simple_gla mosaic_tpu: chunk must be a multiple of 8, got {chunk}"
    kp, vp = -(-K // 128) * 128, -(-V // 128) * 128
    for kind in _KERNELS:
        used = vmem_bytes(kind, chunk=chunk, k_dim=kp, v_dim=vp, dtype=dtype, has_seg=True)
        if used > VMEM_LIMIT:
            return (f"simple_gla mosaic_tpu: the {kind} kernel needs {used} B of VMEM at chunk "
                    f"{chunk}, K={kp}, V={vp}, {jnp.dtype(dtype).name} (limit {VMEM_LIMIT})")
    return None


def _grid(x, c):
    """[B, heads, T, D] -> [B·heads, T / C, C, D]; [B, heads, 1, T] -> [B·heads, T / C, 1, C]
    (free reshapes)."""
    bsz, heads, r, d = x.shape
    if r == 1:
        return x.reshape(bsz * heads, d // c, 1, c)
    return x.reshape(bsz * heads, r // c, c, d)


_KERNELS = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkdv": _dkdv_kernel}


def _run(kind, q, k, v, b, seg, s0, do, dfinal, *, scale, chunk, interpret):
    """The ``kind`` pallas_call on the (B·HV, chunk) grid; outputs in the grid layout
    ([B·HV, NC, C, D] per token, [B·HV, K, V] per head)."""
    bsz, h, t, kd = q.shape
    hv, vd = v.shape[1], v.shape[3]
    nc, has_seg = t // chunk, seg is not None
    op = operand_dtype(v.dtype)
    q, k, v = q.astype(op), k.astype(op), v.astype(op)                 # fp16 -> bf16
    do = None if do is None else do.astype(op)
    row = lambda x: _grid(x[..., None, :], chunk)                      # [B·?, NC, 1, C]
    args = [_grid(q, chunk), _grid(k, chunk), _grid(v, chunk), row(b.astype(_F32)),
            *(row(x[:, None]) for x in (seg or ()))]                   # masks: one per row
    flat_state = lambda x: x.reshape(bsz * hv, kd, vd)                 # noqa: E731
    sds = jax.ShapeDtypeStruct
    per_token = lambda d, dt=_F32: sds((bsz * hv, nc, chunk, d), dt)   # noqa: E731
    per_head = sds((bsz * hv, kd, vd), _F32)
    if kind == "fwd":
        args.append(flat_state(s0))
        out_shape = [per_token(vd, v.dtype), per_head]
    elif kind == "dq":
        args += [flat_state(s0), _grid(do, chunk)]
        out_shape = [per_token(kd)]
    else:
        args += [flat_state(dfinal), _grid(do, chunk)]
        out_shape = [per_token(kd), per_token(vd), per_head]
    ins, outs, scratch = _specs(kind, h, hv, nc, chunk, kd, vd, has_seg)
    return pl.pallas_call(
        functools.partial(_KERNELS[kind], c=chunk, scale=scale, has_seg=has_seg, n_chunks=nc),
        grid=(bsz * hv, nc),
        in_specs=ins,
        out_specs=outs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM(scratch, _F32)],
        compiler_params=sequential_params(),
        interpret=interpret,
        name=f"simple_gla_{kind}",
    )(*args)


def simple_gla_fwd_tpu(q, k, v, b, seg, s0, *, scale, chunk=DEFAULT_CHUNK, interpret=False):
    """Forward: (o [B, HV, T, V] in v.dtype, final state [B, HV, K, V] float32).

    q, k: [B, H, T, K]; v: [B, HV, T, V]; b: [B, HV, T] chunk-local cumulative log-decay;
    seg: None or (doc, carry, tail), each [B, T] float32; s0: [B, HV, K, V] float32.
    """
    o, s_final = _run("fwd", q, k, v, b, seg, s0, None, None, scale=scale, chunk=chunk,
                      interpret=interpret)
    return o.reshape(v.shape), s_final.reshape(s0.shape)


def simple_gla_bwd_tpu(q, k, v, b, seg, s0, do, dfinal, *, scale, chunk=DEFAULT_CHUNK,
                       interpret=False):
    """Backward: (dq [B, HV, T, K], dk [B, HV, T, K], dv [B, HV, T, V], ds0 [B, HV, K, V]).

    dq and dk are per value head (summed over each group outside), all float32.
    """
    kw = dict(scale=scale, chunk=chunk, interpret=interpret)
    [dq] = _run("dq", q, k, v, b, seg, s0, do, dfinal, **kw)
    dk, dv, ds0 = _run("dkdv", q, k, v, b, seg, s0, do, dfinal, **kw)
    bsz, hv, t = v.shape[:3]
    per_head = lambda x: x.reshape(bsz, hv, t, x.shape[-1])            # noqa: E731
    return per_head(dq), per_head(dk), per_head(dv), ds0.reshape(s0.shape)
