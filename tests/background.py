"""Subprocess checks that run beside the suite, on the CI machine's second core.

Most of the suite runs in one pytest process, one core busy at a time (an XLA compile is
single-threaded); CI has two. The heavy checks that run as scripts in their own process
(8 simulated devices, several processes, training runs: tests/scale_check.py,
tests/sharded_kernels.py, tests/model_sharding_check.py, tests/multihost_runs.py, ...) are
declared here as `Job`s, and tests/offload.py runs slow in-process tests in one more pytest
process, also a Job. Once pytest has collected the tests, tests/conftest.py starts the jobs
those tests need: the offloaded tests' run and, in a second thread, the scripts one after
another in the order the suite reaches them, all at nice 10, so the suite's own process keeps
its core. A test's fixture then waits for its job's result, which is usually ready by the time
the suite reaches it; a fixture that needs a job the queue has not started yet starts it at
once. Nothing about a check changes: the same script, arguments and assertions, only earlier.

A job's stdout and stderr go to files in its own temporary folder (an unread pipe that fills
would block it); `{dir}` in its arguments is that folder. Jobs still running when pytest ends
are killed (also when pytest itself is killed), and the folders removed.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOCK = threading.Lock()
JOBS: dict[str, "Job"] = {}
_STOPPED = threading.Event()     # set at the end of the session: nothing starts after it


# Run first in the job's process, then exec'd into the job: a lower priority (nice 10), so
# that the suite's own process keeps its core and the jobs take the idle one; SIGKILL when
# pytest dies, even by a signal that skips atexit (Linux's PR_SET_PDEATHSIG, kept across exec;
# elsewhere nothing). A launcher, not Popen's preexec_fn: Python code between fork and exec
# in a multithreaded process (JAX's) can deadlock.
_LAUNCHER = """import ctypes, os, signal, sys
os.nice(10)
try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
except (OSError, AttributeError):
    pass
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


class Job:
    """One script run: `args` (after `python`; `{dir}` in them and in `env`'s values replaced by
    the job's folder) with PYTHONPATH at the repository root, `env` added to the environment
    (a None value removes that variable)."""

    def __init__(self, name: str, args: list, env: dict | None = None, timeout: float = 1800):
        self.name, self.args, self.env, self.timeout = name, list(args), dict(env or {}), timeout
        self.dir = None
        self.proc = None
        self._files = None

    def start(self):
        """Start the process unless it is running or done (thread-safe, idempotent)."""
        with _LOCK:
            if self.proc is not None or _STOPPED.is_set():
                return
            self.dir = tempfile.mkdtemp(prefix=f"bg-{self.name}-")
            self._files = [open(os.path.join(self.dir, f"std{k}"), "w+") for k in ("out", "err")]
            args = [a.replace("{dir}", self.dir) for a in self.args]
            env = {k: v.replace("{dir}", self.dir) for k, v in
                   {**os.environ, "PYTHONPATH": ROOT, **self.env}.items() if v is not None}
            self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, *args], cwd=ROOT,
                                         env=env, text=True, stdout=self._files[0],
                                         stderr=self._files[1])

    def wait(self) -> tuple[int, str, str]:
        """(returncode, stdout, stderr), starting the job first if nothing has."""
        self.start()
        if self.proc is None:
            return -1, "", f"{self.name}: not started, the session is ending"
        try:
            rc = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        out, err = (f.seek(0) or f.read() for f in self._files)
        return rc, out, err

    def path(self, name: str) -> str:
        """A file the job wrote into its folder."""
        return os.path.join(self.dir, name)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in self._files or ():
            f.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def job(name: str, args: list, env: dict | None = None, timeout: float = 1800) -> Job:
    """Declare (once) the job `name`; a module calls this at import and maps the fixture that
    waits for it to it in its `BACKGROUND_JOBS` ({fixture: [Job]}), which tests/conftest.py
    reads."""
    if name not in JOBS:
        JOBS[name] = Job(name, args, env, timeout)
    return JOBS[name]


def run_in_order(jobs: list) -> threading.Thread:
    """Start `jobs` one after another in a daemon thread (each when the one before ends)."""
    def worker():
        for j in jobs:
            j.start()
            if j.proc is None:    # the session ended
                return
            j.proc.wait()
    thread = threading.Thread(target=worker, name="background-jobs", daemon=True)
    thread.start()
    return thread


@atexit.register
def stop_all():
    with _LOCK:
        _STOPPED.set()
    for j in list(JOBS.values()):
        j.stop()
