"""The disk fills up, or the database turns read-only, while a change set is published: the
publish fails with an error that names the problem, nothing of the change set is half-written,
and once the problem is gone the next run completes as if it had never happened."""

import sqlite3
import time

import pytest

from dataverse_assets.simulator import serve_on_loopback
from dataverse_assets.store import mirror as resources
from dataverse_assets.sync import steps
from dataverse_assets_tests.chaos.harness import (
    ALL_ENTITIES,
    canonical_problems,
    make_chaos_mirror,
    mutate_source,
    new_simulator,
)
from dataverse_assets_tests.truth import mirror_contents

PROBLEMS = {
    # SQLite's own limit on the file's pages: writes past it fail as on a full disk.
    "disk_full": ("PRAGMA max_page_count = {pages}", "disk is full"),
    "read_only": ("PRAGMA query_only = ON", "read-only"),
}


@pytest.fixture
def storage_trouble(monkeypatch):
    """While publishing (and only then), every new connection to the mirror has the problem."""
    state = {"problem": None, "publishing": False}
    connect = resources.connect

    def troubled_connect(path):
        connection = connect(path)
        if state["problem"] and state["publishing"]:
            pragma, _ = PROBLEMS[state["problem"]]
            pages = connection.execute("PRAGMA page_count").fetchone()[0]
            connection.execute(pragma.format(pages=pages))
        return connection

    publish = steps.publish

    def publishing(*args, **kwargs):
        state["publishing"] = True
        try:
            return publish(*args, **kwargs)
        finally:
            state["publishing"] = False

    monkeypatch.setattr(resources, "connect", troubled_connect)
    monkeypatch.setattr(steps, "publish", publishing)
    return state


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_a_full_disk_or_read_only_database_fails_clearly_and_writes_nothing(
        tmp_path, problem, storage_trouble, chaos_report):
    started = time.perf_counter()
    simulator = new_simulator()
    with serve_on_loopback(simulator) as url:
        mirror = make_chaos_mirror(tmp_path, simulator, url, "mirror", page_size=50)
        reference = make_chaos_mirror(tmp_path, simulator, url, "reference", page_size=50)
        assert not any(mirror.sync_all().values())
        assert not any(reference.sync_all().values())
        mutate_source(simulator, __import__("random").Random(5))
        before = mirror_contents(mirror, ALL_ENTITIES)

        storage_trouble["problem"] = problem
        outcome = mirror.sync("hourly")
        storage_trouble["problem"] = None

        errors = {name: error for name, error in outcome.items() if error}
        assert errors, "the publish should have failed"
        expected_words = PROBLEMS[problem][1]
        unclear = {name: error for name, error in errors.items()
                   if expected_words not in error or str(mirror.store.db_path) not in error
                   or "nothing" not in error.lower()}
        assert not unclear, unclear
        # Nothing half-written: an entity whose publish failed has its tables, defunct ids and
        # watermark exactly as before (some other entities' smaller writes may have fit).
        after = mirror_contents(mirror, ALL_ENTITIES)
        for name, error in errors.items():
            if "was published (COMPLETE" in error:
                continue  # its data committed whole; only the step log after it failed
            assert after[name] == before[name], name
            assert after[name + "__history"] == before[name + "__history"], name
            assert ([r for r in after["_defunct"] if r[0] == name]
                    == [r for r in before["_defunct"] if r[0] == name]), name
            watermark = {r[0]: r[1] for r in after["_sync_state"]}
            assert watermark[name] == {r[0]: r[1] for r in before["_sync_state"]}[name]

        # Space is back: the next run publishes everything, as if nothing had happened.
        assert not any(mirror.sync_all().values())
        assert not any(reference.sync_all().values())
        assert canonical_problems(mirror) == []
        equal = mirror_contents(mirror, ALL_ENTITIES) == mirror_contents(reference, ALL_ENTITIES)
        assert equal
    chaos_report({"scenario": problem, "passed": True, "failed_publishes": len(errors),
                  "error": next(iter(errors.values()))[:300],
                  "seconds": round(time.perf_counter() - started, 2)})


def test_sqlite_reports_what_the_storage_tests_simulate(tmp_path):
    """The simulation is SQLite's real error for each case."""
    connection = sqlite3.connect(tmp_path / "x.db")
    connection.execute("CREATE TABLE t (x)")
    connection.execute("PRAGMA query_only = ON")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        connection.execute("INSERT INTO t VALUES (1)")
