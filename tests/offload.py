"""Slow in-process tests that run in a second pytest process beside the suite.

`@offload` on a test function (above its parametrize marks) leaves the test exactly as it is
and only changes where it runs. Once collection is done, tests/conftest.py starts one pytest
process (a `background.Job`, queued with the others) on the node ids of the selected offloaded
tests, with OFFLOAD_INNER set; there the decorator returns the function untouched, and the
conftest appends every phase's report (setup, call, teardown: outcome and, on failure, the
traceback) as a JSON line to the file OFFLOAD_REPORTS names. In the main process the test
becomes a proxy that waits for its node id's reports and fails with the inner traceback if a
phase failed (or if the inner process ended without running it). The test's own fixtures are
only built in the inner process: the proxy takes just its parametrized arguments.
"""

import functools
import inspect
import json
import os
import time

import pytest

from tests import background

INNER = "OFFLOAD_INNER"
REPORTS = "OFFLOAD_REPORTS"
_JOB = []          # the one inner run of this session, made by `job_for`


def inner() -> bool:
    return bool(os.environ.get(INNER))


def offload(fn):
    if inner():
        return fn
    names = {n.strip() for m in getattr(fn, "pytestmark", ()) if m.name == "parametrize"
             for n in (m.args[0].split(",") if isinstance(m.args[0], str) else m.args[0])}
    params = [p for p in inspect.signature(fn).parameters.values() if p.name in names]

    @functools.wraps(fn)
    def proxy(**_):
        nodeid = os.environ["PYTEST_CURRENT_TEST"].rsplit(" (", 1)[0]
        reports = wait_for(nodeid)
        for r in reports:
            if r["outcome"] == "failed":
                pytest.fail(f"{nodeid} ({r['when']}, in the offloaded run):\n{r['longrepr']}",
                            pytrace=False)
        assert [r["when"] for r in reports] == ["setup", "call", "teardown"], reports
        assert all(r["outcome"] == "passed" for r in reports), reports

    del proxy.__wrapped__          # pytest reads the proxy's own signature, not fn's
    proxy.__signature__ = inspect.Signature(params)
    proxy.offloaded = True
    return proxy


def job_for(nodeids: list) -> background.Job:
    """The inner pytest run of `nodeids` (made once per session)."""
    if not _JOB:
        _JOB.append(background.job(
            "offloaded", ["-m", "pytest", "-q", "-p", "no:cacheprovider", *nodeids],
            env={INNER: "1", REPORTS: "{dir}/reports.jsonl"}, timeout=3600))
    return _JOB[0]


def wait_for(nodeid: str) -> list:
    """The inner run's reports of `nodeid` once its teardown (or a failed phase) is in."""
    if not _JOB:          # not started at collection (e.g. run without tests/conftest.py)
        job_for([nodeid])
    job = _JOB[0]
    job.start()
    path = job.path("reports.jsonl")
    while True:
        done = job.proc.poll() is not None
        mine = []
        if os.path.exists(path):
            with open(path) as f:
                mine = [r for r in map(json.loads, f) if r["nodeid"] == nodeid]
        if any(r["when"] == "teardown" or r["outcome"] == "failed" for r in mine):
            return mine
        if done:
            rc, out, err = job.wait()
            pytest.fail(f"{nodeid}: the offloaded run ended (exit {rc}) without it:\n"
                        f"{out[-3000:]}\n{err[-3000:]}", pytrace=False)
        time.sleep(0.2)


def record(report):
    """conftest's pytest_runtest_logreport in the inner run: one JSON line per phase."""
    with open(os.environ[REPORTS], "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when,
                            "outcome": report.outcome,
                            "longrepr": str(report.longrepr) if report.failed else ""}) + "\n")
