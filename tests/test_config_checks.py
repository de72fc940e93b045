"""Config checks that run before anything compiles: ranges, fields the run would not read,
layer lists, and the command line's --fields / --mixers. No test here trains a model."""

import os
import subprocess
import sys

import pytest

from configs import lm, mqar
from tests.train_utils import tiny_config
from train import train_and_evaluate
from train.fields import FIELDS, check_config
from train.loop import resolve_config
from train.state import build_model_config
from zoo.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fails(cfg, message, tmp_path, explicit=None, error=ConfigError):
    with pytest.raises(error, match=message):
        train_and_evaluate(cfg, str(tmp_path / "run"), explicit=explicit)
    assert not os.path.exists(tmp_path / "run"), "nothing is written for a bad config"


@pytest.mark.parametrize("path, value, message", [
    ("train.lr", -1e-3, r"config.train.lr = -0.001: out of range; allowed: float > 0"),
    ("train.warmup_steps", -5, r"config.train.warmup_steps = -5: out of range; allowed: int >= 0"),
    ("train.steps", 0, r"config.train.steps = 0: out of range"),
    ("train.b2", 1.0, r"config.train.b2 = 1.0: out of range; allowed: float >= 0 and < 1"),
    ("train.min_lr_ratio", 1.5, r"config.train.min_lr_ratio = 1.5: out of range"),
    ("train.clip_norm", 0.0, r"config.train.clip_norm = 0.0: out of range; allowed: float > 0"),
    ("train.max_skipped_steps", 0, r"config.train.max_skipped_steps = 0: out of range"),
    ("checkpoint.every", 0, r"config.checkpoint.every = 0: out of range"),
    ("data.heldout_fraction", 1.0, r"config.data.heldout_fraction = 1.0: out of range"),
    ("model.dtype", "float16", r"config.model.dtype = 'float16': not allowed; allowed: one of "
                               r"'float32', 'bfloat16'"),
    ("model.impl", "cuda", r"config.model.impl = 'cuda': not allowed; allowed: one of 'auto'"),
    ("mesh.tensor", 0, r"config.mesh.tensor = 0: out of range; allowed: int >= 1 \(or -1\)"),
    ("seed", -1, r"config.seed = -1: out of range"),
])
def test_out_of_range_values_fail_before_anything_runs(tmp_path, path, value, message):
    cfg = tiny_config()
    section, _, name = path.rpartition(".")
    (cfg[section] if section else cfg)[name] = value
    _fails(cfg, message, tmp_path)


def test_every_config_field_has_a_row_and_a_row_every_field():
    """The field table and the config files agree in both directions."""
    from train.fields import _leaves
    rows = {f.path for f in FIELDS}
    for c in (lm.get_config(None), mqar.get_config(None)):
        assert set(_leaves(c)) == rows
    check_config(lm.get_config(None))
    check_config(mqar.get_config(None))


def test_unknown_field_is_an_error(tmp_path):
    cfg = tiny_config()
    cfg.train.lr_decay = 0.5      # e.g. a field of the user's own config file
    _fails(cfg, r"config.train.lr_decay: no such field .*'train.lr'", tmp_path)


@pytest.mark.parametrize("edit, message", [
    (dict(path="/some/dir"), r"config.data.path = '/some/dir' is set but data.source='stdlib' "
                             r"does not read it \(read by data.source in \['text', 'jsonl', "
                             r"'tokens'\]\)"),
    (dict(jsonl_field="body"), r"config.data.jsonl_field = 'body' is set but "
                               r"data.source='stdlib' does not read it \(read by data.source "
                               r"in \['jsonl'\]\)"),
])
def test_a_data_field_the_source_does_not_read_is_an_error(tmp_path, edit, message):
    cfg = tiny_config()
    cfg.data.update(edit)
    _fails(cfg, message, tmp_path)


def test_mqar_fields_on_a_text_run_and_text_fields_on_an_mqar_run(tmp_path):
    cfg = tiny_config()
    cfg.data.mqar.num_kv_pairs = 8
    _fails(cfg, r"config.data.mqar.num_kv_pairs = 8 is set but data.source='stdlib'.*\['mqar'\]",
           tmp_path)
    cfg = mqar.get_config(None)
    cfg.data.update(dict(seq_len=128))
    cfg.data.mqar.update(dict(cells="64:4,128:8", num_kv_pairs=8))
    _fails(cfg, r"config.data.mqar.num_kv_pairs = 8 is set but data.mqar.cells \(64:4,128:8\) "
                r"gives every cell its pairs", tmp_path)
    cfg = mqar.get_config(None)
    cfg.data.max_bytes = 1000
    _fails(cfg, r"config.data.max_bytes = 1000 is set but data.source='mqar' does not read it",
           tmp_path)


def test_mixer_options_for_a_mixer_the_model_does_not_use(tmp_path):
    cfg = tiny_config()           # every layer is attn
    cfg.model.mixer_options = {"gdn": {"expand_v": 2}}
    _fails(cfg, r"config.model.mixer_options\['gdn'\] is set but the model has no 'gdn' layer "
                r"\(layers: \['attn'\]\)", tmp_path)


def test_model_fields_set_on_the_command_line_that_no_layer_reads(tmp_path):
    cfg = tiny_config()
    cfg.model.layer_types = ("gdn", "gdn")
    _fails(cfg, r"config.model.window is set but no layer of this model reads it \(layers: "
                r"\['gdn'\]; read by: \['swa', 'titans_mac', 'titans_mag'\]\)", tmp_path,
           explicit={"model.window"})
    _fails(cfg, r"config.model.mixer is set but model.layer_types is given \(gdn,gdn\)",
           tmp_path, explicit={"model.mixer", "model.layer_types"})


def test_layer_types_comma_form_and_inferred_n_layers():
    cfg = tiny_config()           # n_layers 2
    cfg.model.layer_types = ("swa,gdn,swa",)     # what the command line gives for a,b,c
    resolved = resolve_config(cfg, explicit={"model.layer_types"})
    model = build_model_config(resolved.model, 256)
    assert model.layer_types == ("swa", "gdn", "swa") and model.n_layers == 3
    # An n_layers the user set that disagrees is an error, as from Python (explicit unknown).
    for explicit in ({"model.layer_types", "model.n_layers"}, None):
        resolved = resolve_config(cfg, explicit=explicit)
        with pytest.raises(ConfigError, match="model.layer_types has 3 entries but "
                                              "model.n_layers is 2"):
            build_model_config(resolved.model, 256)


def test_mqar_config_keeps_a_given_size():
    assert mqar.get_config("size=small").model.d_model == 768
    assert mqar.get_config(None).model.d_model == 64
    with pytest.raises(ValueError, match="data='text'"):
        mqar.get_config("data=text")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_fields_and_mixers_listings():
    out = _cli("--fields", "--config.model.layer_types=swa,gdn,swa", "--config.train.lr=0.01")
    assert out.returncode == 0, out.stderr
    lines = {ln.split("=")[0].strip(): ln for ln in out.stdout.splitlines()}
    assert "0.01" in lines["config.train.lr"] and "peak learning rate" in lines["config.train.lr"]
    assert "('swa', 'gdn', 'swa')" in lines["config.model.layer_types"]
    assert "= 3 " in lines["config.model.n_layers"]
    assert len(lines) == len(FIELDS)
    out = _cli("--mixers")
    assert out.returncode == 0, out.stderr
    assert "expand_v=1.0" in out.stdout and "reads: model.num_kv_heads" in out.stdout
    assert "d_state=min(64, d_model / 2)" in out.stdout
    out = _cli("--config.help")
    assert out.returncode == 1 and "python -m train --fields" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
