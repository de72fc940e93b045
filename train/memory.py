"""Memory planning: per-device bytes of the train step, compiled ahead of time, nothing allocated.

The train step is compiled from abstract inputs (`TrainState.abstract_state()` and a batch of
`jax.ShapeDtypeStruct`s carrying their shardings), and XLA's memory analysis of the compiled
program gives, per device,

    total = arguments + outputs − aliased + temp

(the state is donated, so its outputs alias its arguments and count once). From the shardings
alone: params_bytes = Σ over parameters of the bytes of one shard (`sharding.shard_shape`), and
optimizer_bytes the same over the optimizer state. temp_bytes is the compiler's scratch (the
activations kept for the backward pass, gradients, collectives' buffers).

Who compiles decides the numbers: on simulated CPU devices (`--xla_force_host_platform_
device_count=N`) the CPU compiler's fusion and scheduling are not a GPU's or TPU's, so temp bytes
are an estimate of the same program (the state bytes are exact). Where libtpu or the CUDA plugin is
installed, `compile_only_devices` gives devices of a named topology that compile for the real
target without one attached (`jax.experimental.topologies`; written against jax's API, untested
here: this machine has neither).

`fits` compares the total with FIT_MARGIN (90%) of the device's memory: the rest is left to the
runtime (allocator fragmentation, the XLA runtime's own buffers, cuDNN/cuBLAS workspaces). On GPU,
JAX preallocates 75% of memory unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised; the trainer's
pre-check (`check_fits`) reads the real limit (`memory_stats()["bytes_limit"]`) instead.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from zoo.config import ConfigError

__all__ = ["DEVICE_MEMORY", "FIT_MARGIN", "plan_memory", "memory_report", "tree_shard_bytes",
           "abstract_batch", "compile_only_devices", "device_memory_limit", "check_fits",
           "vocab_size_of", "GiB"]

GiB = 1024 ** 3
FIT_MARGIN = 0.9

# Memory of one device, bytes: the capacity of the data sheets (GPUs in GB = 1e9 bytes, TPU HBM
# per chip in GiB). "cpu" is the host's RAM, read when asked for.
DEVICE_MEMORY: dict[str, float] = {
    "h100-80g": 80e9,
    "h200-141g": 141e9,
    "a100-40g": 40e9,
    "a100-80g": 80e9,
    "v5e-16g": 16 * GiB,
    "v5p-95g": 95 * GiB,
    "v6e-32g": 32 * GiB,
    "cpu": None,
}


def _host_memory() -> float:
    import os  # noqa: PLC0415
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def device_memory(name: str) -> float:
    if name not in DEVICE_MEMORY:
        raise ConfigError(f"device: unknown device {name!r}; known: {tuple(DEVICE_MEMORY)}")
    return DEVICE_MEMORY[name] if DEVICE_MEMORY[name] is not None else _host_memory()


def _shard_bytes(x) -> int:
    """Bytes of one device's shard of a ShapeDtypeStruct / array with a NamedSharding."""
    sh = getattr(x, "sharding", None)
    shape = sh.shard_shape(x.shape) if sh is not None else x.shape
    return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def tree_shard_bytes(tree) -> int:
    """Σ over the leaves of the bytes one device holds (the largest shard: shards are equal when
    the mesh axis divides the dimension, which `train.sharding` guarantees)."""
    return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))


def vocab_size_of(config) -> int:
    """The vocabulary the model will have, without reading any data: model.vocab_size when set,
    else data.mqar.vocab_size for MQAR, else the tokenizer's ('bytes' = 256; a tokenizer JSON
    file is read, nothing else)."""
    if int(config.model.vocab_size):
        return int(config.model.vocab_size)
    if config.data.source == "mqar":
        return int(config.data.mqar.vocab_size)
    from train.data.tokenizer import load_tokenizer  # noqa: PLC0415
    return int(load_tokenizer(config.data.tokenizer).vocab_size)


def abstract_batch(batch_size: int, seq_len: int, sharding: NamedSharding) -> dict:
    """The train step's batch as int32 [B, T] ShapeDtypeStructs (train.step's keys)."""
    x = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding)
    return {k: x for k in ("inputs", "targets", "segment_ids", "positions")}


def memory_report(compiled, abstract_state: dict) -> dict:
    """Per-device bytes of a compiled train step (module docstring): params_bytes,
    optimizer_bytes (from the shardings), temp_bytes, total_bytes and the raw argument / output /
    alias / generated-code sizes of XLA's memory analysis."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("this backend gives no memory analysis of a compiled program")
    args, outs = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    alias, temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    return {"params_bytes": tree_shard_bytes(abstract_state["params"]),
            "optimizer_bytes": tree_shard_bytes(abstract_state["opt_state"]),
            "temp_bytes": temp,
            "total_bytes": args + outs - alias + temp,
            "argument_bytes": args, "output_bytes": outs, "alias_bytes": alias,
            "generated_code_bytes": int(getattr(m, "generated_code_size_in_bytes", 0) or 0)}


def compile_only_devices(topology: str, platform: str = "tpu") -> list:
    """Devices of a named topology that compile without hardware attached (e.g. "v5e:2x4" for
    TPU). Needs libtpu (TPU) or the CUDA PJRT plugin (platform "cuda"); untested on this machine.
    """
    try:
        from jax.experimental import topologies  # noqa: PLC0415
        return list(topologies.get_topology_desc(topology_name=topology,
                                                 platform=platform).devices)
    except Exception as e:  # no plugin, unknown name: one line saying which
        raise ConfigError(f"topology {topology!r} on platform {platform!r}: no compile-only "
                          f"devices ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''});"
                          " they need libtpu or the CUDA PJRT plugin installed") from None


def _compiler(devices) -> str:
    d = devices[0]
    kind = getattr(d, "device_kind", d.platform)
    simulated = d.platform == "cpu" and len(devices) > 1
    attached = d in jax.devices(d.platform) if d.platform == jax.default_backend() else False
    how = ("simulated host devices" if simulated else
           "compile-only devices" if not attached else "attached devices")
    return f"xla {d.platform} ({kind}, {len(devices)} {how}, jax {jax.__version__})"


def plan_memory(config, mesh_shape, devices=None, *, device: str | None = None) -> dict:
    """Compile `config`'s train step ahead of time on the (data, fsdp, tensor) mesh `mesh_shape`
    over `devices` (default: jax.devices()) and return its per-device bytes (module docstring):
    {"n_params", "per_device": {params_bytes, optimizer_bytes, temp_bytes, total_bytes, ...},
    "compiler", "device", "device_bytes", "fits", "mesh", "batch_size", "seq_len", "dtype",
    "remat", "compile_s"}. Nothing is allocated and no data is read (`vocab_size_of`); with a
    GPU/TPU `device`, model.dtype "auto" is planned as bfloat16 (what it resolves to there)."""
    import time  # noqa: PLC0415

    import ml_collections  # noqa: PLC0415

    from train.fields import check_config  # noqa: PLC0415
    from train.loop import resolve_config  # noqa: PLC0415
    from train.sharding import batch_sharding, make_mesh, replicated  # noqa: PLC0415
    from train.state import TrainState, build_model_config  # noqa: PLC0415
    from train.step import make_train_step  # noqa: PLC0415

    memory = device_memory(device) if device is not None else None
    config = resolve_config(config, None)
    if device not in (None, "cpu") and config.model.get("dtype") == "auto":
        config.model.dtype = "bfloat16"     # what "auto" resolves to on the named GPU/TPU
    check_config(config, ())
    d, f, t = (int(s) for s in mesh_shape)
    mesh_cfg = ml_collections.ConfigDict(dict(data=d, fsdp=f, tensor=t))
    devices = list(devices if devices is not None else jax.devices())
    try:
        mesh = make_mesh(mesh_cfg, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    gb, seq_len = int(config.train.batch_size), int(config.data.seq_len)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if gb % shards:
        raise ConfigError(f"train.batch_size ({gb}) must be divisible by mesh data*fsdp ({shards})")
    model_cfg = build_model_config(config.model, vocab_size_of(config))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        ts = TrainState(model_cfg, mesh, int(config.seed), config.train)
        state = ts.abstract_state()
        shardings = jax.tree.map(lambda x: x.sharding, state)
        bsh = batch_sharding(mesh)
        mb = int(config.train.get("microbatches", 1))
        kw = {"microbatches": mb} if mb != 1 else {}
        step = make_train_step(ts.graphdef, ts.tx, shardings, bsh, replicated(mesh), **kw)
        compiled = step.lower(state, abstract_batch(gb, seq_len, bsh)).compile()
    per_device = memory_report(compiled, state)
    return {"n_params": int(ts.n_params), "per_device": per_device,
            "compiler": _compiler(devices), "device": device, "device_bytes": memory,
            "fits": None if memory is None else per_device["total_bytes"] <= FIT_MARGIN * memory,
            "fit_margin": FIT_MARGIN, "mesh": [d, f, t], "batch_size": gb, "seq_len": seq_len,
            "dtype": str(model_cfg.dtype), "remat": str(model_cfg.remat),
            "compile_s": round(time.perf_counter() - t0, 2)}


# --- the trainer's pre-check -------------------------------------------------------------------

def device_memory_limit(device=None) -> float | None:
    """Bytes the runtime lets one device allocate (`memory_stats()["bytes_limit"]` on GPU/TPU);
    None where the backend does not say (CPU)."""
    device = device if device is not None else jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    limit = (stats or {}).get("bytes_limit")
    return float(limit) if limit else None


def _remedies(config, report: dict, mesh) -> list[str]:
    """What to change, the biggest lever first: sharded state when the state dominates, fewer
    live activations when temp dominates."""
    state = report["params_bytes"] + report["optimizer_bytes"]
    n = mesh.size
    out = []
    shard_state = (f"shard the parameters and optimizer state over more devices "
                   f"(--config.mesh.fsdp={n} --config.mesh.data=1)")
    if mesh.shape["fsdp"] < n:
        out.append(shard_state)
    remat = config.model.get("remat", False)
    less_activations = []
    if remat not in ("full", True):
        less_activations.append("recompute activations in the backward pass "
                                "(--config.model.remat=full)")
    mb = int(config.train.get("microbatches", 1))
    gb = int(config.train.batch_size)
    rows = gb // (mesh.shape["data"] * mesh.shape["fsdp"])
    if rows // mb > 1:
        less_activations.append(f"accumulate gradients over micro-batches "
                                f"(--config.train.microbatches={2 * mb})")
    less_activations.append(f"a smaller batch (--config.train.batch_size={max(1, gb // 2)}) or "
                            f"shorter sequences (data.seq_len)")
    if report["temp_bytes"] >= state:
        out = less_activations + out
    else:
        out += less_activations
    return out


def check_fits(compiled, abstract_state: dict, config, mesh, *, say=print,
               limit_bytes: float | None = None, margin: float = FIT_MARGIN) -> dict | None:
    """Before step 1: raise ConfigError saying what to change when the compiled train step needs
    more than `margin` × the device's memory; return the per-device report (or None when no
    limit is known: CPU, unless `limit_bytes` is given).

    `compiled` is the object the trainer will run (`train_step.lower(abstract_state,
    abstract_batch).compile()`), so the check costs no compile of its own."""
    limit = limit_bytes if limit_bytes is not None else device_memory_limit()
    if limit is None:
        return None
    report = memory_report(compiled, abstract_state)
    need, usable = report["total_bytes"], margin * limit
    line = (f"memory per device: {need / GiB:.2f} GiB of {limit / GiB:.2f} GiB "
            f"(params {report['params_bytes'] / GiB:.2f}, optimizer "
            f"{report['optimizer_bytes'] / GiB:.2f}, temp {report['temp_bytes'] / GiB:.2f})")
    if need > usable:
        fixes = "; or ".join(_remedies(config, report, mesh))
        raise ConfigError(f"the train step does not fit: it needs {need / GiB:.2f} GiB per device,"
                          f" more than {margin:.0%} of the device's {limit / GiB:.2f} GiB "
                          f"(params {report['params_bytes'] / GiB:.2f}, optimizer "
                          f"{report['optimizer_bytes'] / GiB:.2f}, temp "
                          f"{report['temp_bytes'] / GiB:.2f} GiB); to fit: {fixes}")
    say(line)
    return report
