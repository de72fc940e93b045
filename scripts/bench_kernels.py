"""Benchmark every op's implementations; print a table and write JSON to --out.

For every op, implementation and shape on the current backend: forward and
forward+backward time and tokens/s, and peak memory. The cases come from
scripts/bench_<op>.py (`cases()` -> dicts with op, impl, T, fwd, fwd_bwd, lower
and shape fields). The implementations of one (op, shape) are timed
interleaved: each timing is the best of --reps calls after a compile and
warm-up call, and the best of --rounds such rounds is kept. Peak memory is the
compiled forward+backward's temporary + output bytes (XLA's memory analysis),
so it is comparable across implementations on any backend.

On CPU the process pins itself to one core (environment variable BENCH_CORE,
default 0) with single-threaded Eigen before it imports jax: multi-threaded
XLA on CPU slows down by up to ~100x when another process holds one of the
cores (a 1k-token gated-delta forward+backward went from ~11 ms to ~1 s on a
2-core machine), so unpinned timings on a shared machine are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

_ON_GPU_OR_TPU = os.environ.get("JAX_PLATFORMS", "") not in ("", "cpu") or os.path.exists("/dev/nvidia0")
if __name__ == "__main__" and not _ON_GPU_OR_TPU:  # before jax is imported
    os.sched_setaffinity(0, {int(os.environ.get("BENCH_CORE", "0"))})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

OPS = {"simple_gla": "bench_simple_gla", "gated_delta_rule": "bench_gated_delta", "titans": "bench_titans"}
# Every implementation name a case module can produce; which of them run depends on the backend.
IMPLS = ("chunked", "reference", "triton", "mosaic_tpu", "peer:jla-chunked")
SHAPE_KEYS = ("T", "H", "D", "memory")

EXAMPLES = """examples:
  python scripts/bench_kernels.py
  python scripts/bench_kernels.py --ops simple_gla,gated_delta_rule --T 1024 \\
      --impls chunked,peer:jla-chunked --out results/bench_cpu.json
"""


def _time(fn, reps: int, clock) -> float:
    import jax

    jax.block_until_ready(fn())  # compile + warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        jax.block_until_ready(fn())
        best = min(best, clock() - t0)
    return best


def _peak_bytes(case) -> int | None:
    """Temp + output bytes of the compiled forward+backward, from the case's `lower` callable
    (a zero-argument function returning `jax.jit(f).lower(*inputs)`: inputs stay arguments, so
    XLA does not constant-fold them)."""
    if "lower" not in case:
        return None
    try:
        mem = case["lower"]().compile().memory_analysis()
        return int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
    except Exception:  # backends without memory analysis
        return None


def _load_cases(op: str, lengths, impls):
    module = __import__(OPS[op])
    out = []
    for c in module.cases():
        if lengths and c["T"] not in lengths:
            continue
        if impls and c["impl"] not in impls:
            continue
        out.append(c)
    return out


def _names(known, what, allow_empty=False):
    """argparse type: a comma-separated list of names from `known` -> a tuple."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(s.strip() for s in text.split(",") if s.strip())
        if not names and not allow_empty:
            raise argparse.ArgumentTypeError(f"expected at least one {what} "
                                             f"(choose from {', '.join(known)})")
        unknown = [s for s in names if s not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown))} "
                                             f"(choose from {', '.join(known)})")
        return names
    return parse


def _positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: a comma-separated list of positive integers -> a tuple."""
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=_names(tuple(OPS), "op"), default=",".join(OPS),
                   metavar="OP[,OP...]",
                   help=f"ops to benchmark, comma-separated, from: {', '.join(OPS)} "
                        "(default: %(default)s)")
    p.add_argument("--T", type=_positive_ints, default="", metavar="T[,T...]",
                   help="sequence lengths to keep, comma-separated; simple_gla and "
                        "gated_delta_rule have 1024, 4096, 16384, titans has 1024, 4096 "
                        "(default: all of each op's lengths)")
    p.add_argument("--impls", type=_names(IMPLS, "implementation", allow_empty=True), default="",
                   metavar="IMPL[,IMPL...]",
                   help="implementations to keep, comma-separated, from: chunked; reference "
                        "(T <= 4096 for simple_gla and gated_delta_rule); triton (GPU); "
                        "mosaic_tpu (TPU, titans); peer:jla-chunked (simple_gla and "
                        "gated_delta_rule, when the jax-linear-attention package is installed) "
                        "(default: every one available on this backend)")
    p.add_argument("--reps", type=_positive_int, default=3, metavar="N",
                   help="timed calls per measurement after the warm-up call; the best is kept "
                        "(default: %(default)s)")
    p.add_argument("--rounds", type=_positive_int, default=2, metavar="N",
                   help="interleaved rounds over the implementations of one (op, shape); the "
                        "best round is kept (default: %(default)s)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="cpu: process CPU time (one pinned thread; robust to other jobs on the "
                        "machine); wall: elapsed time; auto: cpu on the CPU backend, else wall "
                        "(default: %(default)s)")
    p.add_argument("--out", default="results/bench_kernels.json", metavar="PATH",
                   help="JSON file to write ({'env': ..., 'rows': [...]}); its folder is "
                        "created (default: %(default)s)")
    return p


def main():
    parser = build_parser()
    args = parser.parse_args()
    modules = {op: __import__(OPS[op]) for op in args.ops}
    known_lengths = sorted({t for m in modules.values() for t in m.LENGTHS})
    missing = sorted(set(args.T) - set(known_lengths))
    if missing:
        parser.error(f"argument --T: no selected op has length(s) {', '.join(map(str, missing))} "
                     f"(their lengths: {', '.join(map(str, known_lengths))})")

    import jax

    use_cpu = args.clock == "cpu" or (args.clock == "auto" and jax.default_backend() == "cpu")
    clock = time.process_time if use_cpu else time.perf_counter
    lengths = set(args.T)
    impls = set(args.impls)
    env = {"jax": jax.__version__, "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind, "python": platform.python_version(),
           "affinity": sorted(os.sched_getaffinity(0)), "clock": "cpu" if use_cpu else "wall"}
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    header = f"{'op':18s} {'impl':18s} {'shape':34s} {'fwd ms':>9s} {'f+b ms':>9s} {'f+b tok/s':>11s} {'peak MiB':>9s}"
    print(header)
    print("-" * len(header))
    rows = []
    for op in args.ops:
        groups: dict = {}
        for c in _load_cases(op, lengths, impls):
            groups.setdefault(tuple(c.get(k) for k in SHAPE_KEYS), []).append(c)
        for shape, group in groups.items():
            best = {id(c): [float("inf"), float("inf")] for c in group}
            for _ in range(args.rounds):  # interleave implementations
                for c in group:
                    b = best[id(c)]
                    b[0] = min(b[0], _time(c["fwd"], args.reps, clock))
                    b[1] = min(b[1], _time(c["fwd_bwd"], args.reps, clock))
            for c in group:
                fwd, fb = best[id(c)]
                peak = _peak_bytes(c)
                row = {"op": op, "impl": c["impl"], **{k: c[k] for k in SHAPE_KEYS if k in c},
                       "fwd_ms": fwd * 1e3, "fwd_bwd_ms": fb * 1e3,
                       "fwd_tokens_per_s": c["T"] / fwd, "fwd_bwd_tokens_per_s": c["T"] / fb,
                       "peak_bytes": peak}
                rows.append(row)
                desc = " ".join(f"{k}={c[k]}" for k in SHAPE_KEYS if k in c)
                mib = f"{peak / 2**20:9.1f}" if peak is not None else f"{'n/a':>9s}"
                print(f"{op:18s} {c['impl']:18s} {desc:34s} {fwd * 1e3:9.2f} {fb * 1e3:9.2f} "
                      f"{c['T'] / fb:11,.0f} {mib}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
