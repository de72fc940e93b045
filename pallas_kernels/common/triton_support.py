"""What a Triton kernel family supports: the dispatcher's table and the compile gate's configurations.

Each op with Triton kernels declares one :class:`KernelTable` in its ``gpu.py`` (importable
without triton) and names it in its ``Op`` (``Op(..., tables={"triton": "module:TABLE"})``).
The table holds

* the limits the dispatcher checks before anything compiles (:meth:`KernelTable.problem`):
  dtypes, the largest padded feature sizes, the GPU architectures, the shared memory the
  kernels need (``shared_bytes(dtype, sizes)``, the largest over the family's kernels, against
  the architecture's per-block limit) — under ``impl="auto"`` a call outside them runs the
  portable form with the reason logged, under an explicit ``impl="triton"`` it is a ValueError;
* the compile gate's configurations (:meth:`KernelTable.configurations`: dtype × padded sizes)
  and how to build each as a function of abstract arrays (``gate_case``), plus the resource
  rules the gate applies (spill allowance per kernel, kernels with no matmul), and the
  (dtype, architecture) pairs the family does not run on (``unsupported``, with the reason the
  gate found), which the dispatcher refuses like a shape over the limits.

Padded sizes: the kernels specialise on feature sizes rounded up to a power of two of at least
16 (the smallest ``tl.dot``); the gate compiles each bucket of ``gate_sizes``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Mapping

import jax.numpy as jnp

from pallas_kernels.common import next_pow2

__all__ = ["ARCHS", "Arch", "KernelTable", "padded"]


@dataclasses.dataclass(frozen=True)
class Arch:
    """A GPU architecture as the gate compiles for it."""
    capability: int
    gpu_name: str            # ptxas --gpu-name
    ptxas: str               # which of Triton's bundled ptxas binaries compiles it
    tensor_core: str         # the PTX instruction a tensor-core matmul becomes
    shared_limit: int        # bytes of shared memory one block may use (opt-in maximum)
    label: str


ARCHS = {
    80: Arch(80, "sm_80", "ptxas", "mma.sync", 166_912, "A100"),
    90: Arch(90, "sm_90a", "ptxas", "wgmma.mma_async", 232_448, "H100/H200"),
    100: Arch(100, "sm_100a", "ptxas-blackwell", "tcgen05.mma", 232_448, "B200"),
}


def padded(size: int) -> int:
    """The feature size a Triton kernel specialises on: a power of two, at least 16."""
    return max(16, next_pow2(size))


@dataclasses.dataclass(frozen=True)
class KernelTable:
    """One op's Triton kernels: limits, resource estimate and gate configurations.

    ``request(arrays, static)`` maps a call (positional arrays, static keywords) to
    ``(dtype name, {dim: padded size})``; ``shared_bytes(dtype, sizes)`` estimates the largest
    shared-memory use of the family's kernels; ``gate_case(dtype, sizes)`` returns
    ``(fn, abstract_args)`` whose lowering launches every kernel of the family (forward and
    backward). ``spill_allowance`` maps a kernel name to the spill bytes (stores + loads) the
    gate allows; kernels not named get 0. ``dotless`` names kernels with no matmul.
    """
    op: str
    max_sizes: Mapping[str, int]
    request: Callable[[tuple, Mapping], tuple[str, Mapping[str, int]]]
    shared_bytes: Callable[[str, Mapping[str, int]], int]
    gate_case: Callable[[str, Mapping[str, int]], tuple[Callable, tuple]]
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    capabilities: tuple[int, ...] = (80, 90, 100)
    gate_sizes: tuple[int, ...] = (64, 128, 256)
    spill_allowance: Mapping[str, int] = dataclasses.field(default_factory=dict)
    dotless: tuple[str, ...] = ()
    # (dtype, capability) -> why the family does not run there (what the gate measured).
    unsupported: Mapping[tuple[str, int], str] = dataclasses.field(default_factory=dict)

    def configurations(self) -> list[tuple[str, dict[str, int]]]:
        """Every (dtype, sizes) the gate compiles: each dtype × each bucket on all dims, plus
        the smallest and largest bucket mixed (K != V)."""
        dims = tuple(self.max_sizes)
        out = [(dt, {d: s for d in dims}) for dt, s in itertools.product(self.dtypes,
                                                                         self.gate_sizes)]
        if len(dims) == 2 and len(self.gate_sizes) > 1:
            lo, hi = self.gate_sizes[0], self.gate_sizes[-1]
            out += [(dt, {dims[0]: lo, dims[1]: hi}) for dt in self.dtypes]
        return out

    def problem(self, arrays: tuple, static: Mapping, capability: int | None,
                interpret: bool = False) -> str | None:
        """Why the kernels cannot run this call (one line), or None when they can."""
        dtype, sizes = self.request(arrays, static)
        return self.refusal(dtype, sizes, capability, interpret)

    def refusal(self, dtype: str, sizes: Mapping[str, int], capability: int | None,
                interpret: bool = False) -> str | None:
        """:meth:`problem` for a request already mapped to (dtype, padded sizes)."""
        if dtype not in self.dtypes:
            return f"dtype {dtype} is not one of {self.dtypes}"
        for dim, size in sizes.items():
            if size > self.max_sizes[dim]:
                return (f"{dim} padded to {size} is over the kernels' largest "
                        f"{self.max_sizes[dim]}")
        if interpret:
            return None
        if capability is None:
            return "no GPU to run on (and no compile target set)"
        if capability not in self.capabilities:
            return (f"compute capability {capability} is not one of {self.capabilities} "
                    f"(the architectures the compile gate checks)")
        if (dtype, capability) in self.unsupported:
            return f"{dtype} on sm_{capability}: {self.unsupported[dtype, capability]}"
        need, limit = self.shared_bytes(dtype, sizes), ARCHS[capability].shared_limit
        if need > limit:
            return (f"needs ~{need} B of shared memory at {dict(sizes)} {dtype}, over the "
                    f"{limit} B of sm_{capability}")
        return None


def dtype_name(x) -> str:
    return jnp.dtype(x.dtype).name
