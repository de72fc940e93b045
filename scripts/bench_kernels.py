"""Benchmark every op's implementations; print a table and write JSON to --out.

For every op of the registry (pallas_kernels.common.frame.registered_ops(): each op's ops.py
declares a BenchSpec with its inputs, lengths, shapes, keyword options and the peer
implementations of other projects), every implementation and shape on the current backend:
forward and forward+backward time and tokens/s, and peak memory. Kernels run only on their
backend (triton on GPU, mosaic_tpu on TPU), the token-scan reference only up to the op's
reference_max_t, peers only when their package is importable; a case an implementation does
not support (e.g. a Titans kernel with an MLP memory) is skipped with a note. The
implementations of one (op, shape) are timed interleaved: each timing is the best of --reps
calls after a compile and warm-up call, and the best of --rounds such rounds is kept.
Forward+backward is the VJP of every input for a fixed random cotangent. Peak memory is the
compiled forward+backward's temporary + output bytes (XLA's memory analysis), so it is
comparable across implementations on any backend.

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

KERNEL_BACKEND = {"triton": "gpu", "mosaic_tpu": "tpu", "mosaic_gpu": "gpu"}


def _benched_ops() -> dict:
    """{name: Op} of every registered op that declares a BenchSpec (imports jax)."""
    from pallas_kernels.common.frame import registered_ops

    return {name: op for name, op in registered_ops().items() if op.bench is not None}


def _impl_names(ops) -> tuple[str, ...]:
    """Every implementation name the ops' BenchSpecs can produce, peers included."""
    names: list[str] = []
    for op in ops.values():
        for name in (*op.bench.impls, *op.bench.peer):
            if name not in names:
                names.append(name)
    return tuple(names)


EXAMPLES = """examples:
  python scripts/bench_kernels.py
  python scripts/bench_kernels.py --ops simple_gla --T 1024 --reps 1 --rounds 1
  python scripts/bench_kernels.py --ops simple_gla,gated_delta_rule --T 1024 \\
      --impls chunked,peer:jla-chunked --out results/bench_cpu.json
"""


def _shape_of(case) -> tuple:
    """((field, value), ...) of a case: T and its BenchSpec shape fields."""
    return tuple((k, v) for k, v in case.items() if k not in ("op", "impl", "fwd", "fwd_bwd",
                                                                  "lower"))


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


def _load(path: str):
    """A peer's "module:function", or None when its package is not installed."""
    import importlib

    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def _first(out):
    """The output array of an op or peer that returns (o, state) or o."""
    return out[0] if isinstance(out, tuple) else out


def _closures(fn, arrays, key):
    """(fwd, fwd_bwd, lower): zero-argument callables on prebuilt inputs, jitted once.
    fwd_bwd is the output and the VJP of every input for a fixed random cotangent."""
    import jax

    fwd_jit = jax.jit(fn)
    shape = jax.eval_shape(fn, *arrays)                     # a ValueError: unsupported case
    ct = jax.random.normal(key, shape.shape).astype(shape.dtype)

    @jax.jit
    def fwd_bwd(arrays, ct):
        o, vjp = jax.vjp(fn, *arrays)
        return (o,) + vjp(ct)

    return (lambda: fwd_jit(*arrays), lambda: fwd_bwd(arrays, ct),
            lambda: fwd_bwd.lower(arrays, ct))


def _implementations(op, t: int, backend: str, impls) -> dict:
    """{impl name: fn(*arrays) -> o} of ``op`` at length ``t`` on ``backend``."""
    spec = op.bench
    out = {}
    for name in spec.impls:
        if name not in op.impls or (impls and name not in impls):
            continue
        if name == "reference" and t > spec.reference_max_t:
            continue
        if KERNEL_BACKEND.get(name, backend) != backend:
            continue
        out[name] = (lambda name: lambda *a: _first(op.function(*a, impl=name, **spec.kwargs)))(name)
    for label, path in spec.peer.items():
        peer = _load(path) if not impls or label in impls else None
        if peer is not None:
            out[label] = (lambda peer: lambda *a: _first(peer(*a)))(peer)
    return out


def _load_cases(op, lengths, impls, backend):
    """Benchmark cases of one op: dicts with op, impl, T, the shape fields and the closures."""
    import jax

    spec = op.bench
    out = []
    for t in spec.lengths:
        if lengths and t not in lengths:
            continue
        for shape in spec.shapes:
            key = jax.random.PRNGKey(0)
            arrays = tuple(spec.inputs(key, T=t, **shape))
            for name, fn in _implementations(op, t, backend, impls).items():
                try:
                    fwd, fwd_bwd, lower = _closures(fn, arrays, jax.random.PRNGKey(1))
                except ValueError as e:                     # e.g. a kernel's block rule
                    print(f"skip {op.name} {name} T={t} {shape}: {str(e).splitlines()[0]}")
                    continue
                out.append({"op": op.name, "impl": name, "T": t, **shape, "fwd": fwd,
                            "fwd_bwd": fwd_bwd, "lower": lower})
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
    ops = _benched_ops()
    impls = _impl_names(ops)
    lengths = "; ".join(f"{name} {', '.join(map(str, op.bench.lengths))}"
                        for name, op in ops.items())
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=_names(tuple(ops), "op"), default=",".join(ops),
                   metavar="OP[,OP...]",
                   help=f"ops to benchmark, comma-separated, from: {', '.join(ops)} "
                        "(default: %(default)s)")
    p.add_argument("--T", type=_positive_ints, default="", metavar="T[,T...]",
                   help=f"sequence lengths to keep, comma-separated; the ops' lengths: {lengths} "
                        "(default: all of each op's lengths)")
    p.add_argument("--impls", type=_names(impls, "implementation", allow_empty=True), default="",
                   metavar="IMPL[,IMPL...]",
                   help=f"implementations to keep, comma-separated, from: {', '.join(impls)}; "
                        "kernels run on their backend only (triton: GPU, mosaic_tpu: TPU), the "
                        "reference up to each op's reference_max_t, peers when their package "
                        "is installed (default: every one available on this backend)")
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
    ops = _benched_ops()
    known_lengths = sorted({t for op in args.ops for t in ops[op].bench.lengths})
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
    backend = jax.default_backend()
    for op in args.ops:
        groups: dict = {}
        for c in _load_cases(ops[op], lengths, impls, backend):
            groups.setdefault(_shape_of(c), []).append(c)
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
                row = {"op": op, "impl": c["impl"], **dict(_shape_of(c)),
                       "fwd_ms": fwd * 1e3, "fwd_bwd_ms": fb * 1e3,
                       "fwd_tokens_per_s": c["T"] / fwd, "fwd_bwd_tokens_per_s": c["T"] / fb,
                       "peak_bytes": peak}
                rows.append(row)
                desc = " ".join(f"{k}={v}" for k, v in _shape_of(c))
                mib = f"{peak / 2**20:9.1f}" if peak is not None else f"{'n/a':>9s}"
                print(f"{op:18s} {c['impl']:18s} {desc:34s} {fwd * 1e3:9.2f} {fb * 1e3:9.2f} "
                      f"{c['T'] / fb:11,.0f} {mib}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
