"""Device mesh and sharding by rules: logical axis names on parameters -> mesh axes.

The mesh has named axes ("data", "fsdp", "tensor") with Auto axis types: `jax.make_mesh`
defaults to Explicit types since jax 0.10, under which an fsdp/tensor-sharded `x @ w` is
rejected at trace time instead of being resharded by XLA. Parameters carry logical axis names in their
metadata (layers/common.make_param); `RULES` (= `layers.partitioning.PARAM_RULES`, the one rule
table, with the activations' ACTIVATION_RULES beside it) maps each name to a mesh axis. A
dimension that the mesh axis does not divide stays replicated, so every preset runs on every
mesh. The batch is split over ("data", "fsdp").
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from layers.partitioning import (ACTIVATION_RULES, BATCH_MESH_AXES, PARAM_RULES, constrain,
                                 spec_for)

__all__ = ["MESH_AXES", "RULES", "PARAM_RULES", "ACTIVATION_RULES", "constrain", "make_mesh",
           "param_specs", "param_axes", "no_decay_mask", "trainable_mask", "batch_sharding",
           "replicated", "to_global"]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = BATCH_MESH_AXES

# logical axis name -> mesh axis (names absent here are replicated); kept under its old name
RULES = PARAM_RULES


_SIMULATE_HINT = ("; on a CPU, simulate N devices with "
                  "XLA_FLAGS=--xla_force_host_platform_device_count=N")


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """Build the (data, fsdp, tensor) mesh; one axis may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes (data, fsdp, tensor) = {tuple(sizes)}; each must be a "
                         "positive int, and at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known}"
                             f"{_SIMULATE_HINT}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are "
                         f"{len(devices)} devices{_SIMULATE_HINT}")
    arr = np.array(devices).reshape(sizes)
    return jax.sharding.Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _meta(var: nnx.Variable) -> dict:
    return var.get_metadata()


def param_axes(state: nnx.State) -> dict:
    """Pure dict (same structure as nnx.to_pure_dict(state)) of logical axis-name tuples."""
    def axes(var):
        m = _meta(var)
        names = m.get("logical_axes")
        return tuple(names) if names is not None else (None,) * var.get_value().ndim
    tree = jax.tree.map(axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree)


def no_decay_mask(state: nnx.State) -> dict:
    """Pure dict of bools: True where AdamW applies weight decay (not tagged no_decay)."""
    tree = jax.tree.map(lambda v: not _meta(v).get("no_decay", False), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree)


def trainable_mask(state: nnx.State) -> dict:
    """Pure dict of bools: True for `nnx.Param` leaves, False for the constants stored beside
    them (`layers.common.Constant`, e.g. Lightning's per-layer decays), which must not move."""
    tree = jax.tree.map(lambda v: isinstance(v, nnx.Param), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree)


def _spec(axes: tuple, shape: tuple, mesh) -> P:
    return spec_for(axes, shape, PARAM_RULES, dict(mesh.shape))


def param_specs(axes_tree: dict, shapes_tree: dict, mesh) -> dict:
    """NamedShardings for a pure params dict, from its logical axes and shapes."""
    is_axes = lambda x: isinstance(x, tuple)
    return jax.tree.map(lambda a, s: NamedSharding(mesh, _spec(a, s.shape, mesh)), axes_tree,
                        shapes_tree, is_leaf=is_axes)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_global(batch: dict, sharding) -> dict:
    """Host-local numpy batch -> global jax arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
