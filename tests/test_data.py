"""Input pipeline (train/data): packing invariants, determinism, host slicing, sources, errors."""

import json
import sys
import types

import numpy as np
import pytest

from train.data import (ByteTokenizer, DataError, HFTokenizer, load_data, load_tokenizer,
                        tokenizer_from_dict)
from train.data.packing import first_fit, pack, split_documents

SEQ = 32


def _cfg(**kw):
    base = dict(source="text", path="", jsonl_field="text", tokenizer="bytes", seq_len=SEQ,
                heldout_fraction=0.1, max_bytes=0)
    base.update(kw)
    return types.SimpleNamespace(**base)


def _texts(n=40, seed=0):
    """Documents of very different lengths (empty, 1 token, < seq_len, several seq_len), utf-8."""
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghij klmnop\n") + ["é", "λ", "✓"]
    sizes = [0, 1, 5, 31, 32, 33, 62, 63, 64] + list(rng.integers(2, 300, n - 9))
    return ["".join(rng.choice(alphabet, int(s))) for s in sizes]


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, text in enumerate(_texts()):
        folder = root / "sub" if i % 3 == 0 else root
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


def _assert_layout(batch):
    """Per row: scored targets stay in their piece, positions restart, padding only trails."""
    inputs, targets = batch["inputs"], batch["targets"]
    seg, pos = batch["segment_ids"], batch["positions"]
    for k in batch:
        assert batch[k].dtype == np.int32 and batch[k].shape == inputs.shape
    for row in range(inputs.shape[0]):
        s, p, x, y = seg[row], pos[row], inputs[row], targets[row]
        n_real = int((s > 0).sum())
        assert (s[:n_real] > 0).all() and (s[n_real:] == 0).all()        # padding trails
        assert (x[n_real:] == 0).all() and (y[n_real:] == -100).all() and (p[n_real:] == 0).all()
        if n_real == 0:
            continue
        assert s[0] == 1 and set(np.diff(s[:n_real])) <= {0, 1}         # segments 1, 2, 3...
        starts = np.flatnonzero(np.diff(s[:n_real], prepend=0))
        for a, b in zip(starts, list(starts[1:]) + [n_real]):
            np.testing.assert_array_equal(p[a:b], np.arange(b - a))      # positions restart
            np.testing.assert_array_equal(y[a:b - 1], x[a + 1:b])        # next token, same piece
            assert y[b - 1] == -100                                      # never crosses
            assert b - a >= 2


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("bytes")
    text = "héllo ✓ wörld\n\tλ"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and tok.vocab_size == 256 and len(ids) == len(text.encode())
    assert tok.decode(np.concatenate([ids, [-100, 0][:1]])) == text  # -100 is dropped
    tok2 = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert isinstance(tok2, ByteTokenizer) and tok2.decode(tok2.encode(text)) == text
    assert tok.decode(np.array([0xFF, 0x41])) == "\ufffdA"  # invalid utf-8 is replaced


class _FakeHF:
    """Stands in for tokenizers.Tokenizer: one id per character of a fixed alphabet."""

    def __init__(self, chars):
        self.chars = chars

    @classmethod
    def from_str(cls, s):
        return cls(json.loads(s)["chars"])

    def get_vocab_size(self, with_added_tokens=True):
        return len(self.chars)

    def encode(self, text, add_special_tokens=False):
        return types.SimpleNamespace(ids=[self.chars.index(c) for c in text])

    def encode_batch(self, texts, add_special_tokens=False):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def test_hf_tokenizer_wrapper_and_missing_package(tmp_path, monkeypatch):
    path = tmp_path / "tok.json"
    path.write_text(json.dumps({"chars": "abc "}))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # not installed
    with pytest.raises(DataError, match="data.tokenizer.*tokenizers"):
        load_tokenizer(str(path))
    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=_FakeHF))
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 4
    np.testing.assert_array_equal(tok.encode("ab c"), [0, 1, 3, 2])
    tok2 = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert tok2.vocab_size == 4 and tok2.decode([2, 3, 0, -100]) == "c a"
    with pytest.raises(DataError, match="data.tokenizer.*does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))


# ----------------------------------------------------------------------------- packing


def test_pieces_score_every_token_but_the_first_once():
    lengths = np.array([0, 1, 2, 5, 31, 32, 33, 100])
    doc, start, length = split_documents(lengths, SEQ)
    assert (length >= 2).all() and (length <= SEQ).all()
    for d, n in enumerate(lengths):
        scored = np.concatenate([np.arange(a + 1, a + m) for a, m in
                                 zip(start[doc == d], length[doc == d])] or [[]])
        np.testing.assert_array_equal(np.sort(scored), np.arange(1, max(n, 1)))


def test_first_fit_matches_naive_and_rows_per_epoch_are_fixed():
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 20, 200)
    rooms, naive = [], []
    for s in sizes:
        row = next((i for i, r in enumerate(rooms) if r >= s), len(rooms))
        rooms += [20] * (row == len(rooms))
        rooms[row] -= s
        naive.append(row)
    np.testing.assert_array_equal(first_fit(sizes, 20), naive)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 200, 300))])
    rows = {pack(offsets, SEQ, np.random.default_rng(e)).num_rows for e in range(4)}
    assert rows == {pack(offsets, SEQ).num_rows}


# ----------------------------------------------------------------------------- pipeline


def test_batches_reconstruct_documents(text_dir):
    data = load_data(_cfg(path=str(text_dir)), seed=3)
    train = data.corpus.train
    rows = data.rows_per_epoch()
    plan = data.plan(0)
    seen = {d: np.zeros(train.lengths[d], bool) for d in range(train.num_docs)}
    for r in range(rows):  # batch_size 1: step r is row r of epoch 0
        b = data.batch(r, batch_size=1)
        _assert_layout(b)
        for k, (d, start, n) in enumerate(plan.row(r)):
            cols = b["segment_ids"][0] == k + 1
            np.testing.assert_array_equal(b["inputs"][0][cols], train.doc(d)[start:start + n])
            seen[d][start + 1:start + n] = True
    assert all(mask[1:].all() for mask in seen.values())  # every token but the first scored
    # Documents are the files' texts (files with < 2 bytes dropped, *.bin not read).
    assert len(train.keys) + data.num_docs("heldout") == 38 and data.num_docs("heldout") > 0
    all_keys = train.keys + data.corpus.heldout.keys
    assert "ignored.bin" not in all_keys and "sub/doc09.txt" in all_keys
    for i, key in enumerate(train.keys):
        assert data.tokenizer.decode(train.doc(i)) == (text_dir / key).read_text(encoding="utf-8")
    assert data.num_tokens("train") == train.num_tokens > 0


def test_batch_is_a_pure_function_of_seed_and_step(text_dir):
    cfg = _cfg(path=str(text_dir))
    a, b = load_data(cfg, seed=0), load_data(cfg, seed=0)
    for s in (7, 0, 3):  # any order of drawing
        for k, v in a.batch(s, batch_size=4).items():
            np.testing.assert_array_equal(v, b.batch(s, batch_size=4)[k])
    it = a.iterator(5, batch_size=4)
    for s in range(5, 9):
        got = next(it)
        for k, v in b.batch(s, batch_size=4).items():
            np.testing.assert_array_equal(got[k], v)
    other = load_data(cfg, seed=1).batch(0, batch_size=4)["inputs"]
    assert not np.array_equal(other, a.batch(0, batch_size=4)["inputs"])
    assert a.fingerprint == b.fingerprint == load_data(cfg, seed=1).fingerprint


def test_host_slices_concatenate_to_the_global_batch_across_epochs(text_dir):
    data = load_data(_cfg(path=str(text_dir)), seed=0)
    rows = data.rows_per_epoch()
    step = rows // 8  # the global batch of 8 rows straddles the end of epoch 0
    full = data.batch(step, batch_size=8)
    _assert_layout(full)
    for count in (2, 4, 8):
        parts = [data.batch(step, batch_size=8, process_index=p, process_count=count)
                 for p in range(count)]
        for k, v in full.items():
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)
    # Epoch 1 is a different shuffle of the same rows.
    epoch0 = [data.plan(0).row(r) for r in range(rows)]
    epoch1 = [data.plan(1).row(r) for r in range(rows)]
    assert epoch0 != epoch1
    assert sorted(p for r in epoch0 for p in r if p[2] == SEQ) == sorted(
        p for r in epoch1 for p in r if p[2] == SEQ)


def test_eval_batches_and_heldout_fallback(tmp_path):
    (tmp_path / "only.txt").write_text("x" * 300 + "y" * 100)
    data = load_data(_cfg(path=str(tmp_path / "only.txt"), heldout_fraction=0.05), seed=0)
    assert "held out the last" in data.describe()
    assert data.num_tokens("heldout") > 0 and data.num_tokens("train") >= SEQ + 1
    ev = data.eval_batches(batch_size=4, max_batches=3)
    assert len(ev) == 1 and ev[0]["inputs"].shape == (4, SEQ)
    _assert_layout(ev[0])
    assert (ev[0]["targets"][ev[0]["targets"] != -100] == ord("y")).all()
    again = load_data(_cfg(path=str(tmp_path / "only.txt"), heldout_fraction=0.05), seed=9)
    np.testing.assert_array_equal(again.eval_batches(batch_size=4, max_batches=3)[0]["inputs"],
                                  ev[0]["inputs"])
    none = load_data(_cfg(path=str(tmp_path / "only.txt"), heldout_fraction=0.0), seed=0)
    assert none.eval_batches(batch_size=4, max_batches=3) == []
    with pytest.raises(DataError, match="heldout_fraction"):
        none.batch(0, split="heldout", batch_size=4)


def test_fingerprint_follows_the_corpus(text_dir):
    cfg = _cfg(path=str(text_dir))
    before = load_data(cfg).fingerprint
    assert load_data(cfg).fingerprint == before
    (text_dir / "doc05.txt").write_text("changed " * 20)
    changed = load_data(cfg).fingerprint
    assert changed != before
    assert load_data(_cfg(path=str(text_dir), heldout_fraction=0.3)).fingerprint != changed


def test_jsonl_and_tokens_sources(tmp_path):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(_texts(30, seed=1))]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:15]) + "\n\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[15:]))
    data = load_data(_cfg(source="jsonl", path=str(tmp_path / "*.jsonl")), seed=0)
    assert data.num_docs("train") + data.num_docs("heldout") == 28  # 0- and 1-char docs drop
    assert all(":" in k for k in data.corpus.train.keys)
    _assert_layout(data.batch(2, batch_size=4))

    rng = np.random.default_rng(0)
    np.save(tmp_path / "one.npy", rng.integers(0, 256, 500).astype(np.uint16))
    np.save(tmp_path / "many.npy", rng.integers(0, 256, (6, 40)))
    data = load_data(_cfg(source="tokens", path=f"{tmp_path}/one.npy,{tmp_path}/many.npy"))
    assert data.num_tokens("train") + data.num_tokens("heldout") == 500 + 6 * 40
    assert data.tokenizer.vocab_size == 256
    _assert_layout(data.batch(0, batch_size=4))


def test_stdlib_source_small():
    data = load_data(_cfg(source="stdlib", path="ignored", max_bytes=200_000), seed=0)
    keys = data.corpus.train.keys + data.corpus.heldout.keys
    assert data.num_tokens("train") + data.num_tokens("heldout") <= 200_000
    assert not any(part in {"test", "tests", "idle_test", "site-packages"}
                   for k in keys for part in k.split("/"))
    assert "stdlib" in data.describe()
    _assert_layout(data.batch(1, batch_size=2))


def _bad_cases(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.md").write_text("\n"[:0])
    (tmp_path / "nomatch").mkdir()
    (tmp_path / "nomatch" / "x.csv").write_text("a,b")
    (tmp_path / "short.txt").write_text("too short")
    np.save(tmp_path / "big.npy", np.array([1, 2, 300]))
    (tmp_path / "r.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    return [
        (dict(path=str(tmp_path / "missing")), "data.path.*does not exist"),
        (dict(path=str(tmp_path / "nomatch")), "data.path.*no .*files"),
        (dict(path=str(tmp_path / "*.nothing")), "data.path.*matches nothing"),
        (dict(path=str(tmp_path / "empty")), "data.path.*no document"),
        (dict(path=str(tmp_path / "short.txt")), "data.path.*fewer than one sequence"),
        (dict(source="csv"), "data.source.*allowed.*'stdlib'.*'text'.*'jsonl'.*'tokens'"),
        (dict(source="tokens", path=str(tmp_path / "big.npy")), "data.path.*300.*vocab_size"),
        (dict(source="jsonl", path=str(tmp_path / "r.jsonl")), "data.jsonl_field.*'text'"),
        (dict(seq_len=1), "data.seq_len"),
        (dict(heldout_fraction=1.5), "data.heldout_fraction"),
        (dict(source="stdlib", max_bytes=10), "data.max_bytes.*fewer than one sequence"),
        (dict(path=str(tmp_path / "short.txt"), tokenizer=str(tmp_path / "no.json")),
         "data.tokenizer.*does not exist"),
    ]


def test_bad_inputs_raise_data_error_naming_the_field(tmp_path, text_dir):
    for kw, pattern in _bad_cases(tmp_path):
        with pytest.raises(DataError, match=pattern):
            load_data(_cfg(**kw))
    data = load_data(_cfg(path=str(text_dir)))
    with pytest.raises(DataError, match="batch_size.*not divisible by process_count"):
        data.batch(0, batch_size=6, process_count=4)
    with pytest.raises(DataError, match="batch_size.*not divisible"):
        data.iterator(0, batch_size=6, process_count=4)
    with pytest.raises(DataError, match="split.*allowed"):
        data.batch(0, split="validation", batch_size=2)
    assert issubclass(DataError, ValueError)
