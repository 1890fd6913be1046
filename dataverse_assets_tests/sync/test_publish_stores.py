"""The publish on both stores (docs/store-backends.md): plan then execute, history, defunct
ids, the changed fields, the watermark; the same tables either way."""

import pytest

from dataverse_assets.defs.checks import relation_identifier
from dataverse_assets.store.db import quote_identifier
from dataverse_assets_tests.helpers import stage_and_publish, thing


@pytest.fixture
def any_store(each_store):
    return each_store


def rows(store, sql, params=()):
    with store.connection() as connection:
        return [tuple(r) for r in connection.execute(sql, params).fetchall()]


def test_publishing_change_sets_gives_the_same_tables_on_both_stores(any_store):
    first = stage_and_publish(any_store, "20260101T000000Z", [
        thing(1, "Alpha"), thing(2, "Beta"), thing(3, "Gamma"), thing(10, "Zeta")])
    assert (first.created, first.updated, first.deleted) == (4, 0, 0)
    second = stage_and_publish(any_store, "20260102T000000Z", [
        thing(1, "Alpha"), thing(2, "Beta, renamed", 2), thing(4, "Delta")])
    assert (second.created, second.updated, second.unchanged, second.deleted) == (1, 1, 1, 2)
    assert rows(any_store, "SELECT thingid, name, size FROM things ORDER BY thingid") == [
        ("id-1", "Alpha", 1), ("id-2", "Beta, renamed", 2), ("id-4", "Delta", 1)]
    history = quote_identifier("things__history")
    assert rows(any_store, f"SELECT thingid, name, change_kind, superseded_in FROM {history}"
                           " ORDER BY thingid") == [
        ("id-10", "Zeta", "delete", "20260102T000000Z"),
        ("id-2", "Beta", "update", "20260102T000000Z"),
        ("id-3", "Gamma", "delete", "20260102T000000Z")]
    assert rows(any_store, "SELECT id, reason FROM _defunct ORDER BY id") == [
        ("id-10", "no longer in the source"), ("id-3", "no longer in the source")]
    changes = rows(any_store, "SELECT record_id, kind, changes FROM _change_history"
                              " WHERE change_set = '20260102T000000Z' ORDER BY record_id")
    assert changes == [
        ("id-10", "delete", None), ("id-2", "update",
                                    '{"name":["Beta","Beta, renamed"],"size":[1,2]}'),
        ("id-3", "delete", None), ("id-4", "create", None)]
    assert rows(any_store, "SELECT status, last_change_set FROM _sync_state") == [
        ("completed", "20260102T000000Z")]
    # Published again: nothing changes.
    again = stage_and_publish(any_store, "20260102T000000Z", [
        thing(1, "Alpha"), thing(2, "Beta, renamed", 2), thing(4, "Delta")])
    assert again.already_published or (again.created, again.updated) == (0, 0)


def test_a_publish_in_chunks_on_both_stores(any_store):
    from dataverse_assets.config import EntityConfig
    entity = EntityConfig(name="things", group="daily", incremental="full", publish_chunk_rows=2)
    stage_and_publish(any_store, "20260101T000000Z", [thing(n, f"n{n}") for n in range(7)],
                      entity)
    result = stage_and_publish(any_store, "20260102T000000Z",
                               [thing(n, f"m{n}") for n in range(1, 9)], entity)
    assert (result.created, result.updated, result.deleted) == (2, 6, 1)
    assert rows(any_store, "SELECT thingid, name FROM things ORDER BY thingid") == [
        (f"id-{n}", f"m{n}") for n in range(1, 9)]
    assert rows(any_store, "SELECT count(*) FROM things__history") == [(7,)]


def test_the_relation_identifier_names_the_database_and_its_schema():
    assert relation_identifier("/data/dataverse.db", "accounts") == "dataverse.main.accounts"
    assert relation_identifier("postgresql://sync@db.example:5432/mirror",
                               "accounts") == "mirror.public.accounts"
