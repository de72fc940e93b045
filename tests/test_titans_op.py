"""Titans memory op: the shared op suite for a linear memory with gradient block 16 (chunked
and the Pallas kernels against the token reference — outputs, final state, gradients — with
segment_ids and a continued state for chunked; packing; decoding; auto; lowering; argument
errors), plus Titans' own cases: MLP memories and other block sizes, split prefill, random
packings and states, momentum0 and per-row memories, decoding after a prefill, the remaining
argument checks.

Small shapes throughout (B=2, T=37, H=2, Dk=8, Dv=6, Dh=12): T odd and not a multiple of any
block size, Dk != Dv. A literal NumPy loop checks the reference itself against the math.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.titans import init_state, titans, titans_step
from tests.op_suite import OpSuite, skip_unless_runnable
from tests.tolerance import assert_close

B, T, H, DK, DV, DH = 2, 37, 2, 8, 6, 12
MEMORIES = ("linear", "mlp2")
# Two packed rows: documents of 7, 13, 9 tokens + 8 padding; 21, 16 tokens.
SEGMENTS = np.array([[1] * 7 + [2] * 13 + [3] * 9 + [0] * 8, [4] * 21 + [5] * 16], np.int32)
PACKED = [("linear", 16), ("mlp2", 4)]  # (memory, block size) of the packed cases


def make_inputs(seed, memory, *, t=T, dtype=jnp.float32):
    """Random inputs (NumPy's generator: jax.random would compile a program per shape)."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
    args = dict(
        q=normal((B, t, H, DK)) / DK ** 0.5,
        k=normal((B, t, H, DK)) / DK ** 0.5,
        v=normal((B, t, H, DV)),
        theta=0.1 * sigmoid(normal((B, t, H))),
        eta=sigmoid(normal((B, t, H)) + 1.0),
        alpha=0.1 * sigmoid(normal((B, t, H))),
    )
    if memory == "linear":
        mem0 = {"w": normal((H, DK, DV)) / DK ** 0.5}
    else:
        mem0 = {"w0": normal((H, DK, DH)) / DK ** 0.5, "w1": normal((H, DH, DV)) / DH ** 0.5}
    cast = lambda x: jnp.asarray(x, dtype)
    return {n: cast(x) for n, x in args.items()}, {n: cast(w) for n, w in mem0.items()}


GATES = ("q", "k", "v", "theta", "eta", "alpha")
KERNELS = ("triton", "mosaic_tpu")  # linear memory only; run interpreted on CPU
PARTS = ("memory", "momentum", "block_start")


def call(impl, args, mem0, b, **kw):
    return titans(*(args[n] for n in GATES), mem0, block_size=b, impl=impl,
                  output_final_state=True, interpret=impl in KERNELS, **kw)


# Tests compile many small programs and run each once: XLA's backend optimisations would cost
# more time than they save (the numerics are the same programs; only code generation differs).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
jit = partial(jax.jit, compiler_options=FAST_COMPILE)


@partial(jit, static_argnames=("impl", "b"))
def fwd(args, mem0, segment_ids=None, initial_state=None, momentum0=None, *, impl, b):
    return call(impl, args, mem0, b, segment_ids=segment_ids, initial_state=initial_state,
                momentum0=momentum0)


@partial(jit, static_argnames=("impl", "b"))
def _fwd_bwd(args, mem0, segment_ids, initial_state, cots, *, impl, b):
    weights = None if initial_state is None else {p: initial_state[p] for p in PARTS}

    def f(args, mem0, weights):
        st0 = None if weights is None else {**weights, "pos": initial_state["pos"]}
        y, st = call(impl, args, mem0, b, segment_ids=segment_ids, initial_state=st0)
        return (y, st["memory"], st["momentum"]), st

    outs, vjp, st = jax.vjp(f, args, mem0, weights, has_aux=True)
    return outs[0], st, vjp(cots)


def fwd_bwd(args, mem0, segment_ids=None, initial_state=None, *, impl, b):
    """(y, final state, grads): the gradients of a random linear function of (y, final memory,
    final momentum) w.r.t. args, memory0 and the float parts of ``initial_state``."""
    def outs(args, mem0):
        y, st = call(impl, args, mem0, b, segment_ids=segment_ids, initial_state=initial_state)
        return y, st["memory"], st["momentum"]

    rng = np.random.default_rng(b)
    cots = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype),
                        jax.eval_shape(outs, args, mem0))
    return _fwd_bwd(args, mem0, segment_ids, initial_state, cots, impl=impl, b=b)


def slice_t(args, start, stop):
    return {n: x[:, start:stop] for n, x in args.items()}


def check_state(actual, expected, dtype=jnp.float32, kind="out", name="state"):
    np.testing.assert_array_equal(actual["pos"], expected["pos"], err_msg=f"{name}: pos")
    for part in PARTS:
        for w in expected[part]:
            assert_close(actual[part][w], expected[part][w], dtype, kind, f"{name}.{part}.{w}")


def check_grads(ga, ge, dtype=jnp.float32):
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(ge)):
        assert_close(a, e, dtype, "grad", "grad " + jax.tree_util.keystr(path))


def check_run(chunked, reference, dtype=jnp.float32, name=""):
    """Compare two ``fwd_bwd`` results: output, final state, gradients."""
    assert_close(chunked[0], reference[0], dtype, name=f"{name} y")
    check_state(chunked[1], reference[1], dtype, name=f"{name} state")
    check_grads(chunked[2], reference[2], dtype)


# --------------------------------------------------------------------------- the shared suite


def _suite_inputs(key, *, B, T, H, HV, K, V, dtype):
    """q, k, v, θ, η, α as in ``make_inputs`` and a linear memory0 {"w": [H, K, V]} (HV = H)."""
    ks = jax.random.split(key, 7)
    n = lambda kk, shape: jax.random.normal(kk, shape)
    args = (n(ks[0], (B, T, H, K)) / K ** 0.5, n(ks[1], (B, T, H, K)) / K ** 0.5,
            n(ks[2], (B, T, H, V)), 0.1 * jax.nn.sigmoid(n(ks[3], (B, T, H))),
            jax.nn.sigmoid(n(ks[4], (B, T, H)) + 1.0), 0.1 * jax.nn.sigmoid(n(ks[5], (B, T, H))))
    return tuple(x.astype(dtype) for x in args) + ({"w": (n(ks[6], (H, K, V)) / K ** 0.5)
                                                     .astype(dtype)},)


class TestTitansLinear(OpSuite):
    """Linear memory, b = 16: T = 37 ends mid-block; bf16 T = 32 is whole blocks. The kernels
    take neither segment_ids nor a state (``plain_impls``)."""
    op = staticmethod(titans)
    step = staticmethod(titans_step)
    make_inputs = staticmethod(_suite_inputs)
    kwargs = {"block_size": 16}
    impls = ("chunked",) + KERNELS
    plain_impls = KERNELS
    packing_impls = ("chunked",)                          # as before the suite
    cases = {"float32": dict(B=B, T=T, H=H, HV=H, K=DK, V=DV),
             "bfloat16": dict(B=B, T=32, H=H, HV=H, K=DK, V=DV)}
    lower_impls = KERNELS
    kernel_names = {"triton": ("titans_fwd_h", "titans_fwd_o", "titans_bwd_dh", "titans_bwd_dk"),
                    "mosaic_tpu": ("titans_linear_fwd_tpu", "titans_linear_bwd_tpu")}
    compiler_options = FAST_COMPILE

    def make_state(self, key, shape, arrays):
        """A continued state: memory0 plus noise in every part, pos mid-block."""
        mem0 = arrays[6]
        state = init_state(mem0, arrays[0].shape[0])
        ks = iter(jax.random.split(key, 4))
        for part in PARTS:
            state[part] = {n: w + 0.1 * jax.random.normal(next(ks), w.shape)
                           for n, w in state[part].items()}
        state["pos"] = jax.random.randint(next(ks), (arrays[0].shape[0],), 0, 16, jnp.int32)
        return state

    def call_step(self, arrays_t, state, **kw):
        return titans_step(*arrays_t[:6], state, arrays_t[6], **kw)


# --------------------------------------------------------------------------- the reference itself


def _numpy_titans(args, mem0, b, segment_ids):
    """The paper's recurrence written out literally (float64, hand-derived gradients, silu)."""
    a = {n: np.asarray(x, np.float64) for n, x in args.items()}
    names = sorted(mem0)
    w0 = [np.asarray(mem0[n], np.float64) for n in names]
    silu = lambda z: z / (1 + np.exp(-z))
    dsilu = lambda z: (1 + np.exp(-z) + z * np.exp(-z)) / (1 + np.exp(-z)) ** 2

    def forward(ws, x):
        hs, zs = [x], []
        for l, w in enumerate(ws):
            zs.append(hs[-1] @ w)
            hs.append(silu(zs[-1]) if l < len(ws) - 1 else zs[-1])
        return hs, zs

    y = np.zeros(a["v"].shape)
    for bi in range(B):
        for h in range(H):
            doc = None
            for t in range(T):
                if segment_ids[bi, t] == 0:
                    continue
                if segment_ids[bi, t] != doc:  # new document: fresh memory, momentum, block
                    doc, start = segment_ids[bi, t], t
                    mem = [w[h].copy() for w in w0]
                    mom = [np.zeros_like(m) for m in mem]
                if (t - start) % b == 0:
                    ref = [m.copy() for m in mem]
                hs, zs = forward(ref, a["k"][bi, t, h])
                e = 2 * (zs[-1] - a["v"][bi, t, h])
                grads = [None] * len(ref)
                for l in range(len(ref) - 1, -1, -1):
                    grads[l] = np.outer(hs[l], e)
                    if l:
                        e = (e @ ref[l].T) * dsilu(zs[l - 1])
                th, et, al = (a[n][bi, t, h] for n in ("theta", "eta", "alpha"))
                mom = [et * s - th * g for s, g in zip(mom, grads)]
                mem = [(1 - al) * m + s for m, s in zip(mem, mom)]
                y[bi, t, h] = forward(mem, a["q"][bi, t, h])[0][-1]
    return y


@pytest.mark.parametrize("memory,b", PACKED)
def test_reference_matches_literal_loop(memory, b):
    args, mem0 = make_inputs(0, memory)
    y, _, _ = fwd_bwd(args, mem0, jnp.asarray(SEGMENTS), impl="reference", b=b)
    assert_close(y, _numpy_titans(args, mem0, b, SEGMENTS), jnp.float32, name="y")


# --------------------------------------------------------------------------- chunked vs reference


# (linear, 16) is TestTitansLinear's case.
@pytest.mark.parametrize("memory,b", [("linear", 1), ("linear", 4), ("mlp2", 1), ("mlp2", 4),
                                      ("mlp2", 16)])
def test_chunked_matches_reference(memory, b):
    args, mem0 = make_inputs(1, memory)
    got, want = fwd_bwd(args, mem0, impl="chunked", b=b), fwd_bwd(args, mem0, impl="reference", b=b)
    check_run(got, want)
    np.testing.assert_array_equal(want[1]["pos"], [T % b] * B)


def test_chunked_matches_reference_bf16():
    args, mem0 = make_inputs(2, "mlp2", dtype=jnp.bfloat16)
    got, want = fwd_bwd(args, mem0, impl="chunked", b=4), fwd_bwd(args, mem0, impl="reference", b=4)
    assert got[0].dtype == jnp.bfloat16 and got[1]["memory"]["w0"].dtype == jnp.float32
    check_run(got, want, jnp.bfloat16)


# --------------------------------------------------------------------------- Pallas kernels


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("b", [32])                       # b = 16: TestTitansLinear
def test_kernel_matches_reference(impl, b):
    """Linear memory through the Pallas kernels (interpreted): T = 37 is not a multiple of b
    (the final block_start is then the memory entering the last block), Dk = 8 != Dv = 6."""
    skip_unless_runnable(impl, "float32")
    args, mem0 = make_inputs(11, "linear")
    got = fwd_bwd(args, mem0, impl=impl, b=b)
    want = fwd_bwd(args, mem0, impl="reference", b=b)
    check_run(got, want, name=f"{impl} b={b}")


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("memory,b", PACKED[1:])      # linear, 16: TestTitansLinear
def test_packed_equals_separate(memory, b):
    args, mem0 = make_inputs(4, memory)
    seg = jnp.asarray(SEGMENTS)
    got = fwd_bwd(args, mem0, seg, impl="chunked", b=b)
    check_run(got, fwd_bwd(args, mem0, seg, impl="reference", b=b), name="packed")
    y_p, st_p, _ = got
    assert not np.any(np.asarray(y_p)[0, 29:]), "padding tokens must output 0"
    # Each document alone: one per row of a new batch, starting at token 0, padded after.
    docs = [(row, doc) for row in range(B) for doc in np.unique(SEGMENTS[row][SEGMENTS[row] > 0])]
    spans = [np.nonzero(SEGMENTS[row] == doc)[0][[0, -1]] + [0, 1] for row, doc in docs]
    alone = {n: jnp.stack([jnp.pad(x[row, lo:hi], [(0, T - hi + lo)] + [(0, 0)] * (x.ndim - 2))
                           for (row, _), (lo, hi) in zip(docs, spans)]) for n, x in args.items()}
    seg_alone = jnp.asarray([[1] * (hi - lo) + [0] * (T - hi + lo) for lo, hi in spans], jnp.int32)
    y_s, st_s = fwd(alone, mem0, seg_alone, impl="chunked", b=b)
    for i, ((row, doc), (lo, hi)) in enumerate(zip(docs, spans)):
        assert_close(y_p[row, lo:hi], y_s[i, :hi - lo], jnp.float32, name=f"doc {doc}")
    for row in range(B):  # the row's final state is that of its last document
        i = max(i for i, (r, _) in enumerate(docs) if r == row)
        check_state(jax.tree.map(lambda x: x[row], st_p), jax.tree.map(lambda x: x[i], st_s),
                    name=f"row {row} final state")


# --------------------------------------------------------------------------- continued states


@pytest.mark.parametrize("memory,b,splits", [("linear", 16, (23, 30)), ("mlp2", 4, (16, 5))])
def test_split_prefill_equals_one_call(memory, b, splits):
    """Prefill in two pieces == one piece, packed, cut mid-block: linear b=16 at 23 leaves pos
    3 / 7 in rows 0 / 1, at 30 row 0 is all padding after the cut; mlp2 b=4 at 16 leaves pos
    1 / 0 (aligned), at 5 pos 1 / 1."""
    args, mem0 = make_inputs(5, memory)
    seg = jnp.asarray(SEGMENTS)
    y_full, st_full, _ = fwd_bwd(args, mem0, seg, impl="chunked", b=b)
    for split in splits:
        y1, st1 = fwd(slice_t(args, 0, split), mem0, seg[:, :split], impl="chunked", b=b)
        y2, st2 = fwd(slice_t(args, split, T), mem0, seg[:, split:], st1, impl="chunked", b=b)
        assert_close(jnp.concatenate([y1, y2], axis=1), y_full, jnp.float32, name=f"split {split}")
        check_state(st2, st_full, name=f"split {split}")


def random_case(seed, memory, b):
    """Random packing (1-4 documents, trailing padding, sometimes an all-padding row) and a
    random initial state (block_start != memory, any pos)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for row in range(B):
        used = 0 if rng.random() < 0.15 else int(rng.integers(T - 8, T + 1))
        cuts = np.sort(rng.choice(np.arange(1, max(used, 2)), size=min(int(rng.integers(0, 4)),
                                                                         max(used - 1, 0)),
                                  replace=False)) if used else []
        bounds = [0, *cuts, used]
        for d in range(len(bounds) - 1):
            seg[row, bounds[d]:bounds[d + 1]] = d + 1
    args, mem0 = make_inputs(100 + seed, memory)
    state = init_state(mem0, B)
    for part in PARTS:
        state[part] = {n: w + 0.1 * rng.standard_normal(w.shape, np.float32)
                       for n, w in state[part].items()}
    state["pos"] = jnp.asarray(rng.integers(0, b, size=B), jnp.int32)
    return args, mem0, jnp.asarray(seg), state


@pytest.mark.parametrize("memory,b", PACKED)
def test_random_packing_and_states(memory, b):
    """chunked == reference (outputs, final state, gradients incl. w.r.t. the initial state) for
    random document layouts and random continued states."""
    for seed in range(4):
        args, mem0, seg, state = random_case(seed, memory, b)
        got = fwd_bwd(args, mem0, seg, state, impl="chunked", b=b)
        check_run(got, fwd_bwd(args, mem0, seg, state, impl="reference", b=b), name=f"seed {seed}")
        empty = np.nonzero(np.asarray(seg).max(axis=1) == 0)[0]
        for row in empty:  # an all-padding row keeps its state and outputs 0
            assert not np.any(np.asarray(got[0])[row])
            np.testing.assert_array_equal(got[1]["pos"][row], state["pos"][row])


def test_momentum0_and_batched_memory0():
    """momentum0 == the same momentum in an initial_state; a per-row memory0 [B, H, ...] is the
    initial memory and the reset target of its own row (packed rows, chunked == reference)."""
    t = 11
    args, mem0 = make_inputs(6, "mlp2", t=t)
    seg = jnp.asarray([[1] * 5 + [2] * 6, [3] * 9 + [0] * 2], jnp.int32)
    mom0 = jax.tree.map(lambda w: 0.1 * jnp.cos(w), mem0)
    y_a, st_a = fwd(args, mem0, seg, momentum0=mom0, impl="chunked", b=4)
    y_b, st_b = fwd(args, mem0, seg, init_state(mem0, B, mom0), impl="chunked", b=4)
    assert_close(y_a, y_b, jnp.float32, name="momentum0 vs initial_state")
    check_state(st_a, st_b)
    y_0, _ = fwd(args, mem0, seg, impl="chunked", b=4)
    assert not np.allclose(y_0[:, :5], y_a[:, :5]), "momentum0 must matter"
    mem0_rows = {n: jnp.stack([w, 1.1 * w]) for n, w in mem0.items()}  # row 1 differs
    y_c, st_c = fwd(args, mem0_rows, seg, momentum0=mom0, impl="chunked", b=4)
    y_d, st_d = fwd(args, mem0_rows, seg, momentum0=mom0, impl="reference", b=4)
    assert_close(y_c, y_d, jnp.float32, name="per-row memory0, chunked vs reference")
    check_state(st_c, st_d)
    assert_close(y_c[0], y_a[0], jnp.float32, name="row 0 has the shared memory0")
    assert not np.allclose(y_c[1], y_a[1])


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("memory", MEMORIES)
def test_step_by_step_equals_chunked(memory):
    """Decode every token with titans_step (from a fresh state, and after a prefill that ends
    mid-block) == the chunked op over the whole sequence, block boundaries included."""
    b, prefill = 4, 6
    args, mem0 = make_inputs(1, memory)
    y_full, st_full, _ = fwd_bwd(args, mem0, impl="chunked", b=b)
    step = jit(lambda x, st: titans_step(*(x[n] for n in GATES), st, mem0, block_size=b))
    _, st_prefill = fwd(slice_t(args, 0, prefill), mem0, impl="chunked", b=b)
    assert list(st_prefill["pos"]) == [prefill % b] * B
    for first, st in ((0, init_state(mem0, B)), (prefill, st_prefill)):
        ys = []
        for i in range(first, T):
            y, st = step({n: x[:, i] for n, x in args.items()}, st)
            ys.append(y)
        assert_close(jnp.stack(ys, 1), y_full[:, first:], jnp.float32, name=f"decode from {first}")
        check_state(st, st_full, name=f"decode from {first}")
    y0, st0 = titans_step(*(args[n][:, 0] for n in GATES), None, mem0, block_size=b)
    assert_close(y0, y_full[:, 0], jnp.float32, name="step from state=None")


# --------------------------------------------------------------------------- argument checks


def test_bad_inputs_raise():
    args, mem0 = make_inputs(8, "mlp2", t=5)
    q, k, v, th, et, al = (args[n] for n in ("q", "k", "v", "theta", "eta", "alpha"))

    def run(**over):
        a = dict(q=q, k=k, v=v, theta=th, eta=et, alpha=al, memory0=mem0)
        kw = dict(block_size=4)
        for n, x in over.items():
            (a if n in a else kw)[n] = x
        return titans(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("theta"), a.pop("eta"),
                      a.pop("alpha"), a.pop("memory0"), **kw)

    with pytest.raises(ValueError, match=r"k must have shape \[2, 5, 2, 8\]"):
        run(k=k[..., :7])
    with pytest.raises(ValueError, match=r"theta must have shape \[2, 5, 2\]"):
        run(theta=th[..., None])
    with pytest.raises(TypeError, match="v must be a floating dtype"):
        run(v=v.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"memory0\['w0'\] must have shape \[H=2, Dk=8, Dh\]"):
        run(memory0={"w0": mem0["w0"][:, :5], "w1": mem0["w1"]})
    with pytest.raises(ValueError, match=r"memory0\['w1'\] must have shape \[H=2, Dh=12, Dv=6\]"):
        run(memory0={"w0": mem0["w0"], "w1": mem0["w1"][..., :4]})
    with pytest.raises(ValueError, match="memory0 keys must be"):
        run(memory0={"w0": mem0["w0"]})
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        run(block_size=0)
    with pytest.raises(ValueError, match="activation='swish' is not one of"):
        run(activation="swish")
    with pytest.raises(ValueError, match="impl='triton' runs a linear memory"):
        run(impl="triton")
    with pytest.raises(ValueError, match="impl='mosaic_tpu' runs a linear memory"):
        run(impl="mosaic_tpu")
    with pytest.raises(ValueError, match="impl='mosaic_gpu' is not implemented"):
        run(impl="mosaic_gpu")
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[2, 5\]"):
        run(segment_ids=jnp.ones((2, 4), jnp.int32))
    state = init_state(mem0, 2)
    with pytest.raises(ValueError, match=r"initial_state\['momentum'\]\['w1'\] must have shape "
                                         r"\[B=2, H=2, Dh=12, Dv=6\]"):
        run(initial_state={**state, "momentum": {"w0": state["momentum"]["w0"],
                                                 "w1": mem0["w1"]}})
    with pytest.raises(ValueError, match=r"initial_state\['pos'\] must have shape \[2\]"):
        run(initial_state={**state, "pos": jnp.zeros((3,), jnp.int32)})
    with pytest.raises(ValueError, match="momentum0 or initial_state, not both"):
        run(initial_state=state, momentum0=mem0)
    with pytest.raises(ValueError, match=r"titans_step: q must have shape \[B, H, Dk\]"):
        titans_step(q, k, v, th, et, al, None, mem0, block_size=4)


@pytest.mark.parametrize("bad", ["theta", "eta", "alpha"])
def test_debug_checks_catch_bad_gates(bad):
    from jax.experimental import checkify

    args, mem0 = make_inputs(9, "linear", t=6)
    q, k, v, th, et, al = (args[n] for n in ("q", "k", "v", "theta", "eta", "alpha"))
    titans(q, k, v, th, et, al, mem0, block_size=4, debug_checks=True)  # valid: no error
    over = {"theta": dict(theta=th.at[0, 2, 1].set(-0.1)), "eta": dict(eta=et.at[1, 0, 0].set(1.2)),
            "alpha": dict(alpha=al.at[0, 5, 0].set(-1.0))}[bad]
    a = {**dict(theta=th, eta=et, alpha=al), **over}
    with pytest.raises(checkify.JaxRuntimeError, match=f"titans: {bad} must be"):
        titans(q, k, v, a["theta"], a["eta"], a["alpha"], mem0, block_size=4, debug_checks=True)
    step = jax.jit(checkify.checkify(partial(titans_step, block_size=4, debug_checks=True)))
    err, _ = step(q[:, 0], k[:, 0], v[:, 0], a["theta"][:, 0], a["eta"][:, 0], a["alpha"][:, 0],
                  None, mem0)
    sliced_bad = {"theta": False, "eta": True, "alpha": False}[bad]  # only η's bad value is at t=0
    assert (err.get() is not None) == sliced_bad
