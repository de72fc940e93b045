"""Titans linear memory's Triton kernels under Triton's interpreter: what the op suite does not
cover (``tests/test_titans_op.py`` runs the suite's triton rows at b = 16, Dk = 8, Dv = 6).

Every case compares the output, the final state and the VJP of every input (random cotangents
on y and on the final memory, momentum and block_start) with the token reference: D = 256 (K and
V over several tiles, B·H = 1), K != V with different tile counts, T shorter than a block and
T = several blocks + 1, the largest block. Then the kernel table's refusals (K = 512, block sizes
outside 16..64, "auto" under a faked sm_90 capability) and bf16 under the interpreter.

Runs only in the interpreter process (``TRITON_INTERPRET=1``, Python 3.12 venv with triton):
    TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_titans.py
Small shapes: the interpreter runs every program in numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import triton_call
from pallas_kernels.titans import titans
from tests.tolerance import assert_close

_WHY = triton_call.missing() or (None if triton_call.interpreter_on() else
                                 "run with TRITON_INTERPRET=1 (the interpreter process)")
pytestmark = pytest.mark.skipif(_WHY is not None,
                                reason=f"Titans' Triton kernels on CPU need Triton's interpreter: "
                                       f"{_WHY}")

GATES = ("q", "k", "v", "theta", "eta", "alpha")


def inputs(seed, B, T, H, K, V, dtype=jnp.float32):
    """q, k [B, T, H, K] / sqrt(K), v, gates in their ranges, memory0 {"w": [H, K, V]}."""
    rng = np.random.default_rng(seed)
    n = rng.standard_normal
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    args = dict(q=n((B, T, H, K)) / K ** 0.5, k=n((B, T, H, K)) / K ** 0.5, v=n((B, T, H, V)),
                theta=0.1 * sig(n((B, T, H))), eta=sig(n((B, T, H)) + 1.0),
                alpha=0.1 * sig(n((B, T, H))))
    return ({name: jnp.asarray(x, dtype) for name, x in args.items()},
            {"w": jnp.asarray(n((H, K, V)) / K ** 0.5, dtype)})


def run(impl, args, mem0, b):
    """(y, final state, grads w.r.t. args and memory0) for fixed random cotangents."""
    def f(args, mem0):
        y, st = titans(*(args[g] for g in GATES), mem0, block_size=b, impl=impl,
                          output_final_state=True, interpret=impl == "triton")
        return (y, st["memory"], st["momentum"], st["block_start"]), st

    outs, vjp, st = jax.vjp(f, args, mem0, has_aux=True)
    rng = np.random.default_rng(b)
    cts = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), outs)
    return outs[0], st, vjp(cts)


def check(B, T, H, K, V, b, seed=0):
    args, mem0 = inputs(seed, B, T, H, K, V)
    step = jax.jit(run, static_argnums=(0, 3))
    y, st, grads = step("triton", args, mem0, b)
    y_ref, st_ref, grads_ref = step("reference", args, mem0, b)
    assert_close(y, y_ref, jnp.float32, "out", "y")
    np.testing.assert_array_equal(st["pos"], st_ref["pos"])
    for part in ("memory", "momentum", "block_start"):
        assert_close(st[part]["w"], st_ref[part]["w"], jnp.float32, "out", f"state {part}")
    for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree.leaves(grads_ref)):
        assert_close(g, g_ref, jnp.float32, "grad", "d" + jax.tree_util.keystr(path))


def test_d256_tiled_k_and_v():
    """K = V = 256: the recurrence kernels hold 16 of 256 value columns, the output kernel loops
    over 4 key tiles, bwd_dk over 8 key × 8 value tiles; B·H = 1; T = 20 ends mid-block."""
    check(B=1, T=20, H=1, K=256, V=256, b=16)


def test_k_ne_v_different_tile_counts():
    """Dk = 24 (padded 32: one key tile), Dv = 130 (padded 256: several value tiles); T = 3
    blocks + 1 token."""
    check(B=1, T=49, H=2, K=24, V=130, b=16)


def test_t_shorter_than_a_block():
    check(B=2, T=9, H=1, K=16, V=16, b=16)


def test_largest_block():
    """b = 64 over two blocks and a partial third: T = 2·64 + 1, K > V."""
    check(B=1, T=129, H=1, K=40, V=16, b=64)


# --------------------------------------------------------------------------- the kernel table
def test_explicit_triton_refuses_k_512():
    args, mem0 = inputs(1, 1, 16, 1, 512, 16)
    with pytest.raises(ValueError, match=r"impl='triton' cannot run this call: K padded to 512 "
                                         r"is over the kernels' largest 256"):
        jax.eval_shape(lambda a, m: run("triton", a, m, 16), args, mem0)


@pytest.mark.parametrize("b", [8, 48, 128])
def test_explicit_triton_refuses_block_sizes(b):
    args, mem0 = inputs(1, 1, 16, 1, 16, 16)
    with pytest.raises(ValueError, match=r"block_size a power of two in 16\.\.64"):
        jax.eval_shape(lambda a, m: run("triton", a, m, b), args, mem0)


def test_auto_under_sm90_takes_triton_or_falls_back():
    """``Op.supported`` with the capability faked to sm_90: D = 128 runs the kernels, K = 512
    falls back to "chunked"; the same K = 512 under an explicit impl is the ValueError."""
    from pallas_kernels.titans.ops import OP
    small = tuple(inputs(2, 1, 16, 1, 128, 128)[0][g] for g in GATES)
    large = tuple(inputs(2, 1, 16, 1, 512, 64)[0][g] for g in GATES)
    static = {"block_size": 16}
    with triton_call.target(90):
        assert OP.supported("triton", "auto", small, static, interpret=False) == "triton"
        assert OP.supported("triton", "auto", large, static, interpret=False) == "chunked"
        with pytest.raises(ValueError, match="K padded to 512"):
            OP.supported("triton", "triton", large, static, interpret=False)


def test_interpreter_refuses_bf16():
    args, mem0 = inputs(3, 1, 16, 1, 16, 16, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"interpret=True takes float32 or integer arrays.*"
                                         r"bfloat16"):
        jax.eval_shape(lambda a, m: run("triton", a, m, 16), args, mem0)
