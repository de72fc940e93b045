"""Public simple_gla op: argument checks, the implementation table and the decoding step.

    S_t = exp(g_t)·S_{t-1} + k_t v_tᵀ,    o_t = scale·S_tᵀ q_t

q, k ``[B, T, H, K]``; v ``[B, T, HV, V]``; g ``[B, T, HV]`` (log-decay, ≤ 0); HV % H == 0 and value
head j uses q/k head j // (HV / H); state ``[B, HV, K, V]`` float32.

Implementations (``impl``, declared in :data:`OP`): "reference" (token scan, the
specification), "chunked" (pure JAX, the CPU default), "triton" (Triton kernels through
jax_triton: ``gpu.py``, its limits in ``gpu.TABLE``) and "mosaic_tpu" (Pallas TPU, whose layout
adapter and custom_vjp are in ``kernels.py``).
"""

from __future__ import annotations

import jax

from pallas_kernels.common import check_float, check_range, check_segment_ids, check_shape
from pallas_kernels.common.frame import BenchSpec, Op
from pallas_kernels.simple_gla.reference import simple_gla_step_reference

__all__ = ["OP", "AVAILABLE", "simple_gla", "simple_gla_step"]


def _bench_inputs(key, B, T, H, D):
    """q, k, v [B, T, H, D] standard normal; g = −softplus(x) [B, T, H]."""
    ks = jax.random.split(key, 4)
    q, k, v = (jax.random.normal(kk, (B, T, H, D)) for kk in ks[:3])
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
    return q, k, v, g


_HERE = "pallas_kernels.simple_gla."
OP = Op("simple_gla",
        impls={"reference": _HERE + "reference:simple_gla_reference",
               "chunked": _HERE + "chunked:simple_gla_chunked",
               "triton": _HERE + "gpu:simple_gla_triton",
               "mosaic_tpu": _HERE + "kernels:simple_gla_tpu"},
        # Its scan runs over the B·NB blocks of all rows: per shard, or XLA gathers the batch.
        shard_map_impls=("chunked",),
        tables={"triton": _HERE + "gpu:TABLE"},
        bench=BenchSpec(inputs=_bench_inputs,
                        peer={"peer:jla-chunked": "jla.ops.chunked:simple_gla"}))
AVAILABLE = OP.available
_OP = OP.name


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


@OP.entry
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
    OP.resolve(impl)
    if debug_checks:
        check_range(_OP, "g (a log decay)", g, hi=0.0)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return OP.run(impl, (q, k, v, g), scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, segment_ids=segment_ids,
                  interpret=interpret)


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
