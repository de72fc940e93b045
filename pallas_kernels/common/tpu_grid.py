"""Grid plumbing shared by the sequential Mosaic TPU kernels (simple_gla, gated delta rule,
Titans).

Their grid is (batch·head, chunk): heads in parallel, chunks in order ("arbitrary"), with the
recurrent state in VMEM scratch across the chunk axis. Arrays are [BH, NC, rows, cols] so every
block's last two dims are full array dims. An array whose leading axis is not the grid's
batch·head index (q/k with fewer, grouped heads; per-batch masks) maps it with ``row``.
:func:`vmem_bytes` counts what one grid step of a traced ``pallas_call`` holds in VMEM.

Per-chunk scalars (a decay λ per chunk and head) are lane-dense: all NC values of one head are
one [1, NC] row (:func:`lane_row_spec`, a [BH, 1, NC] array), resident across the chunk axis, so
it is read from HBM once per head and pads to one (8, NC) tile instead of NC (8, 128) tiles of
[.., 1, 1] blocks. :func:`lane_pick` reads lane c as a [1, 1] value (a masked lane sum: no
dynamic lane slice); :func:`lane_put` adds a value into lane c of a resident output row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["sequential_params", "chunk_spec", "head_spec", "lane_row_spec", "lane_pick",
           "lane_put", "tile_bytes", "vmem_bytes"]

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


def lane_row_spec(n):
    """Block [1, n] of a [BH, 1, n] array (one lane per chunk), resident across the chunk axis."""
    return pl.BlockSpec((None, 1, n), lambda b, c: (b, 0, 0))


def lane_pick(row, i):
    """Lane ``i`` (a traced index) of a [1, n] row as a [1, 1] value."""
    lanes = jax.lax.broadcasted_iota(jnp.int32, row.shape, 1)
    return jnp.sum(jnp.where(lanes == i, row, 0.0), axis=1, keepdims=True)


def lane_put(ref, i, value):
    """ref[0, i] += value for a [1, n] ref and a [1, 1] value (zero the ref first)."""
    lanes = jax.lax.broadcasted_iota(jnp.int32, ref.shape, 1)
    ref[...] = ref[...] + jnp.where(lanes == i, value, 0.0)


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
