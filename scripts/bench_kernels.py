"""Kernel benchmark: forward and forward+backward time, tokens/s and peak memory per op and
implementation, on the current backend. Prints a table and writes JSON.

    python scripts/bench_kernels.py [--ops simple_gla,gated_delta_rule,titans] [--T 1024,4096]
                                    [--impls chunked,peer:jla-chunked] [--out results/bench.json]

On CPU the process pins itself to one core with single-threaded Eigen before importing jax
(FIELD_NOTES.md: multi-threaded XLA collapses when the other core is busy), and the
implementations of one (op, shape) are timed interleaved, best of `--reps` x `--rounds`.
Peak memory is the compiled executable's temporary + output bytes (XLA's memory analysis), so
it is comparable across implementations on any backend. Each op contributes its cases from
`scripts/bench_<op>.py` (`cases()` -> dicts with op, impl, T, fwd, fwd_bwd, lower and shape fields).
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

import jax  # noqa: E402

OPS = {"simple_gla": "bench_simple_gla", "gated_delta_rule": "bench_gated_delta", "titans": "bench_titans"}
SHAPE_KEYS = ("T", "H", "D", "memory")


def _time(fn, reps: int, clock) -> float:
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--T", default="", help="comma list of lengths (default: each op's own)")
    p.add_argument("--impls", default="", help="comma list (default: all available)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="cpu: process CPU time (one pinned thread; robust to other jobs on the "
                        "machine); wall: elapsed time; auto: cpu on the CPU backend, else wall")
    p.add_argument("--out", default="results/bench_kernels.json")
    args = p.parse_args()
    use_cpu = args.clock == "cpu" or (args.clock == "auto" and jax.default_backend() == "cpu")
    clock = time.process_time if use_cpu else time.perf_counter
    lengths = {int(t) for t in args.T.split(",") if t}
    impls = {s for s in args.impls.split(",") if s}
    env = {"jax": jax.__version__, "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind, "python": platform.python_version(),
           "affinity": sorted(os.sched_getaffinity(0)), "clock": "cpu" if use_cpu else "wall"}
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    header = f"{'op':18s} {'impl':18s} {'shape':34s} {'fwd ms':>9s} {'f+b ms':>9s} {'f+b tok/s':>11s} {'peak MiB':>9s}"
    print(header)
    print("-" * len(header))
    rows = []
    for op in args.ops.split(","):
        if op not in OPS:
            raise SystemExit(f"--ops: unknown op {op!r}; known: {tuple(OPS)}")
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
