"""Public gla op (Gated Linear Attention): argument checks, implementation choice, decoding step.

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,    o_t = scale · S_tᵀ q_t

q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV, K] a log-decay per key channel (<= 0);
HV % H == 0 and value head j reads q/k head j // (HV / H); state [B, HV, K, V] float32
(key-major).

Implementations (``impl``): "reference" (token scan, the specification; it applies segment
resets and padding itself) and "chunked" (pure JAX, chunkwise parallel with a hand-written
backward; what "auto" gives on every backend until GPU/TPU kernels exist).
"""

from __future__ import annotations

import jax

from pallas_kernels import common
from pallas_kernels.common import check_float, check_heads, check_shape, check_step_heads
from pallas_kernels.common.frame import BenchSpec, Op
from pallas_kernels.gla.chunked import DEFAULT_CHUNK
from pallas_kernels.gla.reference import gla_step_reference

__all__ = ["OP", "AVAILABLE", "DEFAULT_CHUNK", "gla", "gla_step"]


def _bench_inputs(key, B, T, H, D):
    """q, k, v ~ N(0, 1) [B, T, H, D]; g = logsigmoid(x) / 16 [B, T, H, D] (the GLA layer's gate)."""
    ks = jax.random.split(key, 4)
    q, k, v = (jax.random.normal(kk, (B, T, H, D)) for kk in ks[:3])
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, D))) / 16.0
    return q, k, v, g


_HERE = "pallas_kernels.gla."
OP = Op("gla",
        impls={"reference": _HERE + "reference:gla_reference",
               "chunked": _HERE + "chunked:gla_chunked"},
        # Its scan runs over the B·NB blocks of all rows: per shard, or XLA gathers the batch.
        shard_map_impls=("chunked",),
        bench=BenchSpec(inputs=_bench_inputs,
                        shapes=({"B": 1, "H": 4, "D": 64}, {"B": 1, "H": 2, "D": 128}),
                        peer={"peer:jla-chunked": "jla.ops.chunked:gla"}))
AVAILABLE = OP.available
_OP = OP.name


def _check_inputs(q, k, v, g, initial_state, segment_ids):
    """Shape/dtype checks at trace time; returns (B, T, H, HV, K, V)."""
    check_float(_OP, q=q, k=k, v=v, g=g, initial_state=initial_state)
    B, T, H, HV, K, V = check_heads(_OP, q, k, v, initial_state, segment_ids)
    check_shape(_OP, "g", g, (B, T, HV, K))
    return B, T, H, HV, K, V


@OP.entry
def gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
        segment_ids=None, impl="auto", interpret=False, debug_checks=False,
        chunk_size=DEFAULT_CHUNK):
    """Gated linear attention over a sequence. Returns (o [B, T, HV, V] in v.dtype, final | None).

    ``scale=None`` means K**-0.5. ``initial_state`` [B, HV, K, V] is the state before token 0
    (first document only). ``segment_ids`` [B, T] packs documents (0: padding).
    ``debug_checks=True`` verifies g <= 0 with ``checkify``: called eagerly it raises
    ``checkify.JaxRuntimeError``; under ``jax.jit`` wrap the jitted caller in
    ``checkify.checkify`` and inspect the returned error. ``chunk_size`` applies to "chunked".
    """
    _check_inputs(q, k, v, g, initial_state, segment_ids)
    OP.resolve(impl)
    if debug_checks:
        common.check_range(_OP, "g (a log decay)", g, hi=0.0)
    return OP.run(impl, (q, k, v, g), scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, segment_ids=segment_ids,
                  interpret=interpret, impl_kwargs={"chunked": {"chunk_size": chunk_size}})


def gla_step(q, k, v, g, state, *, scale=None):
    """One decoding step of the recurrence (the token-level form of ``reference.py``).

    q, k: [B, H, K]; v: [B, HV, V]; g: [B, HV, K]; state: [B, HV, K, V].
    Returns (o [B, HV, V] in v.dtype, new_state [B, HV, K, V] float32).
    """
    name = _OP + "_step"
    check_float(name, q=q, k=k, v=v, g=g, state=state)
    B, H, HV, K, V = check_step_heads(name, q, k, v, state)
    check_shape(name, "g", g, (B, HV, K))
    scale = K ** -0.5 if scale is None else scale
    o, new_state = gla_step_reference(q, k, v, g, state, scale=scale)
    return o.astype(v.dtype), new_state
