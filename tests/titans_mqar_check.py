"""The Titans MQAR regression run as a script (tests/test_titans_layer.py, in the background):
`python tests/titans_mqar_check.py` prints {"losses": [...], "grad_norms": [...]} of 120 steps
as its last line.

The run that went to NaN at step 95 with the old undamped θ ≤ 0.5 (memory weights reached
1e13 within one 64-token sequence): mqar config, titans mixer, 2 layers, d_model 64, 2 heads,
sequences of 64 tokens with 4 key-value pairs over a vocabulary of 256, batch 64, lr 3e-3
(200 warmup steps of a 2000-step schedule), weight decay 0.1, one device.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import mqar as mqar_config  # noqa: E402
from train.data import load_data  # noqa: E402
from train.sharding import batch_sharding, make_mesh, replicated, to_global  # noqa: E402
from train.state import TrainState, build_model_config  # noqa: E402
from train.step import make_train_step  # noqa: E402

STEPS = 120


def main():
    cfg = mqar_config.get_config("mixer=titans")
    cfg.model.update(dict(d_model=64, n_layers=2, num_heads=2, window=64))
    cfg.data.seq_len = 64
    cfg.data.mqar.update(dict(vocab_size=256, num_kv_pairs=4, heldout_examples=64))
    cfg.train.update(dict(steps=2000, batch_size=64, lr=3e-3, warmup_steps=200,
                          weight_decay=0.1))
    data = load_data(cfg.data, seed=0)
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        ts = TrainState(build_model_config(cfg.model, data.tokenizer.vocab_size), mesh, 0,
                        cfg.train)
        state = ts.init()
        sh = batch_sharding(mesh)
        step = make_train_step(ts.graphdef, ts.tx, ts.shardings(state), sh, replicated(mesh))
        losses, norms = [], []
        for s in range(STEPS):
            state, out = step(state, to_global(data.batch(s, batch_size=64), sh))
            losses.append(float(out["loss"]))
            norms.append(float(out["grad_norm"]))
    print(json.dumps({"losses": losses, "grad_norms": norms}))


if __name__ == "__main__":
    main()
