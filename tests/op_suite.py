"""The shared op-test base: every op's implementations against its token-level reference.

An op's test file subclasses :class:`OpSuite` and sets a few class attributes; pytest collects
the subclass (``class TestGla(OpSuite): ...``) and this base parametrises its tests over
implementation × dtype (``pytest_generate_tests`` below reads the subclass's attributes)::

    class TestSimpleGla(OpSuite):
        op = staticmethod(simple_gla)            # the public function
        step = staticmethod(simple_gla_step)     # step(*per_token_arrays, state, **kw) -> (o, state)
        make_inputs = staticmethod(inputs)       # (key, *, B, T, H, HV, K, V, dtype) -> arrays
        impls = ("chunked", "triton", "mosaic_tpu")
        lower_impls = ("triton", "mosaic_tpu")

Class attributes (the API): ``op``, ``step`` (None: no step test), ``make_inputs``, ``kwargs``
(static keywords of every call), ``impls`` (compared against "reference"; kernel impls run with
``interpret=True``), ``impl_kwargs`` ({impl: {kw: value}}), ``cases`` ({dtype name: shape}),
``state_shape(B, H, HV, K, V)`` (the float32 state), ``lower_impls`` (Pallas impls lowered for
TPU and CUDA from CPU). Extensions: ``plain_impls`` (impls that take neither segment_ids nor an
initial state: compared without them), ``packing_impls`` (the packing test's impls; default
"reference" and every impl that takes segment_ids), ``kernel_names`` ({impl: names that must
appear in the lowered forward + backward}) and ``compiler_options`` (passed to every
``jax.jit`` of the suite).

Tests, per subclass:
  * ``test_matches_reference[impl-dtype]``: output, final state, and the VJP of every float
    input and of the initial state for random cotangents, with segment_ids (a reset inside a
    chunk, trailing padding) and an initial state, at odd T, K != V and HV > H; padding
    outputs exactly 0. The reference's result is computed once per (class, dtype).
  * ``test_packing_equals_separate[impl]``: three packed documents + padding == each alone
    (the initial state on the first one); padding outputs exactly 0.
  * ``test_step_matches_reference``: the decode step token by token == the reference.
  * ``test_auto_is_chunked_on_cpu`` ("auto" traces to the program of "chunked");
    ``test_lowers[impl-seg]`` (forward + backward lowered for the impl's platform);
    ``test_bad_arguments[case]`` (wrong-rank q, mismatched v batch, HV % H != 0).

Triton rows (impl "triton") run only where Triton's interpreter is on (``TRITON_INTERPRET=1``,
the gpu-check process of ``.ci/run``) and in float32 only (:func:`skip_unless_runnable`);
``test_lowers[triton-*]`` needs triton, jax_triton and the CUDA plugin with the interpreter off,
and reads the kernel names from the kernels the lowering compiled.

Hooks for ops whose arguments do not fit (Titans): :meth:`call`, :meth:`call_step`,
:meth:`make_state`, :meth:`make_segments`, :meth:`case_kwargs`, :meth:`compare_state`,
:meth:`bad_arguments`. State trees may hold integer leaves (compared exactly, not
differentiated).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import triton_call
from pallas_kernels.common.frame import KERNEL_IMPLS
from tests.tolerance import assert_close

F32 = jnp.float32
# Lowering from CPU needs the target's device kind: from a CPU-only jaxlib, Mosaic rejects some
# block shapes (1-D blocks: "Unsupported TPU device kind: cpu") and jax >= 0.11 asks the GPU's
# kind for Triton's compute capability, so lowering runs under an abstract mesh of that device.
# impl -> (platform, device kind, device platform, custom-call marker).
TARGETS = {"mosaic_tpu": ("tpu", "TPU v5 lite", "tpu", "tpu_custom_call"),
           "triton": ("cuda", "NVIDIA H100 80GB HBM3", "gpu", "triton_kernel_call")}
_REFERENCE_CACHE: dict = {}


def skip_unless_runnable(impl: str, dtype: str) -> None:
    """Triton kernels run on CPU only in Triton's interpreter, in a process started with
    TRITON_INTERPRET=1 (the gpu-check run of .ci/run), and there in float32 only: the
    interpreter's bfloat16 arithmetic is wrong (triton-lang/triton#11584), so bf16 is checked by
    the compile gate (tests/test_triton_gate.py) and on a GPU (scripts/device_check.py)."""
    if impl != "triton":
        return
    why = triton_call.missing() or (None if triton_call.interpreter_on() else
                                    "run with TRITON_INTERPRET=1 (the interpreter process)")
    if why:
        pytest.skip(f"Triton kernels on CPU need Triton's interpreter: {why}")
    if dtype != "float32":
        pytest.skip("Triton's interpreter computes bfloat16 wrongly (triton#11584): bf16 is "
                    "checked by the compile gate and on a GPU")


def segments(T, *rows):
    """segment_ids [len(rows), T]: each row a list of (id, length), the rest padding (0)."""
    out = np.zeros((len(rows), T), np.int32)
    for r, spans in enumerate(rows):
        t = 0
        for seg_id, n in spans:
            out[r, t:t + n] = seg_id
            t += n
    return jnp.asarray(out)


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _per_token(x, B, T) -> bool:
    """Is ``x`` a ``[B, T, ...]`` input (sliced per token / per document), not a parameter?"""
    return hasattr(x, "ndim") and x.ndim >= 2 and tuple(x.shape[:2]) == (B, T)


def _split(tree):
    """(float leaves, rebuild(float leaves) -> tree): integer leaves are held constant."""
    leaves, treedef = jax.tree.flatten(tree)
    mask = [_is_float(x) for x in leaves]

    def rebuild(floats):
        it = iter(floats)
        return jax.tree.unflatten(treedef, [next(it) if m else x for m, x in zip(mask, leaves)])
    return [x for m, x in zip(mask, leaves) if m], rebuild


class OpSuite:
    op: Callable = None
    step: Callable | None = None
    make_inputs: Callable = None
    kwargs: dict = {}
    impls: tuple = ("chunked",)
    impl_kwargs: dict = {}
    cases: dict = {"float32": dict(B=2, T=70, H=2, HV=4, K=24, V=40),
                   "bfloat16": dict(B=2, T=37, H=2, HV=2, K=20, V=12)}
    state_shape: Callable = staticmethod(lambda B, H, HV, K, V: (B, HV, K, V))
    lower_impls: tuple = ()
    plain_impls: tuple = ()
    kernel_names: dict = {}
    packing_impls: tuple = ()        # default: "reference" and every impl taking segment_ids
    compiler_options: dict = {}      # for every jit of the suite (e.g. a fast-compile level)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        # A feature the op does not have is no test at all (rather than a skipped one).
        if cls.step is None:
            cls.test_step_matches_reference = None
        if not cls.lower_impls:
            cls.test_lowers = None

    def pytest_generate_tests(self, metafunc):
        name = metafunc.function.__name__
        if name == "test_matches_reference":
            metafunc.parametrize("impl", self.impls)
            metafunc.parametrize("dtype", list(self.cases))
        elif name == "test_packing_equals_separate":
            metafunc.parametrize("impl", self.packing_impls or ("reference",) + tuple(
                i for i in self.impls if i not in self.plain_impls))
        elif name == "test_lowers":
            metafunc.parametrize("impl,segments", [
                (i, s) for i in self.lower_impls
                for s in ((False,) if i in self.plain_impls else (False, True))],
                ids=lambda v: {False: "plain", True: "segments"}.get(v, v))
        elif name == "test_bad_arguments":
            cases = self.bad_arguments()
            metafunc.parametrize("bad", [c[1:] for c in cases], ids=[c[0] for c in cases])

    # ---------------------------------------------------------------------------------- hooks
    def call(self, impl, arrays, *, initial_state=None, segment_ids=None, **kw):
        """The op on ``arrays`` -> (o, final_state)."""
        return type(self).op(*arrays, initial_state=initial_state, segment_ids=segment_ids,
                             output_final_state=True, impl=impl, **kw)

    def call_step(self, arrays_t, state, **kw):
        """One decode step on per-token arrays ``[B, ...]`` -> (o, new_state)."""
        return type(self).step(*arrays_t, state, **kw)

    def make_state(self, key, shape, arrays):
        """A random float32 initial state of ``state_shape`` (``arrays``: the op's inputs)."""
        return 0.5 * jax.random.normal(key, shape, F32)

    def make_segments(self, B, T, dtype="float32"):
        """Row 0: three documents (resets inside a chunk) + trailing padding; row 1: two.
        None for a dtype: that case runs the op's segment-free path."""
        a, b, pad = max(1, 3 * T // 10), max(1, 4 * T // 10), max(1, T // 8)
        rows = [[1] * a + [2] * b + [3] * (T - a - b - pad) + [0] * pad,
                [4] * (T // 2) + [5] * (T - T // 2)]
        return jnp.asarray([rows[r % 2] for r in range(B)], jnp.int32)

    def case_kwargs(self, dtype):
        """Static keywords of the ``dtype`` case (default: ``kwargs``)."""
        return dict(self.kwargs)

    def compare_state(self, got, want, dtype, kind, name):
        for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            label = f"{name}{jax.tree_util.keystr(path)}"
            if _is_float(e):
                assert a.dtype == F32, f"{label}: state must be float32, got {a.dtype}"
                assert_close(a, e, dtype, kind, label)
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=label)

    def bad_arguments(self):
        """(id, positional arrays, match) triples that must raise ValueError; the arrays are
        ``jax.ShapeDtypeStruct``s (the errors are raised at trace time)."""
        arrays = jax.eval_shape(lambda: self.inputs("float32", B=1, T=8, H=2, HV=4, K=8, V=8))
        q, v = arrays[0], arrays[2]
        with_ = lambda i, shape: arrays[:i] + (jax.ShapeDtypeStruct(shape, arrays[i].dtype),
                                               ) + arrays[i + 1:]
        out = [("q_rank", with_(0, q.shape[1:]), r"q must have shape"),
               ("v_batch", with_(2, (2,) + v.shape[1:]), r"v must have shape")]
        if v.shape[2] != q.shape[2]:
            out.append(("heads_not_multiple", with_(2, v.shape[:2] + (3,) + v.shape[3:]),
                        r"v.*multiple of the"))
        return out

    # ------------------------------------------------------------------------------- helpers
    def inputs(self, dtype, *, seed=0, **shape):
        """``make_inputs`` as one jitted program (one compile, not one per random op); eagerly
        when it is not traceable (NumPy inside)."""
        make = functools.partial(type(self).make_inputs, dtype=jnp.dtype(dtype), **shape)
        key = jax.random.PRNGKey(seed)
        try:
            return tuple(jax.jit(make)(key))
        except jax.errors.JAXTypeError:
            return tuple(make(key))

    def jit(self, fn):
        return jax.jit(fn, compiler_options=self.compiler_options or None)

    def kw(self, impl, dtype="float32"):
        kernel = {"interpret": True} if impl in KERNEL_IMPLS else {}
        return {**self.case_kwargs(dtype), **kernel, **self.impl_kwargs.get(impl, {})}

    def case(self, dtype, impl):
        """Inputs, initial state, segment_ids and cotangents of the ``dtype`` case."""
        shape = self.cases[dtype]
        arrays = self.inputs(dtype, seed=1, **shape)
        plain = impl in self.plain_impls
        s0 = None if plain else self.make_state(
            jax.random.PRNGKey(2), type(self).state_shape(
                *(shape[k] for k in ("B", "H", "HV", "K", "V"))), arrays)
        seg = None if plain else self.make_segments(shape["B"], shape["T"], dtype)
        return arrays, s0, seg

    def vjp(self, impl, dtype, arrays, s0, seg):
        """(o, final_state, grads of the float leaves of (arrays, s0)) for fixed cotangents."""
        fa, rebuild_a = _split(arrays)
        fs, rebuild_s = _split(s0)
        kw = self.kw(impl, dtype)

        def f(fa, fs):
            o, final = self.call(impl, rebuild_a(fa), initial_state=rebuild_s(fs) if s0 is not
                                 None else None, segment_ids=seg, **kw)
            ffinal, _ = _split(final)
            return (o, ffinal), final

        @self.jit
        def run(fa, fs):
            out, vjp, final = jax.vjp(f, fa, fs, has_aux=True)
            # Cotangents drawn from a fixed key and the outputs' shapes: the same for every impl.
            ks = iter(jax.random.split(jax.random.PRNGKey(7), len(jax.tree.leaves(out))))
            cts = jax.tree.map(lambda x: jax.random.normal(next(ks), x.shape).astype(x.dtype),
                               out)
            return out[0], final, vjp(cts)
        return run(fa, fs)

    def reference(self, dtype, impl):
        key = (type(self), dtype, impl in self.plain_impls)
        if key not in _REFERENCE_CACHE:
            data = self.case(dtype, impl)
            _REFERENCE_CACHE[key] = data, self.vjp("reference", dtype, *data)
        return _REFERENCE_CACHE[key]

    # --------------------------------------------------------------------------------- tests
    def test_matches_reference(self, impl, dtype):
        skip_unless_runnable(impl, dtype)
        (arrays, s0, seg), (o_ref, s_ref, g_ref) = self.reference(dtype, impl)
        o, s, grads = self.vjp(impl, dtype, arrays, s0, seg)
        assert o.dtype == o_ref.dtype == jnp.dtype(dtype), (o.dtype, o_ref.dtype)
        assert_close(o, o_ref, dtype, "out", f"{impl} o")
        self.compare_state(s, s_ref, dtype, "out", f"{impl} final_state")
        names = ["d" + jax.tree_util.keystr(p) for p, x in
                 jax.tree_util.tree_leaves_with_path((arrays, s0)) if _is_float(x)]
        for name, a, e in zip(names, jax.tree.leaves(grads), jax.tree.leaves(g_ref)):
            assert a.dtype == e.dtype, name
            assert_close(a, e, dtype, "grad", f"{impl} {name}")
        if seg is not None:
            assert float(jnp.max(jnp.abs(o.astype(F32)) * (seg == 0)[:, :, None, None])) == 0.0

    def test_packing_equals_separate(self, impl):
        skip_unless_runnable(impl, "float32")
        lengths, pad = (37, 50, 20), 13
        shape = {**self.cases["float32"], "B": 1, "T": sum(lengths) + pad}
        arrays = self.inputs("float32", seed=3, **shape)
        s0 = self.make_state(jax.random.PRNGKey(4), type(self).state_shape(
            *(shape[k] for k in ("B", "H", "HV", "K", "V"))), arrays)
        ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])
        kw = self.kw(impl)
        o, final = self.jit(lambda a, s, seg: self.call(impl, a, initial_state=s, segment_ids=seg,
                                                       **kw))(arrays, s0, jnp.asarray(ids[None],
                                                                                      jnp.int32))
        alone = self.jit(lambda a, s: self.call(impl, a, initial_state=s, **kw))
        start = 0
        for i, n in enumerate(lengths):
            part = tuple(x[:, start:start + n] if _per_token(x, 1, shape["T"]) else x
                         for x in arrays)
            o_i, final_i = alone(part, s0 if i == 0 else None)
            assert_close(o[:, start:start + n], o_i, F32, "out", f"{impl} document {i}")
            start += n
        self.compare_state(final, final_i, F32, "out", "final state after the last document")
        np.testing.assert_array_equal(np.asarray(o[:, start:], F32), 0.0)

    def test_step_matches_reference(self):
        shape = {**self.cases["float32"], "T": 9}
        arrays = self.inputs("float32", seed=5, **shape)
        state = self.make_state(jax.random.PRNGKey(6), type(self).state_shape(
            *(shape[k] for k in ("B", "H", "HV", "K", "V"))), arrays)
        kw = self.case_kwargs("float32")
        o_ref, s_ref = self.call("reference", arrays, initial_state=state, **kw)
        per_token = [_per_token(x, shape["B"], shape["T"]) for x in arrays]
        step = self.jit(lambda xs, st: self.call_step(xs, st, **kw))
        for t in range(shape["T"]):
            o_t, state = step(tuple(x[:, t] if p else x for x, p in zip(arrays, per_token)), state)
            assert_close(o_t, o_ref[:, t], F32, "out", f"token {t}")
        self.compare_state(state, s_ref, F32, "out", "state")

    def test_auto_is_chunked_on_cpu(self):
        """"auto" traces to the very program of "chunked" (no compile needed)."""
        assert jax.default_backend() == "cpu"
        arrays = self.inputs("float32", seed=8, **{**self.cases["float32"], "T": 20})
        kw = {**self.case_kwargs("float32"), **self.impl_kwargs.get("chunked", {})}
        trace = lambda impl: str(jax.make_jaxpr(lambda a: self.call(impl, a, **kw))(arrays))
        assert trace("auto") == trace("chunked") != trace("reference")

    def test_lowers(self, impl, segments):
        if impl == "triton":
            why = triton_call.missing() or ("the Triton interpreter is on in this process"
                                            if triton_call.interpreter_on() else None)
            if why:
                pytest.skip(f"lowering Triton for CUDA needs the gpu-check extra: {why}")
        platform, kind, device_platform, marker = TARGETS[impl]
        shape = self.cases["float32"]
        arrays = jax.eval_shape(lambda: self.inputs("float32", **shape))
        seg = self.make_segments(shape["B"], shape["T"]) if segments else None
        kw = {**self.case_kwargs("float32"), **self.impl_kwargs.get(impl, {})}

        def fwd_bwd(arrays):                  # the forward's kernels are in it too
            fa, rebuild = _split(arrays)
            fwd = lambda fa: self.call(impl, rebuild(fa), segment_ids=seg, **kw)
            loss = lambda fa: sum(jnp.sum(x.astype(F32)) for x in _split(fwd(fa))[0])
            return jax.grad(loss)(fa)

        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
            device_kind=kind, num_cores=1, platform=device_platform))
        if impl == "triton":            # kernel names live in the compiled kernels, not the HLO
            from pallas_kernels.common import triton_gate
            with triton_gate.capture() as compiled:
                text = triton_gate.lower_for(fwd_bwd, (arrays,), 90).as_text()
            names = " ".join(res.name for res, _, _ in compiled)
        else:
            with jax.sharding.use_abstract_mesh(mesh):
                text = jax.jit(fwd_bwd).trace(arrays).lower(
                    lowering_platforms=(platform,)).as_text()
            names = text
        assert marker in text
        for name in self.kernel_names.get(impl, ()):
            assert name in names, f"{name} not in the lowered forward + backward"

    def test_bad_arguments(self, bad):
        arrays, match = bad
        kw = self.case_kwargs("float32")
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(lambda a: self.call("reference", a, **kw), arrays)
