"""Benchmark the Titans memory op: chunked vs the token reference, forward and forward+backward.

    python scripts/bench_titans.py            # pinned to one core, prints a table and speedups

``cases()`` returns one dict per (impl, T, memory):
``{"op": "titans", "impl", "T", "memory": "linear" | "mlp2", "fwd": callable, "fwd_bwd": callable}``
where the callables run a jitted computation on prebuilt inputs and block until it is done.
Shapes: B=1, H=4, Dk=Dv=Dh=64, block size 16, T in (1024, 4096), float32.

For stable numbers run as a script: it pins the process to core 0 and turns off XLA's
multi-threaded Eigen *before* importing jax (FIELD_NOTES.md: multi-threaded XLA on a shared
2-core CPU collapses when another process holds the other core), and interleaves the
implementations in one process.
"""

from __future__ import annotations

import os
import sys
import time

if __name__ == "__main__":
    os.sched_setaffinity(0, {0})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.titans import titans  # noqa: E402

B, H, D, BLOCK = 1, 4, 64, 16
LENGTHS = (1024, 4096)
MEMORIES = ("linear", "mlp2")
IMPLS = ("chunked", "reference")


def make_inputs(t: int, memory: str, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q = jax.random.normal(ks[0], (B, t, H, D)) / D ** 0.5  # [B, T, H, D]
    k = jax.random.normal(ks[1], (B, t, H, D)) / D ** 0.5
    v = jax.random.normal(ks[2], (B, t, H, D))
    theta = 0.05 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, t, H)))  # [B, T, H]
    eta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, t, H)) + 2.0)
    alpha = 0.05 * jax.nn.sigmoid(jax.random.normal(ks[5], (B, t, H)))
    if memory == "linear":
        mem0 = {"w": jax.random.normal(ks[6], (H, D, D)) / D ** 0.5}
    else:
        mem0 = {"w0": jax.random.normal(ks[6], (H, D, D)) / D ** 0.5,
                "w1": jax.random.normal(ks[7], (H, D, D)) / D ** 0.5}
    return (q, k, v, theta, eta, alpha), mem0


def _case(impl: str, t: int, memory: str) -> dict:
    args, mem0 = make_inputs(t, memory)
    cot = jax.random.normal(jax.random.PRNGKey(1), args[2].shape)

    def forward(args, mem0):
        y, _ = titans(*args, mem0, block_size=BLOCK, impl=impl)
        return y

    fwd_jit = jax.jit(forward)
    grad_jit = jax.jit(jax.grad(lambda a, m: jnp.sum(forward(a, m) * cot), argnums=(0, 1)))

    def fwd():
        return jax.block_until_ready(fwd_jit(args, mem0))

    def fwd_bwd():
        return jax.block_until_ready(grad_jit(args, mem0))

    return {"op": "titans", "impl": impl, "T": t, "memory": memory, "fwd": fwd, "fwd_bwd": fwd_bwd}


def cases() -> list[dict]:
    """Chunked and reference, T in (1024, 4096), linear and 2-layer MLP memory, block 16."""
    return [_case(impl, t, memory) for t in LENGTHS for memory in MEMORIES for impl in IMPLS]


def _time(fn, repeats: int) -> tuple[float, float]:
    """Best wall time and best process CPU time of ``repeats`` calls, in seconds, after one
    untimed call. Pinned to one core with single-threaded XLA, CPU time is robust to other
    processes sharing the core; wall time is what a user sees on an idle machine."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def main() -> None:
    repeats = int(os.environ.get("BENCH_REPEATS", "5"))
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, B={B} H={H} D={D} "
          f"block={BLOCK}, best of {repeats}; times in ms as wall / CPU")
    rows = {}
    for case in cases():
        key = (case["T"], case["memory"], case["impl"])
        rows[key] = {mode: _time(case[mode], repeats) for mode in ("fwd", "fwd_bwd")}
        r = rows[key]
        print(f"T={key[0]:5d} {key[1]:6s} {key[2]:9s} "
              f"fwd {1e3 * r['fwd'][0]:8.1f} / {1e3 * r['fwd'][1]:8.1f}   "
              f"fwd+bwd {1e3 * r['fwd_bwd'][0]:8.1f} / {1e3 * r['fwd_bwd'][1]:8.1f}   "
              f"({key[0] / r['fwd_bwd'][1] / 1e3:6.1f} k tok/s fwd+bwd, CPU)", flush=True)
    print("speedup of chunked over reference (wall / CPU):")
    for t in LENGTHS:
        for memory in MEMORIES:
            c, r = rows[(t, memory, "chunked")], rows[(t, memory, "reference")]
            sp = {m: (r[m][0] / c[m][0], r[m][1] / c[m][1]) for m in ("fwd", "fwd_bwd")}
            print(f"  T={t:5d} {memory:6s} fwd {sp['fwd'][0]:5.1f}x / {sp['fwd'][1]:5.1f}x   "
                  f"fwd+bwd {sp['fwd_bwd'][0]:5.1f}x / {sp['fwd_bwd'][1]:5.1f}x")


if __name__ == "__main__":
    main()
