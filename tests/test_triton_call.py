"""The Triton launch path itself (pallas_kernels/common/triton_call.py, jax_triton_compat.py).

Runs in the gpu-check venv (triton, jax-triton, the CUDA plugin): the interpreter checks need a
process started with TRITON_INTERPRET=1, the lowering checks one without it; each test skips
in the other process, and everything skips where triton is not installed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import triton_call

pytestmark = pytest.mark.skipif(triton_call.missing() is not None,
                                reason=f"needs the gpu-check extra: {triton_call.missing()}")
interpreted = pytest.mark.skipif(not triton_call.interpreter_on(),
                                 reason="needs TRITON_INTERPRET=1 (the interpreter process)")
compiled = pytest.mark.skipif(triton_call.interpreter_on(),
                              reason="lowering needs the compiler: the interpreter is on here")


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def scaled_matmul(x_ptr, y_ptr, o_ptr, rowsum_ptr, M: tl.constexpr, N: tl.constexpr,
                      K: tl.constexpr, SCALE: tl.constexpr):
        """o = SCALE · x @ y per program's block of 64 rows; rowsum = Σ_j o[i, j]. (Triton puts
        a dot of fewer than 64 rows on mma.sync even on sm_90a/sm_100a: no wgmma/tcgen05.)"""
        rows = tl.program_id(0) * 64 + tl.arange(0, 64)
        ks, ns = tl.arange(0, K), tl.arange(0, N)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :])
        y = tl.load(y_ptr + ks[:, None] * N + ns[None, :])
        o = tl.dot(x, y) * SCALE
        tl.store(o_ptr + rows[:, None] * N + ns[None, :], o.to(o_ptr.dtype.element_ty))
        tl.store(rowsum_ptr + rows, tl.sum(o, axis=1))
    return scaled_matmul


def _call(x, y, interpret):
    M, K = x.shape
    N = y.shape[1]
    return triton_call.launch(_kernels(), x, y, out_shape=[jax.ShapeDtypeStruct((M, N), x.dtype),
                                                           jax.ShapeDtypeStruct((M,), jnp.float32)],
                              grid=(M // 64,), interpret=interpret, M=M, N=N, K=K, SCALE=0.5)


@interpreted
def test_interpreter_runs_the_kernel_under_jit_vmap_free_and_grad_free():
    x = jax.random.normal(jax.random.key(0), (128, 32))
    y = jax.random.normal(jax.random.key(1), (32, 16))
    o, rowsum = jax.jit(lambda a, b: _call(a, b, True))(x, y)
    want = 0.5 * np.asarray(x, np.float64) @ np.asarray(y, np.float64)
    np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rowsum), want.sum(1), rtol=1e-5, atol=1e-4)


@interpreted
def test_interpreter_refuses_bfloat16_with_the_reason():
    x = jnp.ones((64, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 wrongly"):
        _call(x, x, True)


@compiled
def test_interpret_needs_the_interpreter_switched_on():
    x = jnp.ones((64, 64), jnp.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _call(x, x, True)


@compiled
@pytest.mark.parametrize("cc, instruction", [(80, "mma.sync"), (90, "wgmma.mma_async"),
                                             (100, "tcgen05.mma")])
def test_lowers_for_each_arch_with_its_tensor_core_instruction(cc, instruction):
    from pallas_kernels.common import triton_gate
    from pallas_kernels.common.triton_support import ARCHS
    x = jax.ShapeDtypeStruct((128, 64), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)
    with triton_gate.capture() as results:
        text = triton_gate.lower_for(lambda a, b: _call(a, b, False), (x, y), cc).as_text()
    assert "triton_kernel_call" in text
    (res, options, target), = results
    assert target.arch == cc and res.name == "scaled_matmul"
    assert f".version {triton_call.PTX_VERSION // 10}.{triton_call.PTX_VERSION % 10}" in res.binary
    report = triton_gate._report("test", "bf16", ARCHS[cc], res, options)
    assert report.tensor_core > 0 and report.spills == 0 and report.registers > 0


@compiled
def test_capability_comes_from_target_then_the_device():
    assert triton_call.capability() is None               # this machine has no GPU
    with triton_call.target(90):
        with triton_call.target(100):
            assert triton_call.capability() == 100
        assert triton_call.capability() == 90
    assert triton_call.capability() is None


@compiled
def test_the_dce_shim_keeps_every_input_with_two_or_three_arguments():
    from jax._src.interpreters import partial_eval as pe

    from pallas_kernels.common import jax_triton_compat
    jt = triton_call.jax_triton()
    rule = pe.dce_rules[jt.triton_lib.triton_kernel_call_p]
    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    closed = jax.make_jaxpr(lambda a, b: _call(a, b, False)[1])(x, x)
    eqn, = [e for e in closed.jaxpr.eqns if e.primitive is jt.triton_lib.triton_kernel_call_p]
    for extra in ((), (None,)):                            # jax <= 0.11 passes 2, 0.12 passes 3
        used, kept = jax_triton_compat.keep_every_input([False, True], eqn, *extra)
        assert used == [True] * len(eqn.invars) and kept is eqn
    assert jax_triton_compat._takes(rule, 2) and jax_triton_compat._takes(rule, 3)
    dced, used_inputs = pe.dce_jaxpr(closed.jaxpr, [True])
    assert used_inputs == [True, True] and any(
        e.primitive is jt.triton_lib.triton_kernel_call_p for e in dced.eqns)


@interpreted
def test_interpreter_keeps_each_pointers_dtype_across_calls():
    """int32 and float32 inputs in alternating positions, many calls: every pointer keeps its
    element type. (The gated delta rule's wrapper saw int32 and float32 pointers mixed up at
    random with a fresh dtype object per array; one object per dtype fixed it there. This
    small case passes either way: it guards the adapter's dtype mapping.)"""
    import triton
    import triton.language as tl

    @triton.jit
    def ids_first(ids_ptr, x_ptr, o_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        ids, x = tl.load(ids_ptr + i), tl.load(x_ptr + i)
        tl.store(o_ptr + i, tl.where(ids == 1, x, 0.0) + ids.to(tl.float32))

    @triton.jit
    def x_first(x_ptr, ids_ptr, o_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        ids, x = tl.load(ids_ptr + i), tl.load(x_ptr + i)
        tl.store(o_ptr + i, tl.where(ids == 1, x, 0.0) + ids.to(tl.float32))

    x = jnp.arange(64, dtype=jnp.float32) / 7
    ids = (jnp.arange(64) % 3).astype(jnp.int32)
    want = np.where(np.asarray(ids) == 1, np.asarray(x), 0.0) + np.asarray(ids, np.float32)
    out = [jax.ShapeDtypeStruct((64,), jnp.float32)]
    for i in range(16):
        args = (ids_first, ids, x) if i % 2 else (x_first, x, ids)
        o, = triton_call.launch(*args, out_shape=out, grid=(1,), interpret=True, N=64)
        np.testing.assert_array_equal(np.asarray(o), want)
