"""Benchmark cases for simple_gla: forward and forward+backward closures per implementation.

``cases()`` returns a list of dicts ``{"op", "impl", "T", "H", "D", "fwd", "fwd_bwd", "lower"}`` whose
callables take no arguments and run an already-jitted function on inputs built here (B=1, H=4,
K=V=64, float32); the caller blocks on the result (``scripts/bench_kernels.py`` does).
Implementations: "chunked" (this repo's CPU default), "reference" (the token scan, T <= 4096
only), "triton" (only when the default backend is a GPU) and "peer:jla-chunked" — the
``jax-linear-attention`` package's chunked simple_gla — when it is importable
(``pip install jax-linear-attention``; it needs Python >= 3.12).

fwd_bwd returns the output and the VJP of all of q, k, v, g for a fixed random cotangent.

Run them with ``python scripts/bench_kernels.py --ops simple_gla``.
"""

from __future__ import annotations



import jax
import jax.numpy as jnp

from pallas_kernels.simple_gla import simple_gla

LENGTHS = (1024, 4096, 16384)
B, H, D = 1, 4, 64
REFERENCE_MAX_T = 4096


def _peer():
    """The jax-linear-attention chunked simple_gla, or None when the package is missing."""
    try:
        from jla.ops import chunked as jla_chunked
    except ImportError:
        return None
    return lambda q, k, v, g: jla_chunked.simple_gla(q, k, v, g)[0]


def _implementations(t):
    impls = {"chunked": lambda q, k, v, g: simple_gla(q, k, v, g, impl="chunked")[0]}
    if t <= REFERENCE_MAX_T:
        impls["reference"] = lambda q, k, v, g: simple_gla(q, k, v, g, impl="reference")[0]
    if jax.default_backend() == "gpu":
        impls["triton"] = lambda q, k, v, g: simple_gla(q, k, v, g, impl="triton")[0]
    peer = _peer()
    if peer is not None:
        impls["peer:jla-chunked"] = peer
    return impls


def _inputs(t, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (B, t, H, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, t, H, D), jnp.float32)
    v = jax.random.normal(ks[2], (B, t, H, D), jnp.float32)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, t, H), jnp.float32))
    do = jax.random.normal(ks[4], (B, t, H, D), jnp.float32)
    return (q, k, v, g), do


def _closures(fn, args, do):
    fwd = jax.jit(fn)

    @jax.jit
    def fwd_bwd(args, do):
        o, vjp = jax.vjp(fn, *args)
        return (o,) + vjp(do)

    return (lambda: fwd(*args)), (lambda: fwd_bwd(args, do)), (lambda: fwd_bwd.lower(args, do))


def cases(lengths=LENGTHS, impls=None):
    """One dict per (implementation, T); ``impls`` filters by name."""
    out = []
    for t in lengths:
        args, do = _inputs(t)
        for name, fn in _implementations(t).items():
            if impls is not None and name not in impls:
                continue
            fwd, fwd_bwd, lower = _closures(fn, args, do)
            out.append({"op": "simple_gla", "impl": name, "T": t, "H": H, "D": D, "fwd": fwd,
                        "fwd_bwd": fwd_bwd, "lower": lower})
    return out
