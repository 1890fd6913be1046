"""Rebuild from archive: replay every archived change set, in order, into a fresh database.

Each complete change set of each configured entity is staged from the archive and published
with the same functions the assets use (`steps.staged_records`, `write_staged`,
`steps.publish`), oldest first. Canonical row timestamps come from each change set's fetch
time, so the rebuilt canonical and history tables equal the live-synced ones row by row; only
bookkeeping times (when a plan ran, when a change was applied) differ.

Page bodies are read through `ChangeSetArchive.iter_page_bodies()`: gzip page files with
Python's zlib, compacted change sets with DuckDB from their Parquet parts (see
benchmarks/archive_replay.py for why each reader is the one used).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dataverse_assets.archive.change_sets import list_change_sets
from dataverse_assets.archive.storage import ArchiveStorage, LocalStorage, open_storage
from dataverse_assets.config import EntitiesConfig
from dataverse_assets.defs.partitions import add_change_sets
from dataverse_assets.errors import CorruptArchiveError, RebuildError
from dataverse_assets.names import change_set_order
from dataverse_assets.store.lifecycle import (
    building_address,
    discard,
    move_into_place,
    nothing_written,
    same_store,
    target_problem,
)
from dataverse_assets.store.mirror import Mirror
from dataverse_assets.store.tables import canonical_row_count
from dataverse_assets.sync import steps
from dataverse_assets.sync.progress import FetchProgress, ProgressReporter
from dataverse_assets.sync.stage import write_staged


@dataclass
class EntityRebuild:
    entity: str
    change_sets: int = 0
    compacted: int = 0
    rows: int = 0  # staged rows replayed
    canonical_rows: int = 0
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class SkippedChangeSet:
    """A change set `rebuild --skip-corrupt` left out, and why."""

    entity: str
    change_set: str
    reason: str


@dataclass
class RebuildReport:
    into: str  # the store address rebuilt
    archive_dir: str  # the folder or s3://bucket/prefix replayed
    entities: list[EntityRebuild] = field(default_factory=list)
    skipped: list[SkippedChangeSet] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def change_sets(self) -> int:
        return sum(e.change_sets for e in self.entities)

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.entities)

    def rows_table(self) -> list[dict]:
        return [{"entity": e.entity, "change_sets": e.change_sets, "compacted": e.compacted,
                 "rows": e.rows, "canonical_rows": e.canonical_rows,
                 "seconds": round(e.seconds, 2), "rows_per_s": round(e.rows_per_second)}
                for e in self.entities]

    def lines(self) -> list[str]:
        rows_per_second = self.rows / self.seconds if self.seconds else 0
        return [f"{e['entity']}: {e['change_sets']} change sets ({e['compacted']} compacted), "
                f"{e['rows']:,} rows, {e['seconds']} s, {e['rows_per_s']:,} rows/s"
                for e in self.rows_table()] + [
            f"total: {self.change_sets} change sets, {self.rows:,} rows, "
            f"{self.seconds:.2f} s, {rows_per_second:,.0f} rows/s"]


def _check_target(into: str, *, force: bool, live_db_path: str | None) -> None:
    if live_db_path is not None and same_store(into, live_db_path):
        raise RebuildError(f"{into} is the live mirror (DATAVERSE_STORE_URL or "
                           "DATAVERSE_DB_PATH); rebuild into a new store and swap it in once "
                           "you have compared them")
    problem = target_problem(into, force=force)
    if problem is not None:
        raise RebuildError(f"{into} {problem}")


def rebuild(
    config: EntitiesConfig, archive_dir: ArchiveStorage | str | os.PathLike[str],
    into_db_path: str | os.PathLike[str], *, force: bool = False,
    live_db_path: str | os.PathLike[str] | None = None,
    on_entity: Callable[[EntityRebuild], None] | None = None,
    progress_for: Callable[[str], ProgressReporter] | None = None,
    skip_corrupt: bool = False,
) -> RebuildReport:
    """Replay every complete archived change set of every configured entity, oldest first,
    into a fresh mirror at the store address `into_db_path` (SQLite: built beside it, moved
    into place at the end; PostgreSQL: written into that database, emptied first:
    store.lifecycle.building_address).

    `progress_for(entity)` gives the reporter that follows that entity's replay: it is told
    the pages and records replayed after each change set, against the total the manifests
    record, so a long rebuild shows rows/s and an ETA.

    A damaged archive file (CorruptArchiveError) stops the rebuild with that one line and
    nothing written, unless `skip_corrupt`: then its change set is left out (nothing of it is
    staged or published; the report lists it) and the rebuild goes on."""
    storage = open_storage(archive_dir)
    into = os.fspath(into_db_path)
    if isinstance(storage, LocalStorage) and not storage.root.is_dir():
        raise RebuildError(f"no archive at {storage.location} (set DATAVERSE_ARCHIVE_DIR or "
                           "DATAVERSE_ARCHIVE_URL)")
    _check_target(into, force=force,
                  live_db_path=os.fspath(live_db_path) if live_db_path else None)
    building = building_address(into)
    store = _Replaying(db_path=building, archive_dir=storage.location, storage=storage)
    report = RebuildReport(into=into, archive_dir=storage.location)
    started = time.perf_counter()
    try:
        for entity in config.entities:
            progress = EntityRebuild(entity.name)
            entity_started = time.perf_counter()
            change_sets = list_change_sets(storage, entity.name)
            reporter = progress_for(entity.name) if progress_for is not None else None
            summaries = ({key: _summary(store, entity.name, key) for key in change_sets}
                         if reporter is not None else {})
            counts = [summary.get("records") for summary in summaries.values()]
            total = None if None in counts else sum(int(count) for count in counts)
            pages = records = 0
            skipped: set[str] = set()
            for change_set in change_sets:
                archive = store.archive(entity.name, change_set)
                try:
                    with store.connection() as connection:
                        staged = steps.staged_records(connection, archive, entity)
                        if reporter is not None:
                            staged.batches = _reporting(staged.batches, staged.counts,
                                                        reporter, pages, records, total)
                        progress.rows += write_staged(connection, staged)
                    # The live path's publish: plan, validate, execute, move the watermark.
                    steps.publish(store, entity, change_set, skip=skipped)
                except CorruptArchiveError as exc:
                    if not skip_corrupt:
                        raise RebuildError(f"{exc}. {nothing_written(into)}") from None
                    skipped.add(change_set)
                    report.skipped.append(SkippedChangeSet(entity.name, change_set, str(exc)))
                    continue
                progress.change_sets += 1
                progress.compacted += archive.is_compacted()
                if reporter is not None:
                    summary = summaries[change_set]
                    pages += int(summary.get("pages") or 0)
                    records += int(summary.get("records") or 0)
                    reporter(FetchProgress(pages, records, total))
            with store.connection() as connection:
                progress.canonical_rows = canonical_row_count(connection, entity.name)
            progress.seconds = time.perf_counter() - entity_started
            if reporter is not None:
                reporter.finish(pages, records)
            report.entities.append(progress)
            if on_entity is not None:
                on_entity(progress)
    except BaseException:
        discard(building)
        raise
    move_into_place(building, into)
    report.seconds = time.perf_counter() - started
    return report


@dataclass(frozen=True)
class _Replaying(Mirror):
    """The database being built, reading the archive through the storage it was given (an
    S3 one keeps its endpoint and region)."""

    storage: ArchiveStorage | None = None

    def archive_storage(self) -> ArchiveStorage:
        return self.storage if self.storage is not None else super().archive_storage()


def _summary(store: Mirror, entity: str, change_set: str) -> dict:
    """A change set's fetch summary for progress ({} when its manifest is damaged: the replay
    itself reports that)."""
    try:
        return store.archive(entity, change_set).manifest()["summary"]
    except CorruptArchiveError:
        return {}


def _reporting(batches, counts: dict[str, int], reporter: ProgressReporter, pages: int,
               records: int, total: int | None):
    """The staged batches of one change set, telling the reporter the records read so far
    (the reporter throttles what it shows)."""
    for batch in batches:
        yield batch
        reporter(FetchProgress(pages, records + counts.get("records", 0), total))


# -- the same through Dagster: archived change sets as partitions -----------------------------

def archived_change_sets(config: EntitiesConfig,
                         archive_dir: ArchiveStorage | str | os.PathLike[str],
                         group: str) -> dict[str, list[str]]:
    """Archived change-set keys of a group, oldest first, with the entities archived for each
    (a targeted refresh archives only some)."""
    keys: dict[str, list[str]] = {}
    storage = open_storage(archive_dir)
    for entity in config.entities_in_group(group):
        for change_set in list_change_sets(storage, entity.name):
            keys.setdefault(change_set, []).append(entity.name)
    return dict(sorted(keys.items(), key=lambda item: change_set_order(item[0])))


def register_archived(instance, group: str, keys: list[str]) -> list[str]:
    """Add the keys not yet registered to the group's dynamic partitions; returns those added."""
    return add_change_sets(instance, group, keys)
