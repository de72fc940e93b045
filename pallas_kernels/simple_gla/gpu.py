"""simple_gla on GPU: Triton kernels (``triton_kernels.py``) behind one custom_vjp, their layout
and the dispatcher's table.

    S_t = exp(g_t)·S_{t-1} + k_t v_tᵀ,    o_t = scale·S_tᵀ q_t

Layout: heads-major ``[B, H, Tp, Dp]`` (``common.layout.to_kernel_layout``): T zero-padded to a
multiple of the chunk C = 64 with k = 0, g = 0 (exact: a padded token leaves the state alone),
features zero-padded to a power of two >= 16 (exact: a zero feature adds nothing to a dot); q, k
and v are cast to one dtype (the dots take one operand dtype); the gate arrives as b, the
log-decay cumulated inside each chunk (``chunk_cumsum``, float32, in XLA). ``segment_ids`` become
three per-token float masks (``kernels.segment_masks``: document index, "still in the document
that entered the chunk", "in the chunk's last document") that remove exactly the terms crossing a
document boundary; padding tokens get q = k = 0, g = 0, so they are no-ops with output 0.

Pipeline (fla's chunk pipeline; kernels in ``triton_kernels.py``):

* forward: ``fwd_h`` (sequential over chunks, grid K tiles × V tiles × B·HV) stores the state
  entering each chunk, ``[B, HV, NT, K, V]`` in the input dtype, and the final state in float32;
  ``fwd_o`` (chunk-parallel) gives o from those states and the intra-chunk scores.
* backward: ``bwd_dh`` (sequential, reverse) stores ∂L/∂(state leaving each chunk) and gives
  ∂L/∂S_0; ``bwd_dv`` and ``bwd_dqdk`` (chunk-parallel) give dv and the per-value-head dq, dk
  (float32), each reduction inside one program. Residuals: the inputs and one state per chunk.
* gates: every term of L depends on the global cumulative log-decay B only through
  exp(B_t − B_s) with t on the query (or final-state) side and s on the key side, so
  ∂L/∂B_t = q_t·dq_t − k_t·dk_t (+ Σ dF∘S_final at the last token) and dg_t = Σ_{u ≥ t} ∂L/∂B_u:
  one reverse cumsum in XLA, from the per-value-head dq, dk before the groups are summed.

Tiles (:func:`tiles`): BK = min(K, 64), BV = min(V, 64) (bwd_dqdk in float32: 32 x 32), so
the shared memory and registers a program needs do not grow with K, V (up to 256: K/BK, V/BV
loop iterations or grid columns).
``TABLE`` states the limits (float32/bfloat16, K and V padded to at most 256, sm_80/90/100) and
the shared-memory estimate the dispatcher checks; Triton is imported only when a kernel runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import triton_call
from pallas_kernels.common.layout import chunk_cumsum, from_kernel_layout, to_kernel_layout
from pallas_kernels.common.triton_support import KernelTable, padded

__all__ = ["simple_gla_triton", "TABLE", "DEFAULT_CHUNK", "KERNELS", "tiles"]

DEFAULT_CHUNK = 64
KERNELS = ("simple_gla_fwd_h", "simple_gla_fwd_o", "simple_gla_bwd_dh", "simple_gla_bwd_dv",
           "simple_gla_bwd_dqdk")
_F32 = jnp.float32
_SDS = jax.ShapeDtypeStruct


def tiles(kernel: str, dtype, kp: int, vp: int) -> tuple[int, int]:
    """(BK, BV) of ``kernel`` at padded sizes K = kp, V = vp: 64 x 64, so a program's shared
    memory and registers do not grow with K, V; bwd_dqdk in float32 takes 32 x 32 (its three
    float32 accumulators spilled on sm_80 at 64 x 64 and at 32 x 64, even with 8 warps; 150
    registers at 32 x 32)."""
    if kernel == "simple_gla_bwd_dqdk" and jnp.dtype(dtype).itemsize > 2:
        return min(kp, 32), min(vp, 32)
    return min(kp, 64), min(vp, 64)


def _launch_options(kernel: str, dtype) -> dict:
    """num_warps / num_stages per kernel. The recurrences carry one [BK, BV] float32 state: 4
    warps. The chunk-parallel kernels carry two or three [64, 64] float32 accumulators; with
    float32 operands (twice the registers per loaded tile) 4 warps spilled on sm_80 (fwd_o,
    bwd_dv 8 B, bwd_dqdk up to 1.2 KB at 255 registers), so those get 8; bwd_dqdk gets 8 in
    bf16 too (three accumulators)."""
    parallel = kernel in ("simple_gla_fwd_o", "simple_gla_bwd_dv", "simple_gla_bwd_dqdk")
    wide = jnp.dtype(dtype).itemsize > 2 and parallel
    return dict(num_warps=8 if wide or kernel == "simple_gla_bwd_dqdk" else 4, num_stages=2)


def _launch(name, *inputs, out_shape, grid, interpret, **constexprs):
    """Kernel ``name`` of ``triton_kernels`` (imported here: Triton only when a kernel runs) over
    ``grid(BK, BV)``, its tiles passed as the BK, BV constexprs."""
    from pallas_kernels.simple_gla import triton_kernels
    dtype = inputs[0].dtype
    bk, bv = tiles(name, dtype, constexprs["K"], constexprs["V"])
    return triton_call.launch(getattr(triton_kernels, name), *inputs, out_shape=out_shape,
                              grid=grid(bk, bv), interpret=interpret, name=name, BK=bk, BV=bv,
                              **_launch_options(name, dtype), **constexprs)


def _constants(q, v, seg, chunk):
    """The constexprs every kernel takes: sizes, HAS_SEG."""
    return dict(T=q.shape[2], H=q.shape[1], HV=v.shape[1], K=q.shape[3], V=v.shape[3], C=chunk,
                HAS_SEG=seg is not None)


def _masks(b, seg):
    """The three mask pointers (b stands in, unread, when there are no segments)."""
    return (b, b, b) if seg is None else seg


def _forward(q, k, v, b, seg, s0, scale, interpret, chunk=DEFAULT_CHUNK):
    """(o [B, HV, T, V] in v.dtype, final [B, HV, K, V] f32, h [B, HV, NT, K, V] in v.dtype)."""
    c = _constants(q, v, seg, chunk)
    bsz, hv, t, vp = v.shape
    kp, nt, bhv = c["K"], t // chunk, bsz * hv
    hs, final = _launch(
        "simple_gla_fwd_h", k, v, b, *_masks(b, seg), s0,
        out_shape=[_SDS((bsz, hv, nt, kp, vp), v.dtype), _SDS((bsz, hv, kp, vp), _F32)],
        grid=lambda bk, bv: (kp // bk, vp // bv, bhv), interpret=interpret, **c)
    (o,) = _launch("simple_gla_fwd_o", q, k, v, b, *_masks(b, seg), hs,
                   out_shape=[_SDS(v.shape, v.dtype)], grid=lambda bk, bv: (vp // bv, nt, bhv),
                   interpret=interpret, SCALE=scale, **c)
    return o, final, hs


def _backward(q, k, v, b, seg, hs, do, dfinal, scale, interpret, chunk=DEFAULT_CHUNK):
    """(dq, dk [B, HV, T, K] per value head, dv [B, HV, T, V], ds0 [B, HV, K, V]), float32."""
    c = dict(_constants(q, v, seg, chunk), SCALE=scale)
    bsz, hv, t, vp = v.shape
    kp, nt, bhv = c["K"], t // chunk, bsz * hv
    dhs, ds0 = _launch("simple_gla_bwd_dh", q, do, b, *_masks(b, seg), dfinal,
                       out_shape=[_SDS(hs.shape, v.dtype), _SDS((bsz, hv, kp, vp), _F32)],
                       grid=lambda bk, bv: (kp // bk, vp // bv, bhv), interpret=interpret, **c)
    (dv,) = _launch("simple_gla_bwd_dv", q, k, do, b, *_masks(b, seg), dhs,
                    out_shape=[_SDS(v.shape, _F32)], grid=lambda bk, bv: (vp // bv, nt, bhv),
                    interpret=interpret, **c)
    dq, dk = _launch("simple_gla_bwd_dqdk", q, k, v, do, b, *_masks(b, seg), hs, dhs,
                     out_shape=[_SDS((bsz, hv, t, kp), _F32)] * 2,
                     grid=lambda bk, bv: (kp // bk, nt, bhv), interpret=interpret, **c)
    return dq, dk, dv, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _core(q, k, v, g, s0, seg, scale, interpret):
    (o, final), _ = _core_fwd(q, k, v, g, s0, seg, scale, interpret)
    return o, final


def _core_fwd(q, k, v, g, s0, seg, scale, interpret):
    b = chunk_cumsum(g, DEFAULT_CHUNK)                                 # [B, HV, Tp] float32
    o, final, hs = _forward(q, k, v, b, seg, s0, scale, interpret)
    return (o, final), (q, k, v, b, seg, hs, final)


def _core_bwd(scale, interpret, res, cts):
    q, k, v, b, seg, hs, final = res
    do, dfinal = cts
    dfinal = dfinal.astype(_F32)
    dq, dk, dv, ds0 = _backward(q, k, v, b, seg, hs, do.astype(v.dtype), dfinal, scale,
                                interpret)
    from pallas_kernels.simple_gla.kernels import input_grads
    return input_grads(q, k, v, seg, dq, dk, dv, ds0, dfinal, final)


_core.defvjp(_core_fwd, _core_bwd)


def simple_gla_triton(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None,
                      output_final_state=False, interpret=False):
    """simple_gla through the Triton kernels (the frame's implementation contract).

    q, k: [B, T, H, K]; v: [B, T, HV, V]; g: [B, T, HV]; initial_state: [B, HV, K, V] or None;
    segment_ids: [B, T] int or None. Returns (o [B, T, HV, V] in v.dtype, final [B, HV, K, V]
    float32).
    """
    from pallas_kernels.simple_gla.kernels import padding_as_no_ops
    chunk = DEFAULT_CHUNK
    bsz, t, h, kd = q.shape
    hv, vd = v.shape[2], v.shape[3]
    scale = float(kd ** -0.5 if scale is None else scale)
    dtype = jnp.result_type(q, k, v)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    q, k, g, seg = padding_as_no_ops(q, k, g, segment_ids, chunk)      # seg: 3 x [B, Tp] f32
    kp, vp = padded(kd), padded(vd)
    s0 = jnp.zeros((bsz, hv, kd, vd), _F32) if initial_state is None else initial_state
    s0 = jnp.pad(s0.astype(_F32), ((0, 0), (0, 0), (0, kp - kd), (0, vp - vd)))
    o, final = _core(to_kernel_layout(q, chunk, kp), to_kernel_layout(k, chunk, kp),
                     to_kernel_layout(v, chunk, vp), to_kernel_layout(g, chunk), s0, seg,
                     scale, interpret)
    return from_kernel_layout(o, t, vd).astype(v.dtype), final[:, :, :kd, :vd]


# ------------------------------------------------------------------------------ the table
def _request(arrays, static):
    q, k, v, _ = arrays
    return (jnp.dtype(jnp.result_type(q, k, v)).name,
            {"K": padded(q.shape[-1]), "V": padded(v.shape[-1])})


def _shared_bytes(dtype, sizes):
    """The largest kernel's shared memory: its dot operands, buffered ``num_stages`` deep, plus
    Triton's small scratch (barriers, layout conversions: up to ~4.4 KB measured).

    Triton stages the operands loaded inside a loop: bwd_dqdk holds v, dO [C, BV] and S, G
    [BK, BV] per stage, fwd_o q, k [C, BK] and S [BK, BV], fwd_h k [C, BK] and v [C, BV]; the
    operands after the loop (q, k and the [C, C] scores) reuse those buffers. The compile gate
    measured at most 98352 B in float32 (fwd_o / bwd_dv / bwd_dqdk, sm_100a) and 65584 B in
    bfloat16 (bwd_dqdk, sm_100a) over K, V in {64, 128, 256}: this gives 106496 and 73728."""
    item = jnp.dtype(dtype).itemsize
    c, kp, vp = DEFAULT_CHUNK, sizes["K"], sizes["V"]
    stages = _launch_options("simple_gla_bwd_dqdk", dtype)["num_stages"]
    bk, bv = tiles("simple_gla_bwd_dqdk", dtype, kp, vp)
    dqdk = max(stages * (2 * c * bv + 2 * bk * bv), 2 * c * bk + c * c)
    bk, bv = tiles("simple_gla_fwd_o", dtype, kp, vp)
    fwd_o = max(stages * (2 * c * bk + bk * bv), c * bv + c * c)
    fwd_h = stages * (c * bk + c * bv)
    return item * max(dqdk, fwd_o, fwd_h) + 8192


def _gate_case(dtype, sizes):
    """value_and_grad of a loss over o and the final state: every kernel, forward and backward."""
    from pallas_kernels.simple_gla.ops import simple_gla
    bsz, h, t = 1, 2, 256
    kd, vd = sizes["K"], sizes["V"]

    def loss(q, k, v, g, s0):
        o, final = simple_gla(q, k, v, g, initial_state=s0, output_final_state=True,
                              impl="triton")
        return jnp.sum(o.astype(_F32)) + jnp.sum(final)

    def fn(q, k, v, g, s0):
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)

    dt = jnp.dtype(dtype)
    args = (_SDS((bsz, t, h, kd), dt), _SDS((bsz, t, h, kd), dt), _SDS((bsz, t, h, vd), dt),
            _SDS((bsz, t, h), _F32), _SDS((bsz, h, kd, vd), _F32))
    return fn, args


TABLE = KernelTable(op="simple_gla", max_sizes={"K": 256, "V": 256}, request=_request,
                    shared_bytes=_shared_bytes, gate_case=_gate_case)
