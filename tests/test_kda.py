"""kda: the chunked form against the token-level reference (shared OpSuite), plus KDA's own checks.

OpSuite covers output, final state and VJPs with segment_ids and an initial state (odd T, K != V,
grouped heads) in float32 and bfloat16, packing, the decode step, "auto" and argument errors.
Here: strong per-channel decay over a long sequence (cumulative decay of −100 and below inside a
chunk beside channels that never decay), the reduction to gated_delta_rule when g does not vary
across channels, debug_checks, and shape errors.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import checkify

from pallas_kernels.gated_delta import gated_delta_rule
from pallas_kernels.kda import kda, kda_step
from pallas_kernels.kda.chunked import kda_chunked
from tests.offload import offload
from tests.op_suite import OpSuite
from tests.tolerance import assert_close

F32 = jnp.float32


def make_inputs(key, *, B, T, H, HV, K, V, dtype):
    """q, k of norm ~1 (a stable recurrence); g = −softplus(x − 1) per channel; β = sigmoid."""
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (B, T, H, K)) / K ** 0.5
    k = jax.random.normal(ks[1], (B, T, H, K)) / K ** 0.5
    v = jax.random.normal(ks[2], (B, T, HV, V))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, HV, K)) - 1.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, HV)))
    return tuple(x.astype(dtype) for x in (q, k, v, g, beta))


class TestKda(OpSuite):
    op = staticmethod(kda)
    step = staticmethod(kda_step)
    make_inputs = staticmethod(make_inputs)
    impl_kwargs = {"chunked": {"chunk_size": 16}}

    def case_kwargs(self, dtype):
        return {"use_qk_l2norm": dtype == "bfloat16"}

    def bad_arguments(self):
        arrays = self.inputs("float32", B=1, T=8, H=2, HV=4, K=8, V=8)
        with_ = lambda i, x: arrays[:i] + (x,) + arrays[i + 1:]
        return super().bad_arguments() + [
            ("g_scalar_gate", with_(3, arrays[3][..., 0]), r"g must have shape \[1, 8, 4, 8\]"),
            ("g_qk_heads", with_(3, arrays[3][:, :, :2]), r"g must have shape \[1, 8, 4, 8\]"),
            ("beta_rank", with_(4, arrays[4][..., None]), r"beta must have shape \[1, 8, 4\]"),
        ]


def _vjp(fn, args, seed=9):
    """(outputs, grads of every arg) of ``fn(*args) -> (o, final)`` for random cotangents."""
    out, pull = jax.vjp(fn, *args)
    keys = jax.random.split(jax.random.PRNGKey(seed), 2)
    cts = tuple(jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, out))
    return out, pull(cts)


@offload
def test_strong_decay_long_sequence():
    """T = 4096 at the default chunk size: per-channel decays whose in-chunk cumulative sum
    reaches −100 and far below (steady −4 and −35 per token, single tokens of −60) beside channels
    with g = 0 exactly, over many blocks of chunks. Output, state and gradients match the
    reference (no overflow, no NaN)."""
    B, T, H, HV, K, V = 1, 4096, 1, 2, 8, 6
    q, k, v, _, beta = make_inputs(jax.random.PRNGKey(0), B=B, T=T, H=H, HV=HV, K=K, V=V,
                                   dtype=F32)
    t = jnp.arange(T)[None, :, None]
    g = jnp.stack([jnp.zeros((B, T, HV)),                                # never decays
                   jnp.full((B, T, HV), -4.0),                           # −4 per token
                   jnp.where(t % 45 == 7, -60.0, 0.0) * jnp.ones((B, T, HV)),   # rare jumps
                   jnp.where(t % 2 == 0, -8.0, -0.01) * jnp.ones((B, T, HV)),
                   jnp.zeros((B, T, HV)),
                   -jax.nn.softplus(jax.random.normal(jax.random.PRNGKey(1), (B, T, HV))),
                   jnp.full((B, T, HV), -35.0),                          # −35 per token
                   jnp.zeros((B, T, HV))], axis=-1)                      # [B, T, HV, K]
    s0 = 0.5 * jax.random.normal(jax.random.PRNGKey(2), (B, HV, K, V))
    args = (q, k, v, g, beta, s0)

    def run(impl, **kw):
        fn = lambda q, k, v, g, beta, s0: kda(q, k, v, g, beta, initial_state=s0,
                                              output_final_state=True, impl=impl, **kw)
        return jax.jit(lambda *a: _vjp(fn, a))(*args)

    (o, final), grads = run("chunked")
    (o_ref, final_ref), grads_ref = run("reference")
    assert_close(o, o_ref, F32, "out", "o")
    assert_close(final, final_ref, F32, "out", "final_state")
    for name, a, e in zip(("dq", "dk", "dv", "dg", "dbeta", "ds0"), grads, grads_ref):
        assert_close(a, e, F32, "grad", name)


@offload
def test_reduces_to_gated_delta_rule():
    """g_t the same for every key channel is gated_delta_rule with that scalar g: row 0 has
    g = 0 (DeltaNet), row 1 a random scalar gate per head and token; packed documents and an
    initial state."""
    B, T, H, HV, K, V = 2, 45, 2, 4, 12, 10
    q, k, v, g, beta = make_inputs(jax.random.PRNGKey(3), B=B, T=T, H=H, HV=HV, K=K, V=V,
                                   dtype=F32)
    g_scalar = g[..., 0].at[0].set(0.0)                                  # [B, T, HV]
    s0 = 0.5 * jax.random.normal(jax.random.PRNGKey(4), (B, HV, K, V))
    seg = jnp.asarray([[1] * 20 + [2] * 20 + [0] * 5, [3] * 45], jnp.int32)
    common = dict(initial_state=s0, output_final_state=True, segment_ids=seg,
                  use_qk_l2norm=True)
    g_k = jnp.broadcast_to(g_scalar[..., None], (B, T, HV, K))
    o, final = jax.jit(lambda *a: kda(*a, impl="chunked", **common))(q, k, v, g_k, beta)
    o_gd, final_gd = jax.jit(lambda *a: gated_delta_rule(*a, impl="reference", **common))(
        q, k, v, g_scalar, beta)
    assert_close(o, o_gd, F32, "out", "o")
    assert_close(final, final_gd, F32, "out", "final_state")


def test_blocks_of_chunks_and_sub_chunks():
    """Several blocks of chunks (the backward's reverse walk), a chunk size that is not a power
    of two and a sub-chunk that does not divide it give the reference's output and VJP."""
    B, T, H, HV, K, V = 1, 100, 1, 2, 8, 8
    q, k, v, g, beta = make_inputs(jax.random.PRNGKey(5), B=B, T=T, H=H, HV=HV, K=K, V=V,
                                   dtype=F32)
    args = (q, k, v, g, beta)
    want, want_grads = _vjp(lambda *a: kda(*a, output_final_state=True, impl="reference"), args)
    for chunk, sub, rows in ((24, 16, 48),):
        fn = lambda *a: kda_chunked(*a, output_final_state=True, chunk_size=chunk,
                                    sub_chunk=sub, block_rows=rows)
        got, grads = jax.jit(lambda *a: _vjp(fn, a))(*args)
        label = f"C={chunk} sub={sub} rows={rows}"
        for a, e in zip(got, want):
            assert_close(a, e, F32, "out", label)
        for name, a, e in zip(("dq", "dk", "dv", "dg", "dbeta"), grads, want_grads):
            assert_close(a, e, F32, "grad", f"{label} {name}")


def test_debug_checks_catch_bad_values():
    """β outside [0, 1] or g > 0 raise eagerly, and under jit through checkify."""
    q, k, v, g, beta = make_inputs(jax.random.PRNGKey(6), B=1, T=8, H=1, HV=1, K=4, V=4,
                                   dtype=F32)
    checked = checkify.checkify(jax.jit(lambda *a: kda(*a, debug_checks=True)))
    err, _ = checked(q, k, v, g, beta)
    err.throw()                                                          # valid: no error
    for name, bad in (("beta", (g, beta.at[0, 3, 0].set(1.5))),
                      ("g", (g.at[0, 2, 0, 1].set(0.1), beta))):
        with pytest.raises(checkify.JaxRuntimeError, match=name):
            kda(q, k, v, *bad, debug_checks=True)
        err, _ = checked(q, k, v, *bad)
        with pytest.raises(checkify.JaxRuntimeError, match=name):
            err.throw()


def _bad(**changes):
    args = dict(zip(("q", "k", "v", "g", "beta"),
                    make_inputs(jax.random.PRNGKey(0), B=1, T=8, H=2, HV=4, K=6, V=5, dtype=F32)))
    args.update(changes)
    return args


@pytest.mark.parametrize("kwargs, error, match", [
    (_bad(k=jnp.zeros((1, 8, 2, 7))), ValueError, r"k must have shape \[1, 8, 2, 6\]"),
    (_bad(g=jnp.zeros((1, 8, 4, 5))), ValueError, r"g must have shape \[1, 8, 4, 6\]"),
    (_bad(beta=jnp.zeros((1, 8, 2))), ValueError, r"beta must have shape \[1, 8, 4\]"),
    (_bad(g=jnp.zeros((1, 8, 4, 6), jnp.int32)), TypeError, "g must be a floating dtype"),
    (_bad(segment_ids=jnp.ones((1, 7), jnp.int32)), ValueError, r"segment_ids must have shape"),
    (_bad(initial_state=jnp.zeros((1, 2, 6, 5))), ValueError,
     r"initial_state must have shape \[1, 4, 6, 5\]"),
    (_bad(impl="triton"), ValueError, r"impl='triton' is not implemented"),
])
def test_bad_inputs_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        kda(**kwargs)


def test_step_bad_inputs_raise():
    q, v, beta = jnp.zeros((2, 2, 4)), jnp.zeros((2, 4, 3)), jnp.zeros((2, 4))
    state = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match=r"g must have shape \[2, 4, 4\]"):
        kda_step(q, q, v, beta, beta, state)                              # a scalar gate
    with pytest.raises(ValueError, match=r"state must have shape \[2, 4, 4, 3\]"):
        kda_step(q, q, v, jnp.zeros((2, 4, 4)), beta, state[..., :2])
