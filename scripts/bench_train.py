"""Benchmark whole train steps; print a table and write JSON to --json.

For every size preset x mixer x sequence length: the train step of `train.step.make_train_step`
(forward, backward, AdamW update, sharded state donated) on the current backend's devices, timed
over --steps steps after a compile and one warm-up step (both excluded). Reported: step time,
tokens/s and MFU = tokens/s x the model's own FLOPs per token (`LM.train_flops_per_token(T)`,
LM head and each mixer's math included) / the matmul peak measured in this process
(`train.peak.measured_peak_flops`: fp32 on CPU, bf16 on GPU/TPU), plus XLA's own FLOP count of
the compiled step (cost analysis) per token. A mixer `name` fills every layer; `name:r` is an
r:1 hybrid with one `attn` layer per r + 1 layers (gdn:3 = the 3:1 GatedDeltaNet hybrid). Each
step sees ~--tokens tokens (batch = max(1, tokens / T) rows of one random byte-level batch, so no
data loading is timed).

On CPU the process pins itself to one core (environment variable BENCH_CORE, default 0) with
single-threaded Eigen before it imports jax, and the peak is measured under the same pinning:
multi-threaded XLA on a shared 2-core machine slows down by up to ~100x when another process
holds a core, so unpinned timings are noise (--no-pin uses every core). A pinned run times
the steps and the peak by this process's CPU time (--clock): the share of the core that other
jobs take is then not counted, in the steps or in the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

_ON_GPU_OR_TPU = os.environ.get("JAX_PLATFORMS", "") not in ("", "cpu") or os.path.exists("/dev/nvidia0")
if __name__ == "__main__" and not _ON_GPU_OR_TPU and "--no-pin" not in sys.argv:
    os.sched_setaffinity(0, {int(os.environ.get("BENCH_CORE", "0"))})  # before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = ("tiny", "small", "340M", "1.3B")
HYBRID = "gdn:3"

EPILOG = """examples:
  python scripts/bench_train.py --sizes tiny --mixers all --lengths 512 --json results/bench_train_cpu.json
  python scripts/bench_train.py --sizes small --mixers gdn:3 --lengths 2048 --steps 3
  python scripts/bench_train.py --sizes tiny --mixers attn,gdn,gdn:3 --lengths 512,2048 --dtype bfloat16
"""


def _csv(kind, allowed=None):
    def parse(text: str):
        items = [p.strip() for p in text.split(",") if p.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma list of {kind}, got {text!r}")
        out = []
        for item in items:
            if kind == "lengths":
                if not item.isdigit() or int(item) < 1:
                    raise argparse.ArgumentTypeError(f"{item!r} is not a positive int")
                out.append(int(item))
            elif allowed is not None and item not in allowed:
                raise argparse.ArgumentTypeError(f"unknown {kind[:-1]} {item!r}; known: "
                                                 f"{', '.join(allowed)}")
            else:
                out.append(item)
        return out
    return parse


def _mixers(text: str) -> list[str]:
    from zoo.registry import known_mixers  # noqa: PLC0415 (imports jax: after the pinning)
    known = tuple(known_mixers())
    if text == "all":
        return [*known, HYBRID]
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, ratio = item.partition(":")
        if name not in known or (ratio and (not ratio.isdigit() or int(ratio) < 1)):
            raise argparse.ArgumentTypeError(
                f"unknown mixer {item!r}; known: all, {', '.join(known)}, or NAME:R (an R:1 "
                f"hybrid with attn, e.g. {HYBRID})")
        out.append(item)
    return out


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_csv("sizes", SIZES), default=["tiny"],
                   help=f"size presets, a comma list of {', '.join(SIZES)} (default: tiny)")
    p.add_argument("--mixers", type=_mixers, default=None, metavar="LIST",
                   help=f"mixers, a comma list of registry names or NAME:R hybrids, or all "
                        f"(every mixer and {HYBRID}) (default: all)")
    p.add_argument("--lengths", type=_csv("lengths"), default=[512],
                   help="sequence lengths T, a comma list (default: 512)")
    p.add_argument("--steps", type=_positive, default=3,
                   help="timed steps per case, after the compile and one warm-up step "
                        "(default: 3)")
    p.add_argument("--tokens", type=_positive, default=16384,
                   help="tokens per step: batch = max(1, tokens / T) rows (default: 16384)")
    p.add_argument("--dtype", choices=("config", "float32", "bfloat16"), default="config",
                   help="compute dtype (model.dtype); config = the config's own (default: config)")
    p.add_argument("--impl", default="auto",
                   help="op implementation of every layer (model.impl) (default: auto)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write the results as JSON to FILE (default: print only)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="time steps and the peak by wall time or by this process's CPU time; "
                        "auto = cpu on a pinned CPU run (the share other jobs take of the core "
                        "is not counted), wall otherwise (default: auto)")
    p.add_argument("--no-pin", action="store_true",
                   help="on CPU, use every core instead of pinning to one (default: off)")
    return p


def case_config(size: str, mixer: str, seq_len: int, tokens: int, dtype: str, impl: str):
    """The run config of one case (configs/lm.py), batch sized to ~tokens tokens."""
    from configs.lm import get_config  # noqa: PLC0415
    name, _, ratio = mixer.partition(":")
    c = get_config(f"mixer={name},ratio={ratio or 0},size={size}")
    c.data.seq_len = seq_len
    c.train.batch_size = max(1, tokens // seq_len)
    c.model.impl = impl
    if dtype != "config":
        c.model.dtype = dtype
    return c


def _batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """One random packed batch: two documents per row (segment ids 1, 2), positions restart."""
    import numpy as np  # noqa: PLC0415
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int32)
    half = seq_len // 2
    seg = np.where(np.arange(seq_len) < half, 1, 2).astype(np.int32)
    pos = np.where(np.arange(seq_len) < half, np.arange(seq_len), np.arange(seq_len) - half)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.broadcast_to(seg, (batch_size, seq_len)).copy(),
            "positions": np.broadcast_to(pos.astype(np.int32), (batch_size, seq_len)).copy()}


def run_case(config, steps: int, clock: str = "wall") -> dict:
    """Compile, warm up and time the train step of `config` on all devices (module docstring).
    The peak is measured again just before and just after the timed steps and the larger one
    is the case's peak (on a shared host the machine's state drifts between cases)."""
    import jax  # noqa: PLC0415
    import ml_collections  # noqa: PLC0415

    from train.memory import abstract_batch, vocab_size_of  # noqa: PLC0415
    from train.peak import measured_peak_flops  # noqa: PLC0415
    from train.sharding import batch_sharding, make_mesh, replicated, to_global  # noqa: PLC0415
    from train.state import TrainState, build_model_config  # noqa: PLC0415
    from train.step import make_train_step  # noqa: PLC0415

    mesh = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    gb, seq_len = int(config.train.batch_size), int(config.data.seq_len)
    gb += (-gb) % mesh.size                                     # divisible by the batch shards
    model_cfg = build_model_config(config.model, vocab_size_of(config))
    with jax.set_mesh(mesh):
        ts = TrainState(model_cfg, mesh, int(config.seed), config.train)
        state = ts.init()
        shardings = jax.tree.map(lambda x: x.sharding, state)
        bsh = batch_sharding(mesh)
        step = make_train_step(ts.graphdef, ts.tx, shardings, bsh, replicated(mesh))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), state)
        t0 = time.perf_counter()
        compiled = step.lower(abstract, abstract_batch(gb, seq_len, bsh)).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        batch = to_global(_batch(gb, seq_len, model_cfg.vocab_size), bsh)
        state, out = compiled(state, batch)                     # warm-up, excluded
        jax.block_until_ready(out)
        timer = time.process_time if clock == "cpu" else time.perf_counter
        peak_before = measured_peak_flops(fresh=True, clock=clock)
        t0 = timer()
        for _ in range(steps):
            state, out = compiled(state, batch)
        jax.block_until_ready((state, out))
        step_s = (timer() - t0) / steps
        peak = max(peak_before, measured_peak_flops(fresh=True, clock=clock))
    tokens = gb * seq_len
    fpt = ts.abstract_model.train_flops_per_token(seq_len)
    tps = tokens / step_s
    return {"n_params": int(ts.n_params), "layer_types": list(model_cfg.layer_types),
            "dtype": str(model_cfg.dtype), "impl": model_cfg.impl, "T": seq_len,
            "batch": gb, "tokens_per_step": tokens, "compile_s": round(compile_s, 2),
            "step_s": step_s, "tokens_per_s": tps, "flops_per_token": fpt,
            "xla_flops_per_token": float((cost or {}).get("flops", float("nan"))) / tokens,
            "peak_flops": peak, "mfu": tps * fpt / peak, "loss": float(out["loss"])}


def _row(r: dict) -> str:
    return (f"{r['size']:<6s} {r['mixer']:<11s} {r['T']:>6d} {r['batch']:>5d} "
            f"{r['step_s'] * 1e3:>10.1f} {r['tokens_per_s'] / 1e3:>9.2f} "
            f"{r['flops_per_token'] / 1e6:>9.1f} {r['xla_flops_per_token'] / 1e6:>9.1f} "
            f"{r['peak_flops'] / 1e9:>8.1f} {100 * r['mfu']:>6.1f} {r['compile_s']:>8.1f}")


HEADER = (f"{'size':<6s} {'mixer':<11s} {'T':>6s} {'batch':>5s} {'step ms':>10s} "
          f"{'ktok/s':>9s} {'MFLOP/tk':>9s} {'XLA MF/tk':>9s} {'GFLOP/s':>8s} {'MFU%':>6s} "
          f"{'compile':>8s}")


def _write(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax  # noqa: PLC0415

    from train.metrics import vendor_peak_flops  # noqa: PLC0415
    from train.peak import measured_peak_flops  # noqa: PLC0415
    mixers = args.mixers if args.mixers is not None else _mixers("all")
    pinned = not args.no_pin and jax.default_backend() == "cpu"
    clock = args.clock if args.clock != "auto" else ("cpu" if pinned else "wall")
    t0 = time.perf_counter()
    peak = measured_peak_flops(clock=clock)
    dev = jax.devices()[0]
    meta = {"backend": jax.default_backend(), "device_kind": dev.device_kind,
            "n_devices": jax.device_count(), "jax": jax.__version__,
            "python": platform.python_version(), "host": platform.machine(),
            "pinned_core": int(os.environ.get("BENCH_CORE", "0")) if pinned else None,
            "clock": clock,
            "peak_flops": peak, "peak_measure_s": round(time.perf_counter() - t0, 3),
            "vendor_peak_flops": vendor_peak_flops(), "steps": args.steps,
            "tokens_per_step": args.tokens}
    print(f"backend {meta['backend']} ({meta['device_kind']} x{meta['n_devices']}), measured "
          f"peak {peak / 1e9:.1f} GFLOP/s (each case re-measures its own: column GFLOP/s), "
          f"pinned core {meta['pinned_core']}, {clock} clock")
    print(HEADER, flush=True)
    rows = []
    for size in args.sizes:
        for mixer in mixers:
            for seq_len in args.lengths:
                cfg = case_config(size, mixer, seq_len, args.tokens, args.dtype, args.impl)
                try:
                    r = {"size": size, "mixer": mixer, **run_case(cfg, args.steps, clock)}
                except Exception as e:  # one failing case is reported, the others still run
                    r = {"size": size, "mixer": mixer, "T": seq_len,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                    print(f"{size:<6s} {mixer:<11s} {seq_len:>6d} error: {r['error']}", flush=True)
                else:
                    print(_row(r), flush=True)
                rows.append(r)
                if args.json:  # after every case: a long run stopped early keeps what it has
                    _write(args.json, {**meta, "cases": rows})
    if args.json:
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
