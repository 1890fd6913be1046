"""Archive compaction and retention: storage growth is bounded and rebuild keeps working.

Compaction merges the gzip page files of a complete change set older than `compact_after_days`
into zstd Parquet (archive.compacted, which says how).

Retention (`retention_days`) deletes whole change sets, and never one a rebuild needs:

- lossless (default): only change sets the mirror published as no-ops (COMPLETE, nothing
  planned: no create, update, delete, stale or delete of an unknown record), and never an
  entity's first change set, its newest, or one whose staging locked or evolved the schema.
  Such a change set wrote nothing a later change set depends on, so a rebuild without it
  equals the live mirror table by table, history included.
- rebase: also everything before the entity's newest snapshot (a `full` change set or a
  change-tracking resync) older than `retention_days`, once everything up to it is COMPLETE.
  A rebuild then starts from that snapshot: the current records are equal, but history and
  _defunct start there, and rows unchanged since carry its sync_time and _change_set.
  modifiedon and filtered entities have no snapshot after their first sync: nothing of theirs
  is deleted this way.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dataverse_assets.archive.change_sets import ChangeSetArchive, list_change_sets
from dataverse_assets.archive.compacted import (
    CompactedChangeSet,
    compact_change_set,
    delete_change_set,
)
from dataverse_assets.archive.storage import ArchiveStorage, open_storage
from dataverse_assets.config import ArchiveConfig, EntitiesConfig
from dataverse_assets.modes import SNAPSHOT_MODES
from dataverse_assets.source.query import parse_datetime
from dataverse_assets.store.backend import is_postgres_address
from dataverse_assets.store.bookkeeping import change_sets_that_wrote, complete_change_sets
from dataverse_assets.store.db import connect, table_exists
from dataverse_assets.store.lifecycle import store_exists
from dataverse_assets.store.staging_retention import StagingPrune, plan_staging_prune, prune_staged

# -- reading --------------------------------------------------------------------------------

# -- compaction -----------------------------------------------------------------------------

# -- retention ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetentionDecision:
    entity: str
    change_set: str
    reason: str


def _finished_at(archive: ChangeSetArchive) -> datetime:
    manifest = archive.manifest()
    return parse_datetime(manifest.get("finished_at") or manifest["started_at"])


def _mirror_facts(connection: sqlite3.Connection | None, entity: str):
    """(COMPLETE change sets, change sets with planned work, schema-changing change sets)."""
    if connection is None:
        return set(), set(), set()
    complete = complete_change_sets(connection, entity)
    # What a change set wrote, from its publish counts: plan rows are deleted by maintenance
    # after a while.
    planned = change_sets_that_wrote(connection, entity)
    schema_changing = set()
    if table_exists(connection, "_schema_check"):
        schema_changing = {row[0] for row in connection.execute(
            "SELECT change_set FROM _schema_check WHERE entity = ?"
            " AND outcome IN ('locked', 'evolved')", (entity,))}
    return complete, planned, schema_changing


def plan_retention(archive_dir: ArchiveStorage | str | Path, entity: str, policy: ArchiveConfig,
                   connection: sqlite3.Connection | None, now: datetime) -> list[RetentionDecision]:
    """The change sets of one entity that retention deletes (a pure decision over the archive
    and the mirror's publish records; nothing is deleted here)."""
    if policy.retention_days is None or connection is None:
        return []
    horizon = now - timedelta(days=policy.retention_days)
    archive_dir = open_storage(archive_dir)
    keys = list_change_sets(archive_dir, entity)
    complete, planned, schema_changing = _mirror_facts(connection, entity)
    old = [k for k in keys if _finished_at(ChangeSetArchive(archive_dir, entity, k)) < horizon]
    decisions: dict[str, str] = {}
    if policy.retention_mode == "rebase":
        bases = [k for k in old if k != keys[0] and ChangeSetArchive(
            archive_dir, entity, k).manifest()["mode"] in SNAPSHOT_MODES]
        if bases:
            base = bases[-1]
            before = [k for k in keys if k < base]
            if all(k in complete for k in [*before, base]):
                for key in before:
                    decisions[key] = f"before snapshot {base} (rebase)"
    for key in old:
        if key in decisions or key in (keys[0], keys[-1]):
            continue
        if key in complete and key not in planned and key not in schema_changing:
            decisions[key] = "published with no changes"
    return [RetentionDecision(entity, key, reason) for key, reason in sorted(decisions.items())]


# -- the whole run --------------------------------------------------------------------------

@dataclass
class EntityCompaction:
    entity: str
    change_sets: int = 0
    compacted: int = 0
    deleted: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


@dataclass
class CompactionReport:
    entities: list[EntityCompaction] = field(default_factory=list)
    compacted: list[CompactedChangeSet] = field(default_factory=list)
    deleted: list[RetentionDecision] = field(default_factory=list)
    staging_pruned: list[StagingPrune] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def bytes_before(self) -> int:
        return sum(e.bytes_before for e in self.entities)

    @property
    def bytes_after(self) -> int:
        return sum(e.bytes_after for e in self.entities)

    def rows(self) -> list[dict]:
        return [{"entity": e.entity, "change_sets": e.change_sets, "compacted": e.compacted,
                 "deleted": e.deleted, "bytes_before": e.bytes_before,
                 "bytes_after": e.bytes_after} for e in self.entities]


def compact_archive(
    archive_dir: ArchiveStorage | str | Path, config: EntitiesConfig, *,
    db_path: str | Path | None = None, older_than_days: float | None = None,
    retention: bool = True, dry_run: bool = False, now: datetime | None = None,
) -> CompactionReport:
    """Apply retention (with the mirror database's publish records), then compact every
    complete change set older than the threshold, entity by entity; then delete the staged
    rows of old published change sets (`staging_keep_change_sets`, see staging_retention)."""
    archive_dir = open_storage(archive_dir)
    policy = config.archive
    now = now or datetime.now(UTC)
    threshold = policy.compact_after_days if older_than_days is None else older_than_days
    report = CompactionReport(dry_run=dry_run)
    connection = None
    if retention and policy.retention_days is not None:
        if db_path is None or not store_exists(db_path):
            connection = None  # no mirror yet (none is made): the note below
        elif is_postgres_address(db_path):
            connection = connect(str(db_path))  # (read only by what it does: it only reads)
        else:
            connection = sqlite3.connect(f"file:{Path(db_path)}?mode=ro", uri=True)
        if connection is None:
            report.notes.append(
                f"retention skipped: no mirror database at {db_path} to tell which change "
                "sets were published")
    try:
        for entity in config.entities:
            summary = EntityCompaction(entity.name)
            report.entities.append(summary)
            if not archive_dir.holds_anything(entity.name):
                continue
            summary.bytes_before = sum(archive_dir.sizes(entity.name).values())
            decisions = plan_retention(archive_dir, entity.name, policy,
                                       connection if retention else None, now)
            report.deleted.extend(decisions)
            summary.deleted = len(decisions)
            for decision in [] if dry_run else decisions:
                delete_change_set(ChangeSetArchive(archive_dir, entity.name,
                                                   decision.change_set))
            gone = {d.change_set for d in decisions}
            keys = [k for k in list_change_sets(archive_dir, entity.name) if k not in gone]
            summary.change_sets = len(keys)
            if threshold is not None:
                horizon = now - timedelta(days=threshold)
                for key in keys:
                    archive = ChangeSetArchive(archive_dir, entity.name, key)
                    if _finished_at(archive) > horizon:
                        continue
                    if dry_run:
                        summary.compacted += bool(archive.page_names())
                        continue
                    done = compact_change_set(archive, zstd_level=policy.zstd_level)
                    if done is not None and not done.kept_pages:
                        report.compacted.append(done)
                        summary.compacted += 1
            summary.bytes_after = sum(archive_dir.sizes(entity.name).values())
    finally:
        if connection is not None:
            connection.close()
    if retention and policy.staging_keep_change_sets is not None:
        _prune_staging(report, archive_dir, config, db_path, policy.staging_keep_change_sets,
                       dry_run=dry_run)
    return report


def _prune_staging(report: CompactionReport, archive_dir: ArchiveStorage, config: EntitiesConfig,
                   db_path: str | Path | None, keep: int, *, dry_run: bool) -> None:
    if db_path is None or not store_exists(db_path):
        report.notes.append(f"staging retention skipped: no mirror database at {db_path}")
        return
    connection = connect(db_path)
    try:
        report.staging_pruned = plan_staging_prune(connection, config, archive_dir, keep)
        if not dry_run:
            for prune in report.staging_pruned:
                prune_staged(connection, prune)
    finally:
        connection.close()
