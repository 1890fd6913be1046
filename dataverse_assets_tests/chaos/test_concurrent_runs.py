"""Two runs for the same entity: the second waits for the first's lock in the database (or
gives up with the holder's name), never interleaves its writes; a dead holder's lock is taken
over with a warning."""

import os
import socket
import subprocess
import sys
import time

import pytest

from dataverse_assets.errors import EntityLockedError
from dataverse_assets.simulator import serve_on_loopback
from dataverse_assets.store.backend import is_postgres_address
from dataverse_assets.store.db import connect, utc_now_iso
from dataverse_assets.store.locks import LockHolder, entity_lock, read_lock, stale_reason
from dataverse_assets_tests.chaos.harness import (
    ALL_ENTITIES,
    canonical_problems,
    make_chaos_mirror,
    new_simulator,
)
from dataverse_assets_tests.chaos.test_process_death import REPO
from dataverse_assets_tests.truth import mirror_contents


def test_a_second_holder_waits_then_fails_naming_the_first(tmp_path, chaos_store):
    db = chaos_store(tmp_path)
    with entity_lock(db, "accounts", owner="run-A", purpose="publish"):
        started = time.monotonic()
        with pytest.raises(EntityLockedError) as refused, entity_lock(
                db, "accounts", owner="run-B", purpose="publish", wait_seconds=0.3):
            pass
        assert time.monotonic() - started >= 0.3
        message = str(refused.value)
        assert "run-A" in message and f"pid {os.getpid()}" in message and "publish" in message
        with entity_lock(db, "contacts", owner="run-B", purpose="publish"):
            pass  # other entities are not held up
    with entity_lock(db, "accounts", owner="run-B", purpose="publish", wait_seconds=0):
        pass  # released


def test_the_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, chaos_store):
    """SQLite: its pid is not alive. PostgreSQL: the process held the lock as an advisory lock
    of a database session, which the server ended with the process (SIGKILL: nothing of the
    process ran after it); its `_locks` row is still there."""
    db = chaos_store(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, db], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    assert holder.stdout.readline() == "held\n", holder.communicate()
    with pytest.raises(EntityLockedError, match="killed-run"), entity_lock(
            db, "teams", owner="next-run", purpose="fetch", wait_seconds=0):
        pass  # held while its process lives
    holder.kill()
    holder.wait()
    warnings = []
    with entity_lock(db, "teams", owner="next-run", purpose="fetch", wait_seconds=5,
                     warn=warnings.append) as me:
        assert me.owner == "next-run"
    reason = "its database session ended" if is_postgres_address(db) else "is gone"
    assert any("taking over" in w and "killed-run" in w and reason in w for w in warnings), (
        warnings)
    with connect(db) as connection:
        assert connection.execute("SELECT count(*) FROM _locks").fetchone()[0] == 0


HOLD_THE_LOCK = """
import sys, time
from dataverse_assets.store.locks import entity_lock
with entity_lock(sys.argv[1], "teams", owner="killed-run", purpose="publish"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_concurrent_syncs_of_one_mirror_wait_for_each_other_and_never_interleave(
        tmp_path, chaos_store, chaos_report):
    """A sync holds vin_candidates' publish lock for a few seconds (a fault point sleeps inside
    the publish transaction: long enough for the test to see it on a loaded machine); a second
    sync of the same mirror started meanwhile waits for it at that entity, then completes; the
    result equals a mirror synced once, alone."""
    started = time.perf_counter()
    simulator = new_simulator()
    with serve_on_loopback(simulator) as url:
        mirror = make_chaos_mirror(tmp_path, simulator, url, "mirror", page_size=50,
                                   store_for=chaos_store)
        reference = make_chaos_mirror(tmp_path, simulator, url, "reference", page_size=50,
                                      store_for=chaos_store)
        env = {**os.environ, "PYTHONPATH": str(REPO),
               "DATAVERSE_FAULT_POINTS": "publish.before_watermark=sleep:4"}
        first = subprocess.Popen(
            [sys.executable, "-m", "dataverse_assets_tests.chaos.driver",
             "--db", mirror.store.db_path, "--archive", mirror.store.archive_dir,
             "--config", str(mirror.config_path), "--url", url, "--group", "hourly",
             "--change-set", mirror.next_key()], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        holder = None
        while holder is None or holder.purpose != "publish":
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            with connect(mirror.store.db_path) as connection:
                holder = read_lock(connection, "vin_candidates")
            time.sleep(0.02)
        assert holder.pid == first.pid
        outcome = mirror.sync("hourly")  # the second run, while the first holds the lock
        assert first.wait(60) == 0, first.communicate()
        assert not any(outcome.values()), outcome
        assert not any(mirror.sync("daily").values())
        assert not any(reference.sync_all().values())
        assert canonical_problems(mirror) == []
        assert mirror_contents(mirror, ALL_ENTITIES) == mirror_contents(reference, ALL_ENTITIES)
        with connect(mirror.store.db_path) as connection:
            # Each change set was published whole, one after the other.
            published = connection.execute(
                "SELECT change_set, started_at, finished_at FROM _publish_state"
                " WHERE entity = 'vin_candidates' ORDER BY started_at").fetchall()
    assert all(a[2] <= b[1] for a, b in zip(published, published[1:], strict=False)), published
    chaos_report({"scenario": "concurrent_runs", "passed": True,
                  "seconds": round(time.perf_counter() - started, 2)})


def test_only_a_dead_holder_or_an_old_lock_from_another_host_is_stale():
    old = "2020-01-01T00:00:00.000000Z"
    here = socket.gethostname()
    alive = LockHolder("teams", "run-1", os.getpid(), here, "fetch", old)
    assert stale_reason(alive, 3600) is None  # a long first sync keeps its lock
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = LockHolder("teams", "run-2", finished.pid, here, "fetch", utc_now_iso())
    assert "is gone" in stale_reason(dead, 3600)
    elsewhere = LockHolder("teams", "run-3", 1, "another-host", "fetch", old)
    assert "old (stale after 3,600 s)" in stale_reason(elsewhere, 3600)
    recent = LockHolder("teams", "run-4", 1, "another-host", "fetch", utc_now_iso())
    assert stale_reason(recent, 3600) is None
