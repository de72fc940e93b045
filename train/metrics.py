"""Training logs: TensorBoard scalars, `<workdir>/metrics.jsonl`, a progress line, and MFU.

MFU = achieved model FLOP/s ÷ the devices' peak. Model FLOPs per token are the model's own
count, `LM.train_flops_per_token(seq_len)`: 3 × the forward FLOPs each mixer reports for its
math (backward ≈ 2 × forward), plus the MLPs and the output head.
"""

from __future__ import annotations

import json
import os
import time

import jax

__all__ = ["MetricsWriter", "device_peak_flops"]

# Dense peak FLOP/s per device: bf16 tensor-core peaks from the vendors' data sheets; the CPU
# figure is a 2-core x86 host's float32 matmul peak (1024³ jnp.dot, best of 10: ~500 GFLOP/s).
_PEAK_BY_KIND = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5 lite": 197e12,
                 "v5e": 197e12, "v5p": 459e12, "v6": 918e12, "v4": 275e12}
_CPU_PEAK = 500e9


def device_peak_flops() -> float:
    devices = jax.devices()
    kind = devices[0].device_kind.lower()
    if devices[0].platform == "cpu":
        return _CPU_PEAK  # the whole host: simulated CPU devices share the same cores
    for key, peak in _PEAK_BY_KIND.items():
        if key in kind:
            return peak * len(devices)
    return float("nan")


class _TensorBoard:
    """Scalar event files readable by TensorBoard, written with the tensorboard package alone."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self._writer = EventFileWriter(logdir)

    def scalars(self, step: int, values: dict) -> None:
        summary = self._summary_pb2.Summary(value=[
            self._summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                                     summary=summary))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsWriter:
    """Writes each logged step to TensorBoard and metrics.jsonl (only on process 0)."""

    def __init__(self, workdir: str, *, subdir: str = "tb", jsonl: str = "metrics.jsonl",
                 resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, jsonl)
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate(resume_step)
        self.tb = _TensorBoard(os.path.join(workdir, subdir))

    def _truncate(self, resume_step: int) -> None:
        """Keep only the lines at or before the restored step, so a resume does not repeat them."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(lines)

    def find(self, step: int, key: str) -> dict | None:
        """The logged row of `step` that holds `key` (e.g. a finished run's eval), or None."""
        if not os.path.exists(self.path):
            return None
        with open(self.path) as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
        return next((r for r in rows if r.get("step") == step and key in r), None)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.tb.scalars(step, values)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
