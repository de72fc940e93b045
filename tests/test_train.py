"""The trainer: a run lowers the loss, resumes exactly, shards, and rejects bad input early."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import background
from tests.offload import offload
from tests.train_utils import tiny_config
from train import train_and_evaluate
from train.checkpoint import CheckpointError
from train.data import DataError
from zoo.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every interpret-mode kernel under a batch-sharded jit, beside the suite (tests/background.py).
SHARDED = background.job("sharded_kernels_batch", ["tests/sharded_kernels.py"], timeout=600)
BACKGROUND_JOBS = {"sharded_kernel_errors": [SHARDED]}


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@offload
def test_run_resumes_exactly(tmp_path):
    """Kill after the step-3 checkpoint (step 6's is lost), restart: the same next losses."""
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    cfg = tiny_config()
    final = train_and_evaluate(cfg, straight)
    assert final["train_loss"] < final["first_loss"] and np.isfinite(final["eval_loss"])
    assert os.listdir(os.path.join(straight, "tb")), "TensorBoard events are written"

    train_and_evaluate(tiny_config(), resumed)
    ckpts = os.path.join(resumed, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["3", "6"]
    os.rename(os.path.join(ckpts, "6"), os.path.join(ckpts, "6.orbax-checkpoint-tmp-1"))  # mid-save
    train_and_evaluate(tiny_config(), resumed)
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == sorted(a), "metrics.jsonl is truncated to the restored step on resume"
    np.testing.assert_allclose([b[s] for s in (4, 5, 6)], [a[s] for s in (4, 5, 6)], rtol=1e-6)


def test_resume_refuses_a_different_data_order(tmp_path):
    train_and_evaluate(tiny_config(steps=3), str(tmp_path))
    cfg = tiny_config(steps=4)
    cfg.data.seq_len = 16
    with pytest.raises(CheckpointError, match="data.seq_len"):
        train_and_evaluate(cfg, str(tmp_path))
    cfg = tiny_config(steps=4)
    cfg.data.max_bytes = 200_000
    with pytest.raises(CheckpointError, match="different corpus"):
        train_and_evaluate(cfg, str(tmp_path))


@pytest.mark.parametrize("section, field, value, error, message", [
    ("model", "mixer", "nope", ConfigError, "model.mixer: unknown mixer 'nope'; known"),
    ("model", "layer_types", ("attn",), ConfigError, "model.layer_types has 1 entries"),
    ("model", "num_heads", 3, ConfigError, "divisible by model.num_heads"),
    ("model", "mixer_options", {"attn": {"bogus": 1}}, ConfigError,
     r"model.mixer_options\['attn'\]: unknown option\(s\) \['bogus'\]; allowed: \[.*'qk_norm'"),
    ("data", "path", "/does/not/exist", DataError, "data.path: '/does/not/exist' does not exist"),
    ("data", "seq_len", 10 ** 8, DataError, "data"),
    ("train", "microbatches", 3, ConfigError, r"train.batch_size \(8\) must be divisible by "
     r"train.microbatches \(3\)"),
    ("profile", "steps", "10-15", ConfigError, "config.profile.steps = '10-15': expected 'A:B'"),
])
def test_bad_input_fails_before_compiling(tmp_path, section, field, value, error, message):
    cfg = tiny_config()
    cfg[section][field] = value
    if field == "path":
        cfg.data.source = "text"
    with pytest.raises(error, match=message):
        train_and_evaluate(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_empty_data_path(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cfg = tiny_config()
    cfg.data.update(dict(source="text", path=str(tmp_path / "empty.txt")))
    with pytest.raises(DataError, match="data.path"):
        train_and_evaluate(cfg, str(tmp_path / "run"))


def test_cli_unknown_field_names_the_known_ones():
    out = subprocess.run([sys.executable, "-m", "train", "--config.train.stepz=3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "unknown config field 'config.train.stepz'" in out.stderr
    assert "'steps'" in out.stderr


@offload
def test_bf16_compute_keeps_float32_parameters(tmp_path):
    cfg = tiny_config(steps=3)
    cfg.model.dtype = "bfloat16"
    cfg.model.layer_types = ("gdn", "attn")
    final = train_and_evaluate(cfg, str(tmp_path))
    assert np.isfinite(final["train_loss"]) and np.isfinite(final["eval_loss"])
    from train.restore import restore_run
    params = restore_run(str(tmp_path)).params
    assert params["blocks"][0]["mixer"]["q_proj"]["w"].dtype == np.float32


@pytest.fixture
def sharded_kernel_errors():
    """{"op/impl": max abs error} from tests/sharded_kernels.py (8 simulated devices)."""
    rc, out, err = SHARDED.wait()
    assert rc == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_pallas_kernels_run_per_batch_shard_under_a_mesh(sharded_kernel_errors):
    """pallas_call has no partitioning rule: the ops wrap kernels in shard_map over the batch."""
    errors = sharded_kernel_errors
    from tests.sharded_kernels import kernel_cases   # every interpret-mode kernel of the registry
    expected = {f"{name}/{impl}" for name, impl in kernel_cases()}
    # Triton kernels need Triton's interpreter process (tests/test_triton_sharding.py).
    assert {"simple_gla/mosaic_tpu", "gated_delta_rule/mosaic_tpu", "titans/mosaic_tpu"} <= expected
    assert set(errors) == expected and max(errors.values()) < 1e-3, errors


def test_bad_mesh_fails_before_anything_is_written(tmp_path):
    cfg = tiny_config()
    cfg.mesh.tensor = 3
    with pytest.raises(ConfigError, match="mesh: .* devices"):
        train_and_evaluate(cfg, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a")
