"""The devices' peak FLOP/s, measured in this process: the denominator of MFU.

A vendor's data-sheet peak says what the silicon could do, not what this process gets (clocks,
a shared host, thread pinning); MFU against it mixes the model's efficiency with the machine's
state. The peak here is the FLOP rate of one large matmul, timed where the model runs:

    peak = 2·M·N·K / best_time   (best of `reps` calls after a compile and a warm-up call)

in bfloat16 on GPU/TPU (the dtype of their matrix units) and float32 on CPU, with sizes that keep
the units busy: [4·8192, 8192] @ [8192, 8192] (4.4 TFLOP) on an accelerator, 2048³ (17 GFLOP) on
CPU, so the CPU measurement takes well under 2 s even on one core. It is measured once per
(backend, dtype) and cached.

`measured_peak_flops()` is the peak of all devices: per device × jax.device_count() on GPU/TPU
(one device is timed, they are alike). On CPU the simulated devices
(`--xla_force_host_platform_device_count`) share the host's cores, so the host is measured once
and not multiplied.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

__all__ = ["measured_peak_flops", "matmul_flops_per_s"]

_ACCEL_SHAPE = (4 * 8192, 8192, 8192)   # (M, K, N)
_CPU_SHAPE = (2048, 2048, 2048)


def matmul_flops_per_s(m: int, k: int, n: int, dtype, *, reps: int = 5, device=None,
                       clock=time.perf_counter) -> float:
    """FLOP/s of one [m, k] @ [k, n] matmul on `device`: 2·m·k·n / the best of `reps` timed
    calls (after a compile and a warm-up call), timed by `clock` (wall time by default;
    `time.process_time` counts only the time this process ran, see `measured_peak_flops`)."""
    device = device if device is not None else jax.local_devices()[0]
    ka, kb = jax.random.split(jax.random.key(0))
    # Unit-scale entries: no overflow in bf16 and no denormals (slow on CPU) in the products.
    a = jax.device_put(jax.random.normal(ka, (m, k), dtype), device)
    b = jax.device_put((jax.random.normal(kb, (k, n), jnp.float32) * k ** -0.5).astype(dtype),
                       device)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        mm(a, b).block_until_ready()
        best = min(best, clock() - t0)
    return 2.0 * m * k * n / best


_CACHE: dict[tuple, float] = {}


def _measure(backend: str, dtype, n_devices: int, clock) -> float:
    if backend == "cpu":
        return matmul_flops_per_s(*_CPU_SHAPE, dtype, reps=5, clock=clock)
    return matmul_flops_per_s(*_ACCEL_SHAPE, dtype, reps=5, clock=clock) * n_devices


def measured_peak_flops(dtype=None, *, fresh: bool = False, clock: str = "wall") -> float:
    """Peak FLOP/s of all devices, measured once per process (module docstring); `fresh`
    measures again (a benchmark on a shared machine re-measures beside each timing). `dtype`:
    default bfloat16 on GPU/TPU, float32 on CPU. `clock`: "wall", or "cpu" (process time: on a
    host shared with other jobs, a process pinned to one core with single-threaded XLA is
    timed only while it runs; a benchmark then times its steps with the same clock)."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    backend = jax.default_backend()
    if dtype is None:
        dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
    key = (backend, jnp.dtype(dtype).name, jax.device_count(), clock)
    if fresh or key not in _CACHE:
        timer = time.process_time if clock == "cpu" else time.perf_counter
        _CACHE[key] = _measure(backend, jnp.dtype(dtype), jax.device_count(), timer)
    return _CACHE[key]
