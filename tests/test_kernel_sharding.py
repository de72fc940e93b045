"""Ops on a mesh with heads on "tensor": kernels per (batch, head) shard, the fallback, constraints.

The mesh checks run once in a subprocess with 8 simulated CPU devices
(``tests/sharded_kernels.py heads``, its docstring lists what it measures; started beside the
suite once the tests are collected, tests/background.py); the placement rules
themselves are checked here under abstract meshes, with no devices.
"""

import json
import logging
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType

from pallas_kernels.common import sharding
from pallas_kernels.common.frame import registered_ops
from tests import background
from tests.sharded_kernels import kernel_cases

HEADS = background.job("sharded_kernels_heads", ["tests/sharded_kernels.py", "heads"], timeout=900)
BACKGROUND_JOBS = {"checks": [HEADS]}   # runs beside the suite (tests/background.py)


def _mesh(shape):
    return AbstractMesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _sds(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


@pytest.fixture(scope="module")
def checks():
    rc, out, err = HEADS.wait()
    assert rc == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _kernel_ops():
    """Ops with an interpret-mode Pallas kernel (attention() takes no ``interpret``: its splash
    kernel's shard_map and fallback are lowered in tests/test_attention.py)."""
    return {name for name, _ in kernel_cases()}


def test_every_kernel_op_runs_per_batch_and_head_shard(checks):
    """(2, 1, 4), heads on tensor: the shard_map splits every array's heads, the compiled
    forward + backward has no all-gather, and loss and gradients equal one device's."""
    kernel_ops = _kernel_ops()
    assert {"simple_gla", "gated_delta_rule", "titans"} <= kernel_ops
    cases = checks["numerics"]
    assert {c.split("/")[0] for c in cases if "/chunked" not in c} == kernel_ops
    for case, got in cases.items():
        if case.split("/")[0] in kernel_ops or case.startswith(("simple_gla/", "gla/")):
            assert got["specs"], f"{case}: no shard_map"
            assert all("'tensor'" in s for s in got["specs"]), f"{case}: {got['specs']}"
        assert got["all_gathers"] == [], f"{case}: {got['all_gathers']}"
        assert got["error"] < 1e-5, f"{case}: relative error {got['error']}"
    assert "hgrn/chunked" in cases and "kda/chunked/grouped" in cases


def test_kernels_lower_for_tpu_on_a_tensor_mesh_and_fall_back_on_a_batch_of_3(checks):
    """(1, 1, 8): the Mosaic kernel inside shard_map (unsharded it would not lower); (8, 1, 1)
    with B=3: no kernel (chunked), one warning naming op, shapes and mesh."""
    tpu_ops = {n for n in _kernel_ops() if "mosaic_tpu" in registered_ops()[n].impls}
    for name in tpu_ops:
        assert checks["tpu"][f"{name}/(1,1,8)"] == {"kernel": True, "shard_map": True}, name
        assert checks["tpu"][f"{name}/(8,1,1)b3"]["kernel"] is False, name
        notes = [w for w in checks["warnings"] if w.startswith(f"{name}: impl='mosaic_tpu'")]
        assert len(notes) == 1, checks["warnings"]
        assert "runs 'chunked'" in notes[0] and "batch 3" in notes[0] and "data=8" in notes[0]
        assert "[3, 32, 8, 16]" in notes[0]


def test_kernels_trace_per_shard_without_a_final_state():
    """output_final_state=False (training): each kernel's shard_map returns o alone."""
    for name in sorted(_kernel_ops()):
        op = registered_ops()[name]
        arrays = jax.eval_shape(lambda: op.bench.inputs(jax.random.PRNGKey(0), B=2, T=16, H=4,
                                                        D=16))
        f = lambda a: op.function(*a, impl="mosaic_tpu", interpret=True, **op.bench.kwargs)
        with jax.sharding.use_abstract_mesh(_mesh((2, 1, 2))):
            (o, final), jaxpr = jax.eval_shape(f, arrays), str(jax.make_jaxpr(f)(arrays))
        assert o.shape == arrays[2].shape and final is None, name
        assert "shard_map" in jaxpr and "P('data', None, 'tensor', None)" in jaxpr, name


def test_shard_problem_names_what_does_not_divide():
    q, v, g = _sds(4, 8, 4, 16), _sds(4, 8, 8, 16), _sds(4, 8, 8)
    with jax.sharding.use_abstract_mesh(_mesh((2, 1, 4))):
        layout = sharding.mesh_layout()
        assert layout.batch == ("data",) and layout.heads == "tensor"
        assert sharding.shard_problem(layout, (q, q, v, g), (2, 2, 2, 2)) is None
        odd = sharding.shard_problem(layout, (_sds(3, 8, 4, 16),), (2,))
        assert odd == "batch 3 is not a multiple of data = 2"
        few = sharding.shard_problem(layout, (_sds(4, 8, 2, 16), v), (2, 2),
                                     initial_state=_sds(4, 8, 16, 16))
        assert few == "head count(s) [2] not a multiple of tensor = 4"
    with jax.sharding.use_abstract_mesh(_mesh((1, 1, 1))):
        assert sharding.mesh_layout() is None


def test_grouped_heads_stay_aligned_in_contiguous_blocks():
    """Value head j reads q/k head j // G: block i of HV heads maps onto block i of H heads."""
    assert sharding.groups_aligned([4, 8, 8], 4) and sharding.groups_aligned([2, 6], 2)
    assert sharding.groups_aligned([8, 32], 8)


def test_a_kernel_that_cannot_shard_gives_way_to_chunked_once(caplog):
    op = registered_ops()["simple_gla"]
    arrays = (_sds(3, 8, 4, 16),) * 3 + (_sds(3, 8, 4),)
    with jax.sharding.use_abstract_mesh(_mesh((2, 1, 2))), caplog.at_level(logging.WARNING):
        assert op.placed("mosaic_tpu", arrays) == "chunked"
        assert op.placed("mosaic_tpu", arrays) == "chunked"
        assert op.placed("reference", arrays) == "reference"
        o, _ = jax.eval_shape(lambda a: op.function(*a, impl="mosaic_tpu"), arrays)
    notes = [r.getMessage() for r in caplog.records if r.name == sharding.__name__]
    assert len(notes) == 1, notes
    assert notes[0].startswith("simple_gla: impl='mosaic_tpu' runs 'chunked' instead on mesh "
                               "data=2, fsdp=1, tensor=2: batch 3 is not a multiple of data = 2")
    assert o.shape == (3, 8, 4, 16)
    with jax.sharding.use_abstract_mesh(_mesh((1, 1, 2))):
        assert op.placed("mosaic_tpu", arrays) == "mosaic_tpu"


@pytest.mark.parametrize("batch, heads, spec", [(3, 4, "P(None, None, 'tensor', None)"),
                                                (4, 3, "P('data', None, None, None)")])
def test_a_chunked_form_that_scans_the_batch_runs_on_the_part_of_the_mesh_that_divides(
        batch, heads, spec):
    """simple_gla's chunked scan runs over B·NB blocks (Op.shard_map_impls): a batch of 3
    splits its heads only, 3 heads its batch only; nothing is logged (it is no fallback)."""
    op = registered_ops()["simple_gla"]
    arrays = (_sds(batch, 8, heads, 16),) * 3 + (_sds(batch, 8, heads),)
    f = lambda a: op.function(*a, impl="chunked")
    with jax.sharding.use_abstract_mesh(_mesh((2, 1, 2))):
        jaxpr = str(jax.make_jaxpr(f)(arrays))
    assert re.search(r"in_specs=\(" + re.escape(spec), jaxpr), jaxpr[:2000]


def test_head_axes_must_match_the_arrays():
    op = registered_ops()["hgrn"]
    assert op.heads_of((_sds(2, 8, 64), _sds(2, 8, 64))) == (2, 2)
    with pytest.raises(ValueError, match=r"hgrn: head_axes \(2, 2\) declares 2 arrays, the op "
                                         r"passed 1"):
        op.heads_of((_sds(2, 8, 64),))
