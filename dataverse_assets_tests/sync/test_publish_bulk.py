"""A first publish into an empty canonical table: its plan is one rule ("create every staged
record"), its creates go in by key ranges, and the result is the same as the row-by-row plan's.
Also: large writes leave their WAL checkpoint to a background thread."""

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.ops.plan_view import render_plan
from dataverse_assets.store.db import table_columns, wait_for_checkpoint
from dataverse_assets.sync import publish_execute as publish_module
from dataverse_assets.sync.stage import write_staged
from dataverse_assets.sync.steps import publish, staged_records
from dataverse_assets_tests.helpers import ENTITY, archive_change_set, stage_and_publish, thing

DELETED = {"@odata.context": "things/$deletedEntity", "id": "id-99", "reason": "deleted"}


def rows(store, table="things", skip=()):
    with store.connection() as connection:
        columns = [c for c in table_columns(connection, table) if c not in skip]
        return connection.execute(
            f"SELECT {', '.join(columns)} FROM {table} ORDER BY thingid").fetchall()


def test_a_first_publish_stores_one_rule_and_creates_every_record(each_store):
    store = each_store  # (both stores: docs/store-backends.md)
    records = [thing(n, f"Thing {n}", size=n) for n in range(1, 8)]
    result = stage_and_publish(store, "20260101T000000Z", [*records, DELETED])
    assert (result.created, result.updated, result.deleted, result.unchanged) == (7, 0, 0, 0)
    with store.connection() as connection:
        state = connection.execute(
            "SELECT status, bulk_create, created, rows_applied FROM _publish_state"
            " WHERE change_set = '20260101T000000Z'").fetchone()
        assert state == ("COMPLETE", 1, 7, 8)  # 7 creates and the delete of an unknown id
        # No plan row per create; the delete of a record never mirrored keeps its row.
        assert connection.execute(
            "SELECT pk, kind, applied FROM _publish_plan").fetchall() == [
            ("id-99", "delete_unknown", 1)]
        assert connection.execute(
            "SELECT id, reason FROM _defunct").fetchall() == [("id-99", "deleted in source")]
        history = connection.execute(
            "SELECT record_id, kind FROM _change_history ORDER BY record_id").fetchall()
        assert history == [(f"id-{n}", "create") for n in range(1, 8)] + [
            ("id-99", "delete_unknown")]
        text = render_plan(connection, "things", "20260101T000000Z", max_rows_per_kind=3)
    assert [(name, size) for _, name, size, *_ in rows(store)] == [
        (f"Thing {n}", n) for n in range(1, 8)]
    assert text.splitlines()[:8] == [
        "Plan for things, change set 20260101T000000Z (COMPLETE)",
        "7 to create, 0 to update, 0 to delete, 0 unchanged",
        "(into an empty table: every staged record is a create)",
        "",
        "+ 7 to create",
        "  + id-1",
        "  + id-2",
        "  + id-3",
    ]
    assert "  ... and 4 more" in text
    assert "- 1 deletes of records never mirrored" in text


def test_the_rule_writes_what_the_row_by_row_plan_writes(tmp_path):
    records = [thing(n, f"Thing {n}", size=n) for n in range(1, 6)]
    bulk = MirrorStore(db_path=str(tmp_path / "a.db"), archive_dir=str(tmp_path / "a"))
    stage_and_publish(bulk, "20260102T000000Z", records)
    # The same records published into a table that already has a row: the row-by-row plan.
    rowwise = MirrorStore(db_path=str(tmp_path / "b.db"), archive_dir=str(tmp_path / "b"))
    stage_and_publish(rowwise, "20260101T000000Z", [thing(0, "Zero")])
    archive_change_set(rowwise.archive_dir, "20260102T000000Z", [thing(0, "Zero"), *records])
    with rowwise.connection() as connection:
        write_staged(connection, staged_records(
            connection, rowwise.archive("things", "20260102T000000Z"), ENTITY))
    publish(rowwise, ENTITY, "20260102T000000Z")
    # Every column; the times are each publish's own, so they are compared apart: one
    # timestamp for sync_time, valid_from (no modifiedon) and updated_at of every row.
    times = ("sync_time", "valid_from", "updated_at")
    assert rows(bulk, skip=times) == rows(rowwise, skip=times)[1:]
    for published in (rows(bulk), rows(rowwise)[1:]):
        assert len({r[-4:-1] for r in published}) == 1
        assert len(set(published[0][-4:-1])) == 1
    with rowwise.connection() as connection:
        assert connection.execute("SELECT bulk_create FROM _publish_state"
                                  " WHERE change_set = '20260102T000000Z'").fetchone() == (0,)


def test_a_failure_between_chunks_resumes_without_duplicates(each_store, monkeypatch):
    store = each_store  # (both stores: docs/store-backends.md)
    entity = ENTITY.model_copy(update={"publish_chunk_rows": 3})
    records = [thing(n, f"Thing {n}") for n in range(1, 9)]
    archive_change_set(store.archive_dir, "20260101T000000Z", records)
    with store.connection() as connection:
        write_staged(connection, staged_records(
            connection, store.archive("things", "20260101T000000Z"), entity))
    calls = []

    def crash_after_second_chunk(name):
        calls.append(name)
        if name == "publish.after_chunk_commit" and calls.count(name) == 2:
            raise RuntimeError("killed between chunks")

    monkeypatch.setattr(publish_module, "fault_point", crash_after_second_chunk)
    with pytest.raises(RuntimeError, match="killed between chunks"):
        publish(store, entity, "20260101T000000Z")
    with store.connection() as connection:
        assert connection.execute(
            "SELECT status, rows_applied FROM _publish_state").fetchone() == ("FAILED", 6)
        assert connection.execute("SELECT count(*) FROM things").fetchone() == (6,)
        assert connection.execute("SELECT watermark FROM _sync_state").fetchone() in (
            None, (None,))
    monkeypatch.setattr(publish_module, "fault_point", lambda name: None)
    result = publish(store, entity, "20260101T000000Z")[-1]
    # Planned again against the table as it now is: the committed chunks are unchanged.
    assert (result.created, result.unchanged) == (2, 6)
    assert [r[0] for r in rows(store)] == [f"id-{n}" for n in range(1, 9)]
    with store.connection() as connection:
        assert connection.execute(
            "SELECT count(*), count(DISTINCT record_id) FROM _change_history").fetchone() == (8, 8)


def test_checkpoints_run_on_a_thread_and_finish_before_the_process_exits(store, tmp_path):
    stage_and_publish(store, "20260101T000000Z", [thing(n, "x" * 2000) for n in range(300)])
    with store.connection() as connection:
        # Commits do not checkpoint inline; the checkpoint thread does.
        assert connection.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    wait_for_checkpoint(store.db_path)
    connection = sqlite3.connect(store.db_path, isolation_level=None)
    try:
        # Everything the steps committed was already moved into the database file.
        busy, log_frames, checkpointed = connection.execute(
            "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and log_frames == checkpointed
    finally:
        connection.close()

    # A process that writes and exits leaves a database file that holds everything: its
    # checkpoint thread finished (and the WAL was folded in) before it exited.
    other = tmp_path / "other.db"
    script = (
        "from dataverse_assets.store.db import connect, transaction\n"
        f"c = connect({str(other)!r})\n"
        "with transaction(c):\n"
        "    c.execute('CREATE TABLE t (x)')\n"
        "    c.executemany('INSERT INTO t VALUES (?)', [('y' * 2000,)] * 2000)\n"
        "c.close()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert not Path(f"{other}-wal").exists() or Path(f"{other}-wal").stat().st_size == 0
    copy = tmp_path / "copy.db"
    shutil.copyfile(other, copy)  # the file alone, without -wal or -shm
    copied = sqlite3.connect(copy)
    assert copied.execute("SELECT count(*) FROM t").fetchone() == (2000,)
    copied.close()
