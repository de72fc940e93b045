"""`train_and_evaluate(config, workdir)`: the training loop, in sections.

1. Inputs and model config are validated (before anything compiles).
2. Mesh, sharded parameters and optimizer state; resume from the workdir's last checkpoint.
3. Train: the batch of step s is a pure function of (seed, s); log, checkpoint.
4. Evaluate held-out loss and bits per byte (per token for non-byte tokenizers); report.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from train.checkpoint import Checkpointer, CheckpointError
from train.data import load_data
from train.optimizer import make_schedule
from train.metrics import MetricsWriter, device_peak_flops, flops_per_token
from train.sharding import batch_sharding, make_mesh, replicated, to_global
from train.state import TrainState, abstract_of, build_model_config
from train.step import make_eval_step, make_train_step
from zoo.config import ConfigError

__all__ = ["train_and_evaluate", "evaluate_heldout", "to_global"]


def evaluate_heldout(ts: TrainState, params, data, batch_size: int, max_batches: int) -> dict:
    """Held-out loss (nats/token), perplexity and bits per byte (or per token)."""
    mesh = ts.mesh
    step = make_eval_step(ts.graphdef, ts.param_shardings, batch_sharding(mesh), replicated(mesh))
    nll, tokens = 0.0, 0.0
    for batch in data.eval_batches(batch_size=batch_size, max_batches=max_batches):
        out = step(params, to_global(batch, batch_sharding(mesh)))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    loss = nll / max(tokens, 1.0)
    unit = "bits_per_byte" if data.tokenizer.to_dict().get("type") == "bytes" else "bits_per_token"
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), unit: loss / math.log(2),
            "eval_tokens": tokens}


def _check_same_data_order(saved: dict, config, workdir: str) -> None:
    """A resume must see the batches the run would have seen: seed, seq_len and batch size."""
    for section, key in ((None, "seed"), ("data", "seq_len"), ("train", "batch_size")):
        old = saved.get(key) if section is None else saved.get(section, {}).get(key)
        new = config[key] if section is None else config[section][key]
        if old is not None and old != new:
            name = key if section is None else f"{section}.{key}"
            raise CheckpointError(f"{name} is {new} but the checkpoint in {workdir} was trained "
                                  f"with {old}; resuming would change the data order")


def _describe(ts: TrainState) -> str:
    c = ts.model_cfg
    return (f"model: {ts.n_params / 1e6:.2f}M parameters ({(ts.n_params - ts.n_embed) / 1e6:.2f}M "
            f"non-embedding), d_model={c.d_model}, layers={c.n_layers} {list(c.layer_types)}")


def train_and_evaluate(config, workdir: str) -> dict:
    # 1. Validate inputs before compiling anything.
    data = load_data(config.data, seed=config.seed)
    model_cfg = build_model_config(config.model, data.tokenizer.vocab_size)
    try:
        mesh = make_mesh(config.mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    gb, tc = int(config.train.batch_size), config.train
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if gb % n_batch_shards:
        raise ConfigError(f"train.batch_size ({gb}) must be divisible by mesh data*fsdp "
                          f"({n_batch_shards})")
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)

    # 2. Model, optimizer state, resume.
    with jax.set_mesh(mesh):
        try:
            ts = TrainState(model_cfg, mesh, int(config.seed), tc)
        except ConfigError:
            raise
        except ValueError as e:  # a layer rejecting its arguments (mixer_options)
            raise ConfigError(f"model: {e}") from e
        os.makedirs(workdir, exist_ok=True)
        say(_describe(ts))
        say(data.describe())
        state = ts.init()
        ckpt = Checkpointer(workdir, keep=int(config.checkpoint.keep))
        start = 0
        if ckpt.latest_step() is not None:
            _, meta = ckpt.restore_meta()
            if meta.get("fingerprint") != data.fingerprint:
                raise CheckpointError(
                    f"{workdir} holds a run on a different corpus or tokenizer (fingerprint "
                    f"{meta.get('fingerprint')} != {data.fingerprint}); use a new --workdir")
            _check_same_data_order(meta.get("config", {}), config, workdir)
            start, state, _ = ckpt.restore(None, abstract_of(state))
            say(f"resumed from step {start} ({ckpt.directory})")
        meta = {"config": json.loads(config.to_json_best_effort()),
                "tokenizer": data.tokenizer.to_dict(), "fingerprint": data.fingerprint}
        metrics = MetricsWriter(workdir, resume_step=start)

        # 3. Train.
        bsh = batch_sharding(mesh)
        train_step = make_train_step(ts.graphdef, ts.tx, ts.shardings(state), bsh, replicated(mesh))
        schedule_lr = make_schedule(tc)
        seq_len = int(config.data.seq_len)
        n_attn = sum(t in ("attn", "swa") for t in model_cfg.layer_types)
        fpt = flops_per_token(ts.n_params - ts.n_embed, n_attn, seq_len, model_cfg.d_model)
        peak = device_peak_flops()
        steps, log_every = int(tc.steps), max(1, int(tc.log_every))
        every = max(1, int(config.checkpoint.every))
        it = data.iterator(start, batch_size=gb, process_index=jax.process_index(),
                           process_count=jax.process_count())
        t0, t_start, window_tokens, first_loss, last = time.time(), time.time(), 0.0, None, {}
        for step in range(start, steps):
            state, out = train_step(state, to_global(next(it), bsh))
            window_tokens += gb * seq_len
            done = step + 1
            if done % log_every == 0 or done == steps or done == start + 1:
                out = jax.device_get(out)
                loss = float(out["loss"])
                first_loss = loss if first_loss is None else first_loss
                dt = time.time() - t0
                tps = window_tokens / max(dt, 1e-9)
                last = {"loss": loss, "lr": float(schedule_lr(step)),
                        "grad_norm": float(out["grad_norm"]), "tokens_per_s": tps,
                        "mfu": tps * fpt / peak}
                metrics.write(done, last)
                eta = (time.time() - t_start) / (done - start) * (steps - done)
                say(f"step {done:>6}/{steps} | loss {loss:.4f} | lr {last['lr']:.2e} | "
                    f"gnorm {last['grad_norm']:.3f} | {tps / 1e3:.1f}k tok/s | "
                    f"MFU {100 * last['mfu']:.1f}% | eta {eta:.0f}s", flush=True)
                t0, window_tokens = time.time(), 0.0
            if done % every == 0 or done == steps:
                ckpt.save(done, state, {**meta, "step": done})
        ckpt.wait()

        # 4. Evaluate.
        results = evaluate_heldout(ts, state["params"], data, gb, int(tc.eval_batches))
        metrics.write(steps, results)
        metrics.close()
        ckpt.close()
    final = {"step": steps, "train_loss": last.get("loss"), "first_loss": first_loss, **results}
    say("eval: " + " | ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "eval_tokens"))
    say(f"logs: {os.path.join(workdir, 'tb')} (tensorboard --logdir {workdir}), "
        f"{os.path.join(workdir, 'metrics.jsonl')}")
    say(f"checkpoint: {os.path.join(workdir, 'checkpoints', str(steps))}")
    return final
