"""simple_gla's Triton kernels under Triton's interpreter: what the op suite does not cover
(``tests/test_simple_gla.py`` runs the suite's triton rows at T = 100, K = 24, V = 40, HV = 4 > H).

Every numeric case compares the output, the final state and the VJP of q, k, v, g and the
initial state (random cotangents on o and the final state) with the token reference: D = 256
(K and V over four tiles each, B·H = 1, T shorter than one chunk), K != V with different tile
counts (one K tile, four V tiles), T = three chunks + 1 with documents packed across chunk
boundaries, and Mamba-2 SSD through the kernels. Then the kernel table's refusals (K = 512
under an explicit impl="triton"; "auto" through ``Op.supported`` under a faked sm_90 / sm_75
capability) and bf16 under the interpreter.

Runs only in the interpreter process (``TRITON_INTERPRET=1``, Python 3.12 venv with triton):
    TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_simple_gla.py
Small shapes: the interpreter runs every program in numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import triton_call
from pallas_kernels.simple_gla import simple_gla, ssd
from pallas_kernels.simple_gla.gpu import DEFAULT_CHUNK, tiles
from pallas_kernels.simple_gla.ops import OP
from tests.tolerance import assert_close

_WHY = triton_call.missing() or (None if triton_call.interpreter_on() else
                                 "run with TRITON_INTERPRET=1 (the interpreter process)")
pytestmark = pytest.mark.skipif(_WHY is not None,
                                reason=f"simple_gla's Triton kernels on CPU need Triton's "
                                       f"interpreter: {_WHY}")
F32 = jnp.float32


def inputs(seed, B, T, H, HV, K, V, dtype=F32):
    """q, k [B, T, H, K] / sqrt(K), v [B, T, HV, V], g = -softplus(x - 1) [B, T, HV], s0."""
    rng = np.random.default_rng(seed)
    n = rng.standard_normal
    q, k = n((B, T, H, K)) / K ** 0.25, n((B, T, H, K)) / K ** 0.25
    v, g = n((B, T, HV, V)), -np.logaddexp(0.0, n((B, T, HV)) - 1.0)
    s0 = 0.5 * n((B, HV, K, V))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, g)) + (jnp.asarray(s0, F32),)


def run(impl, args, segment_ids=None):
    """(o, final state, grads of q, k, v, g, s0) for fixed random cotangents."""
    def f(q, k, v, g, s0):
        return simple_gla(q, k, v, g, initial_state=s0, output_final_state=True,
                          segment_ids=segment_ids, impl=impl, interpret=impl == "triton")

    @jax.jit
    def go(args):
        out, vjp = jax.vjp(f, *args)
        keys = jax.random.split(jax.random.PRNGKey(7), 2)
        cts = tuple(jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, out))
        return out, vjp(cts)
    return go(args)


def check(args, segment_ids=None):
    (o, s), grads = run("triton", args, segment_ids)
    (o_ref, s_ref), grads_ref = run("reference", args, segment_ids)
    assert o.dtype == args[2].dtype and s.dtype == F32
    assert_close(o, o_ref, F32, "out", "o")
    assert_close(s, s_ref, F32, "out", "final_state")
    for name, a, e in zip(("dq", "dk", "dv", "dg", "ds0"), grads, grads_ref):
        assert a.dtype == e.dtype, name
        assert_close(a, e, F32, "grad", name)
    return o


def test_d256_tiled_short_sequence():
    """K = V = 256: four K tiles x four V tiles in the recurrences, four-tile loops in the
    chunk-parallel kernels; T = 20 < one chunk; B·H = 1."""
    assert tiles("simple_gla_fwd_o", F32, 256, 256) == (64, 64)
    check(inputs(0, B=1, T=20, H=1, HV=1, K=256, V=256))


def test_k_neq_v_tile_counts():
    """K = 32 (one tile of 32) against V = 160 (padded to 256: four tiles), grouped heads."""
    assert tiles("simple_gla_bwd_dv", F32, 32, 256) == (32, 64)
    check(inputs(1, B=1, T=40, H=1, HV=2, K=32, V=160))


def test_chunks_plus_one_packed():
    """T = 3 chunks + 1 with resets inside a chunk, on a chunk boundary and trailing padding."""
    t = 3 * DEFAULT_CHUNK + 1
    ids = np.zeros((2, t), np.int32)
    ids[0, :50], ids[0, 50:DEFAULT_CHUNK * 2], ids[0, DEFAULT_CHUNK * 2:t - 9] = 1, 2, 3
    ids[1, :DEFAULT_CHUNK], ids[1, DEFAULT_CHUNK:] = 4, 5
    o = check(inputs(2, B=2, T=t, H=1, HV=1, K=16, V=16), jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(o[0, t - 9:]), 0.0)


def test_ssd_through_triton():
    """Mamba-2 SSD (grouped B/C heads, scale 1, state transposed at the boundary) on the
    kernels: output, final state and the gradients of x, dt, B, C against the reference."""
    rng = np.random.default_rng(5)
    n = lambda *shape: jnp.asarray(rng.standard_normal(shape), F32)
    x, dt, a, bm, cm = n(1, 40, 4, 12), n(1, 40, 4) - 1.0, -jnp.exp(n(4)), n(1, 40, 2, 10), \
        n(1, 40, 2, 10)

    def run_ssd(impl):
        def f(x, dt, bm, cm):
            return ssd(x, dt, a, bm, cm, output_final_state=True, impl=impl,
                       interpret=impl == "triton")

        @jax.jit
        def go(x, dt, bm, cm):
            out, vjp = jax.vjp(f, x, dt, bm, cm)
            return out, vjp(jax.tree.map(jnp.cos, out))
        return go(x, dt, bm, cm)

    (y, h), grads = run_ssd("triton")
    (y_ref, h_ref), grads_ref = run_ssd("reference")
    assert_close(y, y_ref, F32, "out", "y")
    assert_close(h, h_ref, F32, "out", "final state [B, H, P, N]")
    for name, a_, e_ in zip(("dx", "ddt", "dB", "dC"), grads, grads_ref):
        assert_close(a_, e_, F32, "grad", name)


def _shapes(K, V, dtype=F32):
    return (jax.ShapeDtypeStruct((1, 64, 2, K), dtype),) * 2 + (
        jax.ShapeDtypeStruct((1, 64, 2, V), dtype), jax.ShapeDtypeStruct((1, 64, 2), F32))


def test_explicit_triton_refuses_k512():
    q, k, v, g, _ = inputs(3, B=1, T=8, H=1, HV=1, K=512, V=16)
    with pytest.raises(ValueError, match=r"impl='triton' cannot run this call: K padded to 512 "
                                         r"is over the kernels' largest 256"):
        simple_gla(q, k, v, g, impl="triton", interpret=True)


def test_auto_falls_back_by_table():
    """Op.supported with a faked capability: the table takes K = V = 128 on sm_90, sends K = 512
    and an unchecked architecture (sm_75) to "chunked" under "auto", and errors when explicit."""
    static = {"scale": 1.0}
    with triton_call.target(90):
        assert OP.supported("triton", "auto", _shapes(128, 128), static, False) == "triton"
        assert OP.supported("triton", "auto", _shapes(128, 128, jnp.bfloat16), static,
                            False) == "triton"
        assert OP.supported("triton", "auto", _shapes(512, 128), static, False) == "chunked"
        with pytest.raises(ValueError, match="V padded to 512"):
            OP.supported("triton", "triton", _shapes(64, 300), static, False)
    with triton_call.target(75):
        assert OP.supported("triton", "auto", _shapes(64, 64), static, False) == "chunked"
        with pytest.raises(ValueError, match="compute capability 75"):
            OP.supported("triton", "triton", _shapes(64, 64), static, False)


def test_bf16_under_the_interpreter_is_a_clear_error():
    q, k, v, g, _ = inputs(4, B=1, T=8, H=1, HV=1, K=16, V=16, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="interpret=True takes float32 or integer arrays"):
        simple_gla(q, k, v, g, impl="triton", interpret=True)
