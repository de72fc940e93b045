"""Benchmark cases for ``gated_delta_rule`` (consumed by scripts/bench_kernels.py).

``cases()`` returns dicts {"op", "impl", "T", "H", "D", "fwd", "fwd_bwd", "lower"}: ``fwd`` and
``fwd_bwd`` are zero-argument callables over jitted functions with inputs prebuilt; each returns
arrays (call ``jax.block_until_ready`` on the result); ``lower()`` lowers the forward+backward with
the inputs as arguments (for XLA's memory analysis). B = 1, float32, T in (1024, 4096, 16384),
(H, D) in ((4, 64), (2, 128)). Implementations: "chunked", "reference" (T <= 4096), "triton"
when ``jax.default_backend() == "gpu"``, and the peer package ``jax-linear-attention``'s chunked
gated delta rule as "peer:jla-chunked" when it is importable.

Run directly for a single-core comparison (interleaved, best of N), e.g.

    python scripts/bench_gated_delta.py --impls chunked,peer:jla-chunked --T 1024,4096,16384

which pins itself to core 0 (``BENCH_CORE`` to change) and turns off XLA's multi-threaded Eigen
before importing jax (the numbers of FIELD_NOTES.md are taken that way). On CPU it times process
CPU time by default, which the other processes on a shared machine disturb less than wall time
(``--clock wall`` for wall time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":                       # must happen before jax is imported
    os.sched_setaffinity(0, {int(os.environ.get("BENCH_CORE", "0"))})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta import gated_delta_rule

OP = "gated_delta_rule"
LENGTHS = (1024, 4096, 16384)
HEAD_SHAPES = ((4, 64), (2, 128))
REFERENCE_MAX_T = 4096


def make_inputs(T, H, D, seed=0):
    """q, k, v [1, T, H, D] (q, k L2-normalised), g <= 0, β in (0, 1) [1, T, H], cotangent."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    shape = (1, T, H, D)
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = norm(jax.random.normal(ks[0], shape))
    k = norm(jax.random.normal(ks[1], shape))
    v = jax.random.normal(ks[2], shape)
    g = -jax.nn.softplus(jax.random.normal(ks[3], shape[:3]) - 2.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], shape[:3]))
    ct = jax.random.normal(ks[5], shape)
    return q, k, v, g, beta, ct


def _peer_fn():
    """The peer's chunked gated delta rule, or None when the package is not installed."""
    try:
        from jla.ops import chunked as peer_chunked
    except ImportError:
        return None
    return lambda q, k, v, g, beta: peer_chunked.gated_delta_rule(q, k, v, g, beta)[0]


def _impls():
    out = {
        "chunked": lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, impl="chunked")[0],
        "reference": lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, impl="reference")[0],
    }
    if jax.default_backend() == "gpu":
        out["triton"] = lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, impl="triton")[0]
    peer = _peer_fn()
    if peer is not None:
        out["peer:jla-chunked"] = peer
    return out


def _case(name, fn, T, H, D):
    q, k, v, g, beta, ct = make_inputs(T, H, D)
    fwd = jax.jit(fn)

    @jax.jit
    def fwd_bwd(q, k, v, g, beta, ct):
        o, vjp = jax.vjp(fn, q, k, v, g, beta)
        return (o,) + vjp(ct)

    return {"op": OP, "impl": name, "T": T, "H": H, "D": D,
            "fwd": lambda: fwd(q, k, v, g, beta),
            "fwd_bwd": lambda: fwd_bwd(q, k, v, g, beta, ct),
            "lower": lambda: fwd_bwd.lower(q, k, v, g, beta, ct)}


def cases(lengths=LENGTHS, head_shapes=HEAD_SHAPES, impls=None):
    """Benchmark cases (see the module docstring); ``impls`` filters by name."""
    table = _impls()
    out = []
    for T in lengths:
        for H, D in head_shapes:
            for name, fn in table.items():
                if impls is not None and name not in impls:
                    continue
                if name == "reference" and T > REFERENCE_MAX_T:
                    continue
                out.append(_case(name, fn, T, H, D))
    return out


def _time(fn, reps, clock="auto"):
    """Best of ``reps``. ``clock="auto"``: on CPU process CPU time (the process is pinned to one
    core, so it is wall time minus what other processes took from that core), elsewhere wall."""
    if clock == "auto":
        clock = "process" if jax.default_backend() == "cpu" else "wall"
    clock = time.process_time if clock == "process" else time.perf_counter
    jax.block_until_ready(fn())                 # compile + warm up
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        jax.block_until_ready(fn())
        best = min(best, clock() - t0)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impls", default=None, help="comma list (default: all available)")
    p.add_argument("--T", default=",".join(map(str, LENGTHS)))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds, best kept")
    p.add_argument("--clock", choices=("auto", "wall", "process"), default="auto")
    args = p.parse_args()
    impls = None if args.impls is None else set(args.impls.split(","))
    lengths = tuple(int(t) for t in args.T.split(","))
    print(f"jax {jax.__version__} on {jax.default_backend()}, "
          f"affinity {sorted(os.sched_getaffinity(0))}")
    print(f"{'impl':18s} {'T':>6s} {'H':>2s} {'D':>4s} {'fwd tok/s':>12s} {'fwd+bwd tok/s':>14s}")
    for T in lengths:
        for H, D in HEAD_SHAPES:
            group = cases((T,), ((H, D),), impls)
            best = {c["impl"]: [float("inf"), float("inf")] for c in group}
            for _ in range(args.rounds):        # interleave implementations
                for c in group:
                    b = best[c["impl"]]
                    b[0] = min(b[0], _time(c["fwd"], args.reps, args.clock))
                    b[1] = min(b[1], _time(c["fwd_bwd"], args.reps, args.clock))
            for c in group:
                f, fb = best[c["impl"]]
                print(f"{c['impl']:18s} {T:6d} {H:2d} {D:4d} {T / f:12,.0f} {T / fb:14,.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
