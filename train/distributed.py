"""Multi-process (multi-host) runs: start jax's distributed runtime, check the mesh feeds it.

`initialize(coordinator, num_processes, process_id)` must run before anything touches a jax
backend. It starts `jax.distributed` when there is more than one process to join:
  * a cluster jax detects by itself (SLURM, Open MPI, Cloud TPU pod / GKE TPU; see
    `detected_cluster`): every field not given is read from the cluster's environment;
  * otherwise a hand-launched job: `--coordinator_address host:port` (process 0's address, a
    free port), `--num_processes P` and `--process_id i` on each process, or the environment
    variable JAX_COORDINATOR_ADDRESS for the first.
With none of these, or with `--num_processes 1` (which also overrides a detected cluster), the
run is one process and nothing is started; so is a detected cluster job of one task.

`check_batch_axes(mesh.devices, P)`: with P processes, each process loads its own slice of the global
batch (rows [i*B/P, (i+1)*B/P) of step s, `train.data`) and `train.sharding.to_global` places it
with `jax.make_array_from_process_local_data`, which maps a process's local rows onto the batch
shards its devices hold. That is a distinct slice per process exactly when
  (1) every batch shard (one row of `mesh.devices` reshaped to [data*fsdp, tensor]: the
      devices holding the same rows, a tensor group) lies on one process — a group spread over
      two processes would need both to feed the same rows, and they feed different ones;
  (2) every process holds the same number of batch shards, (data*fsdp) / P — its local batch
      is B/P rows.
A mesh breaking either is a ConfigError before anything compiles. A process's batch shards need
not be adjacent (TPU device orders interleave hosts): its rows then land in the shards it holds,
the global batch is a row permutation of the one-process batch, and its mean loss the same.
"""

from __future__ import annotations

import collections
import os
import re

import numpy as np

from zoo.config import ConfigError

__all__ = ["initialize", "detected_cluster", "check_batch_axes", "DistributedError"]

_ADDRESS = re.compile(r"^\[?[\w.:-]+\]?:\d{1,5}$")  # host:port, [ipv6]:port


class DistributedError(RuntimeError):
    """jax.distributed could not start (coordinator unreachable, backend already running)."""


def _detected_env():
    """The cluster environment class jax's auto-detection would use, or None: the same
    classes in the same order as `jax.distributed.initialize()`, skipping the opt-in ones
    (mpi4py); a probe that fails counts as absent."""
    try:
        from jax._src import clusters  # private: jax has no public probe  # noqa: PLC0415
        kinds = list(clusters.ClusterEnv._cluster_types)
    except (ImportError, AttributeError):
        return None
    for env in kinds:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return env
        except Exception:  # noqa: BLE001 - a broken probe must not stop a single-host run
            continue
    return None


def detected_cluster() -> str | None:
    """The name of the cluster environment `jax.distributed.initialize()` would read its
    arguments from (SlurmCluster, OmpiCluster, GceTpuCluster, GkeTpuCluster, K8sCluster), or
    None. On a Cloud TPU VM the GCE probe asks the metadata server; elsewhere every probe only
    reads environment variables."""
    env = _detected_env()
    return env.__name__ if env is not None else None


def _check_args(coordinator, num_processes, process_id) -> None:
    if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
        raise ConfigError(f"--num_processes: must be a positive integer, got {num_processes!r}")
    if process_id is not None:
        if num_processes is None:
            raise ConfigError(f"--process_id {process_id} needs --num_processes (the number of "
                              "processes in the job)")
        if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id: must lie in [0, {num_processes}) for "
                              f"--num_processes {num_processes}, got {process_id!r}")
    if coordinator is not None and not _ADDRESS.match(coordinator):
        raise ConfigError(f"--coordinator_address: expected host:port (process 0's address and "
                          f"a free port, e.g. 10.0.0.1:1234), got {coordinator!r}")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, force: bool = False) -> str:
    """Join (or start) the distributed runtime when the job has more than one process.

    Arguments left None come from JAX_COORDINATOR_ADDRESS (the coordinator) or from a
    detected cluster; `force` calls `jax.distributed.initialize` even when nothing is detected
    (the former ZOO_DISTRIBUTED=1). Returns a one-line description of what was done. Raises
    ConfigError for inconsistent arguments and DistributedError when jax cannot start.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    _check_args(coordinator, num_processes, process_id)
    if num_processes == 1:  # also the way out of a cluster's detection (e.g. a lone k8s pod)
        return "one process"
    env = _detected_env()
    cluster = env.__name__ if env is not None else None
    if env is not None and num_processes is None and coordinator is None:
        try:
            count = int(env.get_process_count())
        except Exception:  # noqa: BLE001 - let jax.distributed report it below
            count = None
        # A one-task job (`srun python -m train` on one node, a single-host TPU VM) needs no
        # coordinator; started anyway, jax would give the process one device of the node.
        if count == 1:
            return "one process"
    if cluster is None and not force:
        if coordinator is None and num_processes is None:
            return "one process"
        missing = [name for name, v in (("--coordinator_address", coordinator),
                                        ("--num_processes", num_processes),
                                        ("--process_id", process_id)) if v is None]
        if missing:
            raise ConfigError(f"a multi-process run outside a cluster jax detects (SLURM, Open "
                              f"MPI, Cloud TPU) needs --coordinator_address, --num_processes "
                              f"and --process_id on every process; missing: "
                              f"{', '.join(missing)}")
    import jax  # noqa: PLC0415
    # Collectives between CPU devices of different processes; this setting concerns only the
    # CPU client, so on a GPU or TPU host it changes nothing for the accelerators.
    if jax.config.jax_cpu_collectives_implementation not in ("gloo", "mpi"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except Exception as e:  # noqa: BLE001 - jax raises RuntimeError, ValueError, XlaRuntimeError
        text = str(e).strip()
        first = text.splitlines()[0][:300] if text else type(e).__name__
        raise DistributedError(f"jax.distributed.initialize(coordinator_address={coordinator!r}, "
                               f"num_processes={num_processes}, process_id={process_id}"
                               f"{', cluster ' + cluster if cluster else ''}) failed: "
                               f"{first}") from None
    where = f" ({cluster})" if cluster else ""
    return (f"process {jax.process_index()} of {jax.process_count()}{where}, coordinator "
            f"{coordinator or 'from the cluster'}")


def check_batch_axes(mesh_devices: np.ndarray, process_count: int) -> None:
    """Raise ConfigError unless each of `process_count` processes feeds a distinct slice of
    the batch (rules (1) and (2) of the module docstring). `mesh_devices`: the mesh's
    [data, fsdp, tensor] array of devices (anything with a `process_index`)."""
    if process_count <= 1:
        return
    data, fsdp, tensor = mesh_devices.shape
    shards = mesh_devices.reshape(data * fsdp, tensor)  # [batch shard, tensor]
    n = data * fsdp
    local = collections.Counter(d.process_index for d in mesh_devices.flat)
    per_process = f"{min(local.values())}" if len(set(local.values())) == 1 else "unequal"
    if n % process_count:
        raise ConfigError(
            f"mesh: data*fsdp = {data}*{fsdp} = {n} batch shards do not divide among the "
            f"{process_count} processes (each feeds its own slice of the batch): make "
            f"mesh.data*mesh.fsdp a multiple of {process_count}, e.g. mesh.tensor at most the "
            f"devices per process ({per_process})")
    for i, row in enumerate(shards):
        owners = sorted({d.process_index for d in row})
        if len(owners) > 1:
            raise ConfigError(
                f"mesh: the mesh.tensor={tensor} devices of batch shard {i} lie on processes "
                f"{owners}; a tensor group must sit within one process: make mesh.tensor "
                f"divide the devices per process ({per_process})")
    held = collections.Counter(row[0].process_index for row in shards)
    if set(held.values()) != {n // process_count} or len(held) != process_count:
        raise ConfigError(
            f"mesh: processes hold unequal numbers of batch shards {dict(sorted(held.items()))} "
            f"(each must hold data*fsdp/{process_count} = {n // process_count}); give every "
            f"process the same number of devices")
