"""Sequence-mixing ops: one folder per op (reference · chunked · Pallas GPU · Pallas TPU · ops).

This package imports jax alone (no flax, no config) so kernels can be tested and benchmarked on
a bare accelerator machine. Each op's public function lives in its ``ops.py``.
"""
