"""Public HGRN recurrence: argument checks, implementation choice, and the decoding step.

    h_t = exp(g_t) ⊙ h_{t-1} + x_t,      o_t = h_t

x, g (log forget gate, <= 0) [B, T, D] — fla's ``hgrn`` names and layout: one scalar state per
feature channel, no heads; state [B, D] float32.

Implementations (``impl``): "reference" (token scan, the specification) and "chunked" (a blocked
scan of the associative operator (a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2) with a hand-written
VJP, ``chunked.py``; the default everywhere, since no backend has a kernel of this op: the
recurrence is elementwise and memory-bound, so a fused kernel could only save the few passes
over [B, T, D] that the scan makes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.common import check_float, check_segment_ids, check_shape
from pallas_kernels.common.frame import BenchSpec, Op
from pallas_kernels.hgrn.chunked import DEFAULT_CHUNK
from pallas_kernels.hgrn.reference import recurrent_step

__all__ = ["OP", "AVAILABLE", "hgrn", "hgrn_step"]


def _bench_inputs(key, B, T, H, D):
    """x, g [B, T, H·D]: the benchmark's H heads of D features fold into one feature axis of
    H·D channels (the op has no heads). HGRN's own gates: f = sigmoid(z + 2) (forget gates
    near 0.9, as a trained layer's), g = log f, x = (1 − f) ⊙ n with n standard normal."""
    kz, kn = jax.random.split(key)
    z = jax.random.normal(kz, (B, T, H * D)) + 2.0
    g = jax.nn.log_sigmoid(z)
    x = jax.nn.sigmoid(-z) * jax.random.normal(kn, (B, T, H * D))
    return x, g


_HERE = "pallas_kernels.hgrn."
OP = Op("hgrn",
        impls={"reference": _HERE + "reference:hgrn_reference",
               "chunked": _HERE + "chunked:hgrn_chunked"},
        # No heads: each of the D channels is its own recurrence, so D splits over "tensor".
        head_axes=(2, 2),
        bench=BenchSpec(inputs=_bench_inputs,
                        shapes=({"B": 1, "H": 4, "D": 64}, {"B": 1, "H": 8, "D": 128}),
                        impls=("chunked", "reference")))
AVAILABLE = OP.available
_OP = OP.name


def _check_inputs(x, g, initial_state, segment_ids):
    """Shape/dtype checks at trace time; returns (B, T, D)."""
    check_float(_OP, x=x, g=g, initial_state=initial_state)
    if x.ndim != 3:
        raise ValueError(f"{_OP}: x must have shape [B, T, D], got {list(x.shape)}")
    B, T, D = x.shape
    check_shape(_OP, "g", g, (B, T, D))
    if initial_state is not None:
        check_shape(_OP, "initial_state", initial_state, (B, D))
    check_segment_ids(_OP, segment_ids, B, T)
    return B, T, D


@OP.entry
def hgrn(x, g, *, initial_state=None, output_final_state=False, segment_ids=None, impl="auto",
         interpret=False, debug_checks=False, chunk_size=DEFAULT_CHUNK):
    """HGRN recurrence over a sequence. Returns (o [B, T, D] in x.dtype, final_state | None).

    ``initial_state`` [B, D] is the state before token 0 (first document only); the final state
    is float32 [B, D]. ``segment_ids`` [B, T] packs documents (0: padding).
    ``debug_checks=True`` verifies g <= 0 with ``checkify``: called eagerly it raises
    ``checkify.JaxRuntimeError``; under ``jax.jit`` wrap the jitted caller in
    ``checkify.checkify``. ``interpret`` is accepted for the common signature (no kernel here).
    ``chunk_size`` applies to "chunked".
    """
    _check_inputs(x, g, initial_state, segment_ids)
    OP.resolve(impl)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size must be a positive int, got {chunk_size!r}")
    if debug_checks:
        common.check_range(_OP, "g (a log decay)", g, hi=0.0)
    return OP.run(impl, (x, g), initial_state=initial_state,
                  output_final_state=output_final_state, segment_ids=segment_ids,
                  interpret=interpret, impl_kwargs={"chunked": {"chunk_size": chunk_size}})


def hgrn_step(x, g, state):
    """One decoding step: x, g [B, D], state [B, D] -> (o [B, D] in x.dtype, new_state float32)."""
    name = _OP + "_step"
    check_float(name, x=x, g=g, state=state)
    if x.ndim != 2:
        raise ValueError(f"{name}: x must have shape [B, D], got {list(x.shape)}")
    check_shape(name, "g", g, x.shape)
    check_shape(name, "state", state, x.shape)
    f32 = jnp.float32
    new_state = recurrent_step(x.astype(f32), g.astype(f32), state.astype(f32))
    return new_state.astype(x.dtype), new_state
