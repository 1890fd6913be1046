"""Staging retention: the staged rows of old, published change sets are deleted.

Every change set's staged rows (typed columns and `json_response`) stay in `_staging__E` after
it is published, so without retention the database holds every version ever fetched next to
the mirror; a `full` entity (a junction table synced hourly) stages the whole table again every
change set. `dataverse-assets compact` deletes the staged rows of change sets that nothing can
need again, keeping each entity's newest `archive.staging_keep_change_sets` staged change sets.
A change set's rows are deleted only when:

- it is COMPLETE (published), and not among the entity's newest N staged change sets (the
  newest one is what the `row_count` check and the next publish compare against);
- every filtered entity that links from this entity is done with that change set: its own
  fetch of it is archived or published, or it never began it, has moved past it and has no
  retry queued or dead letter for it (a filtered entity's fetch reads the linking tables'
  staged rows of the same change set).

Rows of a change set that was never staged nor recorded (a fetch that staged its pages as they
arrived and was killed: sync.prestage) are deleted too, once the entity has published a newer
change set.

The `_staged` row stays, with `pruned_at` set, so the publish records keep their context and
anything that would read the rows fails with a message instead of finding nothing: publishing
the change set again, or a filtered entity's fetch of it. Materializing `staging/E` for that
change set stages it again from the archive. Rebuild replays the archive and stages everything
again; its canonical and history tables equal the mirror's whatever was pruned.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from dataverse_assets.archive.change_sets import ChangeSetArchive
from dataverse_assets.archive.storage import ArchiveStorage, open_storage
from dataverse_assets.config import EntitiesConfig, EntityConfig
from dataverse_assets.modes import PublishStatus
from dataverse_assets.names import change_set_order, is_change_set_key
from dataverse_assets.store.bookkeeping import (
    mark_pruned,
    publish_status,
    read_sync_state,
    staged_with_status,
)
from dataverse_assets.store.db import quote_identifier, table_exists, transaction
from dataverse_assets.store.staging_store import (
    forget_prestaged,
    forget_staged_here,
    prestaged_change_sets,
)
from dataverse_assets.store.tables import delete_staged_rows, staging_table


@dataclass(frozen=True)
class StagingPrune:
    entity: str
    change_set: str
    rows: int


def _filtered_readers(config: EntitiesConfig, entity: str) -> list[EntityConfig]:
    return [e for e in config.entities
            if e.filtered and any(link.entity == entity for link in e.linked_from)]


def _has_row(connection: sqlite3.Connection, table: str, entity: str, change_set: str) -> bool:
    if not table_exists(connection, table):
        return False
    return connection.execute(
        f"SELECT 1 FROM {quote_identifier(table)} WHERE entity = ? AND change_set = ? LIMIT 1",
        (entity, change_set)).fetchone() is not None


def _done_with(connection: sqlite3.Connection, archive_dir: ArchiveStorage, reader: str,
               change_set: str) -> bool:
    """Can the filtered entity `reader` no longer need its linking tables' staging of it?"""
    status = publish_status(connection, reader, change_set)
    if status == PublishStatus.COMPLETE:
        return True
    archive = ChangeSetArchive(archive_dir, reader, change_set)
    if archive.is_complete():
        return True  # its fetch is done: staging and publish read the archive, not the links
    if status is not None or archive.exists():
        return False  # begun and not finished
    if any(_has_row(connection, table, reader, change_set)
           for table in ("_retry_queue", "_dead_letter")):
        return False  # a retry may fetch it yet
    state = read_sync_state(connection, reader)
    return state is not None and state.last_change_set is not None and (
        change_set_order(state.last_change_set) > change_set_order(change_set))


def plan_staging_prune(connection: sqlite3.Connection, config: EntitiesConfig,
                       archive_dir: ArchiveStorage | str | Path,
                       keep: int) -> list[StagingPrune]:
    """The change sets whose staged rows may be deleted now, oldest first per entity."""
    if keep < 1:
        raise ValueError("staging retention keeps at least the newest change set")
    archive_dir = open_storage(archive_dir)
    if not table_exists(connection, "_staged") or not table_exists(connection, "_publish_state"):
        return []
    plan: list[StagingPrune] = []
    for entity in config.entities:
        if not table_exists(connection, staging_table(entity.name)):
            continue
        # Newest first by the time each key encodes; a row an older version staged under a
        # key that is not one has no archive folder to check against, and is left alone.
        staged = sorted((row for row in staged_with_status(connection, entity.name)
                         if is_change_set_key(row[0])),
            key=lambda row: change_set_order(row[0]), reverse=True)
        readers = _filtered_readers(config, entity.name)
        for change_set, rows, pruned, status in reversed(staged[keep:]):
            if pruned is not None or status != PublishStatus.COMPLETE:
                continue
            if all(_done_with(connection, archive_dir, r.name, change_set) for r in readers):
                plan.append(StagingPrune(entity.name, change_set, rows))
        plan += _orphans(connection, entity.name, {row[0] for row in staged})
    return plan


def _orphans(connection: sqlite3.Connection, entity: str,
             staged: set[str]) -> list[StagingPrune]:
    """Rows of change sets never staged or recorded: a fetch that staged its pages as they
    arrived (sync.prestage) and was killed. Only change sets older than the entity's last
    published one, so a fetch still running is never touched (its key is newer)."""
    state = read_sync_state(connection, entity)
    if state is None or state.last_change_set is None:
        return []
    newest = change_set_order(state.last_change_set)
    known = staged | prestaged_change_sets(connection, entity)
    table = quote_identifier(staging_table(entity))
    return [StagingPrune(entity, change_set, rows) for change_set, rows in connection.execute(
                f"SELECT _change_set, count(*) FROM {table} GROUP BY _change_set")
            if change_set not in known and is_change_set_key(change_set)
            and change_set_order(change_set) < newest]


def prune_staged(connection: sqlite3.Connection, prune: StagingPrune) -> int:
    """Delete one change set's staged rows (and its key-scan keys) and mark it pruned, in one
    transaction. Returns the rows deleted."""
    with transaction(connection, staging=True):
        deleted = delete_staged_rows(connection, prune.entity, prune.change_set)
        forget_prestaged(connection, prune.entity, prune.change_set)
        forget_staged_here(connection, prune.entity, prune.change_set)
        mark_pruned(connection, prune.entity, prune.change_set)
    return deleted
