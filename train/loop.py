"""`train_and_evaluate(config, workdir)`: the training loop, in sections.

1. Inputs and model config are validated (before anything compiles): every field's range, no
   field set that the run will not read (`train.fields`).
2. Mesh, sharded parameters and optimizer state; resume from the workdir's last checkpoint
   after checking it is the same run (`train.resume`).
3. Train: the batch of step s is a pure function of (seed, s); log, checkpoint. A non-finite
   update is skipped and logged (`train.guard`); SIGINT/SIGTERM save and stop
   (`train.interrupt`).
4. Evaluate held-out loss and bits per byte (per token for non-byte tokenizers; recall accuracy
   for a recall task); a finished run started again reports its stored evaluation.
"""

from __future__ import annotations

import json
import math
import time

import jax
import numpy as np
from etils import epath

from train.checkpoint import Checkpointer
from train.data import load_data
from train.distributed import check_batch_axes
from train.fields import check_config
from train.guard import SkippedUpdates
from train.interrupt import Interrupted, StopFlag
from train.memory import abstract_batch, check_fits, device_memory_limit
from train.metrics import MetricsWriter, device_peak_flops
from train.optimizer import make_schedule
from train.profile import ProfileWindow
from train.resume import check_resume
from train.sharding import batch_sharding, make_mesh, replicated, to_global
from train.state import TrainState, build_model_config, normalize_layer_types
from train.step import make_eval_step, make_train_step
from zoo.config import ConfigError

__all__ = ["train_and_evaluate", "evaluate_heldout", "resolve_config", "Interrupted"]


def evaluate_heldout(ts: TrainState, params, data, batch_size: int, max_batches: int) -> dict:
    """Held-out loss (nats/token), perplexity and bits per byte (or per token).

    Each process loads only its slice of every held-out batch (rows [i*B/P, (i+1)*B/P));
    `to_global` assembles the global batch, so the sums are those of one process alone."""
    mesh = ts.mesh
    step = make_eval_step(ts.graphdef, ts.param_shardings, batch_sharding(mesh), replicated(mesh))
    sums = {"nll_sum": 0.0, "tokens": 0.0, "acc_sum": 0.0, "acc_rows": 0.0}
    for batch in data.eval_batches(batch_size=batch_size, max_batches=max_batches,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count()):
        out = jax.device_get(step(params, to_global(batch, batch_sharding(mesh))))
        for k in sums:
            sums[k] += float(out[k])
    loss = sums["nll_sum"] / max(sums["tokens"], 1.0)
    unit = "bits_per_byte" if data.tokenizer.to_dict().get("type") == "bytes" else "bits_per_token"
    out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), unit: loss / math.log(2),
           "eval_tokens": sums["tokens"]}
    if getattr(data, "is_recall_task", False):
        out["recall_accuracy"] = sums["acc_sum"] / max(sums["acc_rows"], 1.0)
    return out


def _describe(ts: TrainState) -> str:
    c = ts.model_cfg
    return (f"model: {ts.n_params / 1e6:.2f}M parameters ({(ts.n_params - ts.n_embed) / 1e6:.2f}M "
            f"non-embedding), d_model={c.d_model}, layers={c.n_layers} {list(c.layer_types)}")


def resolve_config(config, explicit):
    """A copy with layer_types in tuple form; from the command line (`explicit` given) an explicit
    layer list sets n_layers unless n_layers was set too (then they must agree)."""
    config = config.copy_and_resolve_references()
    layer_types = normalize_layer_types(config.model.layer_types)
    config.model.layer_types = layer_types
    if layer_types and explicit is not None and "model.n_layers" not in explicit:
        config.model.n_layers = len(layer_types)
    return config


def train_and_evaluate(config, workdir: str, *, explicit=None) -> dict:
    """Train (or resume) the run of `config` in `workdir`, then evaluate it.

    `explicit`: the dotted config fields the user set on the command line. They decide what
    counts as "set" for fields whose defaults come from size presets (a set field the model
    does not read is an error), and let an explicit layer_types imply n_layers. Raises
    ConfigError / DataError / CheckpointError for bad input, NonFiniteError after too many
    skipped updates, Interrupted after a signal (a checkpoint was saved).
    """
    # 1. Validate inputs before compiling anything.
    config = resolve_config(config, explicit)
    check_config(config, explicit or ())
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
    check_batch_axes(mesh.devices, jax.process_count())  # each process feeds its own rows
    micro = int(tc.microbatches)
    if gb % (micro * n_batch_shards):
        raise ConfigError(f"train.batch_size ({gb}) must be divisible by train.microbatches "
                          f"({micro}) x mesh data*fsdp ({n_batch_shards}): every micro-batch "
                          f"is split over the batch shards")
    profile = ProfileWindow(workdir, config.profile.steps)  # checks the window's format
    is_main = jax.process_index() == 0
    given = epath.Path(workdir)  # for messages: the workdir as the user wrote it (or a URI)
    say = print if is_main else (lambda *a, **k: None)

    # 2. Model, optimizer state, resume.
    peak = device_peak_flops()  # a one-device matmul: measured outside the mesh context
    with jax.set_mesh(mesh):
        try:
            ts = TrainState(model_cfg, mesh, int(config.seed), tc)
        except ConfigError:
            raise
        except ValueError as e:  # a layer rejecting its arguments (mixer_options)
            raise ConfigError(f"model: {e}") from e
        ckpt = Checkpointer(workdir, keep=int(config.checkpoint.keep))
        start = 0
        if ckpt.latest_step() is not None:
            _, saved = ckpt.restore_meta()
            check_resume(saved, config, model_cfg, data, workdir)
        say(_describe(ts))
        say(data.describe())
        if ckpt.latest_step() is not None:  # straight into the shardings: no fresh state first
            start, state, _ = ckpt.restore(None, ts.abstract_state())
            say(f"resumed from step {start} ({given / 'checkpoints'})")
        else:
            state = ts.init()
        meta = {"config": json.loads(config.to_json_best_effort()),
                "tokenizer": ckpt.store_tokenizer(data.tokenizer), "fingerprint": data.fingerprint}
        metrics = MetricsWriter(workdir, resume_step=start)
        steps = int(tc.steps)
        stored = metrics.find(steps, "eval_loss") if start >= steps else None

        # 3. Train.
        bsh = batch_sharding(mesh)
        train_step = make_train_step(ts.graphdef, ts.tx, ts.state_shardings, bsh, replicated(mesh),
                                     microbatches=micro)
        schedule_lr = make_schedule(tc)
        seq_len = int(config.data.seq_len)
        if device_memory_limit() is not None:  # GPU/TPU: compile ahead, refuse what won't fit
            train_step = train_step.lower(ts.abstract_state(),
                                          abstract_batch(gb, seq_len, bsh)).compile()
            check_fits(train_step, ts.abstract_state(), config, mesh, say=say)
        fpt = ts.abstract_model.train_flops_per_token(seq_len)  # each mixer's own count
        log_every = max(1, int(tc.log_every))
        every = max(1, int(config.checkpoint.every))
        it = data.iterator(start, batch_size=gb, process_index=jax.process_index(),
                           process_count=jax.process_count())
        guard = SkippedUpdates(int(tc.max_skipped_steps), ckpt, metrics, say, start)
        t0, t_start, window_tokens, first_loss, last = time.time(), time.time(), 0.0, None, {}
        saved_at, done = None, start
        with StopFlag() as stop:
            for step in range(start, steps):
                profile.before(step)
                state, out = train_step(state, to_global(next(it), bsh))
                profile.after(step + 1, out)
                window_tokens += gb * seq_len
                done = step + 1
                guard.observe(done, out)  # reads the previous step's flags: no host sync here
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
                    saved_at = done
                if stop.should_stop(done, ckpt.manager) and done < steps:
                    break
            guard.flush()
            profile.close()
            if stop.signum is not None and done < steps:
                if saved_at != done:
                    ckpt.save(done, state, {**meta, "step": done})
                ckpt.close()
                metrics.close()
                raise Interrupted(
                    f"{stop.name()} at step {done}/{steps}: saved checkpoint "
                    f"{given / 'checkpoints' / str(done)}; run the same command to resume "
                    f"(exit {stop.exit_code()})", stop.exit_code())
            ckpt.wait()

            # 4. Evaluate (a finished run started again reports what it stored).
            if stored is not None:
                results = {k: v for k, v in stored.items() if k != "step"}
                say(f"run already finished at step {steps}; its evaluation from "
                    f"{metrics.path}:")
            else:
                results = evaluate_heldout(ts, state["params"], data, gb, int(tc.eval_batches))
                metrics.write(steps, results)
        metrics.close()
        ckpt.close()
    final = {"step": steps, "train_loss": last.get("loss"), "first_loss": first_loss, **results}
    say("eval: " + " | ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "eval_tokens"))
    say(f"logs: {given / 'tb'} (tensorboard --logdir {given}), {given / 'metrics.jsonl'}")
    say(f"checkpoint: {given / 'checkpoints' / str(steps)}")
    return final
