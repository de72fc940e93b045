"""Benchmark the Titans memory op: chunked vs the token reference, forward and forward+backward.

    python scripts/bench_titans.py            # pinned to one core, prints a table and speedups

``cases()`` returns one dict per (impl, T, memory): ``{"op": "titans", "impl", "T", "H", "D",
"memory": "linear" | "mlp2", "fwd", "fwd_bwd", "lower"}`` where ``fwd`` / ``fwd_bwd`` run a jitted
computation on prebuilt inputs and block until it is done, and ``lower()`` returns the lowered
fwd+bwd program (inputs as arguments) for ``scripts/bench_kernels.py``'s peak-memory column.
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
    grad_jit = jax.jit(jax.grad(lambda a, m, c: jnp.sum(forward(a, m) * c), argnums=(0, 1)))

    def fwd():
        return jax.block_until_ready(fwd_jit(args, mem0))

    def fwd_bwd():
        return jax.block_until_ready(grad_jit(args, mem0, cot))

    def lower():  # for peak memory: the fwd+bwd program with the inputs as arguments
        return grad_jit.lower(args, mem0, cot)

    return {"op": "titans", "impl": impl, "T": t, "H": H, "D": D, "memory": memory, "fwd": fwd,
            "fwd_bwd": fwd_bwd, "lower": lower}


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
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "2"))
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, B={B} H={H} D={D} "
          f"block={BLOCK}, best of {repeats} x {rounds} rounds; ms as wall / CPU")
    groups: dict = {}
    for case in cases():
        groups.setdefault((case["T"], case["memory"]), []).append(case)
    rows = {}
    for (t, memory), group in groups.items():
        for _ in range(rounds):  # interleave the implementations of one shape
            for case in group:
                for mode in ("fwd", "fwd_bwd"):
                    wall, cpu = _time(case[mode], repeats)
                    old = rows.get((t, memory, case["impl"], mode), (float("inf"),) * 2)
                    rows[(t, memory, case["impl"], mode)] = (min(old[0], wall), min(old[1], cpu))
        for case in group:
            f, fb = (rows[(t, memory, case["impl"], m)] for m in ("fwd", "fwd_bwd"))
            print(f"T={t:5d} {memory:6s} {case['impl']:9s} fwd {1e3 * f[0]:8.1f} / "
                  f"{1e3 * f[1]:8.1f}   fwd+bwd {1e3 * fb[0]:8.1f} / {1e3 * fb[1]:8.1f}   "
                  f"({t / fb[1] / 1e3:5.1f} k tok/s fwd+bwd, CPU)", flush=True)
    print("speedup of chunked over reference (wall / CPU):")
    for (t, memory) in groups:
        sp = {m: tuple(r / c for r, c in zip(rows[(t, memory, "reference", m)],
                                              rows[(t, memory, "chunked", m)]))
              for m in ("fwd", "fwd_bwd")}
        print(f"  T={t:5d} {memory:6s} fwd {sp['fwd'][0]:5.1f}x / {sp['fwd'][1]:5.1f}x   "
              f"fwd+bwd {sp['fwd_bwd'][0]:5.1f}x / {sp['fwd_bwd'][1]:5.1f}x")


if __name__ == "__main__":
    main()
