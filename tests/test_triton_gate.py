"""The compile gate over every Triton kernel (pallas_kernels/common/triton_gate.py).

Every op's kernel table × configuration × architecture (sm_80, sm_90a, sm_100a) is lowered for
CUDA on this CPU and each kernel assembled by Triton's bundled ptxas: a kernel over the
architecture's shared memory, spilling beyond its allowance, with serialized wgmma or with no
tensor-core instruction fails here, before any GPU sees it. Reports are cached by source hash
in tests/triton_gate_cache.json (a kernel edit recompiles what it touched); one configuration
per op is always compiled afresh. Needs the gpu-check extra and the interpreter off.
"""

from __future__ import annotations

import pathlib

import pytest

from pallas_kernels.common import triton_call

WHY = triton_call.missing() or ("the Triton interpreter is on in this process"
                                if triton_call.interpreter_on() else None)
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"the compile gate needs the gpu-check "
                                                        f"extra and no interpreter: {WHY}")
CACHE = pathlib.Path(__file__).with_name("triton_gate_cache.json")


def _tables():
    from pallas_kernels.common import triton_gate
    return triton_gate.tables()


ALL = [(op, dtype, sizes, cc) for op, table in _tables().items()
       for dtype, sizes in table.configurations() for cc in table.capabilities]
# What the dispatcher would run: the rest is refused by the table (checked below).
CASES = [c for c in ALL if _tables()[c[0]].refusal(*c[1:]) is None]


def _id(case):
    op, dtype, sizes, cc = case
    from pallas_kernels.common.triton_gate import config_label
    return f"{op}-{config_label(dtype, sizes).replace(' ', '-')}-sm{cc}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_every_kernel_fits_and_runs_on_the_tensor_cores(case):
    from pallas_kernels.common import triton_gate
    op, dtype, sizes, cc = case
    table = _tables()[op]
    reports = triton_gate.reports(table, dtype, sizes, cc, cache=CACHE)
    bad = [v for r in reports for v in triton_gate.violations(table, r)]
    assert not bad, "\n".join(bad)
    # The dispatcher's estimate may be conservative, never low: it is what refuses a shape.
    assert table.shared_bytes(dtype, sizes) >= max(r.shared for r in reports), (
        f"{op}: shared_bytes({dtype}, {sizes}) = {table.shared_bytes(dtype, sizes)} under the "
        f"compiled {max(r.shared for r in reports)} B")


@pytest.mark.parametrize("op", sorted(_tables()))
def test_one_configuration_compiles_afresh(op):
    """The pipeline itself (lowering, capture, ptxas) runs in CI, not only the cache."""
    from pallas_kernels.common import triton_gate
    table = _tables()[op]
    dtype, sizes = next((d, s) for d, s in table.configurations()
                        if d == "bfloat16" and set(s.values()) == {128})
    reports = triton_gate.compile_case(table, dtype, sizes, 90)
    assert reports and all(r.registers > 0 for r in reports)
    assert not [v for r in reports for v in triton_gate.violations(table, r)]


def test_refusals_are_few_and_stated():
    """The tables run every dtype and padded size on every architecture but where a stated
    shared-memory estimate is over the limit or the table names the (dtype, arch) pair it does
    not run on, with the gate's finding (then "auto" runs the portable form)."""
    refused = [(_id(c), _tables()[c[0]].refusal(*c[1:])) for c in ALL if c not in CASES]
    stated = lambda c, why: ("shared memory" in why
                             or (c[1], c[3]) in _tables()[c[0]].unsupported)
    assert all(stated(c, _tables()[c[0]].refusal(*c[1:])) for c in ALL if c not in CASES), refused
    assert len(refused) <= len(ALL) // 4, refused
