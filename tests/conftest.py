"""Starts the subprocess checks of the collected tests in the background (tests/background.py).

A test module maps each fixture that waits for `background.Job`s to those jobs in
`BACKGROUND_JOBS` ({fixture name: [Job]}); tests marked `@offload` (tests/offload.py) run in
one more pytest process. Once collection (and -k / -m selection) is done, that process
starts, and in a second queue the jobs that the selected tests need run one after another
beside the suite, in the order the suite reaches them.
"""

from tests import background, offload


def pytest_collection_finish(session):
    if offload.inner():
        return
    offloaded = [item.nodeid for item in session.items
                 if getattr(getattr(item, "obj", None), "offloaded", False)]
    if offloaded:
        background.run_in_order([offload.job_for(offloaded)])
    jobs = []
    for item in session.items:
        needs = getattr(getattr(item, "module", None), "BACKGROUND_JOBS", {})
        for fixture in getattr(item, "fixturenames", ()):
            jobs += [j for j in needs.get(fixture, ()) if j not in jobs]
    if jobs:
        background.run_in_order(jobs)


def pytest_runtest_logreport(report):
    if offload.inner():
        offload.record(report)


def pytest_sessionfinish(session, exitstatus):
    background.stop_all()
