"""Launching ``@triton.jit`` kernels from JAX: through jax_triton on a GPU, Triton's interpreter on CPU.

Every Triton kernel of the project is called through :func:`launch`::

    o, final = launch(kernel, q, k, v, out_shape=[sds_o, sds_final], grid=(n_v, B * H),
                      interpret=interpret, num_warps=4, num_stages=2, name="...", T=T, K=K, ...)

The kernel takes one pointer per input, then one per output, then its ``tl.constexpr`` keywords
(shapes, strides, block sizes: every size is static in JAX, so it is a constexpr). Arrays are
contiguous row-major; outputs are not zero-initialised on a GPU, so a kernel writes every element.

* On a GPU (``interpret=False``): ``jax_triton.triton_call`` with ``out_type=out_shape``. The compute
  capability is the device's, or the one set by :func:`target` (the compile gate lowers for
  sm_80 / sm_90a / sm_100 from a CPU this way). The PTX ISA version is pinned to
  :data:`PTX_VERSION`: Triton 3.9 emits 9.4 by default, which the CUDA 12 ptxas of
  ``jax[cuda12]`` and Triton's own bundled sm_90 ptxas (12.9) reject.
* On a CPU (``interpret=True``): the same kernel runs in Triton's interpreter inside a
  ``jax.pure_callback``, so the real wrapper (custom_vjp, padding, shard_map) is what the tests
  run. The interpreter must be switched on before triton is first imported
  (``TRITON_INTERPRET=1`` in the environment: the interpreter tests run in their own process),
  it keeps global state (calls are serialised by a lock), it reads arguments through torch's
  tensor API (:class:`_HostArray` gives a numpy array that API) and its bfloat16 is broken
  (``tl.dot`` multiplies raw bit patterns, triton-lang/triton#11584; add and compare too,
  #10945): interpreted launches take float32 (or integer) arrays only. Its float32 ``tl.dot``
  is exact, where a GPU uses TF32.

Triton and jax_triton are imported on first use only: the base install has neither.
:func:`missing` says why they cannot be used (None when they can).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from typing import Any, Sequence

import jax
import numpy as np

__all__ = ["PTX_VERSION", "launch", "missing", "interpreter_on", "target", "capability",
           "jax_triton"]

PTX_VERSION = 87                      # PTX ISA 8.7 = CUDA 12.8: sm_80, sm_90a and sm_100a all take it
_LOCK = threading.Lock()
_TARGETS: list[int] = []


def missing() -> str | None:
    """Why the Triton path cannot run here ("triton is not installed ..."), or None."""
    for module in ("triton", "jax_triton"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            return (f"{module} is not importable ({e}); install the GPU extra: "
                    f"pip install -e '.[gpu]' (Python >= 3.12)")
    return None


def interpreter_on() -> bool:
    """Was Triton's interpreter switched on (``TRITON_INTERPRET=1``) for this process?"""
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def target(compute_capability: int):
    """Lower Triton launches for ``compute_capability`` (80, 90, 100, ...) inside this block."""
    _TARGETS.append(int(compute_capability))
    try:
        yield
    finally:
        _TARGETS.pop()


def capability() -> int | None:
    """The compute capability launches compile for: :func:`target`'s, else the first GPU's
    (e.g. 90 on an H100/H200), else None (no GPU)."""
    if _TARGETS:
        return _TARGETS[-1]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    cc = getattr(gpus[0], "compute_capability", None) if gpus else None
    return int(float(cc) * 10) if isinstance(cc, str) else cc


@functools.cache
def jax_triton():
    """The jax_triton module, with :mod:`pallas_kernels.common.jax_triton_compat` applied."""
    from pallas_kernels.common import jax_triton_compat
    return jax_triton_compat.patched()


def launch(kernel, *inputs, out_shape: Sequence[jax.ShapeDtypeStruct], grid, interpret=False,
           num_warps: int = 4, num_stages: int = 2, name: str = "", **constexprs: Any):
    """Run ``kernel[grid](*inputs, *outputs, **constexprs)``; returns the outputs as a tuple."""
    outs = tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in out_shape)
    grid = (grid,) if isinstance(grid, int) else tuple(int(g) for g in grid)
    if interpret:
        return _interpreted(kernel, inputs, outs, grid, name, constexprs)
    jt = jax_triton()
    result = jt.triton_call(*inputs, kernel=kernel, out_type=list(outs), grid=grid,
                            name=name or kernel.__name__, num_warps=num_warps,
                            num_stages=num_stages, compute_capability=capability(),
                            backend_options={"ptx_version": PTX_VERSION}, **constexprs)
    return tuple(result)


# ------------------------------------------------------------------------- the interpreter path
_TORCH_DTYPES = {"float32": "float32", "float64": "float64", "float16": "float16",
                 "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
                 "uint8": "uint8", "bool": "bool"}


class _TorchDtypeName:
    """The dtype of a :class:`_HostArray` as Triton's argument specialiser reads it ("torch.x").

    One object per dtype (:func:`_dtype_of`): with a fresh object per array, the gated delta
    rule's interpreted kernels saw int32 and float32 pointers mixed up at random (the
    specialiser appears to key on the object, whose freed address another dtype's reused)."""

    def __init__(self, name: str):
        self.name = name

    def __str__(self):
        return "torch." + self.name

    __repr__ = __str__


@functools.cache
def _dtype_of(name: str) -> _TorchDtypeName:
    return _TorchDtypeName(_TORCH_DTYPES[name])


class _Storage:
    def __init__(self, array: np.ndarray):
        self.array = array

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def cpu(self):                     # already host memory: the interpreter works in place
        return self

    def copy_(self, other):
        pass


class _HostArray:
    """A contiguous numpy array behind the part of torch's tensor API the interpreter calls:
    it copies "device" tensors to the host through their storage and back after the launch;
    here both are the same memory, so the kernel reads and writes the numpy array itself."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.dtype = _dtype_of(np.dtype(array.dtype).name)

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def untyped_storage(self):
        return _Storage(self.array)

    def new_empty(self, *args, **kwargs):
        return self

    def set_(self, *args):
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self):
        return self.array.shape

    def stride(self, *dim):
        strides = tuple(s // self.array.itemsize for s in self.array.strides)
        return strides[dim[0]] if dim else strides

    def element_size(self) -> int:
        return self.array.itemsize


def _interpreted(kernel, inputs, outs, grid, name, constexprs):
    label = name or getattr(kernel, "__name__", "kernel")
    if not interpreter_on():
        raise RuntimeError(f"{label}: interpret=True runs Triton's interpreter, which is switched "
                           f"on only by TRITON_INTERPRET=1 in the environment before triton is "
                           f"imported (run the interpreter tests in their own process)")
    if type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(f"{label}: triton was imported before TRITON_INTERPRET=1 was set; "
                           f"its kernels are compiled, not interpreted")
    for i, x in enumerate(inputs):
        if np.dtype(x.dtype).name not in _TORCH_DTYPES:
            raise ValueError(f"{label}: interpret=True takes float32 or integer arrays, input {i} "
                             f"is {x.dtype}: Triton's interpreter computes bfloat16 wrongly "
                             f"(triton-lang/triton#11584); check bf16 with the compile gate and "
                             f"on a GPU")

    def host(*arrays):
        ins = [np.ascontiguousarray(np.asarray(a)).copy() for a in arrays]
        res = [np.zeros(o.shape, o.dtype) for o in outs]
        with _LOCK:
            kernel[grid](*map(_HostArray, ins), *map(_HostArray, res), **constexprs)
        return tuple(res)

    return tuple(jax.pure_callback(host, outs, *inputs))
