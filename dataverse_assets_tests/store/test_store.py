"""The store: identifiers, and databases made by older versions."""

import sqlite3

from dataverse_assets.store import db
from dataverse_assets.store.bookkeeping import read_sync_state
from dataverse_assets.store.db import connect, quote_identifier


def test_a_database_from_an_older_version_gains_new_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE _sync_state (entity TEXT PRIMARY KEY, mode TEXT, watermark TEXT,
            delta_token TEXT, status TEXT NOT NULL DEFAULT 'pending', last_change_set TEXT,
            updated_at TEXT NOT NULL);
        INSERT INTO _sync_state VALUES ('accounts', 'modifiedon', '2025-01-01T00:00:00Z', NULL,
            'completed', '20250101T000000Z', '2025-01-01T00:00:00Z');
        CREATE TABLE _staged (entity TEXT NOT NULL, change_set TEXT NOT NULL, mode TEXT NOT NULL,
            rows INTEGER NOT NULL, watermark_after TEXT, staged_at TEXT NOT NULL,
            PRIMARY KEY (entity, change_set));
    """)
    old.close()
    connection = connect(path)
    state = read_sync_state(connection, "accounts")
    assert state.watermark == "2025-01-01T00:00:00Z" and state.reconciled_at is None
    columns = {row[1] for row in connection.execute("PRAGMA table_info(_staged)")}
    assert {"fetched_at", "reconciled", "reconciled_at", "delta_token_after"} <= columns
    assert connection.execute("SELECT reconciled FROM _staged").fetchall() == []


def test_identifiers_are_always_quoted_safely(tmp_path):
    connection = connect(tmp_path / "m.db")
    hostile = ['order', 'a"b', "a'b", "with space", "Zürich 東京", "x" * 200,
               'x"); DROP TABLE t;--']
    table = quote_identifier('weird "table"')
    connection.execute(f"CREATE TABLE {table} ({', '.join(quote_identifier(c) for c in hostile)})")
    connection.execute(f"INSERT INTO {table} VALUES ({', '.join('?' for _ in hostile)})",
                       list(range(len(hostile))))
    row = connection.execute(f"SELECT * FROM {table}").fetchone()
    assert row == tuple(range(len(hostile)))
    assert [r[1] for r in connection.execute(f"PRAGMA table_info({table})")] == hostile


def test_a_reader_opens_the_mirror_at_once_while_a_publish_holds_the_write_lock(
        tmp_path, monkeypatch):
    """status, the sensors and the UI open the mirror during a sync: opening must not wait for
    the writer's transaction (it once did, for as long as the publish ran)."""
    db_path = tmp_path / "mirror.db"
    writer = connect(db_path)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE accounts (accountid TEXT PRIMARY KEY)")
    monkeypatch.setattr(db, "BUSY_TIMEOUT_SECONDS", 1.0)  # a wait raises StorageError
    try:
        with connect(db_path) as reader:
            assert reader.execute("SELECT count(*) FROM _sync_state").fetchone() == (0,)
    finally:
        writer.rollback()
        writer.close()


def test_threads_that_open_a_new_mirror_at_once_all_get_it(tmp_path) -> None:
    """The entities of a run are fetched on threads that each open the mirror (and take their
    entity's lock) at the same moment; on a new file that once deadlocked in SQLite ("database
    is locked" at once, a few times in a hundred)."""
    import threading

    from dataverse_assets.store import locks

    failures = []
    for trial in range(100):
        path = tmp_path / f"m{trial}.db"
        start = threading.Barrier(12)

        def take_a_lock(index: int, path=path, start=start) -> None:
            start.wait()
            try:
                with locks.entity_lock(path, f"entity{index}", owner="run", purpose="fetch"):
                    pass
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                failures.append(str(exc))

        threads = [threading.Thread(target=take_a_lock, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
