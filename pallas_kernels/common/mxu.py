"""Matmuls of the Mosaic TPU kernels: MXU operands in one dtype, float32 accumulation.

The dtype rule of every TPU kernel (``gated_delta/tpu.py``, ``simple_gla/tpu.py``,
``titans/tpu.py``):

* bf16 or fp16 inputs -> the MXU operands are bfloat16 (:func:`operand_dtype`; fp16 is cast to
  bf16 at the kernel boundary: the MXU has no fp16 path on v5e), every matmul accumulates in
  float32 (``preferred_element_type=float32``) at the default precision: one bf16 pass.
* float32 inputs -> float32 operands at the DEFAULT precision, which on a TPU is the MXU's own
  bf16-pass behaviour (what XLA does for a float32 matmul there), not the 3-6 pass HIGHEST
  emulation. On CPU (interpret mode) a float32 DEFAULT dot is exact float32.
* Carried states, final states and gates stay float32; a state is cast to the operand dtype only
  where it is a matmul operand. Elementwise work (decays, masks, state updates) stays float32:
  v5e's VPU has no bf16 arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["operand_dtype", "mxu_dot"]


def operand_dtype(dtype) -> jnp.dtype:
    """The MXU operand dtype for inputs of ``dtype``: bfloat16 for 16-bit floats, else float32."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(jnp.float32)


def mxu_dot(a: jax.Array, b: jax.Array, dtype=None, *, ta: bool = False,
            tb: bool = False) -> jax.Array:
    """float32 ``op(a) @ op(b)`` with both operands cast to ``dtype`` (default ``a.dtype``).

    ``ta`` / ``tb`` transpose an operand through the contracting dims (no transpose op).
    Default precision: one MXU pass on bf16 operands (see the module docstring).
    """
    dtype = a.dtype if dtype is None else dtype
    dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
    return lax.dot_general(a.astype(dtype), b.astype(dtype), dims,
                           preferred_element_type=jnp.float32)
