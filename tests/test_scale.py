"""Sharded training on 8 simulated devices (tests/scale_check.py, two processes in the background):
every mesh computes one device's loss and gradients, the optimizer state is sharded like the
parameters, accumulation equals the big batch, and checkpoints resume onto other meshes."""

import json

import numpy as np
import pytest

from tests import background

# Both modes run concurrently when the fixture starts them, one after the other when the
# background queue does (tests/background.py); each compile is single-threaded, CI has 2 cores.
JOBS = {mode: background.job(f"scale_{mode}", ["tests/scale_check.py", mode,
                                               f"{{dir}}/{mode}.json"], timeout=1500)
        for mode in ("mixers", "train")}
BACKGROUND_JOBS = {"results": list(JOBS.values())}


@pytest.fixture(scope="module")
def results():
    for j in JOBS.values():
        j.start()
    res = {}
    for mode, j in JOBS.items():
        rc, _, err = j.wait()
        assert rc == 0, f"{mode}: {err[-3000:]}"
        with open(j.path(f"{mode}.json")) as f:
            res[mode] = json.load(f)
    return res


MESHES = {"mixers": ("(2, 2, 2)", "(1, 1, 8)"), "train": ("(8, 1, 1)", "(2, 4, 1)", "(1, 4, 2)")}


@pytest.mark.parametrize("mode, mesh", [(m, s) for m, ss in MESHES.items() for s in ss])
def test_every_mesh_computes_the_single_device_loss_and_gradients(results, mode, mesh):
    r = results[mode][mesh]
    np.testing.assert_allclose(r["loss"], r["ref_loss"], rtol=1e-5)
    assert r["grad_rel_err"] < 2e-4, r


def test_the_mixer_check_covers_every_registered_mixer(results):
    from zoo.registry import known_mixers
    assert results["mixers"]["mixers"] == list(known_mixers())


@pytest.mark.parametrize("mesh", ["(8, 1, 1)", "(2, 4, 1)", "(1, 4, 2)", "(2, 2, 2)", "(1, 1, 8)"])
def test_optimizer_state_is_sharded_like_the_parameters(results, mesh):
    for mode in ("train", "mixers"):
        r = results[mode].get(mesh)
        if r is None:
            continue
        assert r["moments_like_params"], (mode, mesh)
        # params + mu + nu: per device at most 1.1x an even split over fsdp * tensor
        assert r["per_device_bytes"] <= 1.1 * r["total_bytes"] / r["fsdp_tensor"], (mode, mesh, r)


def test_accumulating_four_padded_microbatches_equals_the_big_batch(results):
    r = results["train"]["accumulation"]
    assert r["loss_err"] < 1e-6 and r["grad_abs_err"] < 1e-6, r


@pytest.mark.parametrize("mesh", ["(1, 4, 2)", "(2, 1, 2)"])
def test_a_checkpoint_resumes_on_another_mesh(results, mesh):
    r = results["train"]["resume"]
    assert r[mesh]["moments_sharded"], mesh
    np.testing.assert_allclose(r[mesh]["losses"], r["(2, 2, 2)"]["losses"], rtol=1e-5)
