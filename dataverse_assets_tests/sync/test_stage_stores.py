"""Staging on both stores (docs/store-backends.md): the same staged rows from the same
archived change set, the last version of a key staged twice, and a value that does not fit
its column (PostgreSQL: NULL there, exact in json_response, an issue)."""

import json

import orjson
import pytest

from dataverse_assets.archive.change_sets import MANIFEST
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.store.backend import is_postgres_address
from dataverse_assets.store.db import transaction
from dataverse_assets.store.issues import list_issues
from dataverse_assets.store.schema import to_postgres_value
from dataverse_assets.store.schema_registry import load_locked_schema
from dataverse_assets.sync import stage as stage_module
from dataverse_assets.sync.prestage import PageStager
from dataverse_assets.sync.stage import StagingWriter, count_staged, write_staged
from dataverse_assets.sync.steps import publish, staged_records
from dataverse_assets_tests.helpers import ENTITY, archive_change_set, thing


@pytest.fixture
def any_store(each_store):
    return each_store


def stage(store, change_set, records) -> int:
    archive = archive_change_set(store.archive_dir, change_set, [])
    # (json, not orjson: a page may hold integers beyond 64 bits.)
    archive.replace_page(1, json.dumps({"value": records}).encode())
    with store.connection() as connection:
        return write_staged(connection, staged_records(connection, archive, ENTITY))


def staged(store, change_set):
    with store.connection() as connection:
        return connection.execute(
            "SELECT _pk, name, size, _op FROM _staging__things WHERE _change_set = ?"
            " ORDER BY _pk", (change_set,)).fetchall()


def test_staging_writes_the_same_rows_on_both_stores(any_store):
    first, second = "20260101T000000Z", "20260102T000000Z"
    assert stage(any_store, first, [thing(1, "Alpha"), thing(2, "Beta, old"), thing(3, "Gamma"),
                                    thing(2, "Beta, new")]) == 4
    assert staged(any_store, first) == [("id-1", "Alpha", 1, "upsert"),
                                        ("id-2", "Beta, new", 1, "upsert"),
                                        ("id-3", "Gamma", 1, "upsert")]
    stage(any_store, second, [thing(2, "Beta, old", 2), thing(4, "Zoë O'Neil"),
                              thing(2, "Beta, new", 3)])
    # Staged again: replaced, nothing doubles.
    stage(any_store, second, [thing(2, "Beta, new", 3), thing(4, "Zoë O'Neil")])
    assert staged(any_store, second) == [("id-2", "Beta, new", 3, "upsert"),
                                         ("id-4", "Zoë O'Neil", 1, "upsert")]
    assert staged(any_store, first)[0] == ("id-1", "Alpha", 1, "upsert")
    with any_store.connection() as connection:
        assert count_staged(connection, "things", second, "upsert") == 2
        assert connection.execute(
            "SELECT rows, upserts FROM _staged WHERE change_set = ?", (second,)
        ).fetchone() == (2, 2)
        body = connection.execute(
            "SELECT json_response FROM _staging__things WHERE _pk = 'id-4'").fetchone()[0]
    assert orjson.loads(body) == thing(4, "Zoë O'Neil")


def test_a_value_that_does_not_fit_its_column(any_store):
    stage(any_store, "20260101T000000Z", [thing(1, "Alpha"), thing(2, "nul\x00inside")])
    rows = {key: (name, size) for key, name, size, _ in staged(any_store, "20260101T000000Z")}
    with any_store.connection() as connection:
        bodies = dict(connection.execute(
            "SELECT _pk, json_response FROM _staging__things").fetchall())
        issues = {(i["record_id"], i["field"]) for i in list_issues(connection, "things")}
    # json_response keeps every value exactly, on both stores.
    assert orjson.loads(bodies["id-2"])["name"] == "nul\x00inside"
    assert rows["id-1"] == ("Alpha", 1)
    if is_postgres_address(any_store.db_path):
        # PostgreSQL's text cannot hold it: NULL in the typed column, and an issue.
        assert rows["id-2"] == (None, 1)
        assert issues == {("id-2", "name")}
    else:
        assert rows["id-2"] == ("nul\x00inside", 1)  # SQLite keeps it
        assert issues == set()


@pytest.mark.parametrize(("value", "kind", "expected"), [
    (True, "INTEGER", 1), (5.0, "INTEGER", 5), ("42", "INTEGER", 42), (2**63 - 1, "INTEGER",
                                                                     2**63 - 1),
    (3, "REAL", 3.0), ("1.5", "REAL", 1.5), (7, "TEXT", "7"), (False, "TEXT", "0"),
    ({"a": 1}, "TEXT", '{"a":1}'), ("plain", "TEXT", "plain"), (None, "INTEGER", None),
])
def test_values_that_fit_are_converted_to_their_column_type(value, kind, expected):
    assert to_postgres_value(value, kind) == (expected, None)


@pytest.mark.parametrize(("value", "kind"), [
    ("abc", "INTEGER"), (2**63, "INTEGER"), (1.5, "INTEGER"), ({"a": 1}, "INTEGER"),
    ("x", "REAL"), (10**400, "REAL"), ("a\x00b", "TEXT"),
])
def test_values_that_do_not_fit_are_null_with_a_reason(value, kind):
    converted, problem = to_postgres_value(value, kind)
    assert converted is None and problem


def test_rows_staged_while_fetching_are_taken_on_both_stores(any_store):
    stage(any_store, "20260101T000000Z", [thing(1, "Alpha"), thing(2, "Beta")])
    records = [thing(2, "Beta, old"), thing(3, "Gamma"), thing(2, "Beta, new")]
    archive = archive_change_set(any_store.archive_dir, "20260102T000000Z", records)
    with any_store.connection() as connection:
        locked = load_locked_schema(connection, "things")
    stager = PageStager(any_store.db_path, ENTITY, archive, locked)
    stager.page(1, {"kind": "snapshot", "shape": "collection"}, records)
    assert stager.finish(), stager.given_up
    with any_store.connection() as connection:
        staged_set = staged_records(connection, archive, ENTITY)
        assert write_staged(connection, staged_set) == 3
    assert staged_set.adopted
    assert staged(any_store, "20260102T000000Z") == [("id-2", "Beta, new", 1, "upsert"),
                                                     ("id-3", "Gamma", 1, "upsert")]


def test_a_key_staged_again_in_a_later_batch_keeps_its_last_version(any_store, monkeypatch):
    """A record that changed (or was deleted) while we paged comes again on a later page, in
    a later batch: its last version is the staged one, counted once (PostgreSQL COPYs each
    batch straight into the table, so the earlier row must go first)."""
    monkeypatch.setattr(stage_module, "STAGING_BATCH_ROWS", 2)  # a batch per page
    change_set = "20260101T000000Z"
    pages = [[thing(1, "Alpha"), thing(2, "Beta")],
             [thing(3, "Gamma"), thing(1, "Alpha, newer", 2)],
             [{"id": "id-2", "reason": "deleted"}, thing(4, "Delta")]]
    archive = archive_change_set(any_store.archive_dir, change_set, [])
    for number, records in enumerate(pages, start=1):
        archive.replace_page(number, orjson.dumps({"value": records}))
    manifest = archive.manifest()
    archive.write_json(MANIFEST, {**manifest, "pages": manifest["pages"] * 3})
    with any_store.connection() as connection:
        staged_set = staged_records(connection, archive, ENTITY)
        batches = list(staged_set.batches)
        assert [len(rows) for rows, _ in batches] == [2, 2, 2]
        staged_set.batches = iter(batches)
        assert write_staged(connection, staged_set) == 6
    assert staged(any_store, change_set) == [("id-1", "Alpha, newer", 2, "upsert"),
                                             ("id-2", None, None, "delete"),
                                             ("id-3", "Gamma", 1, "upsert"),
                                             ("id-4", "Delta", 1, "upsert")]
    with any_store.connection() as connection:
        assert connection.execute("SELECT upserts FROM _staged WHERE change_set = ?",
                                  (change_set,)).fetchone() == (3,)
    assert publish(any_store, ENTITY, change_set)[-1].created == 3


def test_a_change_set_staged_over_a_killed_fetchs_rows_replaces_them(any_store):
    """A fetch that staged pages as they came and was killed leaves rows recorded nowhere;
    staging the change set from its archive replaces them: none is left, none doubles."""
    change_set = "20260101T000000Z"
    killed = archive_change_set(any_store.archive_dir, change_set,
                                [thing(1, "Alpha, as paged"), thing(9, "not in the archive")])
    with any_store.connection() as connection:
        partial = staged_records(connection, killed, ENTITY)
        with transaction(connection, mirror=False, staging=True):
            writer = StagingWriter(connection, "things", change_set, partial.schema, [])
            writer.start()
            for batch, keys in partial.batches:
                writer.write(batch, keys)
    assert stage(any_store, change_set, [thing(1, "Alpha"), thing(2, "Beta")]) == 2
    assert staged(any_store, change_set) == [("id-1", "Alpha", 1, "upsert"),
                                             ("id-2", "Beta", 1, "upsert")]
    with any_store.connection() as connection:
        assert connection.execute("SELECT upserts FROM _staged WHERE change_set = ?",
                                  (change_set,)).fetchone() == (2,)
    publish(any_store, ENTITY, change_set)
    with any_store.connection() as connection:
        assert connection.execute("SELECT thingid, name FROM things ORDER BY thingid"
                                  ).fetchall() == [("id-1", "Alpha"), ("id-2", "Beta")]


def test_a_staging_column_of_another_type_takes_its_values_as_text(postgres_store_url,
                                                                    tmp_path):
    """PostgreSQL: rows go in by binary COPY only when the staging table's columns have the
    types the values are converted to; a column made with another type takes them as text,
    converted by the server, as before."""
    store = MirrorStore(db_path=postgres_store_url, archive_dir=str(tmp_path / "archive"))
    stage(store, "20260101T000000Z", [thing(1, "Alpha")])
    with store.connection() as connection:
        connection.execute("ALTER TABLE staging._staging__things ALTER COLUMN size TYPE text")
    stage(store, "20260102T000000Z", [thing(2, "Beta", 3)])
    with store.connection() as connection:
        assert connection.execute(
            "SELECT _pk, size FROM _staging__things ORDER BY _pk").fetchall() == [
            ("id-1", "1"), ("id-2", "3")]
