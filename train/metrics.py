"""Training logs: TensorBoard scalars, `<workdir>/metrics.jsonl`, a progress line, and MFU.

MFU = achieved model FLOP/s ÷ the devices' peak. Model FLOPs per token are the model's own
count, `LM.train_flops_per_token(seq_len)`: 3 × the forward FLOPs each mixer reports for its
math (backward ≈ 2 × forward), plus the MLPs and the output head. The peak is measured in this
process (`train.peak.measured_peak_flops`: a large matmul, bf16 on GPU/TPU, fp32 on CPU); the
vendors' data-sheet peaks stay as a reference (`vendor_peak_flops`).
"""

from __future__ import annotations

import json
import os
import time

import jax

from train.paths import workdir_path

__all__ = ["MetricsWriter", "device_peak_flops", "vendor_peak_flops"]

# Dense peak FLOP/s per device: bf16 tensor-core peaks from the vendors' data sheets (a
# reference beside the measured peak; not the MFU denominator).
_PEAK_BY_KIND = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5 lite": 197e12,
                 "v5e": 197e12, "v5p": 459e12, "v6": 918e12, "v4": 275e12}


def vendor_peak_flops() -> float:
    """The data-sheet bf16 peak of all devices; nan for CPU or an unknown device kind."""
    devices = jax.devices()
    kind = devices[0].device_kind.lower()
    for key, peak in _PEAK_BY_KIND.items():
        if devices[0].platform != "cpu" and key in kind:
            return peak * len(devices)
    return float("nan")


def device_peak_flops(dtype=None) -> float:
    """The peak FLOP/s of all devices, measured in this process (`train.peak`)."""
    from train.peak import measured_peak_flops  # noqa: PLC0415
    return measured_peak_flops(dtype)


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
    """Writes each logged step to TensorBoard and metrics.jsonl (only on process 0; the other
    processes read the file, e.g. `find`). `workdir` may be local or a bucket URI."""

    def __init__(self, workdir: str | os.PathLike, *, subdir: str = "tb",
                 jsonl: str = "metrics.jsonl", resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        workdir = workdir_path(workdir)
        self.path = workdir / jsonl
        self._lines: list[str] = []
        if not self.enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        self.tb = _TensorBoard(os.fspath(workdir / subdir))  # tensorboard opens URIs itself

    def _rows(self) -> list[str]:
        return [ln + "\n" for ln in self.path.read_text().splitlines() if ln.strip()] \
            if self.path.exists() else []

    def _truncate(self, resume_step: int) -> None:
        """Keep only the lines at or before the restored step, so a resume does not repeat them.
        Rewritten whole through a temporary file: another process reading it (`find`) sees the
        old or the new file, never half of one."""
        self._lines = [ln for ln in self._rows() if json.loads(ln).get("step", 0) <= resume_step]
        if self.path.exists():
            self._store()

    def _store(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(self._lines))
        tmp.replace(self.path)

    def find(self, step: int, key: str) -> dict | None:
        """The logged row of `step` that holds `key` (e.g. a finished run's eval), or None."""
        rows = [json.loads(ln) for ln in self._rows()]
        return next((r for r in rows if r.get("step") == step and key in r), None)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.tb.scalars(step, values)
        row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self._lines.append(json.dumps(row) + "\n")
        if "://" in os.fspath(self.path):  # an object store cannot append: rewrite (small) file
            self._store()
        else:
            with self.path.open("a") as f:
                f.write(self._lines[-1])

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
