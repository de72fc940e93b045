"""Grid plumbing shared by the sequential Mosaic TPU kernels (simple_gla, gated delta rule,
Titans).

Their grid is (batch·head, chunk): heads in parallel, chunks in order ("arbitrary"), with the
recurrent state in VMEM scratch across the chunk axis. Arrays are [BH, NC, rows, cols] so every
block's last two dims are full array dims. An array whose leading axis is not the grid's
batch·head index (q/k with fewer, grouped heads; per-batch masks) maps it with ``row``.
:func:`vmem_bytes` counts what one grid step of a traced ``pallas_call`` holds in VMEM.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["sequential_params", "chunk_spec", "head_spec", "tile_bytes", "vmem_bytes"]

LANE, SUBLANE = 128, 8


def sequential_params():
    """Compiler parameters of a (parallel batch·head, sequential chunk) grid."""
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def chunk_spec(rows, cols, reverse=False, n_chunks=None, row=None):
    """Block [rows, cols] of chunk c (or NC-1-c) of a [BH, NC, rows, cols] array; ``row`` maps
    the grid's batch·head index to the array's leading index (default: the same)."""
    row = row or (lambda b: b)
    if reverse:
        return pl.BlockSpec((None, None, rows, cols),
                            lambda b, c: (row(b), n_chunks - 1 - c, 0, 0))
    return pl.BlockSpec((None, None, rows, cols), lambda b, c: (row(b), c, 0, 0))


def head_spec(rows, cols):
    """Block [rows, cols] of a [BH, rows, cols] array, resident across the chunk axis."""
    return pl.BlockSpec((None, rows, cols), lambda b, c: (b, 0, 0))


def tile_bytes(shape, itemsize):
    """Bytes of a VMEM buffer: the last two dims padded to (8, 128) tiles."""
    *lead, rows, cols = (1, 1) + tuple(shape)
    n = 1
    for d in lead:
        n *= d
    return n * (-(-rows // SUBLANE) * SUBLANE) * (-(-cols // LANE) * LANE) * itemsize


def vmem_bytes(fn, *args):
    """VMEM bytes one grid step of the single ``pallas_call`` in ``fn(*args)`` needs: every
    in/out block double-buffered plus the scratch, read off the traced call's own block specs
    (so the count follows the kernel), each padded to (8, 128) tiles. ``args`` may be
    ``jax.ShapeDtypeStruct``s."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    [eqn] = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]
    gm = eqn.params["grid_mapping"]
    total = 0
    for bm in gm.block_mappings:
        shape = [getattr(d, "block_size", 1) if not isinstance(d, int) else d
                 for d in bm.block_shape]
        total += 2 * tile_bytes(shape, bm.array_aval.dtype.itemsize)
    for aval in gm.scratch_avals:
        total += tile_bytes(aval.shape, aval.dtype.itemsize)
    return total
