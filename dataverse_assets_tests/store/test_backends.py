"""The store's two backends (store/backend.py, docs/store-backends.md): what is migrated so far
(the bookkeeping tables, transactions, per-entity locks) behaves the same on SQLite and on
PostgreSQL. Tests taking `store_address` run once per store; the PostgreSQL half needs the
server binaries (skipped without them, failed in CI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dataverse_assets.config import Settings
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.errors import ConfigError, EntityLockedError, StorageError
from dataverse_assets.modes import PublishStatus
from dataverse_assets.ops.cli import main as cli_main
from dataverse_assets.simulator import SimAttribute
from dataverse_assets.store import bookkeeping, dead_letters, issues, staging_store
from dataverse_assets.store.backend import (
    bulk_insert,
    dialect_of,
    postgres_query,
)
from dataverse_assets.store.db import (
    connect,
    quote_identifier,
    table_columns,
    table_exists,
    transaction,
)
from dataverse_assets.store.locks import entity_lock, is_held, read_lock
from dataverse_assets.store.tables import entity_identifiers
from dataverse_assets_tests.conftest import write_entities_config

KEY_1, KEY_2 = "20260101T000000Z", "20260102T000000Z"


# -- parameters --------------------------------------------------------------------------------

def test_sqlite_placeholders_become_psycopgs_outside_literals_and_names():
    assert postgres_query("SELECT ? FROM t WHERE a = :a AND b::text = '?:x' AND \"c?\" LIKE"
                          " '50%' -- what?\n AND d = ?", True) == (
        "SELECT %s FROM t WHERE a = %(a)s AND b::text = '?:x' AND \"c?\" LIKE '50%%'"
        " -- what?\n AND d = %s")
    assert postgres_query("SELECT 5 % ?, '%'", True) == "SELECT 5 %% %s, '%%'"
    assert postgres_query("SELECT '50%'", False) == "SELECT '50%'"


# -- refused until finished --------------------------------------------------------------------

URL = "postgresql://mirror@127.0.0.1:1/dataverse"


def test_an_unreachable_postgresql_store_is_one_line(monkeypatch):
    with pytest.raises(StorageError, match=r"^postgresql://mirror@127\.0\.0\.1:1/dataverse: "
                                           "cannot connect to the PostgreSQL store") as failed:
        connect(URL)
    assert "\n" not in str(failed.value)


# -- bookkeeping -------------------------------------------------------------------------------

def _stage(connection, change_set: str, source_timestamp: str = "t") -> None:
    with transaction(connection):
        bookkeeping.record_staged(
            connection, entity="things", change_set=change_set, mode="modifiedon", rows=3,
            upserts=3, watermark_after="2026-01-01T00:00:00Z", delta_token_after=None,
            reconciled=True, reconciled_at="r", fetched_at="f",
            source_timestamp=source_timestamp, divergence={"scanned": 5})


def test_bookkeeping_reads_what_it_wrote(store_address):
    connection = connect(store_address)
    try:
        with transaction(connection):
            bookkeeping.write_sync_state(connection, "things", mode="modifiedon",
                                         watermark="w1", delta_token=None, status="completed",
                                         change_set=KEY_1, reconciled_at="r1")
            bookkeeping.write_sync_state(connection, "things", mode="modifiedon",
                                         watermark="w2", delta_token="d", status="completed",
                                         change_set=KEY_2)
        state = bookkeeping.read_sync_state(connection, "things")
        assert (state.watermark, state.delta_token, state.reconciled_at,
                state.last_change_set) == ("w2", "d", "r1", KEY_2)

        _stage(connection, KEY_1)
        staged = bookkeeping.read_staged(connection, "things", KEY_1)
        assert (staged.rows, staged.reconciled, staged.reconciled_at) == (3, True, "r")
        assert bookkeeping.publish_status(connection, "things", KEY_1) == PublishStatus.PENDING

        # Published, then staged again: it stays COMPLETE; a pruned marker is cleared.
        with transaction(connection):
            bookkeeping.set_publish_state(connection, "things", KEY_1, PublishStatus.COMPLETE,
                                          created=3, finished_at="2026-01-01T00:00:01+00:00")
            bookkeeping.mark_pruned(connection, "things", KEY_1)
        assert bookkeeping.pruned_at(connection, "things", KEY_1) is not None
        _stage(connection, KEY_1, source_timestamp="t2")
        assert bookkeeping.pruned_at(connection, "things", KEY_1) is None
        row = bookkeeping.read_publish_state(connection, "things", KEY_1)
        assert (row["status"], row["created"], row["source_timestamp"]) == (
            PublishStatus.COMPLETE, 3, "t2")

        # A key that is not a change-set key is never the newest.
        with transaction(connection):
            bookkeeping.set_publish_state(connection, "things", "zzz-not-a-key",
                                          PublishStatus.PENDING)
            bookkeeping.set_publish_state(connection, "things", KEY_2, PublishStatus.EXECUTING)
        assert bookkeeping.latest_publish_state(connection, "things")["change_set"] == KEY_2
        assert bookkeeping.latest_publish_state(
            connection, "things", PublishStatus.COMPLETE)["change_set"] == KEY_1
        assert [r[0] for r in bookkeeping.publish_history(connection, "things", 5)] == [
            KEY_2, KEY_1]

        assert bookkeeping.record_interrupted_publishes(connection, "things") == [KEY_2]
        bookkeeping.record_publish_failure(connection, "things", KEY_2, "execute",
                                           RuntimeError("disk on fire"))
        row = bookkeeping.read_publish_state(connection, "things", KEY_2)
        assert (row["status"], row["retry_count"], row["error"]) == (
            PublishStatus.FAILED, 2, "RuntimeError: disk on fire")
        assert bookkeeping.read_sync_state(connection, "things").status == "failed"
        assert bookkeeping.complete_change_sets(connection, "things") == {KEY_1}
        assert bookkeeping.change_sets_that_wrote(connection, "things") == {KEY_1}
    finally:
        connection.close()


def test_a_failed_transaction_leaves_nothing(store_address):
    connection = connect(store_address)
    try:
        with pytest.raises(RuntimeError), transaction(connection):
            bookkeeping.mark_sync_status(connection, "things", "in_progress")
            raise RuntimeError("stopped")
        assert not connection.in_transaction
        assert bookkeeping.read_sync_state(connection, "things") is None
    finally:
        connection.close()


def test_both_stores_have_the_same_bookkeeping_tables(tmp_path, postgres_store_url):
    sqlite, postgres = connect(str(tmp_path / "m.db")), connect(postgres_store_url)
    try:
        for table in ("_sync_state", "_sync_log", "_publish_state", "_schema", "_defunct",
                      "_staged", "_change_history", "_key_check", "_locks", "_issues"):
            assert table_exists(postgres, table), table
            assert table_columns(postgres, table) == table_columns(sqlite, table), table
        assert not table_exists(postgres, "_no_such_table")
    finally:
        sqlite.close()
        postgres.close()


def test_connections_opened_at_once_all_find_the_bookkeeping_tables(postgres_store_url):
    connections, errors = [], []

    def open_one() -> None:
        try:
            connections.append(connect(postgres_store_url))
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for connection in connections:
        connection.close()
    assert not errors


# -- per-entity locks --------------------------------------------------------------------------

def test_a_second_run_waits_for_the_lock_and_names_its_holder(store_address):
    warnings: list[str] = []
    with entity_lock(store_address, "things", owner="run-a", purpose="publish"):
        with pytest.raises(EntityLockedError, match="things is locked by run run-a"):
            with entity_lock(store_address, "things", owner="run-b", purpose="publish",
                             wait_seconds=0.3, warn=warnings.append):
                pass
        # Another entity is not held up.
        with entity_lock(store_address, "others", owner="run-b", purpose="publish"):
            pass
        connection = connect(store_address)
        try:
            assert is_held(connection, "things") and not is_held(connection, "others")
        finally:
            connection.close()
    assert warnings and "waiting up to 0.3 s" in warnings[0]
    with entity_lock(store_address, "things", owner="run-b", purpose="publish",
                     wait_seconds=0, warn=warnings.append):
        pass  # released: taken at once
    connection = connect(store_address)
    try:
        assert not is_held(connection, "things") and read_lock(connection, "things") is None
    finally:
        connection.close()


HOLD = """
import sys, time
from dataverse_assets.store.locks import entity_lock
with entity_lock(sys.argv[1], "things", owner="doomed-run", purpose="publish"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lock_of_a_killed_run_is_taken_over(store_address):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, store_address], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert holder.stdout.readline().strip() == "held"
        connection = connect(store_address)
        try:
            assert is_held(connection, "things")
        finally:
            connection.close()
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        warnings: list[str] = []
        started = time.monotonic()
        with entity_lock(store_address, "things", owner="next-run", purpose="publish",
                         wait_seconds=30, warn=warnings.append) as me:
            assert me.owner == "next-run"
        assert time.monotonic() - started < 10
        assert any("taking over the lock of run doomed-run" in w for w in warnings), warnings
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)


# -- staging's bookkeeping -------------------------------------------------------------------

def test_staging_markers_and_prestaged_records_on_both_stores(store_address):
    connection = connect(store_address)
    try:
        with transaction(connection, staging=True):
            staging_store.mark_staged_here(connection, "things", KEY_1, 3, "now")
            staging_store.mark_staged_here(connection, "things", KEY_1, 4, "later")
            staging_store.record_prestaged(connection, "things", KEY_2, "fp", 2,
                                           {"created": 2}, [{"problem": "x"}])
        assert staging_store.staged_here(connection, "things", KEY_1)
        assert staging_store.prestaged_change_sets(connection, "things") == {KEY_2}
        with transaction(connection, staging=True):
            assert staging_store.take_prestaged(connection, "things", KEY_2, "other") is None
        assert not staging_store.prestaged_exists(connection, "things", KEY_2)
        with transaction(connection, staging=True):
            staging_store.record_prestaged(connection, "things", KEY_2, "fp", 2,
                                           {"created": 2}, [{"problem": "x"}])
            assert staging_store.take_prestaged(connection, "things", KEY_2, "fp") == (
                2, {"created": 2}, [{"problem": "x"}])
            staging_store.forget_staged_here(connection, "things")
        assert not staging_store.staged_here(connection, "things", KEY_1)
    finally:
        connection.close()


# -- what each dialect writes --------------------------------------------------------------------

HOSTILE_COLUMNS = ["order", 'a"b', "a'b", "with space", "ünï", "pct%s"]


def test_bulk_insert_and_upserts_keep_every_value_exactly(store_address):
    connection = connect(store_address)
    dialect = dialect_of(connection)
    table = quote_identifier("hostile table")
    columns = ["pk", *HOSTILE_COLUMNS, "n", "x"]
    rows = [("k1", "O'Neil", 'say "hi"', "50%", "tab\there", "مرحبا", "%(x)s", 2**62, 1.5),
            ("k2", None, "", "?", ":name", "::", "\\N", -1, None)]
    try:
        with transaction(connection):
            connection.execute(dialect.render_ddl(
                f"CREATE TABLE {table} (pk TEXT PRIMARY KEY, "
                + ", ".join(f"{quote_identifier(c)} TEXT" for c in HOSTILE_COLUMNS)
                + ", n INTEGER, x REAL)"))
            bulk_insert(connection, table, columns, iter(rows))
        assert connection.execute(f"SELECT * FROM {table} ORDER BY pk").fetchall() == rows
        with transaction(connection):
            connection.execute(dialect.upsert(table, columns, ["pk"]),
                               ("k1", *[None] * len(HOSTILE_COLUMNS), 7, 0.25))
            connection.execute(dialect.insert_ignore(table, ["pk", "n"]), ("k2", 99))
        assert connection.execute(f"SELECT * FROM {table} ORDER BY pk").fetchall() == [
            ("k1", *[None] * len(HOSTILE_COLUMNS), 7, 0.25), rows[1]]
    finally:
        connection.close()


def test_json_text_nocase_and_key_patterns_mean_the_same_on_both(store_address):
    connection = connect(store_address)
    dialect = dialect_of(connection)
    try:
        with transaction(connection):
            connection.execute(dialect.render_ddl("CREATE TABLE t (k TEXT, body TEXT)"))
            connection.executemany("INSERT INTO t VALUES (?, ?)", [
                ("Abc", '{"@odata.etag": "W/\\"1\\"", "reason": "deleted", "n": 5}'),
                ("aBC", '{"reason": null}'), (KEY_1, "{}"), ("2026-01-01", "{}")])
        # Text sorts by code point on both (PostgreSQL's columns are COLLATE "C").
        assert [k for (k,) in connection.execute("SELECT k FROM t ORDER BY k")] == [
            "2026-01-01", KEY_1, "Abc", "aBC"]
        assert connection.execute(
            f"SELECT k, {dialect.json_text('body', '@odata.etag')},"
            f" {dialect.json_text('body', 'reason')} FROM t ORDER BY k").fetchall() == [
            ("2026-01-01", None, None), (KEY_1, None, None), ("Abc", 'W/"1"', "deleted"),
            ("aBC", None, None)]
        assert connection.execute(
            f"SELECT count(*) FROM t WHERE {dialect.nocase('k')} = {dialect.nocase('?')}",
            ("ABC",)).fetchone() == (2,)
        assert connection.execute(
            f"SELECT k FROM t WHERE k {dialect.key_match} ?", (dialect.key_pattern,)
        ).fetchall() == [(KEY_1,)]
    finally:
        connection.close()


# -- issues and dead letters -------------------------------------------------------------------

def test_an_issue_seen_again_is_counted_once_per_change_set_and_resolved(store_address):
    connection = connect(store_address)
    problem = {"entity": "things", "record_id": "k1", "field": "size", "problem": "not a number"}
    try:
        with transaction(connection):
            for change_set in (KEY_1, KEY_1, KEY_2):
                issues.record_issue(connection, change_set=change_set, context=change_set,
                                    **problem)
            issues.record_issue(connection, change_set=KEY_1, **{**problem, "field": None})
        listed = {(i["field"], i["occurrences"], i["last_change_set"])
                  for i in issues.list_issues(connection, "things")}
        assert listed == {("size", 2, KEY_2), (None, 1, KEY_1)}
        with transaction(connection, staging=True):
            connection.execute(dialect_of(connection).render_ddl(
                'CREATE TABLE staging."_staging__things" (_change_set TEXT, _pk TEXT)'))
            connection.execute("INSERT INTO \"_staging__things\" VALUES (?, ?)", (
                "20260103T000000Z", "k1"))
        with transaction(connection):
            assert issues.resolve_issues(connection, "things", "20260103T000000Z",
                                         "_staging__things") == 2
        assert issues.list_issues(connection, "things") == []
        assert len(issues.list_issues(connection, "things", include_resolved=True)) == 2
    finally:
        connection.close()


def test_a_change_set_failing_every_retry_becomes_a_dead_letter(store_address):
    connection = connect(store_address)
    delays = (timedelta(minutes=5),)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    try:
        assert dead_letters.record_failure(connection, "things", KEY_1, "boom", now=start,
                                           delays=delays) == "scheduled"
        assert dead_letters.due_retries(connection, start) == []
        assert dead_letters.due_retries(connection, start + timedelta(minutes=6)) == [
            dead_letters.DueRetry("things", KEY_1, 1)]
        assert dead_letters.record_failure(connection, "things", KEY_1, "boom again",
                                           now=start, delays=delays) == "dead_letter"
        [letter] = dead_letters.list_dead_letters(connection)
        shown = dead_letters.get_dead_letter(connection, letter["id"])
        assert (shown["reason"], len(shown["retry_history"])) == ("boom again", 2)
        dead_letters.mark_succeeded(connection, "things", KEY_1)
        assert dead_letters.list_dead_letters(connection) == []
    finally:
        connection.close()


# -- names PostgreSQL would cut short -----------------------------------------------------------

LONG_MULTI_SELECT = "vin_" + "therapeutic_area_choices_of_the_candidate_x" + "yz"  # 50 bytes
LONG_CHOICE = "vin_" + "stage_of_the_candidate_in_the_selection_process_of_today"  # 60 bytes


def test_every_name_the_mirror_derives_from_an_entity_fits_and_is_known(make_mirror,
                                                                         postgres_store_url):
    """PostgreSQL cuts names past 63 bytes short, silently: two long names could then name one
    table. Every table, view and index of a synced PostgreSQL mirror is a bookkeeping table, a
    name `entity_identifiers` lists (what the entity-name limit is computed from), a
    multi-select child table, or one PostgreSQL named itself; and a multi-select column whose
    child table's name would not fit keeps its codes in `E` without one."""
    mirror = make_mirror(store_url=postgres_store_url)
    mirror.simulator.add_column(
        "vin_candidates", SimAttribute(LONG_MULTI_SELECT, "MultiSelectPicklist",
                                       option_set="vin_therapeuticarea"),
        default=lambda row: row["vin_therapeuticareas"])
    mirror.simulator.add_column("vin_candidates", SimAttribute(LONG_CHOICE, "Picklist"),
                                default=lambda row: row["vin_stage"])
    mirror.sync_all()
    config = mirror.settings.entities
    known = {name for e in config.entities for name in entity_identifiers(e.name)}
    with mirror.connection() as connection:
        names = [name for (name,) in connection.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname IN ('public', 'staging')")]
        children = {f"{e.name}__{column}" for e in config.entities
                    for (column,) in connection.execute(
                        "SELECT column_name FROM information_schema.columns"
                        " WHERE table_name = ?", (e.name,))}
        view = [column for (column,) in connection.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
            ("vin_candidates__readable",))]
        long_codes = connection.execute(
            f"SELECT count(*) FROM vin_candidates WHERE {quote_identifier(LONG_MULTI_SELECT)}"
            " IS NOT DISTINCT FROM vin_therapeuticareas").fetchone()[0]
    unknown = [n for n in names if n not in known and n not in children
               and not n.endswith(("_pkey", "_seq"))
               and not (n.startswith("_") and not n.startswith("_staging"))]
    assert unknown == []
    assert "vin_candidates__vin_therapeuticareas" in names  # a child table that fits is made
    assert not any(n.startswith(f"vin_candidates__{LONG_MULTI_SELECT[:20]}") for n in names)
    assert long_codes == len(mirror.simulator.records("vin_candidates"))  # the codes are in E
    # The readable view's labels column of a choice whose name leaves no room for "_label"
    # is left out, not cut short (a cut name could be another column's).
    assert "vin_stage_label" in view and LONG_CHOICE in view
    assert [c for c in view if c.startswith(LONG_CHOICE) and c != LONG_CHOICE] == []


def test_an_entity_name_too_long_for_postgresql_is_refused_in_one_line(tmp_path, monkeypatch,
                                                                        capsys):
    longest = max(entity_identifiers("x"), key=len)
    fits = "t" * (63 - len(longest) + 1)  # the longest derived name is exactly 63 bytes
    for name, refused in ((fits, False), (fits + "s", True)):
        config = write_entities_config(tmp_path / f"{len(name)}.json", page_size=40,
                                       overrides={"teams": {"name": name}})
        for store_url, kind in ((URL, "postgresql"), (None, "sqlite")):
            settings = Settings(store_url=store_url, db_path=tmp_path / "m.db",
                                archive_dir=tmp_path / "archive", entities_config_path=config)
            if refused and kind == "postgresql":
                with pytest.raises(ConfigError) as error:
                    build_definitions(settings)
                message = str(error.value)
                assert message.startswith(f"{config}: entity {name!r} (entities[")
                assert (f"field 'name': {len(name)} bytes is too long for a PostgreSQL store"
                        in message)
                assert f"an entity's name can have at most {len(fits)} bytes" in message
                assert "\n" not in message and "SQLite" in message
            else:
                build_definitions(settings)  # SQLite has no such limit
    monkeypatch.setenv("DATAVERSE_STORE_URL", URL)
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(config))
    assert cli_main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"configuration error: {config}: entity {fits + 's'!r}")
    assert err.count("\n") == 1
