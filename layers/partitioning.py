"""Logical axis names -> mesh axes: the one rule table of parameters and activations.

Parameters carry logical axis names in their metadata (`layers.common.make_param`); activations
name theirs at the call site with `constrain(x, ("batch", None, "embed"))`. Each name maps to a
mesh axis, a tuple of mesh axes (their product splits the dimension), or None (replicated):

    PARAM_RULES:      vocab, mlp, heads, kv_heads -> tensor;  embed -> fsdp;  layers -> None
    ACTIVATION_RULES: batch -> (data, fsdp);  heads, kv_heads, mlp, vocab -> tensor;
                      embed, seq -> None

A parameter's embed dimension is split over fsdp (FSDP: all-gathered before its matmul), an
activation's is not: the batch already uses fsdp, and a mesh axis can split one dimension only.
"layers" is the stacked-repeat axis of scanned layer groups (zoo/model.py); it stays whole so
`lax.scan` slices it locally.

The rule for both tables: a dimension whose mesh axes do not divide it stays unsplit (so every
preset runs on every mesh), and a mesh axis already used by an earlier dimension is not used
again. The mesh-axis names come from `pallas_kernels.common`, which the kernels' `shard_map`
also reads, so the two agree by construction.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels import common as _kernels_common

__all__ = ["BATCH_MESH_AXES", "HEAD_MESH_AXIS", "FSDP_MESH_AXIS", "PARAM_RULES",
           "ACTIVATION_RULES", "spec_for", "constrain"]

BATCH_MESH_AXES: tuple[str, ...] = tuple(_kernels_common.BATCH_MESH_AXES)
# The kernels' head axis; "tensor" until pallas_kernels.common exports it.
HEAD_MESH_AXIS: str = getattr(_kernels_common, "HEAD_MESH_AXIS", "tensor")
FSDP_MESH_AXIS = "fsdp"

PARAM_RULES: dict[str, str | tuple[str, ...] | None] = {
    "vocab": HEAD_MESH_AXIS,
    "embed": FSDP_MESH_AXIS,
    "mlp": HEAD_MESH_AXIS,
    "heads": HEAD_MESH_AXIS,
    "kv_heads": HEAD_MESH_AXIS,
    "layers": None,
}

ACTIVATION_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_MESH_AXES,
    "heads": HEAD_MESH_AXIS,
    "kv_heads": HEAD_MESH_AXIS,
    "mlp": HEAD_MESH_AXIS,
    "vocab": HEAD_MESH_AXIS,
    "embed": None,
    "seq": None,
}


def spec_for(axes: Sequence[str | None], shape: Sequence[int], rules: dict, mesh_shape) -> P:
    """PartitionSpec of an array of `shape` whose dimensions have logical names `axes`.

    mesh_shape: {mesh axis: size} (`mesh.shape`). A name absent from `rules` is replicated;
    a dimension not divisible by the product of its mesh axes' sizes, or whose mesh axes are
    missing from the mesh or already used, stays unsplit."""
    if len(axes) != len(shape):
        raise ValueError(f"spec_for: axes {tuple(axes)} do not match shape {tuple(shape)}")
    used, out = set(), []
    for name, dim in zip(axes, shape):
        rule = rules.get(name) if name is not None else None
        mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        ok = (mesh_axes and all(a in mesh_shape and a not in used for a in mesh_axes)
              and dim % math.prod(mesh_shape[a] for a in mesh_axes) == 0)
        if not ok:
            out.append(None)
            continue
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint(x, spec)` with the spec from ACTIVATION_RULES, under the mesh
    set with `jax.set_mesh`. A no-op without a mesh or on a 1-device mesh, so single-device code
    (tests, generation) runs unchanged. Fixing the activations' layout stops XLA's propagation
    from choosing it from a neighbouring FSDP weight (which would all-gather the batch)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: axes {tuple(axes)} do not match x of shape {x.shape}")
    spec = spec_for(axes, x.shape, ACTIVATION_RULES, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)
