"""The staging table's (_change_set, _pk) key: in SQLite a new table's first change set is
appended and its key index built after the rows (PostgreSQL makes it with the table); a record
staged twice keeps its last version either way, and tables made by earlier versions (the key as
PRIMARY KEY) keep working. On both stores but where said."""

import sqlite3

import psycopg
import pytest

from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.store.backend import POSTGRES, dialect_of
from dataverse_assets.sync.stage import count_staged, staging_key_index
from dataverse_assets_tests.helpers import stage_and_publish, thing


@pytest.fixture
def store(each_store):
    """The tests that take `store` run in each kind of store (docs/store-backends.md)."""
    return each_store


@pytest.fixture
def sqlite_store(tmp_path) -> MirrorStore:
    return MirrorStore(db_path=str(tmp_path / "m.db"), archive_dir=str(tmp_path / "archive"))


def unique_indexes(connection, table: str) -> list[str]:
    if dialect_of(connection) is POSTGRES:
        return [r[0] for r in connection.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = to_regclass(?) AND i.indisunique", (table,))]
    return [r[0] for r in connection.execute(
        "SELECT name FROM pragma_index_list(?) WHERE \"unique\" = 1", (table,))]


def staged(store, change_set):
    with store.connection() as connection:
        return connection.execute(
            "SELECT _pk, name FROM _staging__things WHERE _change_set = ? ORDER BY _pk",
            (change_set,)).fetchall()


def canonical(store):
    with store.connection() as connection:
        return connection.execute("SELECT thingid, name FROM things ORDER BY thingid").fetchall()


def test_a_record_seen_twice_in_a_first_change_set_keeps_its_last_version(store):
    # id-2 changed while we paged: seen twice, the later one is newer.
    result = stage_and_publish(store, "20260101T000000Z", [
        thing(1, "Alpha"), thing(2, "Beta, old"), thing(3, "Gamma"), thing(2, "Beta, new")])
    assert staged(store, "20260101T000000Z") == [
        ("id-1", "Alpha"), ("id-2", "Beta, new"), ("id-3", "Gamma")]
    assert result.created == 3
    assert canonical(store) == [("id-1", "Alpha"), ("id-2", "Beta, new"), ("id-3", "Gamma")]
    with store.connection() as connection:
        assert count_staged(connection, "things", "20260101T000000Z", "upsert") == 3
        assert connection.execute(
            "SELECT upserts FROM _staged WHERE change_set = '20260101T000000Z'"
        ).fetchone() == (3,)
        # The key index was built, and it is unique: the next change set goes through it.
        assert unique_indexes(connection, "_staging__things") == [
            staging_key_index("_staging__things")]
        with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
            connection.execute(
                "INSERT INTO _staging__things (_change_set, _pk, _op) VALUES"
                " ('20260101T000000Z', 'id-1', 'upsert')")


def test_later_change_sets_replace_through_the_key_index(store):
    stage_and_publish(store, "20260101T000000Z", [thing(1, "Alpha"), thing(2, "Beta")])
    result = stage_and_publish(store, "20260102T000000Z", [
        thing(2, "Beta, old"), thing(4, "Delta"), thing(2, "Beta, new")])
    assert staged(store, "20260102T000000Z") == [("id-2", "Beta, new"), ("id-4", "Delta")]
    assert staged(store, "20260101T000000Z") == [("id-1", "Alpha"), ("id-2", "Beta")]
    assert (result.created, result.updated, result.deleted) == (1, 1, 1)
    assert canonical(store) == [("id-2", "Beta, new"), ("id-4", "Delta")]
    # Staging the same change set again replaces its rows, nothing doubles.
    stage_and_publish(store, "20260102T000000Z", [thing(2, "Beta, new"), thing(4, "Delta")])
    assert staged(store, "20260102T000000Z") == [("id-2", "Beta, new"), ("id-4", "Delta")]


# SQLite only: earlier versions made SQLite stores only.
def test_a_staging_table_made_by_an_earlier_version_keeps_its_primary_key(sqlite_store):
    store = sqlite_store
    with store.connection() as connection:
        connection.execute(
            "CREATE TABLE _staging__things (_change_set TEXT, _pk TEXT, _op TEXT,"
            " _content_hash TEXT, _modifiedon TEXT, thingid TEXT, name TEXT, size INTEGER,"
            " json_response TEXT, PRIMARY KEY (_change_set, _pk))")
    stage_and_publish(store, "20260101T000000Z", [
        thing(1, "Alpha"), thing(2, "Beta, old"), thing(2, "Beta, new")])
    assert staged(store, "20260101T000000Z") == [("id-1", "Alpha"), ("id-2", "Beta, new")]
    assert canonical(store) == [("id-1", "Alpha"), ("id-2", "Beta, new")]
    with store.connection() as connection:
        names = [r[0] for r in connection.execute(
            "SELECT name FROM pragma_index_list('_staging__things')")]
    assert staging_key_index("_staging__things") not in names


def dated(n, name, created):
    return {**thing(n, name), "createdon": created, "modifiedon": "2026-01-02T00:00:00Z"}


def test_an_update_that_changes_createdon_moves_it_and_its_index_entry(store):
    # createdon is left out of the update's SET (Dataverse never changes it) and set apart
    # for the rows whose changed fields name it: both must still end up right.
    stage_and_publish(store, "20260101T000000Z", [
        dated(1, "Alpha", "2025-01-01T00:00:00Z"), dated(2, "Beta", "2025-01-02T00:00:00Z")])
    result = stage_and_publish(store, "20260102T000000Z", [
        dated(1, "Alpha", "2025-06-01T00:00:00Z"), dated(2, "Beta, renamed",
                                                         "2025-01-02T00:00:00Z")])
    assert result.updated == 2
    with store.connection() as connection:
        assert connection.execute(
            "SELECT thingid, name, createdon FROM things ORDER BY thingid").fetchall() == [
            ("id-1", "Alpha", "2025-06-01T00:00:00Z"),
            ("id-2", "Beta, renamed", "2025-01-02T00:00:00Z")]
        if dialect_of(connection) is not POSTGRES:  # (PostgreSQL maintains its indexes itself)
            # Looked up through the createdon index, which must agree with the rows.
            assert connection.execute(
                "SELECT thingid FROM things INDEXED BY things__createdon"
                " WHERE createdon >= '2025-06-01'").fetchall() == [("id-1",)]
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert connection.execute(
            "SELECT thingid, createdon FROM things__history ORDER BY thingid").fetchall() == [
            ("id-1", "2025-01-01T00:00:00Z"), ("id-2", "2025-01-02T00:00:00Z")]
