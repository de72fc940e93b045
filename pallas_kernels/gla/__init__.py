"""Gated Linear Attention (per-key-channel decay): reference scan and chunked JAX."""

from pallas_kernels.gla.ops import OP, gla, gla_step

__all__ = ["OP", "gla", "gla_step"]
