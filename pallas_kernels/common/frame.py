"""The op frame: what every op shares beyond its math.

An op's ``ops.py`` declares one :class:`Op` — its name, its implementation table (impl name ->
"module:function", imported on first use), the head axis of each positional array and its
benchmark case — and its public function checks the arguments and hands the arrays to
:meth:`Op.run`. Layers call :func:`sequence_or_step`, the one place that turns "a cache and a
single token" into the op's decoding step.

Placement on the mesh (``sharding.py``), under the mesh of ``jax.set_mesh`` (or an abstract
mesh when lowering):

* A Pallas kernel (``KERNEL_IMPLS``) runs once per (batch, head) shard: inside ``jax.shard_map``
  over the batch axes ("data", "fsdp") on dim 0 of every array, state and output, and over
  "tensor" on the head axes (``Op.head_axes`` of the positional arrays, axis 1 of the state
  leaves, axis 2 of ``o``); ``segment_ids`` splits over the batch only. Each device computes its
  own rows and heads; q/k/v are never gathered.
* When the mesh does not divide the shapes (batch by data·fsdp, a head count by tensor, grouped
  heads that would not stay aligned), the kernel is not called: ``Op.fallback`` (the portable
  form, "chunked") runs instead and a warning says so once per op, shapes and mesh. An explicit
  ``impl="triton"``/``"mosaic_tpu"`` falls back too: an unsharded kernel call under a sharded jit
  would fail anyway ("Mosaic kernels cannot be automatically partitioned").
* Every other implementation is plain XLA: its inputs and outputs are constrained to the same
  layout (a dimension the mesh does not divide stays whole), so propagation keeps heads local.
  Those in ``Op.shard_map_impls`` run per shard like the kernels, over the part of the mesh
  that divides their shapes (batch and heads, heads only, or batch only).

Implementation contract (every entry of ``Op.impls``)::

    fn(*arrays, initial_state=None, segment_ids=None, output_final_state=False, **static)
        -> (o, final_state | None)

``arrays`` are the op's positional inputs, batch-leading ``[B, T, ...]``; kernel entries also take
``interpret``. ``static`` are the op's keyword options (scale, chunk sizes, flags), passed through
unchanged; arrays among them (attention's dense mask, Titans' memory0) are not split, so an
implementation that runs per shard (a kernel, ``Op.shard_map_impls``) takes none.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any, Callable, Mapping

import jax

from pallas_kernels.common import resolve_impl, sharding

__all__ = ["Op", "BenchSpec", "registered_ops", "sequence_or_step"]

KERNEL_IMPLS = ("triton", "mosaic_tpu", "mosaic_gpu")
_REGISTRY: dict[str, "Op"] = {}
_UNSUPPORTED_LOGGED: set = set()


def _load(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """How ``scripts/bench_kernels.py`` times an op.

    ``inputs(key, B, T, H, D, **extra)`` returns the op's positional arrays (float32, a
    realistic gate distribution) for every length and each of ``shapes``; a shape's keys beyond
    B, H, D (Titans' ``memory``) are passed to ``inputs`` as keywords and reported as columns.
    ``kwargs`` are passed to every call. ``impls`` are the implementations timed (kernels only on
    their backend). ``peer`` names other projects' implementations ({label: "module:function"})
    taking the same positional arrays and returning ``o`` first; a peer whose module is missing
    is skipped. ``reference_max_t`` bounds the token-scan reference (it is slow).
    """
    inputs: Callable[..., tuple]
    lengths: tuple[int, ...] = (1024, 4096, 16384)
    shapes: tuple[Mapping[str, int], ...] = ({"B": 1, "H": 4, "D": 64},)
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    peer: Mapping[str, str] = dataclasses.field(default_factory=dict)
    reference_max_t: int = 4096
    impls: tuple[str, ...] = ("chunked", "reference", "triton", "mosaic_tpu")


@dataclasses.dataclass(frozen=True)
class Op:
    """One op's declaration (module docstring). ``fallback`` is what "auto" gives where the
    backend has no kernel of this op, and what a kernel gives way to on a mesh that does not
    divide its shapes. ``head_axes`` names the head axis of each positional array (None: no head
    axis, split over the batch only); the default is axis 2 of every one, the H of the ops'
    ``[B, T, H, ...]`` sequences and ``[B, T, H]`` gates. ``shard_map_impls`` are pure-JAX
    implementations that run per shard like the kernels (their only array arguments are the
    positional arrays, the state and segment_ids): those whose scan runs over the batch
    (B·NB blocks in one ``lax.scan``), which XLA's partitioner cannot split and all-gathers.
    ``tables`` names, per kernel impl, the ``triton_support.KernelTable`` ("module:NAME") of
    the shapes, dtypes and architectures it supports (see :meth:`supported`)."""
    name: str
    impls: Mapping[str, str]
    fallback: str = "chunked"
    head_axes: tuple[int | None, ...] | None = None
    shard_map_impls: tuple[str, ...] = ()
    tables: Mapping[str, str] = dataclasses.field(default_factory=dict)
    bench: BenchSpec | None = None
    public: list = dataclasses.field(default_factory=list, compare=False, repr=False)

    def __post_init__(self):
        _REGISTRY[self.name] = self

    @property
    def available(self) -> tuple[str, ...]:
        return tuple(self.impls)

    def resolve(self, impl: str) -> str:
        return resolve_impl(self.name, impl, available=self.available, fallback=self.fallback)

    def implementation(self, impl: str) -> Callable:
        """The function of a resolved implementation name (imported on first use)."""
        return _load(self.impls[impl])

    def heads_of(self, arrays: tuple) -> tuple[int | None, ...]:
        """The head axis of each of ``arrays`` (``head_axes``, or 2 for every one)."""
        if self.head_axes is None:
            return (sharding.SEQUENCE_HEAD_AXIS,) * len(arrays)
        if len(self.head_axes) != len(arrays):
            raise ValueError(f"{self.name}: head_axes {self.head_axes} declares "
                             f"{len(self.head_axes)} arrays, the op passed {len(arrays)}")
        return self.head_axes

    def supported(self, name: str, impl: str, arrays: tuple, static: Mapping,
                  interpret: bool) -> str:
        """``name`` if its kernel table takes this call; else, under ``impl="auto"``, the
        fallback (the reason logged once), and under an explicit impl a ValueError."""
        if name not in self.tables:
            return name
        from pallas_kernels.common import triton_call
        reason = triton_call.missing() if name == "triton" else None
        if reason is None:
            table = _load(self.tables[name])
            reason = table.problem(arrays, static, triton_call.capability(), interpret)
        if reason is None:
            return name
        if impl != "auto":
            raise ValueError(f"{self.name}: impl={name!r} cannot run this call: {reason}")
        key = (self.name, name, reason)
        if key not in _UNSUPPORTED_LOGGED:
            _UNSUPPORTED_LOGGED.add(key)
            logging.getLogger(__name__).warning("%s: impl='auto' runs %r instead of %r: %s",
                                                self.name, self.fallback, name, reason)
        return self.fallback

    def placed(self, name: str, arrays: tuple, initial_state=None) -> str:
        """The implementation that runs resolved ``name`` on the current mesh: a kernel whose
        shapes the mesh does not divide gives way to ``fallback`` (logged once)."""
        layout = sharding.mesh_layout()
        if name not in KERNEL_IMPLS or layout is None:
            return name
        problem = sharding.shard_problem(layout, arrays, self.heads_of(arrays), initial_state)
        if problem is None:
            return name
        sharding.note_fallback(self.name, name, self.fallback, arrays, layout, problem)
        return self.fallback

    def entry(self, fn: Callable) -> Callable:
        """Decorator marking the public function (what benchmarks and shared tests call)."""
        self.public.append(fn)
        return fn

    @property
    def function(self) -> Callable:
        if not self.public:
            raise RuntimeError(f"{self.name}: no public function registered with Op.entry")
        return self.public[0]

    def run(self, impl: str, arrays: tuple, *, initial_state=None, segment_ids=None,
            output_final_state: bool = False, interpret=False, impl_kwargs=None, **static):
        """Resolve ``impl`` and call it, placed on the current mesh (module docstring): kernels
        per (batch, head) shard, the portable form where the mesh does not divide the shapes,
        constrained arrays for every other implementation.

        ``impl_kwargs`` ({impl: {keyword: value}}) are options only some implementations take
        (the chunked form's chunk size). Returns ``(o, final_state)`` with ``final_state = None``
        unless asked for.
        """
        name = self.supported(self.resolve(impl), impl, arrays, static, interpret)
        name = self.placed(name, arrays, initial_state)
        fn = self.implementation(name)
        static = {**static, **(impl_kwargs or {}).get(name, {})}
        if name in KERNEL_IMPLS:
            static["interpret"] = interpret
        heads = self.heads_of(arrays)

        def call(xs, state, seg):
            return fn(*xs, initial_state=state, segment_ids=seg,
                      output_final_state=output_final_state, **static)

        layout = sharding.mesh_layout()
        if layout is not None and name in self.shard_map_impls:
            layout = sharding.divisible_part(layout, arrays, heads, initial_state)
        elif name not in KERNEL_IMPLS:
            layout = None                   # a kernel still named here: the mesh divides it
        if layout is not None:
            o, final = sharding.run_per_shard(call, layout, arrays, heads, initial_state,
                                              segment_ids)
        elif name in KERNEL_IMPLS:                    # no multi-device mesh
            o, final = call(arrays, initial_state, segment_ids)
        else:
            con = sharding.constrain_heads
            o, final = call(tuple(con(x, ax) for x, ax in zip(arrays, heads)),
                            sharding.constrain_state(initial_state), con(segment_ids, None))
            o, final = con(o, sharding.SEQUENCE_HEAD_AXIS), sharding.constrain_state(final)
        return o, (final if output_final_state else None)


def registered_ops() -> dict[str, Op]:
    """Every op of ``pallas_kernels`` by name (importing each op package's ``ops`` module)."""
    import pkgutil

    import pallas_kernels
    for info in pkgutil.iter_modules(pallas_kernels.__path__):
        if info.ispkg and info.name != "common":
            try:
                importlib.import_module(f"pallas_kernels.{info.name}.ops")
            except ModuleNotFoundError as e:
                if e.name != f"pallas_kernels.{info.name}.ops":
                    raise
    return dict(sorted(_REGISTRY.items()))


def sequence_or_step(op: Callable, step: Callable, *arrays, state=None, segment_ids=None,
                     impl: str = "auto", **kwargs):
    """A layer's call of a recurrent op, with or without a decode cache.

    With a cached ``state``, one token and no ``segment_ids`` this is the op's single-token
    ``step(*[x[:, 0] for x in arrays], state, **kwargs)``; otherwise the sequence form
    ``op(*arrays, initial_state=state, output_final_state=state is not None,
    segment_ids=segment_ids, impl=impl, **kwargs)``. ``arrays`` are ``[B, T, ...]``.
    Returns ``(o [B, T, ...], new_state | None)``: the new state is returned when a state came in.
    """
    if state is not None and arrays[0].shape[1] == 1 and segment_ids is None:
        o, new_state = step(*(x[:, 0] for x in arrays), state, **kwargs)
        return jax.tree.map(lambda y: y[:, None], o), new_state
    o, new_state = op(*arrays, initial_state=state, output_final_state=state is not None,
                      segment_ids=segment_ids, impl=impl, **kwargs)
    return o, (new_state if state is not None else None)
