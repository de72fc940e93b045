"""The op frame: what every op shares beyond its math.

An op's ``ops.py`` declares one :class:`Op` — its name, its implementation table (impl name ->
"module:function", imported on first use), which implementations are Pallas kernels (they run
per batch shard, ``shard_over_batch``) and its benchmark case — and its public function checks
the arguments and hands the arrays to :meth:`Op.run`. Layers call :func:`sequence_or_step`, the
one place that turns "a cache and a single token" into the op's decoding step.

Implementation contract (every entry of ``Op.impls``)::

    fn(*arrays, initial_state=None, segment_ids=None, output_final_state=False, **static)
        -> (o, final_state | None)

``arrays`` are the op's positional inputs, batch-leading ``[B, T, ...]``; kernel entries also take
``interpret``. ``static`` are the op's keyword options (scale, chunk sizes, flags), passed through
unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from pallas_kernels.common import resolve_impl, shard_over_batch

__all__ = ["Op", "BenchSpec", "registered_ops", "sequence_or_step"]

KERNEL_IMPLS = ("triton", "mosaic_tpu", "mosaic_gpu")
_REGISTRY: dict[str, "Op"] = {}


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
    backend has no kernel of this op."""
    name: str
    impls: Mapping[str, str]
    fallback: str = "chunked"
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
        """Resolve ``impl`` and call it; kernels run once per batch shard of the current mesh.

        ``impl_kwargs`` ({impl: {keyword: value}}) are options only some implementations take
        (the chunked form's chunk size). Returns ``(o, final_state)`` with ``final_state = None``
        unless asked for.
        """
        name = self.resolve(impl)
        fn = self.implementation(name)
        static = {**static, **(impl_kwargs or {}).get(name, {})}
        if name not in KERNEL_IMPLS:
            o, final = fn(*arrays, initial_state=initial_state, segment_ids=segment_ids,
                          output_final_state=output_final_state, **static)
            return o, (final if output_final_state else None)
        n = len(arrays)

        def per_shard(*xs):
            o, final = fn(*xs[:n], initial_state=xs[n], segment_ids=xs[n + 1],
                          output_final_state=output_final_state, interpret=interpret, **static)
            # shard_map needs a batch-leading output for every entry: carry a dummy state.
            return o, (final if final is not None else jnp.zeros((xs[0].shape[0],), jnp.float32))

        o, final = shard_over_batch(per_shard, *arrays, initial_state, segment_ids)
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
