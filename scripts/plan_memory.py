"""Compile a config's train step ahead of time and print (and with --json, write) its memory per device.

The step is compiled from abstract inputs on a (data, fsdp, tensor) mesh of --devices simulated
CPU devices (or, with --topology, on compile-only TPU/GPU devices where libtpu or the CUDA
plugin is installed; untested on a machine without them). Printed per device: parameter,
optimizer, temp and total bytes, which compiler produced them, and with --device whether the
total fits 90% of that device's memory. No data is read and nothing is allocated: model.vocab_size
0 means the tokenizer's vocabulary (256 for 'bytes'). Fields of the config are overridden as in
training, --config.train.batch_size=8 --config.data.seq_len=8192 --config.model.remat=full.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEVICES = ("h100-80g", "h200-141g", "a100-40g", "a100-80g", "v5e-16g", "v5p-95g", "v6e-32g", "cpu")

EPILOG = """examples:
  python scripts/plan_memory.py --config configs/lm.py:size=tiny,mixer=gdn,ratio=3 --mesh 1,8,1 --devices 8
  python scripts/plan_memory.py --config configs/lm.py:size=1.3B,mixer=gdn,ratio=3 --mesh 1,8,1 --devices 8 --device h100-80g --json plan.json
  python scripts/plan_memory.py --config configs/lm.py:size=1.3B,mixer=gdn,ratio=3 --mesh 1,8,1 --devices 8 --config.data.seq_len=8192 --config.train.batch_size=8
"""


def _mesh(spec: str) -> tuple[int, int, int]:
    parts = spec.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected D,F,T (three positive ints: data, fsdp, "
                                         f"tensor), got {spec!r}")
    return tuple(int(p) for p in parts)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/lm.py", metavar="FILE[:ARG]",
                   help="config file and its argument, e.g. configs/lm.py:size=1.3B,mixer=gdn,"
                        "ratio=3 (default: configs/lm.py)")
    p.add_argument("--mesh", type=_mesh, default=(1, 8, 1), metavar="D,F,T",
                   help="mesh sizes (data, fsdp, tensor); their product is the device count "
                        "(default: 1,8,1)")
    p.add_argument("--devices", type=_positive, default=None, metavar="N",
                   help="simulated CPU devices (default: the mesh's product)")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="say whether the step fits 90%% of this device's memory (default: none)")
    p.add_argument("--topology", default=None, metavar="NAME",
                   help="compile for compile-only devices of this topology, e.g. v5e:2x4 "
                        "(needs libtpu or the CUDA plugin) (default: simulated CPU devices)")
    p.add_argument("--platform", default="tpu", choices=("tpu", "cuda"),
                   help="platform of --topology (default: tpu)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write the plan as JSON to FILE (default: print only)")
    return p


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(`--config.a.b=v` items, the rest)."""
    over = [a for a in argv if a.startswith("--config.")]
    return over, [a for a in argv if not a.startswith("--config.")]


def _parse_value(text: str, old):
    """A command-line value in the type of the field it replaces."""
    if isinstance(old, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, tuple):
        return tuple(p.strip() for p in text.split(",") if p.strip())
    return text


def apply_overrides(config, overrides: list[str]) -> None:
    """Set each `--config.a.b=v` field (unknown fields were refused by `check_overrides`)."""
    for item in overrides:
        dotted, eq, text = item[len("--config."):].partition("=")
        if not eq:
            raise ValueError(f"--config.{dotted}: expected --config.{dotted}=VALUE")
        *path, last = dotted.split(".")
        node = config
        for part in path:
            node = node[part]
        old = node[last]
        try:
            value = _parse_value(text, old)
        except ValueError as e:
            raise ValueError(f"--config.{dotted}: {e}") from None
        with node.ignore_type():
            node[last] = value


def _gib(n) -> str:
    return f"{n / 1024 ** 3:9.3f} GiB"


def describe(plan: dict) -> str:
    per = plan["per_device"]
    rows = [("params", per["params_bytes"]), ("optimizer", per["optimizer_bytes"]),
            ("temp", per["temp_bytes"]), ("total", per["total_bytes"])]
    lines = [f"parameters: {plan['n_params'] / 1e6:.1f}M; mesh (data, fsdp, tensor) = "
             f"{tuple(plan['mesh'])}; batch {plan['batch_size']} x {plan['seq_len']} tokens; "
             f"compute {plan['dtype']}, remat {plan['remat']}",
             f"compiler: {plan['compiler']} (compiled in {plan['compile_s']:.1f} s)",
             "per device:"]
    lines += [f"  {name:<10s}{_gib(v)}" for name, v in rows]
    if plan["device"]:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"{plan['device']}: {verdict} ({_gib(per['total_bytes']).strip()} vs "
                     f"{plan['fit_margin']:.0%} of {_gib(plan['device_bytes']).strip()})")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_overrides(argv)
    args = build_parser().parse_args(rest)
    n = args.devices or args.mesh[0] * args.mesh[1] * args.mesh[2]
    if args.topology is None:  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={n}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from train.cli_config import check_overrides, load_config_file  # noqa: PLC0415
    from train.memory import compile_only_devices, plan_memory  # noqa: PLC0415
    from zoo.config import ConfigError  # noqa: PLC0415
    try:
        check_overrides(overrides, args.config)
        config = load_config_file(args.config)
        apply_overrides(config, overrides)
        devices = (compile_only_devices(args.topology, args.platform) if args.topology else None)
        if devices is not None and args.devices:
            devices = devices[:n]
        plan = plan_memory(config, args.mesh, devices, device=args.device)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(describe(plan))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(plan, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
