"""Gated delta rule (GatedDeltaNet): reference scan, chunked JAX, Triton GPU kernels (jax-triton) and Pallas TPU kernels."""

from pallas_kernels.gated_delta.ops import gated_delta_rule, gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_step"]
