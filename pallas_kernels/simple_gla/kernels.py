"""simple_gla's Mosaic TPU kernels behind one custom_vjp, with the layout they need (the Triton
path lives in ``gpu.py``; it shares :func:`segment_masks`).

The kernels (``tpu.py``) work on the kernel layout of ``common.layout``: heads-major
``[B, H, Tp, Dp]``, T zero-padded to a multiple of the chunk with k = 0, g = 0 (exact: a padded
token leaves the state alone), features zero-padded (exact) to ``tpu_width`` (a multiple of 128
lanes); the gate arrives as b, the log-decay cumulated inside each chunk (``chunk_cumsum``, in
XLA). The chunk is ``tpu.DEFAULT_CHUNK`` = 128 (one v5e MXU tile; ``simple_gla_tpu(chunk=256)``
for v6e); fp16 inputs are cast to bf16 (the MXU operand dtype, see ``tpu.py``).

``segment_ids`` become three per-token float masks (:func:`segment_masks`): document id, "still
in the document that entered the chunk" and "in the chunk's last document", which remove
exactly the terms that cross a document boundary; padding tokens get q = k = 0, g = 0 before the
kernel, so they are no-ops with output 0.

The kernels' backward returns dq, dk, dv and ∂L/∂S_0; the gate gradient follows from the
identity ∂L/∂B_t = q_t·dq_t − k_t·dk_t (+ Σ dF∘S_final at the end), dg_t = Σ_{u ≥ t} ∂L/∂B_u
(B the cumulative log-decay; derivation in ``chunked.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.common import expand_groups, pad_axis
from pallas_kernels.common.layout import (chunk_cumsum, from_kernel_layout, to_kernel_layout,
                                          tpu_width)
from pallas_kernels.simple_gla import tpu as _tpu

__all__ = ["simple_gla_tpu", "segment_masks"]

# impl: (forward, backward, chunk, feature width rule)
_BACKENDS = {
    "mosaic_tpu": (_tpu.simple_gla_fwd_tpu, _tpu.simple_gla_bwd_tpu, _tpu.DEFAULT_CHUNK,
                   tpu_width),
}


def padding_as_no_ops(q, k, g, segment_ids, chunk):
    """(q, k, g float32, seg): padding tokens (segment id 0) get q = k = 0, g = 0 (no-ops with
    output 0) and ``segment_ids`` become the kernels' three masks (:func:`segment_masks`, T
    padded to the chunk); ``seg`` is None without segment_ids. Shared by the Triton and TPU
    kernels."""
    g = g.astype(jnp.float32)
    if segment_ids is None:
        return q, k, g, None
    valid, reset = common.segment_masks(segment_ids)                   # [B, T] each
    q = jnp.where(valid[:, :, None, None], q, 0)
    k = jnp.where(valid[:, :, None, None], k, 0)
    g = jnp.where(valid[:, :, None], g, 0.0)
    return q, k, g, segment_masks(pad_axis(reset, 1, chunk, False), chunk)


def segment_masks(reset, chunk):
    """reset [B, Tp] bool -> (doc, carry, tail), each [B, Tp] float32 (see the module doc)."""
    bsz, t = reset.shape
    doc = jnp.cumsum(reset.astype(jnp.int32), axis=1).reshape(bsz, t // chunk, chunk)
    entering = doc[..., :1] - reset.reshape(doc.shape)[..., :1].astype(jnp.int32)
    carry = doc == entering                                            # [B, N, C]
    tail = doc == doc[..., -1:]                                        # [B, N, C]
    return tuple(x.reshape(bsz, t).astype(jnp.float32) for x in (doc, carry, tail))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _kernel_core(q, k, v, g, s0, seg, impl, scale, interpret, chunk):
    (o, s_final), _ = _kernel_fwd(q, k, v, g, s0, seg, impl, scale, interpret, chunk)
    return o, s_final


def _kernel_fwd(q, k, v, g, s0, seg, impl, scale, interpret, chunk):
    fwd = _BACKENDS[impl][0]
    b = chunk_cumsum(g, chunk)                                         # [B, HV, Tp]
    o, s_final = fwd(q, k, v, b, seg, s0, scale=scale, chunk=chunk, interpret=interpret)
    return (o, s_final), (q, k, v, b, s0, seg, s_final)


def _kernel_bwd(impl, scale, interpret, chunk, res, cts):
    q, k, v, b, s0, seg, s_final = res
    do, dfinal = cts
    bwd = _BACKENDS[impl][1]
    dfinal = dfinal.astype(jnp.float32)
    dq, dk, dv, ds0 = bwd(q, k, v, b, seg, s0, do.astype(v.dtype), dfinal,
                          scale=scale, chunk=chunk, interpret=interpret)
    return input_grads(q, k, v, seg, dq, dk, dv, ds0, dfinal, s_final)


def input_grads(q, k, v, seg, dq, dk, dv, ds0, dfinal, s_final):
    """The custom_vjp's cotangents from the kernels' per-value-head dq, dk [B, HV, Tp, K] (float32),
    dv, ∂L/∂S_0 and the final state's cotangent: dg by the identity
    ∂L/∂B_t = q_t·dq_t − k_t·dk_t (+ Σ dF∘S_final at the end), dg_t = Σ_{u ≥ t} ∂L/∂B_u, then
    dq, dk summed over each group of value heads. Shared by the Triton and TPU kernels."""
    bsz, h, t, kd = q.shape
    hv = v.shape[1]
    f32 = jnp.float32
    db = jnp.sum(expand_groups(q, hv, axis=1).astype(f32) * dq
                 - expand_groups(k, hv, axis=1).astype(f32) * dk, axis=-1)   # [B, HV, Tp]
    dg = jnp.cumsum(db[..., ::-1], axis=-1)[..., ::-1]
    dg = dg + jnp.sum(dfinal * s_final, axis=(-2, -1))[..., None]
    dq = dq.reshape(bsz, h, hv // h, t, kd).sum(2)                     # sum over each group
    dk = dk.reshape(bsz, h, hv // h, t, kd).sum(2)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, ds0,
            jax.tree_util.tree_map(lambda _: None, seg))


_kernel_core.defvjp(_kernel_fwd, _kernel_bwd)


def _run(impl, q, k, v, g, *, scale, initial_state, segment_ids, interpret, chunk=None):
    """Public layout -> kernel layout -> public layout (see the module docstring); ``chunk``
    None: the backend's default."""
    _, _, default_chunk, width = _BACKENDS[impl]
    chunk = default_chunk if chunk is None else int(chunk)
    bsz, t, h, kd = q.shape
    hv, vd = v.shape[2], v.shape[3]
    q, k, g, seg = padding_as_no_ops(q, k, g, segment_ids, chunk)
    kp, vp = width(kd), width(vd)
    s0 = jnp.zeros((bsz, hv, kd, vd), jnp.float32) if initial_state is None else initial_state
    s0 = jnp.pad(s0.astype(jnp.float32), ((0, 0), (0, 0), (0, kp - kd), (0, vp - vd)))
    o, s_final = _kernel_core(to_kernel_layout(q, chunk, kp), to_kernel_layout(k, chunk, kp),
                              to_kernel_layout(v, chunk, vp), to_kernel_layout(g, chunk), s0,
                              seg, impl, scale, interpret, chunk)
    return from_kernel_layout(o, t, vd).astype(v.dtype), s_final[:, :, :kd, :vd]


def simple_gla_tpu(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None,
                   output_final_state=False, interpret=False, chunk=None):
    """simple_gla through the Mosaic TPU kernels (the frame's implementation contract);
    ``chunk``: tokens per grid step, a multiple of 8 (None: ``tpu.DEFAULT_CHUNK`` = 128, v5e;
    ``tpu.CHUNK_V6E`` = 256 for v6e)."""
    if chunk is not None and (chunk <= 0 or chunk % 8):
        raise ValueError(f"simple_gla_tpu: chunk must be a positive multiple of 8, got {chunk}")
    return _run("mosaic_tpu", q, k, v, g, scale=_scale(q, scale), initial_state=initial_state,
                segment_ids=segment_ids, interpret=interpret, chunk=chunk)


def _scale(q, scale):
    return float(q.shape[-1] ** -0.5 if scale is None else scale)
