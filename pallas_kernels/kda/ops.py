"""Public KDA (Kimi Delta Attention): argument checks, implementation choice, the decoding step.

    S'_t = Diag(exp(g_t)) S_{t-1};  S_t = S'_t + k_t (β_t (v_t − S'_tᵀ k_t))ᵀ;  o_t = scale S_tᵀ q_t

q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV, K] (a log decay per key channel, <= 0);
β [B, T, HV] (in [0, 1]); HV % H == 0 and value head j reads q/k head j // (HV / H); state
[B, HV, K, V] float32 (key-major).

Implementations (``impl``): "reference" (token scan, the specification) and "chunked" (pure JAX
WY form with stable per-channel decay, ``chunked.py``; what "auto" gives on every backend until
Pallas kernels are added).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.common import check_float, check_heads, check_shape, check_step_heads, expand_groups
from pallas_kernels.common.frame import BenchSpec, Op
from pallas_kernels.gated_delta.reference import l2norm
from pallas_kernels.kda.chunked import DEFAULT_CHUNK
from pallas_kernels.kda.reference import recurrent_step

__all__ = ["OP", "AVAILABLE", "DEFAULT_CHUNK", "kda", "kda_step"]


def _bench_inputs(key, B, T, H, D):
    """As the KDA layer makes them: q, k L2-normalised [B, T, H, D]; v;
    g = −exp(A_h)·softplus(x − 2) [B, T, H, D] with A_h in [−1, 1]; β = sigmoid(x)."""
    ks = jax.random.split(key, 6)
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k = (norm(jax.random.normal(kk, (B, T, H, D))) for kk in ks[:2])
    v = jax.random.normal(ks[2], (B, T, H, D))
    a = jax.random.uniform(ks[3], (H, 1), minval=-1.0, maxval=1.0)
    g = -jnp.exp(a) * jax.nn.softplus(jax.random.normal(ks[4], (B, T, H, D)) - 2.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H)))
    return q, k, v, g, beta


_HERE = "pallas_kernels.kda."
OP = Op("kda",
        impls={"reference": _HERE + "reference:kda_reference",
               "chunked": _HERE + "chunked:kda_chunked"},
        bench=BenchSpec(inputs=_bench_inputs, peer={"peer:jla-chunked": "jla.ops.chunked:kda"},
                        impls=("chunked", "reference")))
AVAILABLE = OP.available
_OP = OP.name


def _check_inputs(q, k, v, g, beta, initial_state, segment_ids):
    """Shape/dtype checks at trace time; returns (B, T, H, HV, K, V)."""
    check_float(_OP, q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    B, T, H, HV, K, V = check_heads(_OP, q, k, v, initial_state, segment_ids)
    check_shape(_OP, "g", g, (B, T, HV, K))
    check_shape(_OP, "beta", beta, (B, T, HV))
    return B, T, H, HV, K, V


@OP.entry
def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
        segment_ids=None, use_qk_l2norm=False, impl="auto", interpret=False, debug_checks=False,
        chunk_size=DEFAULT_CHUNK):
    """KDA over a sequence. Returns (o [B, T, HV, V] in v.dtype, final_state | None).

    ``scale=None`` means K**-0.5. ``initial_state`` [B, HV, K, V] is the state before token 0
    (first document only). ``segment_ids`` [B, T] packs documents (0: padding).
    ``debug_checks=True`` verifies β in [0, 1] and g <= 0 with ``checkify``: called eagerly it
    raises ``checkify.JaxRuntimeError``; under ``jax.jit`` wrap the jitted caller in
    ``checkify.checkify`` and inspect the returned error. ``chunk_size`` applies to "chunked".
    """
    _check_inputs(q, k, v, g, beta, initial_state, segment_ids)
    OP.resolve(impl)
    if debug_checks:
        common.check_range(_OP, "beta", beta, 0.0, 1.0)
        common.check_range(_OP, "g (a log decay)", g, hi=0.0)
    return OP.run(impl, (q, k, v, g, beta), scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                  segment_ids=segment_ids, interpret=interpret,
                  impl_kwargs={"chunked": {"chunk_size": chunk_size}})


def kda_step(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=False):
    """One decoding step of the recurrence (the token-level form of ``reference.py``).

    q, k: [B, H, K]; v: [B, HV, V]; g: [B, HV, K]; beta: [B, HV]; state: [B, HV, K, V].
    Returns (o [B, HV, V] in v.dtype, new_state [B, HV, K, V] float32).
    """
    name = _OP + "_step"
    check_float(name, q=q, k=k, v=v, g=g, beta=beta, state=state)
    B, H, HV, K, V = check_step_heads(name, q, k, v, state)
    check_shape(name, "g", g, (B, HV, K))
    check_shape(name, "beta", beta, (B, HV))
    scale = K ** -0.5 if scale is None else scale
    f32 = jnp.float32
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = expand_groups(q.astype(f32), HV, axis=1)                        # [B, HV, K]
    k = expand_groups(k.astype(f32), HV, axis=1)
    o, new_state = recurrent_step(q, k, v.astype(f32), g.astype(f32), beta.astype(f32),
                                  state.astype(f32), scale)
    return o.astype(v.dtype), new_state
