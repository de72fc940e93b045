"""Compile every Triton kernel for sm_80 / sm_90a / sm_100a on this CPU and print (and with --json, write) its resources.

For each op with Triton kernels, each configuration of its kernel table (dtype x padded feature
sizes) and each architecture, the op's forward + backward is lowered for CUDA through jax_triton,
each kernel's PTX is assembled by Triton's bundled ptxas, and one row per kernel is printed
(a configuration the table refuses on an architecture is listed with its reason instead):
warps, registers, spill bytes, shared memory, tensor-core instructions (mma.sync on sm_80,
wgmma on sm_90a, tcgen05.mma on sm_100a) and what fails (shared memory over the limit, spills
over the kernel's allowance, serialized wgmma, no tensor-core instruction). Needs the gpu-check
extra (Python >= 3.12: triton, jax-triton, the jax CUDA plugin); no GPU. Reports are cached by
source hash in --cache. The exit status is 1 when any kernel fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CACHE = os.path.join("tests", "triton_gate_cache.json")
ARCH_CHOICES = (80, 90, 100)

EPILOG = """examples:
  python scripts/triton_gate.py
  python scripts/triton_gate.py --ops gated_delta_rule --archs 90 --no-cache
  python scripts/triton_gate.py --json gate.json --jobs 2
"""


def _archs(text: str) -> tuple[int, ...]:
    try:
        archs = tuple(int(a) for a in text.split(","))
    except ValueError:
        archs = ()
    if not archs or any(a not in ARCH_CHOICES for a in archs):
        raise argparse.ArgumentTypeError(f"expected a comma list of {ARCH_CHOICES}, got {text!r}")
    return archs


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return int(text)


def _compile_item(item):
    """One (op, dtype, sizes, capability), compiled in a worker process: its reports as dicts."""
    from pallas_kernels.common import triton_gate
    op, dtype, sizes, cc = item
    return [dataclasses.asdict(r) for r in
            triton_gate.compile_case(triton_gate.tables()[op], dtype, sizes, cc)]


def _precompile(items, cache, jobs: int) -> None:
    """Fill ``cache`` with the items it lacks, ``jobs`` processes at a time."""
    import concurrent.futures
    import multiprocessing

    from pallas_kernels.common import triton_gate
    todo = [i for i in items if triton_gate.cached(cache, triton_gate.source_key(*i)) is None]
    if not todo:
        return
    ctx = multiprocessing.get_context("spawn")      # jax does not survive a fork
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        for item, out in zip(todo, pool.map(_compile_item, todo)):
            triton_gate.store(cache, triton_gate.source_key(*item),
                              [triton_gate.KernelReport(**r) for r in out])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="", metavar="A,B",
                   help="ops to compile, comma-separated (default: every op with Triton kernels)")
    p.add_argument("--archs", type=_archs, default=ARCH_CHOICES, metavar="80,90,100",
                   help="compute capabilities (default: 80,90,100)")
    p.add_argument("--cache", default=CACHE, metavar="FILE",
                   help=f"JSON cache of reports keyed by source hash (default: {CACHE})")
    p.add_argument("--no-cache", action="store_true",
                   help="compile everything again and leave the cache alone (default: off)")
    p.add_argument("--jobs", type=_positive, default=1, metavar="N",
                   help="compile in N processes (default: 1)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write every report and failure here (default: none)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import pathlib

    from pallas_kernels.common import triton_call, triton_gate
    if (why := triton_call.missing()) is not None:
        print(f"triton_gate: {why}", file=sys.stderr)
        return 2
    tables = triton_gate.tables()
    wanted = [o for o in args.ops.split(",") if o] or list(tables)
    unknown = [o for o in wanted if o not in tables]
    if unknown:
        print(f"triton_gate: --ops: {unknown} have no Triton kernels; choose from "
              f"{sorted(tables)}", file=sys.stderr)
        return 2
    cache = None if args.no_cache else pathlib.Path(ROOT, args.cache)
    if args.jobs > 1 and cache is None:             # the workers' results pass through a file
        import tempfile
        cache = pathlib.Path(tempfile.mkdtemp(), "gate.json")
    if args.jobs > 1:
        _precompile([(op, dtype, sizes, cc) for op in wanted
                     for dtype, sizes in tables[op].configurations() for cc in args.archs
                     if tables[op].refusal(dtype, sizes, cc) is None], cache, args.jobs)
    rows, failures = [], []
    head = (f"{'op':18} {'config':22} {'arch':8} {'kernel':34} {'warps':>5} {'regs':>4} "
            f"{'spill':>6} {'smem':>7} {'tc':>5}  verdict")
    print(head)
    for op in wanted:
        table = tables[op]
        for dtype, sizes in table.configurations():
            for cc in args.archs:
                if (why := table.refusal(dtype, sizes, cc)) is not None:
                    label = triton_gate.config_label(dtype, sizes)
                    print(f"{op:18} {label:22} sm_{cc:<5} (refused by the table: {why})")
                    rows.append({"op": op, "config": label, "capability": cc, "refused": why})
                    continue
                for r in triton_gate.reports(table, dtype, sizes, cc, cache=cache):
                    bad = triton_gate.violations(table, r)
                    failures += bad
                    rows.append({**dataclasses.asdict(r), "violations": bad})
                    print(f"{r.op:18} {r.config:22} {r.arch:8} {r.kernel:34} {r.num_warps:5} "
                          f"{r.registers:4} {r.spills:6} {r.shared:7} {r.tensor_core:5}  "
                          f"{'FAIL' if bad else 'ok'}")
    for f in failures:
        print("FAIL", f)
    compiled = sum("kernel" in r for r in rows)
    print(f"{compiled} kernels compiled, {len(rows) - compiled} configurations refused by their "
          f"tables, {len(failures)} failures")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kernels": rows, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
