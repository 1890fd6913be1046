"""Staged rows live in a file of their own, never synced, and heal from the archive: the mirror
file holds each row once, and a lost or untrustworthy staging file costs a re-stage, not data."""

import shutil
import sqlite3

import pytest

from dataverse_assets.config import EntitiesConfig
from dataverse_assets.store.db import transaction
from dataverse_assets.store.staging_retention import plan_staging_prune, prune_staged
from dataverse_assets.store.staging_store import (
    record_prestaged,
    staged_here,
    staging_files,
    staging_path,
)
from dataverse_assets.sync.stage import StagingWriter, staging_key_index, write_staged
from dataverse_assets.sync.steps import publish, staged_records
from dataverse_assets_tests.helpers import ENTITY, archive_change_set, stage_and_publish, thing

FIRST, SECOND = "20260101T000000Z", "20260102T000000Z"


def _tables(path, schema="main") -> set[str]:
    with sqlite3.connect(path) as connection:
        return {row[0] for row in connection.execute(
            f"SELECT name FROM {schema}.sqlite_master WHERE type = 'table'")}


def _mirror(store) -> list[tuple]:
    with store.connection() as connection:
        return connection.execute("SELECT thingid, name FROM things ORDER BY thingid").fetchall()


def _stage_second(store) -> None:
    """A full snapshot after FIRST: id-1 renamed, id-2 gone, id-4 new; staged, not published."""
    archive = archive_change_set(store.archive_dir, SECOND,
                                 [thing(1, "renamed"), thing(3, "c"), thing(4, "d")])
    with store.connection() as connection:
        write_staged(connection, staged_records(connection, archive, ENTITY))


EXPECTED = [("id-1", "renamed"), ("id-3", "c"), ("id-4", "d")]


def test_staged_rows_are_in_the_staging_file_and_the_mirror_file_holds_each_row_once(store):
    stage_and_publish(store, FIRST, [thing(1, "a"), thing(2, "b")])
    mirror_tables = _tables(store.db_path)
    assert "things" in mirror_tables
    assert not {t for t in mirror_tables if t.startswith("_staging")}
    assert {"_staging__things", "_staging_keys__things"} <= _tables(staging_path(store.db_path))
    with sqlite3.connect(store.db_path) as connection:  # json_response once: in canonical
        assert connection.execute("SELECT count(*) FROM things").fetchone()[0] == 2


def test_a_lost_staging_file_is_staged_again_from_the_archive_before_publishing(store):
    stage_and_publish(store, FIRST, [thing(1, "a"), thing(2, "b"), thing(3, "c")])
    _stage_second(store)
    for file in staging_files(store.db_path):
        file.unlink(missing_ok=True)
    publish(store, ENTITY, SECOND)
    # The full snapshot published from its archived pages: not from an empty staging table
    # (which would have deleted every record) and not refused.
    assert _mirror(store) == EXPECTED


def _earlier_boot(path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE _staging_meta SET value = 'a-boot-before-a-crash'")


def _garbage(path) -> None:
    for file in staging_files(str(path).removesuffix("-staging")):
        file.unlink(missing_ok=True)
    path.write_bytes(b"not a database, half written when the machine lost power" * 100)


@pytest.mark.parametrize("damage", [_earlier_boot, _garbage], ids=["earlier-boot", "garbage"])
def test_a_staging_file_that_cannot_be_trusted_is_replaced_and_healed_from_the_archive(
        store, damage):
    stage_and_publish(store, FIRST, [thing(1, "a"), thing(2, "b"), thing(3, "c")])
    _stage_second(store)
    damage(staging_path(store.db_path))
    with store.connection() as connection:
        assert not staged_here(connection, "things", SECOND)  # a new, empty staging file
    publish(store, ENTITY, SECOND)
    assert _mirror(store) == EXPECTED


def test_a_mirror_from_before_the_staging_file_has_its_staged_rows_moved_there_once(
        store, tmp_path):
    stage_and_publish(store, FIRST, [thing(1, "a"), thing(2, "b"), thing(3, "c")])
    _stage_second(store)
    # As an older version left it: the staging tables (and their indexes) in the mirror file.
    staging = staging_path(store.db_path)
    with sqlite3.connect(store.db_path) as connection:
        connection.execute("ATTACH DATABASE ? AS old", (str(staging),))
        objects = connection.execute(
            "SELECT type, name, sql, tbl_name FROM old.sqlite_master WHERE sql IS NOT NULL"
            " ORDER BY type = 'index'").fetchall()
        for kind, name, sql, table in objects:
            if not table.startswith(("_staging__", "_staging_keys__")):
                continue
            connection.execute(sql)
            if kind == "table":
                connection.execute(f'INSERT INTO main."{name}" SELECT * FROM old."{name}"')
        connection.commit()
    for file in staging_files(store.db_path):
        file.unlink()
    assert "_staging__things" in _tables(store.db_path)
    # The archive is gone, so the publish can only succeed from the moved rows.
    shutil.rmtree(tmp_path / "archive" / "things" / SECOND)
    with store.connection() as connection:
        assert staged_here(connection, "things", SECOND)
    assert not {t for t in _tables(store.db_path) if t.startswith("_staging")}
    index_names = {row[0] for row in sqlite3.connect(staging).execute(
        "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "_staging__things__key" in index_names
    publish(store, ENTITY, SECOND)
    assert _mirror(store) == EXPECTED



def _write_unrecorded(connection, archive, *, finish: bool = False):
    """The change set's rows written as the thread that stages a fetch's pages writes them,
    recorded nowhere (a killed fetch leaves them so); its StagedRecords and the writer."""
    staged = staged_records(connection, archive, ENTITY)
    with transaction(connection, mirror=False, staging=True):
        writer = StagingWriter(connection, "things", archive.change_set, staged.schema, [])
        writer.start()
        for batch, keys in staged.batches:
            writer.write(batch, keys)
        if finish:
            writer.finish()
    return staged, writer


def _stage_unrecorded(store, change_set: str, records: list[dict]):
    archive = archive_change_set(store.archive_dir, change_set, records)
    with store.connection() as connection:
        _write_unrecorded(connection, archive)
    return archive


def test_a_staging_table_a_killed_fetch_left_without_its_key_index_gets_it(store):
    """A fetch that staged its entity's first pages while it ran, and died before it finished,
    leaves a new staging table without its key index; staging the change set builds it."""
    records = [thing(1, "a"), thing(2, "b"), thing(1, "a again")]  # id-1 changed while paging
    archive = _stage_unrecorded(store, FIRST, records)
    with store.connection() as connection:
        write_staged(connection, staged_records(connection, archive, ENTITY))
        indexes = {row[0] for row in connection.execute(
            "SELECT name FROM pragma_index_list('_staging__things') WHERE \"unique\" = 1")}
        assert staging_key_index("_staging__things") in indexes
        assert connection.execute("SELECT _pk, name FROM _staging__things ORDER BY _pk"
                                  ).fetchall() == [("id-1", "a again"), ("id-2", "b")]
    publish(store, ENTITY, FIRST)
    assert _mirror(store) == [("id-1", "a again"), ("id-2", "b")]


def test_a_publish_and_staged_rows_are_written_side_by_side(store):
    """A transaction locks the files it writes: one holding the mirror file (a publish) does
    not keep another from writing the staging file (staged rows), nor the other way round."""
    stage_and_publish(store, FIRST, [thing(1, "a")])
    with store.connection() as publishing, store.connection() as staging:
        for connection in (publishing, staging):
            connection.execute("PRAGMA busy_timeout=300")  # a refusal, not a minute's wait
        with transaction(publishing):
            publishing.execute("UPDATE things SET name = 'publishing'")
            with transaction(staging, mirror=False, staging=True):
                staging.execute("DELETE FROM _staging__things WHERE _change_set = ?",
                                (FIRST,))
        with transaction(staging, mirror=False, staging=True):
            staging.execute("DELETE FROM _staging__things")
            with transaction(publishing):
                publishing.execute("UPDATE things SET name = 'published'")
    assert _mirror(store) == [("id-1", "published")]




def test_rows_a_killed_fetch_staged_are_deleted_by_retention_once_a_newer_change_set_published(
        each_store):
    store = each_store  # (both stores: docs/store-backends.md)
    older, newer = "20251231T000000Z", "20260105T000000Z"
    stage_and_publish(store, FIRST, [thing(1, "a")])
    _stage_unrecorded(store, older, [thing(7, "killed")])
    _stage_unrecorded(store, newer, [thing(8, "still fetching")])
    config = EntitiesConfig.model_validate({"groups": {"daily": {"cron": "0 0 * * *"}},
                                            "entities": [ENTITY.model_dump()]})
    with store.connection() as connection:
        plan = plan_staging_prune(connection, config, store.archive_dir, keep=24)
        assert [(p.change_set, p.rows) for p in plan] == [(older, 1)]
        for prune in plan:
            prune_staged(connection, prune)
        assert connection.execute(
            "SELECT _change_set, _pk FROM _staging__things ORDER BY 1").fetchall() == [
            (FIRST, "id-1"), (newer, "id-8")]


def test_rows_staged_during_the_fetch_are_not_taken_when_some_went_missing(each_store):
    """Rows recorded as staged during the fetch are taken only if all are still there."""
    store = each_store  # (both stores: docs/store-backends.md)
    archive = archive_change_set(store.archive_dir, FIRST, [thing(1, "a"), thing(2, "b")])
    with store.connection() as connection:
        staged, writer = _write_unrecorded(connection, archive, finish=True)
        with transaction(connection, mirror=False, staging=True):
            record_prestaged(connection, "things", FIRST, staged.fingerprint, writer.rows,
                             {}, [])
            connection.execute("DELETE FROM _staging__things WHERE _pk = 'id-2'")
        staged = staged_records(connection, archive, ENTITY)
        write_staged(connection, staged)
        assert not staged.adopted  # staged again from the archive
    publish(store, ENTITY, FIRST)
    assert _mirror(store) == [("id-1", "a"), ("id-2", "b")]
