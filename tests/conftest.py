"""Starts the subprocess checks of the collected tests in the background (tests/background.py).

A test module maps each fixture that waits for `background.Job`s to those jobs in
`BACKGROUND_JOBS` ({fixture name: [Job]}); once collection (and -k / -m selection) is done,
the jobs of the fixtures that the selected tests use run one after another beside the suite,
in the order the suite reaches them.
"""

from tests import background


def pytest_collection_finish(session):
    jobs = []
    for item in session.items:
        needs = getattr(getattr(item, "module", None), "BACKGROUND_JOBS", {})
        for fixture in getattr(item, "fixturenames", ()):
            jobs += [j for j in needs.get(fixture, ()) if j not in jobs]
    if jobs:
        background.run_in_order(jobs)


def pytest_sessionfinish(session, exitstatus):
    background.stop_all()
