"""Where an op's arrays live on the mesh: kernels per (batch, head) shard, constraints otherwise.

`pallas_call` has no partitioning rule. Under a sharded `jit` (a mesh set with `jax.set_mesh`, or
an abstract mesh for lowering) a Pallas kernel therefore runs inside `jax.shard_map` over

  * the batch axes ``BATCH_MESH_AXES = ("data", "fsdp")`` on dimension 0 of every array, and
  * the head axis ``HEAD_MESH_AXIS = "tensor"`` on each array's head dimension,

so every device runs the kernel on its own rows and its own heads and nothing is gathered. Head
dimensions: the op declares those of its positional arrays (``Op.head_axes``; by default axis 2,
the H of ``[B, T, H, ...]`` sequences and ``[B, T, H]`` gates); every state leaf ``[B, H, ...]``
has it at axis 1 (a leaf of rank 1, Titans' ``pos [B]``, splits over the batch only); the output
``o [B, T, H, ...]`` at axis 2; ``segment_ids [B, T]`` splits over the batch only.

Grouped heads (q/k with H heads, v and the gates with HV = G·H heads; value head j reads q/k head
j // G) stay aligned under contiguous blocks when the tensor size n divides both H and HV: shard
i holds q heads [i·H/n, (i+1)·H/n) and v heads [i·HV/n, (i+1)·HV/n), and j // G maps the second
range onto the first exactly. :func:`groups_aligned` checks it for every pair of head counts.

A shape the mesh does not divide (the batch by data·fsdp, or a head count by tensor) cannot run
per shard, and an unsharded kernel call would not lower on TPU either ("Mosaic kernels cannot be
automatically partitioned"): the op then runs its portable implementation (``Op.fallback``) and
says so once in the log, for an explicit ``impl="triton"``/``"mosaic_tpu"`` too.

The other implementations (chunked, reference, xla) are plain XLA: :func:`constrain_heads` pins
the same layout on their inputs and outputs (a dimension the mesh does not divide stays whole),
so XLA's sharding propagation does not all-gather the heads.

Mesh axes of size 1, axes the mesh lacks, and axes already manual (the op called inside a
caller's own ``shard_map``) are left out everywhere; constraints use Auto axes only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

__all__ = ["BATCH_MESH_AXES", "HEAD_MESH_AXIS", "SEQUENCE_HEAD_AXIS", "STATE_HEAD_AXIS",
           "MeshLayout", "mesh_layout", "groups_aligned", "shard_problem", "divisible_part",
           "note_fallback", "run_per_shard", "constrain_heads", "constrain_state"]

BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXIS = "tensor"
SEQUENCE_HEAD_AXIS = 2   # [B, T, H, ...] sequences, [B, T, H] gates, the output o
STATE_HEAD_AXIS = 1      # state leaves [B, H, ...]

log = logging.getLogger(__name__)
_NOTED: set = set()      # fallbacks already logged: (op, impl, shapes, mesh)


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """The mesh axes an op's arrays split over: ``batch`` on dimension 0, ``heads`` on the head
    dimension (None: heads stay whole)."""
    mesh: jax.sharding.AbstractMesh
    batch: tuple[str, ...]
    heads: str | None

    @property
    def batch_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.batch)

    @property
    def head_shards(self) -> int:
        return self.mesh.shape[self.heads] if self.heads else 1

    def describe(self) -> str:
        return "mesh " + ", ".join(f"{a}={n}" for a, n in self.mesh.shape.items())

    def spec(self, shape: Sequence[int], head_axis: int | None, whole: bool = False) -> P:
        """dim 0 over the batch axes and ``head_axis`` over the head axis, each only where the
        mesh divides it (``whole``: ``shape`` is per shard, so split every such dim)."""
        parts: list = [None] * len(shape)
        if self.batch and shape and (whole or shape[0] % self.batch_shards == 0):
            parts[0] = self.batch
        if (self.heads and head_axis is not None and head_axis < len(shape)
                and (whole or shape[head_axis] % self.head_shards == 0)):
            parts[head_axis] = self.heads
        return P(*parts)

    def local(self, x, spec: P) -> jax.ShapeDtypeStruct:
        """The per-shard shape of ``x`` under ``spec``."""
        shape = [d // math.prod(self.mesh.shape[a] for a in ((s,) if isinstance(s, str) else s))
                 if s else d for d, s in zip(x.shape, tuple(spec) + (None,) * x.ndim)]
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype)


def mesh_layout(auto_only: bool = False) -> MeshLayout | None:
    """The current mesh's batch and head axes, or None without a multi-device mesh (or with none
    of those axes left to split). ``auto_only``: Auto axes only (for sharding constraints)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    skip = set(mesh.manual_axes) | (set(mesh.axis_names) - set(mesh.auto_axes) if auto_only
                                    else set())

    def usable(a):
        return a in mesh.axis_names and mesh.shape[a] > 1 and a not in skip

    batch = tuple(a for a in BATCH_MESH_AXES if usable(a))
    heads = HEAD_MESH_AXIS if usable(HEAD_MESH_AXIS) else None
    if not batch and heads is None:
        return None
    return MeshLayout(mesh, batch, heads)


def groups_aligned(counts: Sequence[int], n: int) -> bool:
    """True when every pair of head counts (a, b = G·a) keeps its grouping under n contiguous
    blocks: the heads j of b's block i read exactly the heads j // G of a's block i."""
    sizes = sorted(set(counts))
    for a in sizes:
        for b in sizes:
            if b <= a or b % a or a % n or b % n:
                continue
            g = b // a
            for i in range(n):
                block_b = range(i * b // n, (i + 1) * b // n)
                if {j // g for j in block_b} != set(range(i * a // n, (i + 1) * a // n)):
                    return False
    return True


def _state_axis(x) -> int | None:
    return STATE_HEAD_AXIS if x.ndim > STATE_HEAD_AXIS else None


def _head_counts(arrays, head_axes, initial_state) -> list[int]:
    counts = [x.shape[a] for x, a in zip(arrays, head_axes) if x is not None and a is not None]
    counts += [x.shape[STATE_HEAD_AXIS] for x in jax.tree.leaves(initial_state)
               if _state_axis(x) is not None]
    return counts


def shard_problem(layout: MeshLayout, arrays, head_axes, initial_state=None) -> str | None:
    """Why ``arrays`` cannot run per (batch, head) shard of ``layout`` (None when they can)."""
    problems = []
    batch = next(x.shape[0] for x in arrays if x is not None)
    if layout.batch and batch % layout.batch_shards:
        problems.append(f"batch {batch} is not a multiple of {'*'.join(layout.batch)} = "
                        f"{layout.batch_shards}")
    if layout.heads:
        n = layout.head_shards
        counts = _head_counts(arrays, head_axes, initial_state)
        bad = sorted({c for c in counts if c % n})
        if bad:
            problems.append(f"head count(s) {bad} not a multiple of {layout.heads} = {n}")
        elif not groups_aligned(counts, n):
            problems.append(f"grouped heads {sorted(set(counts))} would not stay aligned over "
                            f"{layout.heads} = {n}")
    return "; ".join(problems) or None


def divisible_part(layout: MeshLayout, arrays, head_axes, initial_state=None):
    """The largest part of ``layout`` the shapes divide (batch and heads, heads only, batch
    only), or None: where a pure-JAX form may run per shard when a kernel could not."""
    for part in (layout, dataclasses.replace(layout, batch=()),
                 dataclasses.replace(layout, heads=None)):
        if (part.batch or part.heads) and shard_problem(part, arrays, head_axes,
                                                        initial_state) is None:
            return part
    return None


def note_fallback(op: str, impl: str, fallback: str, arrays, layout: MeshLayout,
                  problem: str) -> None:
    """Log once per (op, impl, shapes, mesh) that a kernel gives way to the portable form."""
    shapes = tuple(tuple(x.shape) for x in arrays if x is not None)
    key = (op, impl, shapes, tuple(layout.mesh.shape.items()))
    if key in _NOTED:
        return
    _NOTED.add(key)
    log.warning("%s: impl=%r runs %r instead on %s: %s (array shapes %s). A Pallas kernel runs "
                "per (batch, head) shard only; unsharded it could not be partitioned.",
                op, impl, fallback, layout.describe(), problem,
                ", ".join(str(list(s)) for s in shapes))


def run_per_shard(fn: Callable, layout: MeshLayout, arrays: tuple, head_axes, initial_state,
                  segment_ids):
    """``fn(arrays, initial_state, segment_ids) -> (o, final)`` once per (batch, head) shard.

    ``arrays`` split on dim 0 and their ``head_axes``, the state leaves on dim 0 and axis 1 (rank
    1: dim 0 only), ``segment_ids`` on dim 0; ``o`` and the leaves of ``final`` come back the same
    way. The outputs' structure is found by tracing ``fn`` on the per-shard shapes.
    """
    a_specs = tuple(None if x is None else layout.spec(x.shape, ax)
                    for x, ax in zip(arrays, head_axes))
    s_specs = jax.tree.map(lambda x: layout.spec(x.shape, _state_axis(x)), initial_state)
    seg_spec = None if segment_ids is None else layout.spec(segment_ids.shape, None)
    local = (tuple(None if x is None else layout.local(x, s) for x, s in zip(arrays, a_specs)),
             jax.tree.map(lambda x: layout.local(x, layout.spec(x.shape, _state_axis(x))),
                          initial_state),
             None if segment_ids is None else layout.local(segment_ids, seg_spec))
    o, final = jax.eval_shape(fn, *local)
    grow = lambda x, ax: layout.spec(x.shape, ax, whole=True)      # from per-shard shapes
    out_specs = (grow(o, SEQUENCE_HEAD_AXIS),
                 jax.tree.map(lambda x: grow(x, _state_axis(x)), final))
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=(a_specs, s_specs, seg_spec),
                         out_specs=out_specs, check_vma=False)(arrays, initial_state, segment_ids)


def constrain_heads(x, head_axis: int | None):
    """``with_sharding_constraint``: dim 0 over the batch axes, ``head_axis`` over ``tensor``,
    each where the current mesh divides it; a no-op without a multi-device mesh or for None."""
    layout = mesh_layout(auto_only=True)
    if layout is None or x is None:
        return x
    return jax.lax.with_sharding_constraint(x, layout.spec(x.shape, head_axis))


def constrain_state(state):
    """:func:`constrain_heads` on every leaf of a recurrent state ([B, H, ...]; [B] leaves over
    the batch only)."""
    return jax.tree.map(lambda x: constrain_heads(x, _state_axis(x)), state)

