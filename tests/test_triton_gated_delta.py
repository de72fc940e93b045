"""The gated delta rule's Triton kernels under Triton's interpreter: what the op suite does not
cover (``tests/test_gated_delta.py`` runs the suite's triton rows: segments, an initial state,
grouped heads, l2norm, odd T, K != V at K = 24, V = 40).

Every case compares the output, the final state and the VJP of q, k, v, g, β and the initial
state (random cotangents on o and on the final state) with the token reference: D = 256 (K and
V over several tiles, B·H = 1), K != V with different tile counts (and segments), T shorter than
a chunk and T = several chunks + 1. Then the kernel table's refusals (K = 512 under an explicit
impl="triton"; "auto" through ``Op.supported`` under a faked sm_75 / sm_80 / sm_90
capability: dtype, size and architecture limits) and bf16 under the interpreter (a clear error).

Runs only in the interpreter process (``TRITON_INTERPRET=1``, Python 3.12 venv with triton):
    TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_gated_delta.py
Small shapes: the interpreter runs every program in numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import triton_call
from pallas_kernels.gated_delta import gated_delta_rule
from pallas_kernels.gated_delta.ops import OP
from tests.op_suite import segments
from tests.tolerance import assert_close

_WHY = triton_call.missing() or (None if triton_call.interpreter_on() else
                                 "run with TRITON_INTERPRET=1 (the interpreter process)")
pytestmark = pytest.mark.skipif(_WHY is not None,
                                reason=f"the gated delta rule's Triton kernels on CPU need "
                                       f"Triton's interpreter: {_WHY}")

F32 = jnp.float32
NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dinitial_state")


def inputs(seed, B, T, H, HV, K, V, dtype=F32):
    """q, k of norm ~1 [B, T, H, K], v, g = −softplus(x − 1), β = sigmoid(x), s0 [B, HV, K, V]."""
    rng = np.random.default_rng(seed)
    n = rng.standard_normal
    args = (n((B, T, H, K)) / K ** 0.5, n((B, T, H, K)) / K ** 0.5, n((B, T, HV, V)),
            -np.logaddexp(0.0, n((B, T, HV)) - 1.0), 1.0 / (1.0 + np.exp(-n((B, T, HV)))),
            0.5 * n((B, HV, K, V)))
    return tuple(jnp.asarray(x, dtype) for x in args[:5]) + (jnp.asarray(args[5], F32),)


def run(impl, args, seg, **kw):
    """(o, final state, VJP of every input) for fixed random cotangents."""
    def f(q, k, v, g, beta, s0):
        return gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                segment_ids=seg, impl=impl, **kw)

    (o, final), vjp = jax.vjp(f, *args)
    rng = np.random.default_rng(1)
    cts = (jnp.asarray(rng.standard_normal(o.shape), o.dtype),
           jnp.asarray(rng.standard_normal(final.shape), F32))
    return o, final, vjp(cts)


def check(B, T, H, HV, K, V, seg=None, **kw):
    args = inputs(0, B, T, H, HV, K, V)
    o, final, grads = jax.jit(lambda a: run("triton", a, seg, interpret=True, **kw))(args)
    o_ref, final_ref, grads_ref = jax.jit(lambda a: run("reference", a, seg, **kw))(args)
    assert o.shape == (B, T, HV, V) and o.dtype == F32
    assert_close(o, o_ref, F32, "out", "o")
    assert_close(final, final_ref, F32, "out", "final_state")
    for name, got, want in zip(NAMES, grads, grads_ref):
        assert_close(got, want, F32, "grad", name)


def test_d256_tiled_k_and_v():
    """K = V = 256: four K and V tiles in the parallel kernels, the state kernels' BS = 32."""
    check(B=1, T=40, H=1, HV=1, K=256, V=256)


@pytest.mark.parametrize("K, V", [(130, 20), (16, 200)])
def test_k_neq_v_tile_counts(K, V):
    """K padded to 256 (4 tiles) with V = 32 (1 tile), and K = 16 with V padded to 256;
    segments with a reset inside a chunk and trailing padding; grouped heads."""
    check(B=1, T=70, H=1, HV=2, K=K, V=V, seg=segments(70, [(1, 30), (2, 31)]))


@pytest.mark.parametrize("T", [20, 3 * 64 + 1])
def test_short_and_several_chunks(T):
    """T < the chunk of 64 and T = three chunks + 1, B·H = 1, l2norm and scale."""
    check(B=1, T=T, H=1, HV=1, K=32, V=16, use_qk_l2norm=True, scale=0.4)


# ------------------------------------------------------------------------------- the table
def _abstract(K, V, dtype):
    B, T, H = 1, 64, 2
    sds = jax.ShapeDtypeStruct
    return (sds((B, T, H, K), dtype), sds((B, T, H, K), dtype), sds((B, T, H, V), dtype),
            sds((B, T, H), dtype), sds((B, T, H), dtype))


def test_explicit_triton_refuses_k512():
    args = inputs(0, 1, 16, 1, 1, 512, 16)
    with pytest.raises(ValueError, match=r"impl='triton' cannot run this call: K padded to 512 "
                                         r"is over the kernels' largest 256"):
        gated_delta_rule(*args[:5], impl="triton", interpret=True)


@pytest.mark.parametrize("cc, K, dtype, want", [
    (90, 128, jnp.bfloat16, "triton"),
    (90, 256, F32, "triton"),
    (80, 256, jnp.bfloat16, "triton"),
    (80, 256, F32, "chunked"),           # float32 on sm_80: bwd_wy spills (TABLE.unsupported)
    (90, 512, jnp.bfloat16, "chunked"),
    (90, 64, jnp.float16, "chunked"),
    (75, 64, jnp.bfloat16, "chunked"),
])
def test_auto_through_the_table(cc, K, dtype, want):
    """impl="auto" takes the kernels only where the table does, under a faked capability."""
    with triton_call.target(cc):
        got = OP.supported("triton", "auto", _abstract(K, 64, dtype), {}, interpret=False)
    assert got == want


def test_bf16_under_the_interpreter_is_a_clear_error():
    args = inputs(0, 1, 16, 1, 1, 16, 16, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"interpret=True takes float32 or integer arrays"):
        gated_delta_rule(*args[:5], impl="triton", interpret=True)
