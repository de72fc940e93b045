"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (preemption) without losing work.

While the training loop runs, the first signal only sets a flag: the loop finishes the current
step, saves a checkpoint there, waits for the asynchronous save to complete and raises
`Interrupted`, which the command line turns into one line and exit code 128 + signal number
(130 for SIGINT, 143 for SIGTERM), the shell convention for "killed by that signal". A second
signal aborts at once (same exit code, nothing saved beyond the last complete checkpoint).

On several hosts every process must save at the same step: a signal reaches each host at a
different moment. `StopFlag.should_stop` therefore agrees across processes each step: the flags
of all hosts are combined (any host stopping stops all), and orbax's preemption sync point
(`CheckpointManager.reached_preemption`, fed by jax.distributed's preemption notice) is honoured
as well, so a cloud preemption that signals one host stops every host at one step.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
import numpy as np

__all__ = ["Interrupted", "StopFlag", "EXIT_CODES"]

EXIT_CODES = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}


class Interrupted(Exception):
    """The run stopped on a signal after saving; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopFlag:
    """Context manager: while active, SIGINT/SIGTERM request a stop instead of killing."""

    def __init__(self, say=print):
        self.signum: int | None = None      # the stop every process agreed on
        self._received: int | None = None   # what reached this process (set by the handler)
        self._say = say
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._received is not None:
            sys.stderr.write(f"\n{name} again: aborting now without saving "
                             f"(exit {EXIT_CODES[signum]})\n")
            sys.stderr.flush()
            os._exit(EXIT_CODES[signum])
        self._received = signum
        sys.stderr.write(f"\n{name}: finishing this step and saving a checkpoint "
                         f"(send it again to abort at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> "StopFlag":
        import threading  # noqa: PLC0415
        if threading.current_thread() is threading.main_thread():
            for s in EXIT_CODES:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def should_stop(self, step: int, manager=None) -> bool:
        """True on every process at the same step once any process was signalled (or reached
        orbax's preemption sync point). The decision uses only the gathered snapshot: a signal
        that lands while the gather is in flight counts at the next step, on every process."""
        received = self._received or 0   # snapshot before the collective
        if jax.process_count() == 1:
            flags = np.array([received])
            preempted = False
        else:
            from jax.experimental import multihost_utils  # noqa: PLC0415
            flags = multihost_utils.process_allgather(np.array([received], np.int32))
            preempted = manager is not None and manager.reached_preemption(step)
        if self.signum is None and (np.any(flags) or preempted):
            self.signum = int(np.max(flags)) or signal.SIGTERM
        return self.signum is not None

    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1)

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
