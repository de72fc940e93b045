"""MQAR recall suite: train 2-layer models of each mixer on multi-query associative recall and
report accuracy and steps (Zoology-style, at CPU scale). Prints a table and writes JSON.

    python scripts/recall_suite.py [--mixers attn,gdn,gdn+attn,mamba2,lightning,hedgehog,titans]
        [--cells 256:64:4,512:128:16] [--minutes 10] [--d_model 64] [--out results/recall_suite.json]

A cell is vocab:seq_len:pairs. Each model trains on fresh MQAR batches (the `mqar` data source)
until its held-out accuracy reaches 0.99 or the time budget runs out; accuracy is per example over
the value positions, then averaged, on 512 held-out examples. `gdn+attn` is a 2-layer hybrid
(gdn, attn).
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

TARGET = 0.99


def _config(mixer: str, vocab: int, seq_len: int, pairs: int, d_model: int, steps: int, lr: float):
    c = mqar_config.get_config("mixer=attn")
    layer_types = ("gdn", "attn") if mixer == "gdn+attn" else (mixer, mixer)
    c.model.update(dict(d_model=d_model, n_layers=2, num_heads=2, layer_types=layer_types,
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixers", default="attn,gdn,gdn+attn,mamba2,lightning,hedgehog,titans")
    p.add_argument("--cells", default="256:64:4,512:128:16")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--out", default="results/recall_suite.json")
    args = p.parse_args()
    rows = []
    for cell in args.cells.split(","):
        vocab, seq_len, pairs = (int(x) for x in cell.split(":"))
        for mixer in args.mixers.split(","):
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
