"""The checks to run on a GPU machine: one script, cases in priority order, JSON after each case.

    python scripts/device_check.py                    # every case, each in its own process
    python scripts/device_check.py --cases cudnn_packing,memory --small
    OUT=/tmp/dc python scripts/device_check.py        # results in $OUT/device_check.json

Needs jax, numpy, this repository and, for the Triton kernels, triton and jax-triton (a GPU
machine without jax-triton: ``pip install --no-deps jax_triton-0.4.1-py3-none-any.whl``, the
wheel carried from ``pip download --no-deps jax-triton==0.4.1``). The caps add up to under
8 minutes; cases run in priority order (the Triton kernels' numerics, their timings, then
attention). Every case runs in a child process with a time cap
(a hung or crashed case cannot take the others down, and an out-of-memory one frees the device),
and the parent rewrites ``$OUT/device_check.json`` (default ``./device_check_out``) after every
case: ``{"env": ..., "cases": {name: {"status", "seconds", "result" | "error"}}}`` with status
"ok", "fail" (a numeric check missed its tolerance), "skipped" (not this machine's feature),
"error" (the exception's text) or "timeout". ``--small`` shrinks every shape (a CPU smoke test).

Adding a case: write ``def case_name(small: bool) -> dict`` and append
``Case("name", cap_seconds, case_name)`` to ``CASES``; raise :class:`Skip` when the machine lacks
what it needs, return ``{"passed": False, ...}`` for a failed check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Skip(Exception):
    """The case does not apply on this machine (its message says why)."""


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    cap_s: float
    fn: Callable[[bool], dict]


# ------------------------------------------------------------------------------------ helpers

def _env() -> dict:
    import jax

    env = {"jax": jax.__version__, "backend": jax.default_backend(),
           "devices": [str(d) for d in jax.devices()],
           "device_kind": jax.devices()[0].device_kind, "python": sys.version.split()[0]}
    cap = getattr(jax.devices()[0], "compute_capability", None)
    if cap is not None:
        env["compute_capability"] = str(cap)
    try:
        from jax._src.lib import cuda_versions
        env["cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception as e:  # the version query is informative only
        env["cudnn"] = f"unknown ({type(e).__name__})"
    return env


def _best_time(fn, *args, reps: int = 5) -> float:
    """Best wall time in seconds of ``fn(*args)`` after a compile + warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _fwd_bwd(impl: str, **kw):
    """jitted (q, k, v, ct) -> (o, dq, dk, dv) of the attention op with ``impl``."""
    import jax
    from pallas_kernels.attention import attention

    def run(q, k, v, ct):
        o, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, impl=impl, **kw), q, k, v)
        return (o, *vjp(ct))

    return jax.jit(run)


def _inputs(B, T, H, HKV, D, dtype, seed=0):
    import jax

    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D)).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, HKV, D)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, HKV, D)).astype(dtype)
    ct = jax.random.normal(ks[3], (B, T, H, D)).astype(dtype)
    return q, k, v, ct


def _packed_segments(B, T):
    """Row 0: documents of T/8, T/4, T/2 tokens and T/8 padding; other rows: one document."""
    import numpy as np
    import jax.numpy as jnp

    seg = np.ones((B, T), np.int32)
    a, b, c = T // 8, T // 8 + T // 4, T // 8 + T // 4 + T // 2
    seg[0, a:b], seg[0, b:c], seg[0, c:] = 2, 3, 0
    return jnp.asarray(seg)


def _rel_err(a, b) -> float:
    """max |a − b| / max(1, max |b|), in float32."""
    import numpy as np

    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


# -------------------------------------------------------------------------------------- cases

def case_cudnn_packing(small: bool) -> dict:
    """cuDNN fused attention with packed documents (q/kv offsets) vs blocked and vs the float32
    reference, bf16, GQA 8:2, D = 128, with and without a window: output and dq, dk, dv."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels.attention.gpu import cudnn_entry, cudnn_supported

    B, T, H, HKV, D = (2, 256, 4, 2, 64) if small else (2, 2048, 8, 2, 128)
    q, k, v, ct = _inputs(B, T, H, HKV, D, jnp.bfloat16)
    if cudnn_entry() is None:
        raise Skip(f"jax {jax.__version__} has no packed cuDNN attention entry")
    if not cudnn_supported(q, k, v):
        raise Skip(f"cuDNN packed attention unsupported on {jax.devices()[0].device_kind}")
    seg = _packed_segments(B, T)
    tol = {"out": 3e-2, "grad": 6e-2}  # tests/tolerance.py's bf16 row
    result, passed = {}, True
    for window in (None, T // 8):
        kw = dict(segment_ids=seg, window=window)
        outs = {impl: _fwd_bwd(impl, **kw)(q, k, v, ct) for impl in ("cudnn", "blocked", "reference")}
        row = {}
        for other in ("blocked", "reference"):
            errs = {n: _rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), outs["cudnn"],
                                                         outs[other])}
            row[f"vs_{other}"] = errs
            passed &= all(e <= tol["out" if n == "o" else "grad"] for n, e in errs.items())
        pad = float(jnp.abs(outs["cudnn"][0][0, seg.shape[1] - T // 8:]).max())
        row["padding_out_max"] = pad
        passed &= pad == 0.0
        times = {impl: _best_time(_fwd_bwd(impl, **kw), q, k, v, ct) * 1e3
                 for impl in ("cudnn", "blocked")}
        row["fwd_bwd_ms"] = times
        result[f"window={window}"] = row
    # The static bound on documents per row: T (ops.py's choice) against a tight one.
    from pallas_kernels.attention.gpu import attention_cudnn

    m_times = {}
    for m in (4, T):
        f = jax.jit(lambda q, k, v: attention_cudnn(q, k, v, seg, scale=D ** -0.5,
                                                    max_segments=m))
        m_times[f"max_segments={m}"] = _best_time(f, q, k, v) * 1e3
    result["fwd_ms_by_max_segments"] = m_times
    result["passed"] = bool(passed)
    return result


def case_blocked_timing(small: bool) -> dict:
    """Forward + backward time of blocked vs xla (dense) vs cudnn, B=1 H=16 D=128 bf16 at
    T = 4k and 16k, plain causal; a failure of one (e.g. xla out of memory) is recorded."""
    import jax.numpy as jnp

    lengths = (512, 1024) if small else (4096, 16384)
    H, D = (4, 64) if small else (16, 128)
    out = {}
    for T in lengths:
        q, k, v, ct = _inputs(1, T, H, H, D, jnp.bfloat16)
        row = {}
        for impl in ("blocked", "xla", "cudnn"):
            try:
                ms = _best_time(_fwd_bwd(impl), q, k, v, ct, reps=3) * 1e3
                row[impl] = {"fwd_bwd_ms": ms, "tokens_per_s": T / (ms / 1e3)}
            except Exception as e:  # recorded per implementation, the others still run
                row[impl] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        out[f"T={T}"] = row
    return out


def case_memory(small: bool) -> dict:
    """Compiled forward + backward temporaries (XLA memory_analysis) at B=1 H=16 D=128 T=8192,
    float32 and bf16: blocked vs xla, and cudnn for bf16."""
    import jax.numpy as jnp
    from pallas_kernels.attention.memory import fwd_bwd_memory

    kw = dict(B=1, T=1024, H=4, D=64) if small else dict(B=1, T=8192, H=16, D=128)
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        for impl in ("blocked", "xla", "cudnn"):
            if impl == "cudnn" and dtype == jnp.float32:
                continue
            key = f"{jnp.dtype(dtype).name}/{impl}"
            try:
                out[key] = {n: v / 2 ** 20 for n, v in fwd_bwd_memory(impl, dtype=dtype,
                                                                      **kw).items()}
            except Exception as e:
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    out["unit"] = "MiB"
    return out


# ------------------------------------------------------------------------- the Triton kernels
KERNEL_OPS = ("simple_gla", "gated_delta_rule", "titans")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device kind substring.
BF16_PEAK = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "B200": 2250.0, "GH200": 989.4}
# Nominal chunk FLOPs per token and head of the forward (C = 64-token chunks, K = V = D), the
# matmuls of the chunked algorithm: simple_gla q·kᵀ, A·v, q·S, kᵀ·v; the gated delta rule adds
# k·kᵀ, the WY products w = T·k, u = T·v and w·S. The backward counts twice the forward.
NOMINAL = {"simple_gla": lambda C, K, V: 2 * (C * K + C * V + 2 * K * V),
           "gated_delta_rule": lambda C, K, V: 2 * (2 * C * K + 2 * C * V + C * C + 3 * K * V),
           "titans": lambda C, K, V: 2 * (2 * C * K + 2 * C * V + 4 * K * V)}


def _op_call(name: str, impl: str, B: int, T: int, H: int, D: int, dtype, segments: bool,
             seed: int = 0):
    """(fwd(*arrays) -> o, arrays, o's shape) of a registered op at (B, T, H, D) in dtype, its
    BenchSpec's inputs and keywords; segments: row 0 packs three documents and padding."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels.common.frame import registered_ops

    op = registered_ops()[name]
    spec = op.bench
    extra = {k: v for k, v in spec.shapes[0].items() if k not in ("B", "H", "D")}
    arrays = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                          else x, tuple(spec.inputs(jax.random.key(seed), B=B, T=T, H=H, D=D,
                                                    **extra)))
    kw = dict(spec.kwargs)
    if segments and name != "titans":          # Titans' kernels take one document per row
        kw["segment_ids"] = _packed_segments(B, T)
    fwd = lambda *a: jax.tree.leaves(op.function(*a, impl=impl, **kw))[0]
    return fwd, arrays


def _fwd_and_grads(fwd, arrays, seed=1):
    """jitted forward and jitted (o, grads) for a fixed random cotangent."""
    import jax

    o_shape = jax.eval_shape(fwd, *arrays)
    ct = jax.random.normal(jax.random.key(seed), o_shape.shape).astype(o_shape.dtype)

    def fwd_bwd(*a):
        o, vjp = jax.vjp(fwd, *a)
        return o, vjp(ct)
    return jax.jit(fwd), jax.jit(fwd_bwd)


def _kernel_pair(small: bool) -> tuple[str, str]:
    """(implementation checked, its baseline): ("triton", "chunked") on a GPU; on a CPU with
    --small, ("chunked", "reference") so the harness itself can be smoke-tested."""
    import jax

    if jax.default_backend() == "gpu":
        return "triton", "chunked"
    if small:
        return "chunked", "reference"
    raise Skip("no GPU: the Triton kernels run on NVIDIA GPUs")


def case_kernels_numerics(small: bool) -> dict:
    """Every Triton kernel family (interpret off) against its chunked form: bf16 and float32
    (TF32 dots), D = 64/128/256, odd T, packed documents; output and every gradient."""
    import jax
    import jax.numpy as jnp
    from tests.tolerance import TOL

    fast, base = _kernel_pair(small)
    B, T, H = (1, 200, 2) if small else (2, 1000, 4)
    result, passed, t0 = {}, True, time.perf_counter()
    for D in (128, 256, 64):                          # in priority order, under a time budget
        for name in KERNEL_OPS:
            for dtype, row in ((jnp.bfloat16, "bfloat16"), (jnp.float32, "tfloat32")):
                key = f"{name}/{jnp.dtype(dtype).name}/D{D}"
                if time.perf_counter() - t0 > CASE_BUDGET_FRACTION * 150:
                    result[key] = {"skipped": "time budget"}
                    continue
                try:
                    outs = {}
                    for impl in (fast, base):
                        fwd, arrays = _op_call(name, impl, B, T, H, D, dtype, segments=True)
                        o, grads = _fwd_and_grads(fwd, arrays)[1](*arrays)
                        outs[impl] = [o, *jax.tree.leaves(grads)]
                    errs = [_rel_err(a, b) for a, b in zip(outs[fast], outs[base])]
                    ok = errs[0] <= TOL[row]["out"][0] and max(errs[1:]) <= TOL[row]["grad"][0]
                    result[key] = {"o": errs[0], "grads_max": max(errs[1:]), "passed": ok}
                    passed &= ok
                except Exception as e:
                    result[key] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
                    passed = False
    result["passed"] = bool(passed)
    return result


CASE_BUDGET_FRACTION = 0.8      # a case starts no new configuration after this share of its cap


def _timing(name: str, small: bool, cap: float) -> dict:
    """triton vs chunked, forward and forward + backward, bf16, D = 128: first the headline
    (B=2, H=16, T=16k: speed-up and nominal TFLOP/s against the bf16 peak), then B·H in
    {32, 128} × T in {4k, 16k, 64k}, each with the compiled fwd+bwd's memory_analysis."""
    import jax
    import jax.numpy as jnp

    fast, base = _kernel_pair(small)
    D, C = (32, 64) if small else (128, 64)
    grid = [(2, 16, 16384)] + [(b, 16, t) for t in (4096, 16384, 65536) for b in (2, 8)
                               if (b, t) != (2, 16384)]
    if small:
        grid = [(1, 2, 512), (2, 2, 1024)]
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in BF16_PEAK.items() if k in kind), None)
    out, t0 = {"device_kind": kind, "bf16_peak_tflops": peak}, time.perf_counter()
    for B, H, T in grid:
        key = f"B{B}_H{H}_T{T}"
        if time.perf_counter() - t0 > CASE_BUDGET_FRACTION * cap:
            out[key] = {"skipped": "time budget"}
            continue
        row = {}
        for impl in (fast, base):
            try:
                fwd, arrays = _op_call(name, impl, B, T, H, D, jnp.bfloat16, segments=False)
                f, fb = _fwd_and_grads(fwd, arrays)
                mem = fb.lower(*arrays).compile().memory_analysis()
                row[impl] = {"fwd_ms": _best_time(f, *arrays, reps=3) * 1e3,
                             "fwd_bwd_ms": _best_time(fb, *arrays, reps=3) * 1e3,
                             "fwd_bwd_temp_MiB": getattr(mem, "temp_size_in_bytes", 0) / 2 ** 20}
            except Exception as e:
                row[impl] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
        if "fwd_bwd_ms" in row.get(fast, {}):
            flops = 3 * B * H * T * NOMINAL[name](C, D, D)
            row[fast]["nominal_tflops"] = flops / (row[fast]["fwd_bwd_ms"] / 1e3) / 1e12
            if peak:
                row[fast]["share_of_peak"] = row[fast]["nominal_tflops"] / peak
            if "fwd_bwd_ms" in row.get(base, {}):
                row["fwd_bwd_speedup"] = row[base]["fwd_bwd_ms"] / row[fast]["fwd_bwd_ms"]
        out[key] = row
    return out


CASES: list[Case] = [
    Case("kernels_numerics", 150, case_kernels_numerics),
    Case("timing_simple_gla", 90, lambda small: _timing("simple_gla", small, 90)),
    Case("timing_gated_delta", 90, lambda small: _timing("gated_delta_rule", small, 90)),
    Case("timing_titans", 45, lambda small: _timing("titans", small, 45)),
    Case("cudnn_packing", 60, case_cudnn_packing),
    Case("blocked_timing", 45, case_blocked_timing),
    Case("memory", 30, case_memory),
]
# The machine's description, gathered in a child too: the parent never imports jax, so it holds
# no device memory while the cases run.
_ENV_CASE = Case("env", 120, lambda small: _env())


# --------------------------------------------------------------------------------------- main

def _run_inline(case: Case, small: bool) -> dict:
    t0 = time.perf_counter()
    try:
        result = case.fn(small)
        status = "fail" if result.get("passed") is False else "ok"
        rec = {"status": status, "result": result}
    except Skip as e:
        rec = {"status": "skipped", "reason": str(e)}
    except Exception:
        rec = {"status": "error", "error": traceback.format_exc()[-4000:]}
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _run_child(case: Case, small: bool, out_dir: str) -> dict:
    """The case in a fresh process, killed after its cap; its record comes back as a file."""
    path = os.path.join(out_dir, f".{case.name}.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case.name, "--child-out", path]
    if small:
        cmd.append("--small")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=case.cap_s)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": round(time.perf_counter() - t0, 2),
                "error": f"killed after its cap of {case.cap_s} s"}
    if os.path.exists(path):
        with open(path) as f:
            rec = json.load(f)
        os.remove(path)
        return rec
    return {"status": "error", "seconds": round(time.perf_counter() - t0, 2),
            "error": f"child exited {proc.returncode} without a result:\n{proc.stderr[-4000:]}"}


EPILOG = """examples:
  python scripts/device_check.py
  python scripts/device_check.py --cases cudnn_packing,memory --small
  OUT=/tmp/dc python scripts/device_check.py
"""


def main(argv=None) -> dict:
    names = [c.name for c in CASES]
    p = argparse.ArgumentParser(
        description="Runs the GPU (or TPU) machine's checks, each case in its own process with a "
                    "time cap, and writes $OUT/device_check.json (default ./device_check_out) "
                    "after every case: its status, seconds, result or error text.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(names),
                   help=f"comma-separated, in the order given; from: {', '.join(names)} "
                        f"(default: all, in that order)")
    p.add_argument("--small", action="store_true",
                   help="small shapes, a CPU smoke test (default: off)")
    p.add_argument("--inline", action="store_true",
                   help="run cases in this process, without time caps (default: off)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    by_name = {c.name: c for c in CASES + [_ENV_CASE]}
    if args.child:
        rec = _run_inline(by_name[args.child], args.small)
        with open(args.child_out, "w") as f:
            json.dump(rec, f, indent=1)
        return rec
    chosen = [n for n in args.cases.split(",") if n]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        p.error(f"--cases: unknown {unknown}; known: {names}")
    out_dir = os.environ.get("OUT") or "device_check_out"
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, "device_check.json")
    env = _run_inline(_ENV_CASE, args.small) if args.inline else _run_child(_ENV_CASE, args.small,
                                                                          out_dir)
    report = {"env": env.get("result", env), "small": args.small, "cases": {}}
    for name in chosen:
        case = by_name[name]
        rec = _run_inline(case, args.small) if args.inline else _run_child(case, args.small, out_dir)
        report["cases"][name] = rec
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"{name:20s} {rec['status']:8s} {rec.get('seconds', 0):8.1f} s", flush=True)
    print(f"wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
