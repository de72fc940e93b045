"""Public simple_gla op: argument checks, implementation choice, and the kernels' custom_vjp.

    S_t = exp(g_t)·S_{t-1} + k_t v_tᵀ,    o_t = scale·S_tᵀ q_t

q, k ``[B, T, H, K]``; v ``[B, T, HV, V]``; g ``[B, T, HV]`` (log-decay, ≤ 0); HV % H == 0 and value
head j uses q/k head j // (HV / H); state ``[B, HV, K, V]`` float32 (DESIGN.md §2).

Implementations: "reference" (token scan), "chunked" (pure JAX, the CPU default), "triton"
(``gpu.py``) and "mosaic_tpu" (``tpu.py``). The Pallas kernels work on a kernel layout that
this module builds and undoes:
  * heads-major ``[B, H, T, D]``; T zero-padded to a multiple of the chunk with k = 0, g = 0
    (exact: a padded token leaves the state alone); features zero-padded (exact) to a power of
    two ≥ 16 (Triton) or a multiple of 128 (TPU lanes);
  * the gate as b, the log-decay cumulated inside each chunk (a cumsum in XLA, outside kernels);
  * ``segment_ids`` as three per-token float masks derived here (see ``_segment_masks``):
    document id, "still in the document that entered the chunk" and "in the chunk's last
    document", which remove exactly the terms that cross a document boundary; padding tokens
    get q = k = 0, g = 0 before the kernel, so they are no-ops with output 0.
The kernels' backward returns dq, dk, dv and ∂L/∂S_0; the gate gradient follows from the
identity ∂L/∂B_t = q_t·dq_t − k_t·dk_t (+ Σ dF∘S_final at the end), dg_t = Σ_{u ≥ t} ∂L/∂B_u
(B the cumulative log-decay; derivation in ``chunked.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from pallas_kernels.common import (check_float, check_range, check_segment_ids, check_shape,
                                   expand_groups, next_pow2, pad_axis, resolve_impl, segment_masks,
                                   shard_over_batch)
from pallas_kernels.simple_gla import chunked as _chunked
from pallas_kernels.simple_gla import gpu as _gpu
from pallas_kernels.simple_gla import tpu as _tpu
from pallas_kernels.simple_gla.reference import (simple_gla_reference,
                                                 simple_gla_step_reference)

__all__ = ["simple_gla", "simple_gla_step", "AVAILABLE"]

AVAILABLE = ("reference", "chunked", "triton", "mosaic_tpu")
_OP = "simple_gla"


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------
def _check_rank(op, name, x, layout):
    if x.ndim != len(layout):
        raise ValueError(f"{op}: {name} must have shape [{', '.join(layout)}], "
                         f"got {list(x.shape)}")


def _check_inputs(q, k, v, g, initial_state, segment_ids):
    check_float(_OP, q=q, k=k, v=v, g=g, initial_state=initial_state)
    _check_rank(_OP, "q", q, ("B", "T", "H", "K"))
    _check_rank(_OP, "v", v, ("B", "T", "HV", "V"))
    bsz, t, h, kd = q.shape
    check_shape(_OP, "k", k, (bsz, t, h, kd))
    check_shape(_OP, "v", v, (bsz, t, None, None))
    hv, vd = v.shape[2], v.shape[3]
    if hv % h:
        raise ValueError(f"{_OP}: v has {hv} heads, which is not a multiple of the {h} q/k heads "
                         f"(HV % H must be 0)")
    check_shape(_OP, "g", g, (bsz, t, hv))
    if initial_state is not None:
        check_shape(_OP, "initial_state", initial_state, (bsz, hv, kd, vd))
    check_segment_ids(_OP, segment_ids, bsz, t)


# ----------------------------------------------------------------------------------------------
# Pallas kernels: layout adapter and custom_vjp
# ----------------------------------------------------------------------------------------------
_BACKENDS = {
    # impl: (forward, backward, chunk, feature padding rule)
    "triton": (_gpu.simple_gla_fwd_triton, _gpu.simple_gla_bwd_triton, _gpu.DEFAULT_CHUNK,
               lambda d: next_pow2(max(d, 16))),
    "mosaic_tpu": (_tpu.simple_gla_fwd_tpu, _tpu.simple_gla_bwd_tpu, _tpu.DEFAULT_CHUNK,
                   lambda d: -(-d // 128) * 128),
}


def _segment_masks(reset, chunk):
    """reset [B, Tp] bool -> (doc, carry, tail), each [B, Tp] float32 (see the module doc)."""
    bsz, t = reset.shape
    doc = jnp.cumsum(reset.astype(jnp.int32), axis=1).reshape(bsz, t // chunk, chunk)
    entering = doc[..., :1] - reset.reshape(doc.shape)[..., :1].astype(jnp.int32)
    carry = doc == entering                                            # [B, N, C]
    tail = doc == doc[..., -1:]                                        # [B, N, C]
    return tuple(x.reshape(bsz, t).astype(jnp.float32) for x in (doc, carry, tail))


def _chunk_cumsum(g, chunk):
    """[B, HV, Tp] -> cumulative sum inside each chunk of ``chunk`` tokens."""
    bsz, hv, t = g.shape
    return jnp.cumsum(g.reshape(bsz, hv, t // chunk, chunk), axis=-1).reshape(bsz, hv, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _kernel_core(q, k, v, g, s0, seg, impl, scale, interpret):
    (o, s_final), _ = _kernel_fwd(q, k, v, g, s0, seg, impl, scale, interpret)
    return o, s_final


def _kernel_fwd(q, k, v, g, s0, seg, impl, scale, interpret):
    fwd, _, chunk, _ = _BACKENDS[impl]
    b = _chunk_cumsum(g, chunk)
    o, s_final = fwd(q, k, v, b, seg, s0, scale=scale, chunk=chunk, interpret=interpret)
    return (o, s_final), (q, k, v, b, s0, seg, s_final)


def _kernel_bwd(impl, scale, interpret, res, cts):
    q, k, v, b, s0, seg, s_final = res
    do, dfinal = cts
    _, bwd, chunk, _ = _BACKENDS[impl]
    dq, dk, dv, ds0 = bwd(q, k, v, b, seg, s0, do.astype(v.dtype), dfinal.astype(jnp.float32),
                          scale=scale, chunk=chunk, interpret=interpret)
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


def _simple_gla_kernel(impl, q, k, v, g, scale, initial_state, segment_ids, interpret):
    """Public layout -> kernel layout -> public layout (see the module docstring)."""
    _, _, chunk, feat = _BACKENDS[impl]
    bsz, t, h, kd = q.shape
    hv, vd = v.shape[2], v.shape[3]
    g = g.astype(jnp.float32)
    seg = None
    if segment_ids is not None:
        valid, reset = segment_masks(segment_ids)                      # [B, T] each
        q = jnp.where(valid[:, :, None, None], q, 0)
        k = jnp.where(valid[:, :, None, None], k, 0)
        g = jnp.where(valid[:, :, None], g, 0.0)
        seg = _segment_masks(pad_axis(reset, 1, chunk, False), chunk)
    kp, vp = feat(kd), feat(vd)

    def to_kernel(x, dp):                                              # [B, T, H, D] -> [B, H, Tp, Dp]
        x = pad_axis(pad_axis(x, 1, chunk), 3, dp) if dp else pad_axis(x, 1, chunk)
        return jnp.moveaxis(x, 2, 1)

    s0 = jnp.zeros((bsz, hv, kd, vd), jnp.float32) if initial_state is None else initial_state
    s0 = jnp.pad(s0.astype(jnp.float32), ((0, 0), (0, 0), (0, kp - kd), (0, vp - vd)))
    o, s_final = _kernel_core(to_kernel(q, kp), to_kernel(k, kp), to_kernel(v, vp),
                              to_kernel(g, 0), s0, seg, impl, scale, interpret)
    o = jnp.moveaxis(o, 1, 2)[:, :t, :, :vd]                           # [B, T, HV, V]
    return o.astype(v.dtype), s_final[:, :, :kd, :vd]


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def simple_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
               segment_ids=None, impl="auto", interpret=False, debug_checks=False):
    """Simple gated linear attention (one log-decay per head and token).

    Args:
      q, k: [B, T, H, K]; v: [B, T, HV, V]; g: [B, T, HV] log-decays (<= 0), HV % H == 0.
      scale: output scale, default K ** -0.5.
      initial_state: [B, HV, K, V] state before token 0 (first document of each row only).
      output_final_state: also return the state after the last real token.
      segment_ids: [B, T] int, non-decreasing, 0 = trailing padding; a new id resets the state.
      impl: "auto" | "reference" | "chunked" | "triton" | "mosaic_tpu".
      interpret: run a Pallas kernel in interpret mode (CPU tests).
      debug_checks: add a ``checkify.check`` that g <= 0 (raises when run eagerly; under jit,
        wrap the caller with ``checkify.checkify``).
    Returns:
      (o [B, T, HV, V] in v.dtype, final_state [B, HV, K, V] float32 or None).
    """
    _check_inputs(q, k, v, g, initial_state, segment_ids)
    impl = resolve_impl(_OP, impl, available=AVAILABLE)
    if debug_checks:
        check_range(_OP, "g (a log decay)", g, hi=0.0)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if impl == "reference":
        o, s_final = simple_gla_reference(q, k, v, g, scale=scale, initial_state=initial_state,
                                          segment_ids=segment_ids)
    elif impl == "chunked":
        o, s_final = _chunked.simple_gla_chunked(q, k, v, g, scale=scale,
                                                 initial_state=initial_state,
                                                 segment_ids=segment_ids)
    else:
        o, s_final = shard_over_batch(
            lambda q, k, v, g, s0, seg: _simple_gla_kernel(impl, q, k, v, g, scale, s0, seg,
                                                           interpret),
            q, k, v, g, initial_state, segment_ids)
    return o, (s_final if output_final_state else None)


def simple_gla_step(q, k, v, g, state, *, scale=None):
    """One decoding step: S' = exp(g)·S + k vᵀ, o = scale·S'ᵀ q.

    Args:
      q, k: [B, H, K]; v: [B, HV, V]; g: [B, HV]; state: [B, HV, K, V].
    Returns:
      (o [B, HV, V] in v.dtype, new_state [B, HV, K, V] float32).
    """
    op = "simple_gla_step"
    check_float(op, q=q, k=k, v=v, g=g, state=state)
    _check_rank(op, "q", q, ("B", "H", "K"))
    _check_rank(op, "v", v, ("B", "HV", "V"))
    bsz, h, kd = q.shape
    check_shape(op, "k", k, (bsz, h, kd))
    check_shape(op, "v", v, (bsz, None, None))
    hv, vd = v.shape[1], v.shape[2]
    if hv % h:
        raise ValueError(f"{op}: v has {hv} heads, which is not a multiple of the {h} q/k heads")
    check_shape(op, "g", g, (bsz, hv))
    check_shape(op, "state", state, (bsz, hv, kd, vd))
    scale = float(kd ** -0.5 if scale is None else scale)
    o, new_state = simple_gla_step_reference(q, k, v, g, state, scale=scale)
    return o.astype(v.dtype), new_state
