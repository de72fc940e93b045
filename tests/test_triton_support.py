"""The dispatcher's view of a Triton kernel family (triton_support.KernelTable, Op.supported).

Pure Python: runs in the main suite without triton, on a made-up table and op.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.common import triton_call
from pallas_kernels.common import frame
from pallas_kernels.common.frame import Op
from pallas_kernels.common.triton_support import ARCHS, KernelTable, padded

F32 = jnp.float32


def _table(shared=lambda dtype, sizes: 1000 * sizes["K"]):
    return KernelTable(
        op="toy", max_sizes={"K": 256, "V": 256},
        request=lambda arrays, static: (jnp.dtype(arrays[0].dtype).name,
                                        {"K": padded(arrays[0].shape[-1]),
                                         "V": padded(arrays[1].shape[-1])}),
        shared_bytes=shared, gate_case=None)


def _arrays(K=64, V=32, dtype=F32):
    return (jax.ShapeDtypeStruct((1, 8, 2, K), dtype), jax.ShapeDtypeStruct((1, 8, 2, V), dtype))


def test_padding_is_a_power_of_two_of_at_least_16():
    assert [padded(n) for n in (1, 16, 17, 100, 128, 129, 256)] == [16, 16, 32, 128, 128, 256, 256]


@pytest.mark.parametrize("arrays, cc, interpret, expected", [
    (_arrays(), 90, False, None),
    (_arrays(), None, True, None),                            # the interpreter needs no GPU
    (_arrays(K=300), 90, False, "K padded to 512 is over the kernels' largest 256"),
    (_arrays(dtype=jnp.float16), 90, False, "dtype float16 is not one of"),
    (_arrays(), 75, False, "compute capability 75 is not one of (80, 90, 100)"),
    (_arrays(), None, False, "no GPU to run on"),
    (_arrays(K=250), 80, False, "needs ~256000 B of shared memory"),     # 163 KB on sm_80
])
def test_problem_names_the_limit(arrays, cc, interpret, expected):
    got = _table().problem(arrays, {}, cc, interpret)
    assert (got is None) if expected is None else (expected in got), got


def test_an_unsupported_dtype_and_arch_pair_is_refused_with_its_reason():
    import dataclasses
    table = dataclasses.replace(_table(), unsupported={("float32", 80): "kernel x spills"})
    assert table.refusal("float32", {"K": 64, "V": 64}, 80) == "float32 on sm_80: kernel x spills"
    assert table.refusal("bfloat16", {"K": 64, "V": 64}, 80) is None
    assert table.refusal("float32", {"K": 64, "V": 64}, 90) is None


def test_configurations_cover_every_dtype_and_bucket_and_one_mixed_pair():
    got = _table().configurations()
    assert ("float32", {"K": 64, "V": 64}) in got and ("bfloat16", {"K": 256, "V": 256}) in got
    assert ("bfloat16", {"K": 64, "V": 256}) in got and len(got) == 2 * 3 + 2


def test_arch_limits():
    assert ARCHS[80].shared_limit == 163 * 1024 and ARCHS[90].shared_limit == 227 * 1024


def _op(tables):
    return Op("toy_op_" + str(len(tables)), impls={"chunked": "x:y", "triton": "x:y"},
              tables=tables)


def test_auto_falls_back_with_a_logged_reason_and_explicit_is_an_error(monkeypatch, caplog):
    import sys
    import types
    module = types.ModuleType("toy_triton_table")
    module.TABLE = _table()
    monkeypatch.setitem(sys.modules, "toy_triton_table", module)
    monkeypatch.setattr(triton_call, "missing", lambda: None)
    monkeypatch.setattr(frame, "_REGISTRY", dict(frame._REGISTRY))    # the toy op stays local
    op = _op({"triton": "toy_triton_table:TABLE"})
    big = _arrays(K=512)
    with triton_call.target(90):
        assert op.supported("triton", "auto", _arrays(), {}, False) == "triton"
        with caplog.at_level(logging.WARNING):
            assert op.supported("triton", "auto", big, {}, False) == "chunked"
        assert "runs 'chunked' instead of 'triton': K padded to 512" in caplog.text
        with pytest.raises(ValueError, match=r"impl='triton' cannot run this call: K padded"):
            op.supported("triton", "triton", big, {}, False)
    monkeypatch.setattr(triton_call, "missing", lambda: "triton is not importable")
    with pytest.raises(ValueError, match="triton is not importable"):
        op.supported("triton", "triton", _arrays(), {}, False)
