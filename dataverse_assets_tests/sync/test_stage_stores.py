"""Staging on both stores (docs/store-backends.md): the same staged rows from the same
archived change set, the last version of a key staged twice, and a value that does not fit
its column (PostgreSQL: NULL there, exact in json_response, an issue)."""

import json

import orjson
import pytest

from dataverse_assets.store.backend import is_postgres_address
from dataverse_assets.store.issues import list_issues
from dataverse_assets.store.schema import to_postgres_value
from dataverse_assets.store.schema_registry import load_locked_schema
from dataverse_assets.sync.prestage import PageStager
from dataverse_assets.sync.stage import count_staged, write_staged
from dataverse_assets.sync.steps import staged_records
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
