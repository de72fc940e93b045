"""Grid plumbing shared by the sequential Mosaic TPU kernels (gated delta rule, Titans).

Their grid is (batch·head, chunk): heads in parallel, chunks in order ("arbitrary"), with the
recurrent state in VMEM scratch across the chunk axis. Arrays are [BH, NC, rows, cols] so every
block's last two dims are full array dims.
"""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["sequential_params", "chunk_spec", "head_spec"]


def sequential_params():
    """Compiler parameters of a (parallel batch·head, sequential chunk) grid."""
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def chunk_spec(rows, cols, reverse=False, n_chunks=None):
    """Block [rows, cols] of chunk c (or NC-1-c) of a [BH, NC, rows, cols] array."""
    if reverse:
        return pl.BlockSpec((None, None, rows, cols), lambda b, c: (b, n_chunks - 1 - c, 0, 0))
    return pl.BlockSpec((None, None, rows, cols), lambda b, c: (b, c, 0, 0))


def head_spec(rows, cols):
    """Block [rows, cols] of a [BH, rows, cols] array, resident across the chunk axis."""
    return pl.BlockSpec((None, rows, cols), lambda b, c: (b, 0, 0))
