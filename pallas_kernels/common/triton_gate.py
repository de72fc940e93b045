"""The compile gate: would the Triton kernels launch, and run on the tensor cores, on real GPUs?

Checked from a CPU, per op × configuration of its :class:`~triton_support.KernelTable` ×
architecture (sm_80, sm_90a, sm_100a):

1. the table's ``gate_case`` is lowered for CUDA under ``triton_call.target(capability)``
   (jax_triton runs Triton's whole pipeline to PTX; the CUDA plugin of jaxlib makes "cuda"
   lowerable without a GPU), and every kernel compiled on the way is captured;
2. each PTX is assembled to a cubin by Triton's bundled ptxas (``ptxas-blackwell`` for
   sm_100a) with ``-v``, whose report gives registers, spill stores/loads and stack;
3. :func:`violations` fails a kernel whose shared memory (Triton's allocation) is over the
   architecture's per-block limit, whose spills exceed the table's allowance (0 unless stated),
   whose ptxas output warns that wgmma is serialized, or which has ``tl.dot`` work but none of
   the architecture's tensor-core instruction (``mma.sync``, ``wgmma.mma_async``,
   ``tcgen05.mma``) in its PTX.

Configurations the table refuses on an architecture (over its shared-memory estimate) are
not compiled there: the dispatcher runs the portable form for them, and the gate reports the
refusal. Reports are cached in a JSON file keyed by a hash of everything that decides them: the
sources of the op's package and of ``pallas_kernels/common``, the configuration, the
architecture and the versions of jax, jaxlib, triton and jax_triton. A kernel edit changes the
key, so only what changed is compiled again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import subprocess
import tempfile
from importlib.metadata import version
from typing import Iterator

import jax

from pallas_kernels.common import triton_call
from pallas_kernels.common.triton_support import ARCHS, KernelTable

__all__ = ["KernelReport", "capture", "compile_case", "reports", "cached", "store",
           "violations", "tables", "source_key"]

_PACKAGE = pathlib.Path(__file__).resolve().parents[1]          # pallas_kernels/


@dataclasses.dataclass
class KernelReport:
    """One compiled kernel: what ptxas and Triton say about it."""
    op: str
    config: str                # e.g. "bfloat16 K128 V128"
    arch: str                  # sm_90a
    kernel: str
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int                # bytes Triton allocates (dynamic shared memory)
    tensor_core: int           # the arch's tensor-core instructions in the PTX
    mma_sync: int
    wgmma: int
    tcgen05: int
    warnings: list[str]

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def tables() -> dict[str, KernelTable]:
    """The Triton kernel table of every op that has one, by op name."""
    from pallas_kernels.common.frame import _load, registered_ops
    return {name: _load(op.tables["triton"]) for name, op in registered_ops().items()
            if "triton" in op.tables}


def config_label(dtype: str, sizes) -> str:
    return " ".join([dtype] + [f"{d}{s}" for d, s in sizes.items()])


# ------------------------------------------------------------------------------- capturing
@contextlib.contextmanager
def capture() -> Iterator[list]:
    """Collect jax_triton's compilation results (PTX, shared memory, name, options) made in the
    block. jax_triton caches kernels on the kernel function: the cache is bypassed here so each
    lowering compiles (and reports) every kernel it launches."""
    jt = triton_call.jax_triton()
    lib = jt.triton_lib
    results: list = []
    compile_ttir = lib.compile_ttir_inplace
    cache_prop = lib.TritonFunction._kernel_cache

    def spy(ttir, backend, options, gpu_target):
        res = compile_ttir(ttir, backend, options, gpu_target)
        results.append((res, options, gpu_target))
        return res

    lib.compile_ttir_inplace = spy
    lib.TritonFunction._kernel_cache = property(lambda self: {})
    try:
        yield results
    finally:
        lib.compile_ttir_inplace = compile_ttir
        lib.TritonFunction._kernel_cache = cache_prop


def lower_for(fn, args, capability: int):
    """``jax.jit(fn)`` lowered for CUDA at ``capability`` from this machine."""
    with triton_call.target(capability):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _ptxas(arch) -> str:
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", arch.ptxas)


def _count(ptx: str, op: str) -> int:
    return len(re.findall(r"^\s*(?:@!?%p\d+\s+)?" + re.escape(op), ptx, flags=re.M))


def _assemble(ptx: str, arch) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={arch.gpu_name}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch.gpu_name}: {out.stderr.strip()[-2000:]}")
    return out.stdout + out.stderr


def _report(op, label, arch, res, options) -> KernelReport:
    ptx = res.binary if isinstance(res.binary, str) else res.binary.decode()
    log = _assemble(ptx, arch)
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else 0
    counts = {"mma.sync": _count(ptx, "mma.sync"), "wgmma.mma_async": _count(ptx, "wgmma.mma_async"),
              "tcgen05.mma": _count(ptx, "tcgen05.mma")}
    return KernelReport(
        op=op, config=label, arch=arch.gpu_name, kernel=res.name,
        num_warps=int(getattr(options, "num_warps", 0)),
        registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
        spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
        shared=int(res.shared_mem_bytes), tensor_core=counts[arch.tensor_core],
        mma_sync=counts["mma.sync"], wgmma=counts["wgmma.mma_async"],
        tcgen05=counts["tcgen05.mma"],
        warnings=[ln.strip() for ln in log.splitlines() if "warning" in ln.lower()])


def compile_case(table: KernelTable, dtype: str, sizes, capability: int) -> list[KernelReport]:
    """Lower the table's gate case for ``capability`` and report every kernel (no cache)."""
    arch = ARCHS[capability]
    fn, args = table.gate_case(dtype, dict(sizes))
    with capture() as results:
        lower_for(fn, args, capability)
    if not results:
        raise RuntimeError(f"{table.op} {config_label(dtype, sizes)}: the gate case launched no "
                           f"Triton kernel (does it call impl='triton'?)")
    label = config_label(dtype, sizes)
    return [_report(table.op, label, arch, res, options) for res, options, _ in results]


# ----------------------------------------------------------------------------------- cache
def _sources(op: str) -> list[pathlib.Path]:
    """The files that decide an op's Triton kernels: its package and common/, less the TPU-only
    modules (a TPU edit does not recompile the GPU kernels)."""
    package = _load_package(op)
    files = [*package.glob("*.py"), *(_PACKAGE / "common").glob("*.py")]
    return sorted(f for f in files if "tpu" not in f.name and f.name != "mxu.py")


def _load_package(op: str) -> pathlib.Path:
    from pallas_kernels.common.frame import registered_ops
    module = registered_ops()[op].impls["triton"].partition(":")[0]
    return _PACKAGE / module.split(".")[1]


def source_key(op: str, dtype: str, sizes, capability: int) -> str:
    """The cache key: sources, configuration, architecture and tool versions."""
    h = hashlib.sha256()
    for path in _sources(op):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for pkg in ("jax", "jaxlib", "triton", "jax-triton"):
        h.update(f"{pkg}={version(pkg)}".encode())
    h.update(f"{op}|{config_label(dtype, sizes)}|{capability}|{triton_call.PTX_VERSION}".encode())
    return h.hexdigest()


def cached(cache: pathlib.Path | None, key: str) -> list[KernelReport] | None:
    """The reports stored under ``key`` in the JSON file ``cache``, or None."""
    store = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    return [KernelReport(**r) for r in store[key]] if key in store else None


def store(cache: pathlib.Path, key: str, out: list[KernelReport]) -> None:
    data = json.loads(cache.read_text()) if cache.exists() else {}
    data[key] = [dataclasses.asdict(r) for r in out]
    cache.write_text(json.dumps(data, indent=0, sort_keys=True))


def reports(table: KernelTable, dtype: str, sizes, capability: int,
            cache: pathlib.Path | None = None) -> list[KernelReport]:
    """:func:`compile_case`, answered from ``cache`` (a JSON file) when the key is there.
    Callers skip what the table refuses on the architecture (:meth:`KernelTable.refusal`)."""
    key = source_key(table.op, dtype, sizes, capability)
    if (hit := cached(cache, key)) is not None:
        return hit
    out = compile_case(table, dtype, sizes, capability)
    if cache is not None:
        store(cache, key, out)
    return out


# ------------------------------------------------------------------------------- the rules
def violations(table: KernelTable, report: KernelReport) -> list[str]:
    """What would fail or be slow on the hardware (empty: the kernel passes)."""
    arch = next(a for a in ARCHS.values() if a.gpu_name == report.arch)
    where = f"{report.op} {report.kernel} [{report.config}] on {report.arch}"
    out = []
    if report.shared > arch.shared_limit:
        out.append(f"{where}: {report.shared} B shared memory, over the {arch.shared_limit} B "
                   f"limit of {arch.label}")
    allowed = table.spill_allowance.get(report.kernel, 0)
    if report.spills > allowed:
        out.append(f"{where}: {report.spills} B of register spills (allowance {allowed} B)")
    out += [f"{where}: ptxas: {w}" for w in report.warnings if "serializ" in w.lower()]
    if report.kernel not in table.dotless and report.tensor_core == 0:
        out.append(f"{where}: no {arch.tensor_core} instruction: its matmuls miss the tensor "
                   f"cores")
    return out
