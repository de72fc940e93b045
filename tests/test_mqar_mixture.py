"""MQAR on a mixture of (length, pairs) cells: batches a pure function of (seed, step), equal
shares of cells, padded rows that score exactly their pairs with the right values, one-line
errors naming the field, three disjoint seed streams, the fingerprint, and evaluation on
explicit and default cells after a short run."""

import dataclasses

import numpy as np
import pytest

from configs import mqar
from train import train_and_evaluate
from train.data import DataError, load_data
from train.eval import (EvalError, check_tasks, default_mqar_cells, mqar_cell_accuracy,
                        mqar_validation_accuracy, run_eval)
from train.recall import recall_accuracy
from train.restore import restore_run
from train.tasks.mqar import parse_cells

CELLS = "16:2,32:4,64:8"
# The fingerprint of configs/mqar.py's default data before mixtures existed: a single-cell run
# must keep it, or resuming such a run would be refused.
DEFAULT_FINGERPRINT = "e96426ebe2e211c6"


def _data(cells=CELLS, seq_len=64, seed=0, **mqar_fields):
    cfg = mqar.get_config(None)
    cfg.data.seq_len = seq_len
    cfg.data.mqar.cells = cells
    cfg.data.mqar.update(mqar_fields)
    return load_data(cfg.data, seed=seed)


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_are_a_pure_function_of_seed_and_step():
    d = _data()
    b3 = d.batch(3, batch_size=12)
    assert _same(b3, _data().batch(3, batch_size=12))         # a fresh object, same batch
    assert not np.array_equal(b3["inputs"], d.batch(4, batch_size=12)["inputs"])
    assert not np.array_equal(b3["inputs"], _data(seed=1).batch(3, batch_size=12)["inputs"])
    # Two hosts' slices put together are the one-host batch.
    halves = [d.batch(3, batch_size=12, process_index=i, process_count=2) for i in range(2)]
    assert _same(b3, {k: np.concatenate([h[k] for h in halves]) for k in b3})


def test_each_cell_takes_an_equal_share_of_every_batch():
    d = _data()
    for step in range(3):
        b = d.batch(step, batch_size=12)
        lengths = b["segment_ids"].sum(1)
        pairs = (b["targets"] != -100).sum(1)
        cells = sorted(zip(lengths.tolist(), pairs.tolist()))
        assert cells == sorted(parse_cells(CELLS) * 4)
        assert [d.cell_of(step * 12 + i) for i in range(12)] == list(zip(lengths, pairs))


def test_padded_rows_score_exactly_their_pairs_with_the_right_values():
    d = _data()
    b = d.batch(0, batch_size=6)
    for i, (length, pairs) in enumerate(parse_cells(CELLS) * 2):
        inputs, targets = b["inputs"][i], b["targets"][i]
        assert (targets[length:] == -100).all() and (inputs[length:] == 0).all()
        assert (b["segment_ids"][i] == (np.arange(64) < length)).all()
        assert (b["positions"][i] == np.where(np.arange(64) < length, np.arange(64), 0)).all()
        scored = np.flatnonzero(targets != -100)
        assert len(scored) == pairs and scored.max() < length
        # The context lists k_1 v_1 … k_K v_K; a scored position reads a key, its target is the
        # value that key was paired with.
        value_of = dict(zip(inputs[0:2 * pairs:2].tolist(), inputs[1:2 * pairs:2].tolist()))
        assert len(value_of) == pairs
        assert [value_of[k] for k in inputs[scored]] == targets[scored].tolist()


@pytest.mark.parametrize("edit, message", [
    (dict(seq_len=32), r"^data.seq_len = 32 must equal the longest length of data.mqar.cells "
                       r"\(16:2,32:4,64:8\): set it to 64$"),
    (dict(cells="16:2,64:40", vocab_size=64), r"^data.mqar.cells: cell 64:40 does not fit: "
                                              r"num_kv_pairs must lie in \[1, .*31\], got 40"),
    (dict(cells="16:2,64:20"), r"^data.mqar.cells: cell 64:20 does not fit: seq_len \(64\) is "
                               r"too short for 20 pairs"),
    (dict(cells="16:2,64-4"), r"^data.mqar.cells = '16:2,64-4': '64-4' is not length:pairs"),
    (dict(cells="16:2,16:2"), r"^data.mqar.cells = '16:2,16:2': cell '16:2' is given twice"),
])
def test_a_bad_mixture_is_a_one_line_error_naming_the_field(edit, message):
    with pytest.raises(DataError, match=message) as e:
        _data(**edit)
    assert "\n" not in str(e.value)


def test_training_heldout_and_validation_streams_differ():
    d = _data()
    rows = {split: d.batch(0, split=split, batch_size=6)["inputs"]
            for split in ("train", "heldout", "validation")}
    assert len({r.tobytes() for r in rows.values()}) == 3
    val = d.validation_batches(batch_size=6, max_batches=2)
    assert len(val) == 2 and np.array_equal(val[0]["inputs"], rows["validation"])
    assert _same(val[1], _data().validation_batches(batch_size=6, max_batches=2)[1])
    # The held-out set is the same mixture: cells by row index as in training.
    assert (d.eval_batches(batch_size=6, max_batches=1)[0]["segment_ids"].sum(1)
            == [16, 32, 64, 16, 32, 64]).all()


def test_fingerprint_includes_the_cells_and_is_unchanged_without_them():
    assert _data(cells="").fingerprint == DEFAULT_FINGERPRINT
    cfg = mqar.get_config(None)
    assert load_data(cfg.data, seed=0).fingerprint == DEFAULT_FINGERPRINT  # no field at all
    prints = {_data().fingerprint, _data(cells="32:4,16:2,64:8").fingerprint,
              _data(cells="16:2,64:8").fingerprint, DEFAULT_FINGERPRINT}
    assert len(prints) == 4
    assert "cells 16:2,32:4,64:8" in _data().describe()


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mixture"))
    cfg = mqar.get_config(None)
    cfg.data.seq_len = 32
    cfg.data.mqar.cells = "16:2,32:4"
    cfg.data.mqar.heldout_examples = 16
    cfg.train.update(dict(steps=3, batch_size=8, warmup_steps=1, log_every=1, eval_batches=1))
    final = train_and_evaluate(cfg, workdir)
    return workdir, final, restore_run(workdir)


def test_eval_on_explicit_cells_matches_the_direct_function(mixture_run):
    workdir, final, r = mixture_run
    assert "recall_accuracy" in final
    # The flag's string form; the direct function takes the pairs.
    res = run_eval(workdir, tasks=("mqar",), mqar_cells="16:2,32:4,64:8", mqar_examples=16)["mqar"]
    assert set(res) == {"L16_kv2", "L32_kv4", "L64_kv8", "train_length", "seconds"}
    assert res["train_length"] == 32.0
    direct = mqar_cell_accuracy(r, [(16, 2), (32, 4), (64, 8)], 16, batch_size=8)
    assert direct == {k: res[k] for k in direct}

    assert default_mqar_cells(r) == [(16, 2), (32, 4), (64, 8), (128, 16)]
    # At vocabulary 256, 4× of (256, 32) would need 128 distinct keys of the 127: left out.
    config = r.config.copy_and_resolve_references()
    config.data.seq_len, config.data.mqar.cells = 256, "128:16,256:32"
    assert default_mqar_cells(dataclasses.replace(r, config=config)) == [(128, 16), (256, 32),
                                                                          (512, 64)]


def test_bad_eval_cells_are_refused_naming_the_flag(mixture_run):
    workdir, _, r = mixture_run
    with pytest.raises(EvalError, match=r"^--mqar_cells: '64' is not length:pairs"):
        run_eval(workdir, tasks=("mqar",), mqar_cells="64")
    # run_eval's check after the restore (called directly: the run is restored already).
    with pytest.raises(EvalError, match=r"^--mqar_cells: cell 64:200 does not fit: num_kv_pairs"):
        check_tasks(r, ("mqar",), None, ((64, 200),))
    with pytest.raises(EvalError, match=r"^--mqar_cells is read by the mqar task only"):
        run_eval(workdir, tasks=("ppl",), mqar_cells="64:4")
    with pytest.raises(EvalError, match=r"^mqar_cells: cell 16:5 does not fit: seq_len \(16\)"):
        mqar_cell_accuracy(r, [(16, 5)], 4, batch_size=8)


def test_validation_accuracy_scores_the_validation_stream(mixture_run):
    _, _, r = mixture_run
    data = load_data(r.config.data, seed=int(r.config.seed))
    batches = data.validation_batches(batch_size=8, max_batches=2)
    expected = recall_accuracy(r.ts, r.params, np.concatenate([b["inputs"] for b in batches]),
                               np.concatenate([b["targets"] for b in batches]), 8)
    assert mqar_validation_accuracy(r.ts, r.params, data, 8, 2) == expected
