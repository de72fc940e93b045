"""A profiler window: `--config.profile.steps=10:15` traces steps 10..14 into <workdir>/profile.

The trace (XProf / Perfetto format) opens in TensorBoard's profile plugin
(`tensorboard --logdir <workdir>/profile`). Steps are 0-based optimizer steps; the window's first
steps after a compile are the ones worth reading, so skip the first step or two.
"""

from __future__ import annotations

import jax

from zoo.config import ConfigError

__all__ = ["parse_window", "ProfileWindow"]


def parse_window(value: str) -> tuple[int, int] | None:
    """"A:B" (0 <= A < B) -> (A, B); "" -> None; anything else is a ConfigError."""
    if not value:
        return None
    a, sep, b = str(value).partition(":")
    if not sep or not a.strip().isdigit() or not b.strip().isdigit() or int(a) >= int(b):
        raise ConfigError(f"config.profile.steps = {value!r}: expected 'A:B' with integers "
                          f"0 <= A < B (trace steps A..B-1), or '' for no trace")
    return int(a), int(b)


class ProfileWindow:
    """Starts the JAX profiler before step A and stops it after step B - 1."""

    def __init__(self, workdir, steps: str):
        self.window = parse_window(steps)
        self.logdir = str(workdir).rstrip("/") + "/profile"
        self.active = False

    def before(self, step: int) -> None:
        if self.window and step == self.window[0] and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, done: int, out=None) -> None:
        """Call after step `done - 1` was dispatched; blocks on `out` so the trace holds it."""
        if self.active and done >= self.window[1]:
            if out is not None:
                jax.block_until_ready(out)
            jax.profiler.stop_trace()
            self.active = False

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
