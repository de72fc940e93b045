"""Shared plumbing for every op: implementation choice, argument checks, segment masks, padding.

The op frame (``frame.py``: implementation table, the layers' single-token step, benchmark
cases), the ops' place on the mesh (``sharding.py``: kernels per (batch, head) shard, constraints
for the pure-JAX forms), kernel layouts (``layout.py``), the TPU grid of the sequential kernels
(``tpu_grid.py``) and their MXU matmuls and dtype rule (``mxu.py``) live beside this module.

The one place that resolves ``impl="auto"`` is :func:`resolve_impl`: "chunked" on CPU (and for
ops with no kernel on the current backend), "triton" on GPU, "mosaic_tpu" on TPU, decided from
``jax.default_backend()`` before a ``pallas_call`` is built: a ``lax.platform_dependent`` whose
branches carry different backends' Pallas compiler params fails at lowering ("Compiler params
for platform tpu cannot be used for gpu lowering").
"""

from __future__ import annotations

from typing import Sequence


import jax
import jax.numpy as jnp
from jax.experimental import checkify

# The mesh axes an op's arrays split over (batch, heads) and the constraint of non-kernel impls.
from pallas_kernels.common.sharding import BATCH_MESH_AXES, HEAD_MESH_AXIS, constrain_heads

__all__ = [
    "IMPLS",
    "resolve_impl",
    "check_float",
    "check_shape",
    "check_segment_ids",
    "check_range",
    "check_heads",
    "check_step_heads",
    "causal_mask",
    "einsum_f32",
    "segment_masks",
    "pad_axis",
    "next_pow2",
    "expand_groups",
    "BATCH_MESH_AXES",
    "HEAD_MESH_AXIS",
    "constrain_heads",
]

IMPLS = ("auto", "reference", "chunked", "xla", "blocked", "triton", "mosaic_tpu", "mosaic_gpu",
         "cudnn")

_AUTO_BY_BACKEND = {"cpu": "chunked", "gpu": "triton", "cuda": "triton", "rocm": "triton",
                    "tpu": "mosaic_tpu"}


def resolve_impl(op: str, impl: str, available: Sequence[str], fallback: str = "chunked") -> str:
    """Turn ``impl`` into a concrete implementation name of ``op``.

    ``available`` lists what the op implements; "auto" picks the backend's kernel when the op has
    one and ``fallback`` (the portable pure-JAX form: "chunked", or "xla" for attention) otherwise.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        choice = _AUTO_BY_BACKEND.get(jax.default_backend(), "chunked")
        return choice if choice in available else fallback
    if impl not in available:
        raise ValueError(f"{op}: impl={impl!r} is not implemented; choose one of "
                         f"{('auto',) + tuple(available)}")
    return impl


def check_float(op: str, **arrays) -> None:
    """Raise if any named array is not floating point."""
    for name, x in arrays.items():
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{op}: {name} must be a floating dtype (float32/bfloat16/float16), "
                            f"got {x.dtype}")


def check_shape(op: str, name: str, x, expected: Sequence[int | None]) -> None:
    """Raise unless ``x.shape`` matches ``expected`` (None matches any size)."""
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{op}: {name} must have shape {want}, got {list(shape)}")


def check_segment_ids(op: str, segment_ids, batch: int, length: int) -> None:
    """segment_ids: [B, T] integer ids (0 = trailing padding)."""
    if segment_ids is None:
        return
    check_shape(op, "segment_ids", segment_ids, (batch, length))
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"{op}: segment_ids must be an integer array [B, T], got {segment_ids.dtype}")


def check_heads(op: str, q, k, v, initial_state=None, segment_ids=None):
    """The q/k/v layout shared by the linear-attention ops, checked at trace time.

    q, k [B, T, H, K]; v [B, T, HV, V] with HV % H == 0; initial_state [B, HV, K, V];
    segment_ids [B, T]. Returns (B, T, H, HV, K, V); the op checks its own gates.
    """
    if q.ndim != 4:
        raise ValueError(f"{op}: q must have shape [B, T, H, K], got {list(q.shape)}")
    B, T, H, K = q.shape
    check_shape(op, "k", k, (B, T, H, K))
    if v.ndim != 4:
        raise ValueError(f"{op}: v must have shape [B, T, HV, V] = [{B}, {T}, *, *], "
                         f"got {list(v.shape)}")
    check_shape(op, "v", v, (B, T, None, None))
    HV, V = v.shape[2], v.shape[3]
    if HV % H != 0:
        raise ValueError(f"{op}: value heads HV={HV} (v.shape[2]) must be a multiple of the q/k "
                         f"heads H={H} (q.shape[2])")
    if initial_state is not None:
        check_shape(op, "initial_state", initial_state, (B, HV, K, V))
    check_segment_ids(op, segment_ids, B, T)
    return B, T, H, HV, K, V


def check_step_heads(op: str, q, k, v, state):
    """The single-token layout of the linear-attention steps: q, k [B, H, K]; v [B, HV, V] with
    HV % H == 0; state [B, HV, K, V]. Returns (B, H, HV, K, V); the step checks its own gates."""
    if q.ndim != 3:
        raise ValueError(f"{op}: q must have shape [B, H, K], got {list(q.shape)}")
    B, H, K = q.shape
    check_shape(op, "k", k, (B, H, K))
    if v.ndim != 3 or v.shape[0] != B:
        raise ValueError(f"{op}: v must have shape [B, HV, V] = [{B}, *, *], got "
                         f"{list(v.shape)}")
    HV, V = v.shape[1], v.shape[2]
    if HV % H != 0:
        raise ValueError(f"{op}: value heads HV={HV} (v.shape[1]) must be a multiple of the "
                         f"q/k heads H={H} (q.shape[1])")
    check_shape(op, "state", state, (B, HV, K, V))
    return B, H, HV, K, V


def einsum_f32(spec, a, b):
    """``jnp.einsum`` at HIGHEST precision with a float32 result (the chunked forms' matmuls)."""
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)


def causal_mask(n: int, strict: bool = False) -> jax.Array:
    """[n, n] bool, True where column j <= row i (j < i when strict)."""
    i = jnp.arange(n)
    return (i[None, :] < i[:, None]) if strict else (i[None, :] <= i[:, None])


def check_range(op: str, name: str, x, lo: float | None = None, hi: float | None = None) -> None:
    """The ops' opt-in value check (``debug_checks=True``): every element of x in [lo, hi].

    A ``checkify.check``: called eagerly it raises ``checkify.JaxRuntimeError``; under ``jax.jit``
    wrap the jitted caller in ``checkify.checkify`` and inspect the returned error.
    """
    ok = jnp.ones((), bool)
    if lo is not None:
        ok = ok & jnp.all(x >= lo)
    if hi is not None:
        ok = ok & jnp.all(x <= hi)
    allowed = (f"in [{lo}, {hi}]" if lo is not None and hi is not None
               else f">= {lo}" if lo is not None else f"<= {hi}")
    checkify.check(ok, f"{op}: {name} must be {allowed}, got values in [{{mn}}, {{mx}}]",
                   mn=jnp.min(x), mx=jnp.max(x))


def segment_masks(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """From ``segment_ids [B, T]`` derive ``(valid, reset)``, both ``[B, T]`` bool.

    ``valid`` is False on padding (id 0). ``reset[t]`` is True where a new non-zero document
    starts at t > 0 (the state before t must be dropped); token 0 never resets, so an
    ``initial_state`` applies to the first document of each row.
    """
    valid = segment_ids != 0
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    reset = valid & (segment_ids != prev)
    return valid, reset


def pad_axis(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """Zero-pad ``axis`` of ``x`` up to a multiple of ``multiple``."""
    size = x.shape[axis]
    extra = (-size) % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def expand_groups(x: jax.Array, n_heads: int, axis: int = 2) -> jax.Array:
    """Repeat grouped heads so head j of the result is head j // (n_heads / x.shape[axis])."""
    groups = x.shape[axis]
    if groups == n_heads:
        return x
    return jnp.repeat(x, n_heads // groups, axis=axis)

