"""Train 2-layer models of each mixer on MQAR; write accuracies as JSON to --out.

The recall suite: multi-query associative recall (MQAR, as in Zoology) at CPU
scale. A cell is vocab:seq_len:pairs. For each cell and each mixer, a 2-layer
model with 2 heads trains on fresh MQAR batches of 64 (the `mqar` data source;
AdamW with weight decay 0.1, min(200, steps/10) warm-up steps, then a cosine
decay over --steps) until its held-out accuracy reaches 0.99, --minutes have
passed or --steps are done. Accuracy is measured every --eval_every steps on
512 held-out examples, per example over the value positions, then averaged. The
JSON (a list of rows: mixer, vocab, seq_len, pairs, accuracy, steps, seconds,
params) is rewritten after every model, so an interrupted run keeps its
finished rows; the table is printed at the end. The mixer `gdn+attn` is a
hybrid of a gdn layer followed by an attn layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import mqar as mqar_config  # noqa: E402
from train.data import load_data  # noqa: E402
from train.eval import recall_accuracy  # noqa: E402
from train.sharding import to_global  # noqa: E402
from train.sharding import batch_sharding, make_mesh, replicated  # noqa: E402
from train.state import TrainState, build_model_config  # noqa: E402
from train.step import make_train_step  # noqa: E402
from train.tasks.mqar import MqarSpec  # noqa: E402
from zoo.registry import known_mixers  # noqa: E402

TARGET = 0.99
NUM_HEADS = 2
HYBRID = "gdn+attn"  # a gdn layer, then an attn layer
DEFAULT_MIXERS = "attn,gdn,gdn+attn,mamba2,lightning,hedgehog,titans"


def _config(mixer: str, vocab: int, seq_len: int, pairs: int, d_model: int, steps: int, lr: float):
    c = mqar_config.get_config("mixer=attn")
    layer_types = ("gdn", "attn") if mixer == HYBRID else (mixer, mixer)
    c.model.update(dict(d_model=d_model, n_layers=2, num_heads=NUM_HEADS, layer_types=layer_types,
                        window=seq_len))
    c.data.seq_len = seq_len
    c.data.mqar.update(dict(vocab_size=vocab, num_kv_pairs=pairs, heldout_examples=512))
    c.train.update(dict(steps=steps, batch_size=64, lr=lr, warmup_steps=min(200, steps // 10),
                        weight_decay=0.1))
    return c


def train_cell(mixer, vocab, seq_len, pairs, *, d_model, minutes, steps, lr, eval_every):
    cfg = _config(mixer, vocab, seq_len, pairs, d_model, steps, lr)
    data = load_data(cfg.data, seed=0)
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        ts = TrainState(build_model_config(cfg.model, data.tokenizer.vocab_size), mesh, 0, cfg.train)
        state = ts.init()
        sh = batch_sharding(mesh)
        step_fn = make_train_step(ts.graphdef, ts.tx, ts.shardings(state), sh, replicated(mesh))
        heldout = data.eval_batches(batch_size=64, max_batches=8)
        inputs = np.concatenate([b["inputs"] for b in heldout])
        targets = np.concatenate([b["targets"] for b in heldout])
        t0, acc, done = time.time(), 0.0, 0
        it = data.iterator(0, batch_size=64)
        for s in range(steps):
            state, out = step_fn(state, to_global(next(it), sh))
            done = s + 1
            if done % eval_every == 0 or done == steps:
                acc = recall_accuracy(ts, state["params"], inputs, targets, 64)
                print(f"  {mixer:10s} step {done:5d} loss {float(out['loss']):.3f} acc {acc:.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
                if acc >= TARGET or time.time() - t0 > minutes * 60:
                    break
    return {"mixer": mixer, "vocab": vocab, "seq_len": seq_len, "pairs": pairs, "accuracy": acc,
            "steps": done, "seconds": time.time() - t0, "params": ts.n_params}


EXAMPLES = """examples:
  python scripts/recall_suite.py --mixers attn,gdn --cells 256:64:4 --minutes 2
  python scripts/recall_suite.py --cells 512:128:16 --d_model 128 --minutes 60 \\
      --out results/recall_suite_512.json
"""


def _mixer_names() -> tuple[str, ...]:
    return known_mixers() + (HYBRID,)


def _mixers(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated mixer names -> a tuple."""
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    known = _mixer_names()
    unknown = [s for s in names if s not in known]
    if not names or unknown:
        what = f"unknown mixer {', '.join(map(repr, unknown))}" if unknown else "no mixer given"
        raise argparse.ArgumentTypeError(f"{what} (choose from {', '.join(known)})")
    return names


def _cells(text: str) -> tuple[tuple[int, int, int], ...]:
    """argparse type: comma-separated vocab:seq_len:pairs cells, each a valid MQAR task."""
    cells = []
    for cell in (s.strip() for s in text.split(",") if s.strip()):
        try:
            vocab, seq_len, pairs = (int(x) for x in cell.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{cell!r} is not vocab:seq_len:pairs (three integers, e.g. 256:64:4)") from None
        try:
            MqarSpec(vocab_size=vocab, seq_len=seq_len, num_kv_pairs=pairs).validate(field="cell")
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{cell!r}: {e}") from None
        cells.append((vocab, seq_len, pairs))
    if not cells:
        raise argparse.ArgumentTypeError("no cell given (e.g. 256:64:4)")
    return tuple(cells)


def _positive(kind):
    """argparse type: a positive int or float."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _d_model(text: str) -> int:
    value = _positive(int)(text)
    if value % NUM_HEADS:
        raise argparse.ArgumentTypeError(f"must be divisible by the {NUM_HEADS} heads, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixers", type=_mixers, default=DEFAULT_MIXERS, metavar="MIXER[,MIXER...]",
                   help=f"mixers to train, comma-separated, from: {', '.join(_mixer_names())} "
                        "(default: %(default)s)")
    p.add_argument("--cells", type=_cells, default="256:64:4,512:128:16",
                   metavar="V:L:K[,V:L:K...]",
                   help="MQAR cells vocab:seq_len:pairs, comma-separated; vocab even and >= 8, "
                        "1 <= pairs < vocab/2, seq_len >= 4*pairs - 1 "
                        "(default: %(default)s)")
    p.add_argument("--minutes", type=_positive(float), default=10.0, metavar="M",
                   help="time budget per model, checked at each evaluation "
                        "(default: %(default)s)")
    p.add_argument("--steps", type=_positive(int), default=20000, metavar="N",
                   help="most training steps per model; the learning rate's cosine decay spans "
                        "them (default: %(default)s)")
    p.add_argument("--d_model", type=_d_model, default=64, metavar="D",
                   help="model width, divisible by the 2 heads (default: %(default)s)")
    p.add_argument("--lr", type=_positive(float), default=3e-3,
                   help="peak learning rate, after the warm-up (default: %(default)s)")
    p.add_argument("--eval_every", type=_positive(int), default=100, metavar="N",
                   help="steps between held-out evaluations (default: %(default)s)")
    p.add_argument("--out", default="results/recall_suite.json", metavar="PATH",
                   help="JSON file to write; its folder is created (default: %(default)s)")
    return p


def main():
    args = build_parser().parse_args()
    rows = []
    for vocab, seq_len, pairs in args.cells:
        for mixer in args.mixers:
            rows.append(train_cell(mixer, vocab, seq_len, pairs, d_model=args.d_model,
                                   minutes=args.minutes, steps=args.steps, lr=args.lr,
                                   eval_every=args.eval_every))
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    print(f"\n{'cell (V:L:kv)':16s} {'mixer':10s} {'accuracy':>9s} {'steps':>7s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['vocab']}:{r['seq_len']}:{r['pairs']:<8} {r['mixer']:10s} {r['accuracy']:9.3f} "
              f"{r['steps']:7d} {r['seconds']:8.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
