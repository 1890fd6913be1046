"""The primary-key check after each publish: the whole key index on a first check, then only
the keys created since, unless something says the table must be read again."""

import pytest

from dataverse_assets.defs.checks import primary_key_result
from dataverse_assets.store import key_check
from dataverse_assets.store.schema_registry import load_locked_schema
from dataverse_assets_tests.helpers import stage_and_publish, thing


@pytest.fixture
def store(each_store):
    """Every test here runs in each kind of store (docs/store-backends.md)."""
    return each_store


def check(store):
    with store.connection() as connection:
        result = primary_key_result(connection, "things",
                                    load_locked_schema(connection, "things"))
    return result.passed, result.metadata["checked"].value, [
        (e["key"], e["rows"]) for e in result.metadata["duplicate_examples"].value]


@pytest.fixture
def scoped(monkeypatch):
    """Scoped checks even on these tiny tables (the default reads the whole index whenever
    the new keys are more than 1 in 20 rows)."""
    monkeypatch.setattr(key_check, "SCOPED_KEY_CHECK_RATIO", 0)


def test_after_a_clean_check_only_new_keys_are_looked_up_and_a_case_twin_is_caught(
        store, scoped):
    stage_and_publish(store, "20260101T000000Z", [thing(1, "a"), thing(2, "b")])
    assert check(store) == (True, "all keys", [])
    stage_and_publish(store, "20260102T000000Z", [thing(1, "a"), thing(2, "b"), thing(3, "c")])
    assert check(store) == (True, "1 keys created since the last check", [])
    # A snapshot with the same key in another letter case: a create, caught by the lookup.
    stage_and_publish(store, "20260103T000000Z", [
        thing(1, "a"), thing(2, "b"), thing(3, "c"), {"thingid": "ID-3", "name": "twin"}])
    assert check(store) == (False, "1 keys created since the last check", [("id-3", 2)])
    # Failed once: the next check reads everything again, and still sees the twin.
    stage_and_publish(store, "20260104T000000Z", [
        thing(1, "a"), thing(2, "b"), thing(3, "c"), {"thingid": "ID-3", "name": "twin"},
        thing(4, "d")])
    assert check(store) == (False, "all keys", [("id-3", 2)])
    # The twin is deleted at the source: the full read passes, and scoped checks resume.
    stage_and_publish(store, "20260105T000000Z", [
        thing(1, "a"), thing(2, "b"), thing(3, "c"), thing(4, "d")])
    assert check(store) == (True, "all keys", [])
    stage_and_publish(store, "20260106T000000Z", [
        thing(1, "a"), thing(2, "b"), thing(3, "c"), thing(4, "d"), thing(5, "e")])
    assert check(store) == (True, "1 keys created since the last check", [])


def test_rows_written_around_publish_make_the_check_read_every_key(store, scoped):
    stage_and_publish(store, "20260101T000000Z", [thing(1, "a"), thing(2, "b")])
    assert check(store)[0]
    with store.connection() as connection:  # by hand: no publish, no history
        # Marked as written by a later change set, so the next snapshot leaves it in place.
        connection.execute(
            "INSERT INTO things (thingid, name, json_response, _content_hash, sync_time,"
            " updated_at, _change_set) VALUES ('ID-1', 'x', '{}', 'x', 'now', 'now',"
            " '20990101T000000Z')")
    stage_and_publish(store, "20260102T000000Z", [thing(1, "a"), thing(2, "b"), thing(3, "c")])
    # One create and no delete since the last check cannot explain two more rows.
    assert check(store) == (False, "all keys", [("id-1", 2)])


def test_many_new_keys_read_the_whole_index(store):
    stage_and_publish(store, "20260101T000000Z", [thing(n, "x") for n in range(40)])
    assert check(store)[:2] == (True, "all keys")
    stage_and_publish(store, "20260102T000000Z", [thing(n, "x") for n in range(41)])
    assert check(store)[:2] == (True, "1 keys created since the last check")  # 1 in 41
    stage_and_publish(store, "20260103T000000Z", [thing(n, "x") for n in range(45)])
    assert check(store)[:2] == (True, "all keys")  # 4 new keys in 45 rows: more than 1 in 20
