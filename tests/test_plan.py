"""Memory planning (train/memory.py, scripts/plan_memory.py), the trainer's fit check, the
measured matmul peak (train/peak.py) and the train-step benchmark (scripts/bench_train.py).

The 8-device plans run the script in a subprocess (it sets
XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax), started beside the
suite once collected like the benchmark (tests/background.py); the expected
per-device bytes are computed here, independently, from the parameters' logical axes on an
abstract mesh of the same shape (no devices needed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tests import background
from train.cli_config import load_config_file
from zoo.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")

# A 2-layer gdn + attn model, small enough to compile in seconds.
TINY = "configs/lm.py:size=tiny,mixer=gdn,ratio=1"
TINY_OVERRIDES = ["--config.model.n_layers=2", "--config.model.d_model=64",
                  "--config.data.seq_len=64", "--config.train.batch_size=8"]


_ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": None}   # the script sets its own device count


def _script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


# The compiling script runs start beside the suite once collected (tests/background.py); each
# writes its JSON into the job's folder.
PLAN_TINY = background.job("plan_tiny", [
    "scripts/plan_memory.py", "--config", TINY, "--mesh", "2,2,2", "--devices", "8", "--device",
    "v5e-16g", "--json", "{dir}/plan.json", *TINY_OVERRIDES], env=_ENV, timeout=600)
PLAN_1P3B = background.job("plan_1p3b", [
    "scripts/plan_memory.py", "--config", "configs/lm.py:size=1.3B,mixer=gdn,ratio=3", "--mesh",
    "1,8,1", "--devices", "8", "--device", "h100-80g", "--json", "{dir}/plan.json",
    "--config.train.batch_size=8", "--config.data.seq_len=256"], env=_ENV, timeout=1800)
BENCH = background.job("bench_train_tiny", [
    "scripts/bench_train.py", "--sizes", "tiny", "--mixers", "swa:1", "--lengths", "64",
    "--steps", "1", "--tokens", "128", "--json", "{dir}/bench.json", "--no-pin"], env=_ENV,
    timeout=600)
BACKGROUND_JOBS = {"plan_tiny": [PLAN_TINY], "plan_1p3b": [PLAN_1P3B], "bench_tiny": [BENCH]}


def _json_of(job, name):
    """(the JSON the job wrote to `name`, its stdout)."""
    rc, out, err = job.wait()
    assert rc == 0, err[-3000:]
    with open(job.path(name)) as f:
        return json.load(f), out


@pytest.fixture
def plan_tiny():
    return _json_of(PLAN_TINY, "plan.json")


@pytest.fixture
def plan_1p3b():
    return _json_of(PLAN_1P3B, "plan.json")[0]


@pytest.fixture
def bench_tiny():
    return _json_of(BENCH, "bench.json")[0]


def _expected_param_bytes(config_spec: str, overrides: dict, mesh_shape) -> tuple[int, int]:
    """(Σ over parameters of one shard's bytes, Σ of the full arrays' bytes) on an abstract
    (data, fsdp, tensor) mesh, from the parameters' logical axes and `train.sharding`'s rules."""
    from train.sharding import MESH_AXES, param_axes, param_specs
    from train.state import build_model_config
    from zoo.model import LM

    config = load_config_file(config_spec)
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        config[section][field] = value
    cfg = build_model_config(config.model, 256)
    mesh = jax.sharding.AbstractMesh(tuple(mesh_shape), MESH_AXES)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    state = nnx.split(abstract)[1]
    shapes = nnx.to_pure_dict(state)
    specs = param_specs(param_axes(state), shapes, mesh)
    shard = full = 0
    for x, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs)):
        item = jnp.dtype(x.dtype).itemsize
        shard += math.prod(sh.shard_shape(x.shape)) * item
        full += math.prod(x.shape) * item
    return shard, full


def test_plan_tiny_on_8_devices_matches_the_shardings(plan_tiny):
    """(2,2,2): params_bytes is Σ of the shards' bytes, every moment is sharded like its
    parameter (optimizer = 2 × params + the step counters), the arguments are exactly the state
    plus this device's batch rows, and total = arguments + outputs − aliased + temp."""
    plan, stdout = plan_tiny
    assert {"n_params", "per_device", "compiler", "device", "fits"} <= set(plan)
    per = plan["per_device"]
    assert {"params_bytes", "optimizer_bytes", "temp_bytes", "total_bytes"} <= set(per)
    overrides = {"model.n_layers": 2, "model.d_model": 64}
    shard, full = _expected_param_bytes(TINY, overrides, (2, 2, 2))
    assert per["params_bytes"] == shard
    assert full / 4 <= shard < full / 2, "fsdp x tensor shards most of the parameters"
    assert plan["n_params"] * 4 == full
    # mu and nu per parameter, sharded alike; small int32 counters (adam's, the schedule's).
    assert 2 * shard <= per["optimizer_bytes"] <= 2 * shard + 64
    batch_rows = 8 // (2 * 2)
    batch_bytes = 4 * batch_rows * 64 * 4                     # 4 int32 [rows, T] arrays
    assert per["argument_bytes"] == (per["params_bytes"] + per["optimizer_bytes"] + 4
                                     + batch_bytes)
    assert per["total_bytes"] == (per["argument_bytes"] + per["output_bytes"]
                                  - per["alias_bytes"] + per["temp_bytes"])
    assert per["alias_bytes"] >= per["params_bytes"] + per["optimizer_bytes"], "state donated"
    assert per["temp_bytes"] > 0
    assert plan["fits"] is True and plan["device"] == "v5e-16g"
    assert "cpu" in plan["compiler"] and "8 simulated" in plan["compiler"]
    assert "per device:" in stdout and "v5e-16g: fits" in stdout


def test_plan_rejects_a_bad_mesh_before_compiling():
    r = _script("plan_memory.py", "--config", TINY, "--mesh", "2,2,2", "--devices", "4",
                timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: mesh:")


@pytest.mark.slow
def test_plan_1p3b_gdn_hybrid_on_1_8_1(plan_1p3b):
    """The 1.3B 3:1 GDN hybrid on (1,8,1): the optimizer state per device is ≤ 1.3 × 1/8 of
    the whole (the moments are fsdp-sharded like their parameters)."""
    plan = plan_1p3b
    total_opt = 2 * 4 * plan["n_params"]                      # mu + nu, float32
    assert plan["n_params"] > 1.0e9
    assert plan["per_device"]["optimizer_bytes"] <= 1.3 * total_opt / 8
    assert plan["fits"] is True


def test_check_fits_raises_with_what_to_change():
    """The trainer's pre-check on the compiled step it will run: a limit below the step's bytes
    raises ConfigError naming the levers; a large limit returns the report; no limit on CPU."""
    import ml_collections

    from train.memory import abstract_batch, check_fits, memory_report
    from train.sharding import batch_sharding, make_mesh, replicated
    from train.state import TrainState, build_model_config
    from train.step import make_train_step

    config = load_config_file(TINY)
    config.model.n_layers, config.model.d_model = 2, 64
    config.train.batch_size, config.data.seq_len = 4, 32
    mesh = make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)))
    with jax.set_mesh(mesh):
        ts = TrainState(build_model_config(config.model, 256), mesh, 0, config.train)
        state = ts.abstract_state()
        bsh = batch_sharding(mesh)
        step = make_train_step(ts.graphdef, ts.tx, jax.tree.map(lambda x: x.sharding, state),
                               bsh, replicated(mesh))
        compiled = step.lower(state, abstract_batch(4, 32, bsh)).compile()
    report = memory_report(compiled, state)
    said = []
    assert check_fits(compiled, state, config, mesh, say=said.append,
                      limit_bytes=10 * report["total_bytes"]) == report
    assert said and "memory per device" in said[0]
    with pytest.raises(ConfigError, match=r"does not fit.*--config.model.remat=full.*"
                                          r"--config.train.batch_size=2"):
        check_fits(compiled, state, config, mesh, limit_bytes=report["total_bytes"] / 2)
    if jax.default_backend() == "cpu":
        assert check_fits(compiled, state, config, mesh) is None


def test_measured_peak_is_positive_and_cached():
    from train.metrics import device_peak_flops
    from train.peak import matmul_flops_per_s, measured_peak_flops

    peak = measured_peak_flops()
    assert peak > 0 and measured_peak_flops() == peak, "measured once per process"
    assert device_peak_flops() == peak
    assert measured_peak_flops(fresh=True) > 0
    assert measured_peak_flops(clock="cpu") > 0
    with pytest.raises(ValueError, match="clock must be 'wall' or 'cpu'"):
        measured_peak_flops(clock="sundial")
    assert matmul_flops_per_s(64, 32, 16, jnp.float32, reps=1) > 0


def test_bench_train_one_tiny_case_writes_json(bench_tiny):
    res = bench_tiny
    assert res["backend"] == "cpu" and res["peak_flops"] > 0
    (case,) = res["cases"]
    assert case["layer_types"] == ["swa", "attn", "swa", "attn"]
    assert case["batch"] == 2 and case["tokens_per_step"] == 128
    assert case["tokens_per_s"] == pytest.approx(128 / case["step_s"])
    assert case["mfu"] == pytest.approx(case["tokens_per_s"] * case["flops_per_token"]
                                        / case["peak_flops"])
    # The model's count and XLA's agree to within the work the count leaves out (norms, softmax,
    # masks, the optimizer update).
    assert 0.5 < case["xla_flops_per_token"] / case["flops_per_token"] < 3
