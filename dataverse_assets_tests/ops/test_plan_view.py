"""Publishing unit by unit on a hand-made archive: the plan, its validation, its text view."""

import orjson
import pytest

from dataverse_assets.errors import PlanValidationError
from dataverse_assets.ops import cli
from dataverse_assets.ops.plan_view import render_plan
from dataverse_assets.store.db import connect
from dataverse_assets.store.schema_registry import load_locked_schema
from dataverse_assets.sync import publish_plan
from dataverse_assets.sync.publish_execute import publish_change_set
from dataverse_assets.sync.publish_plan import changed_fields
from dataverse_assets.sync.stage import write_staged
from dataverse_assets.sync.steps import staged_records
from dataverse_assets_tests.helpers import (
    ENTITY,
    archive_change_set,
    stage_and_publish,
    store_environment,
    thing,
)


@pytest.fixture
def store(each_store):
    """Every test here runs on each kind of store (conftest.each_store)."""
    return each_store


def test_plan_view_shows_counts_first_then_changed_fields_only(store):
    stage_and_publish(store, "20260101T000000Z", [
        thing(1, "Alpha"), thing(2, "Beta"), thing(3, "Gamma"), thing(4, "Delta")])
    result = stage_and_publish(store, "20260102T000000Z", [
        thing(1, "Alpha"), thing(2, "Beta, renamed", size=2), thing(4, "Delta"),
        thing(5, "O'Epsilon")])
    assert (result.created, result.updated, result.deleted, result.unchanged) == (1, 1, 1, 2)
    with store.connection() as connection:
        text = render_plan(connection, "things", "20260102T000000Z")
    assert text == "\n".join([
        "Plan for things, change set 20260102T000000Z (COMPLETE)",
        "1 to create, 1 to update, 1 to delete, 2 unchanged",
        "",
        "+ 1 to create",
        "  + id-5",
        "",
        "~ 1 to update",
        "  ~ id-2",
        '      name: "Beta" -> "Beta, renamed"',
        "      size: 1 -> 2",
        "",
        "- 1 to delete",
        "  - id-3",
    ])


def test_change_history_records_each_applied_change(store):
    stage_and_publish(store, "20260101T000000Z", [thing(1, "Alpha"), thing(2, "Beta")])
    stage_and_publish(store, "20260102T000000Z", [thing(1, "Alpha 2")])
    with store.connection() as connection:
        rows = connection.execute(
            "SELECT change_set, record_id, kind, changes FROM _change_history"
            " ORDER BY id").fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("20260101T000000Z", "id-1", "create"), ("20260101T000000Z", "id-2", "create"),
        ("20260102T000000Z", "id-1", "update"), ("20260102T000000Z", "id-2", "delete")]
    assert orjson.loads(rows[2][3]) == {"name": ["Alpha", "Alpha 2"]}


def test_an_older_snapshot_never_overwrites_a_newer_one(store):
    stage_and_publish(store, "20260101T000000Z", [thing(1, "Old")])
    stage_and_publish(store, "20260103T000000Z", [thing(1, "New"), thing(2, "Added")])
    # A replay of an older change set arrives late.
    result = stage_and_publish(store, "20260102T000000Z", [thing(1, "Middle")])
    assert (result.updated, result.deleted, result.stale) == (0, 0, 1)
    with store.connection() as connection:
        assert connection.execute("SELECT thingid, name FROM things ORDER BY 1").fetchall() == [
            ("id-1", "New"), ("id-2", "Added")]


def test_a_plan_that_does_not_add_up_is_refused_before_any_write(store, monkeypatch):
    stage_and_publish(store, "20260101T000000Z", [thing(1, "Alpha")])
    archive_change_set(store.archive_dir, "20260102T000000Z", [thing(1, "Changed"), thing(2, "B")])
    with store.connection() as connection:
        write_staged(connection, staged_records(
            connection, store.archive("things", "20260102T000000Z"), ENTITY))

        def classification_bug(name):  # loses a row while planning
            if name == "publish.mid_plan":
                connection.execute("DELETE FROM _publish_plan WHERE pk = 'id-2'")

        monkeypatch.setattr(publish_plan, "fault_point", classification_bug)
        schema = load_locked_schema(connection, "things")
        with pytest.raises(PlanValidationError, match="covers 1 staged rows but 2"):
            publish_change_set(connection, schema, "20260102T000000Z", mode="full",
                               watermark_after=None)
        assert connection.execute("SELECT name FROM things").fetchall() == [("Alpha",)]
        assert connection.execute(
            "SELECT status, failed_operation, error_code FROM _publish_state"
            " WHERE change_set = '20260102T000000Z'").fetchone() == (
            "FAILED", "plan", "PlanValidationError")


def test_plan_show_command_prints_the_plan(store, monkeypatch, capsys):
    stage_and_publish(store, "20260101T000000Z", [thing(1, "Alpha")])
    for name, value in store_environment(store.db_path).items():
        monkeypatch.setenv(name, value)
    assert cli.main(["plan", "show", "things", "20260101T000000Z"]) == 0
    assert "1 to create, 0 to update, 0 to delete, 0 unchanged" in capsys.readouterr().out
    assert cli.main(["plan", "show", "things", "19990101T000000Z"]) == 1
    assert "no plan for things" in capsys.readouterr().err
    connect(store.db_path).close()


def test_changed_fields_of_an_update_missing_fields_count_as_null(store):
    stage_and_publish(store, "20260101T000000Z", [
        {**thing(1, "Alpha"), "note": "kept", "gone": "x"}])
    # "gone" disappears (-> null), "added" appears, "note" is unchanged, size goes null.
    stage_and_publish(store, "20260102T000000Z", [
        {"thingid": "id-1", "name": "Alpha", "size": None, "note": "kept", "added": [1]}])
    with store.connection() as connection:
        changes = connection.execute(
            "SELECT changes FROM _publish_plan WHERE change_set = '20260102T000000Z'"
            " AND kind = 'update'").fetchone()[0]
    assert list(orjson.loads(changes).items()) == [
        ("added", [None, [1]]), ("gone", ["x", None]), ("size", [1, None])]
    # Not JSON objects on either side: no detail, but no failure either.
    assert changed_fields("not json", "{}") is None
    assert changed_fields("[1]", "{}") is None
    assert changed_fields(None, "{}") is None
