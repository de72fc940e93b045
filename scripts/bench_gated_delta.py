"""Benchmark cases for ``gated_delta_rule`` (consumed by scripts/bench_kernels.py).

``cases()`` returns dicts {"op", "impl", "T", "H", "D", "fwd", "fwd_bwd", "lower"}: ``fwd`` and
``fwd_bwd`` are zero-argument callables over jitted functions with inputs prebuilt; each returns
arrays (call ``jax.block_until_ready`` on the result); ``lower()`` lowers the forward+backward with
the inputs as arguments (for XLA's memory analysis). B = 1, float32, T in (1024, 4096, 16384),
(H, D) in ((4, 64), (2, 128)). Implementations: "chunked", "reference" (T <= 4096), "triton"
when ``jax.default_backend() == "gpu"``, and the peer package ``jax-linear-attention``'s chunked
gated delta rule as "peer:jla-chunked" when it is importable.

Run them with ``python scripts/bench_kernels.py --ops gated_delta_rule``.
"""

from __future__ import annotations


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
