"""The three steps of a sync (fetch, stage, publish) for one entity and change set.

Plain functions over the store and the source, so the Dagster assets stay thin and the same
steps serve the CLI, rebuilds and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime

import orjson

from dataverse_assets.archive.change_sets import REQUEST, ChangeSetArchive, list_change_sets
from dataverse_assets.config import EntityConfig
from dataverse_assets.errors import ArchiveError, NotStagedError, StorageError
from dataverse_assets.modes import SNAPSHOT_MODES, Mode, PublishStatus, SyncStatus
from dataverse_assets.names import change_set_order, check_change_set_key, is_change_set_key
from dataverse_assets.source.base import DataverseSource
from dataverse_assets.store import dead_letters
from dataverse_assets.store.bookkeeping import (
    complete_change_sets,
    log_step,
    mark_sync_status,
    publish_status,
    read_staged,
    read_sync_state,
    record_interrupted_publishes,
    record_publish_failure,
    refuse_if_pruned,
    staged_change_sets,
    staged_row,
)
from dataverse_assets.store.db import database_path, storage_problem, utc_now_iso
from dataverse_assets.store.mirror import MirrorAccess
from dataverse_assets.store.schema_registry import load_locked_schema
from dataverse_assets.store.staging_store import staged_here
from dataverse_assets.store.tables import mirrored_etags, staging_table
from dataverse_assets.sync.choices import refresh_attribute_metadata
from dataverse_assets.sync.drift import schema_for_change_set
from dataverse_assets.sync.faults import fault_point
from dataverse_assets.sync.fetch import FetchSummary, ProgressCallback, fetch_change_set
from dataverse_assets.sync.fetch_plan import plan_fetch, reconcile_due
from dataverse_assets.sync.prestage import PageStager
from dataverse_assets.sync.progress import FetchProgress, ProgressReporter, phase_reporter
from dataverse_assets.sync.publish_execute import PublishResult, publish_change_set
from dataverse_assets.sync.stage import (
    StagedRecords,
    align_canonical_hashes,
    column_values,
    iter_staged_batches,
    staging_fingerprint,
    write_staged,
)

logger = logging.getLogger(__name__)


def _json(value: object) -> str:
    return orjson.dumps(value, default=str).decode()


def linked_and_mirrored_ids(connection: sqlite3.Connection, entity: EntityConfig,
                            change_set: str) -> tuple[set[str], set[str], set[str]]:
    """For a filtered entity: ids its linking tables name (this change set's staging, plus
    canonical for incrementally synced linking tables), ids already mirrored, ids defunct."""
    linked: set[str] = set()
    for link in entity.linked_from:
        staged = staged_row(connection, link.entity, change_set)
        if staged is not None:
            refuse_if_pruned(connection, link.entity, change_set,
                             f"{entity.name}'s fetch (the ids {link.entity} links)")
            if not staged_here(connection, link.entity, change_set):
                raise NotStagedError(
                    f"{link.entity}: the staged rows of change set {change_set} are not in the"
                    " staging file (made anew after a crash or a restart of the machine), and"
                    f" {entity.name}'s fetch needs the ids it links. Materialize"
                    f" staging/{link.entity} for partition {change_set} to stage it again from"
                    " the archive, then retry.")
            linked |= column_values(connection, staging_table(link.entity), link.column,
                                    change_set=change_set, lookup_target=link.lookup_target)
        if staged is None or staged["mode"] not in SNAPSHOT_MODES:
            # An incremental linking table stages only its changes, and one not staged in this
            # change set has all its links in canonical.
            linked |= column_values(connection, link.entity, link.column,
                                    lookup_target=link.lookup_target)
    locked = load_locked_schema(connection, entity.name)
    mirrored = column_values(connection, entity.name, locked.primary_key) if locked else set()
    defunct = {row[0] for row in connection.execute(
        "SELECT id FROM _defunct WHERE entity = ?", (entity.name,))}
    return linked, mirrored, defunct


def fetch(store: MirrorAccess, source: DataverseSource, entity: EntityConfig,
          change_set: str, *,
          targeted_ids: list[str] | None = None,
          lookup_column: str | None = None,
          reconcile: bool = False,
          on_progress: ProgressCallback | None = None) -> tuple[FetchSummary, bool]:
    """Fetch one change set into the archive. Returns (summary, reused): a change set already
    archived completely is immutable and is not fetched again. `targeted_ids` makes it a
    targeted refresh of those records (see fetch.plan_fetch). `reconcile` adds the
    key-and-version scan now, whether or not the entity's cadence has it due. `on_progress`
    follows the pages (with a `$count` first, for an ETA)."""
    archive = store.archive(entity.name, change_set)  # refuses a key that is not one
    if archive.is_complete():
        return FetchSummary(**archive.manifest()["summary"]), True
    source.check_fetchable(entity.name, change_set)  # the archive source replays only
    with store.connection() as connection:
        if publish_status(connection, entity.name, change_set) == PublishStatus.COMPLETE:
            # Archive retention deleted it after it was published: fetching now would file
            # today's data under an old key, and a rebuild would replay it out of order.
            raise ArchiveError(f"{entity.name}: change set {change_set} was published and its"
                               " archive has since been deleted; it is not fetched again")
        state = read_sync_state(connection, entity.name)
        linked, mirrored, defunct = (
            linked_and_mirrored_ids(connection, entity, change_set)
            if entity.filtered and not targeted_ids else (set(), set(), set())
        )
        mark_sync_status(connection, entity.name, SyncStatus.IN_PROGRESS)
        locked = load_locked_schema(connection, entity.name)
    started_at = utc_now_iso()
    reconcile = reconcile or reconcile_due(entity, state.reconciled_at if state else None,
                                           datetime.now(UTC))

    async def run(mirror: sqlite3.Connection) -> FetchSummary:
        async with source.open_session() as session:
            definition = await session.entity_definition(entity.name)
            attributes = (await session.attribute_metadata(entity.name, definition)
                          if definition is not None else None)
            request = plan_fetch(
                entity, change_set, definition,
                watermark=state.watermark if state else None,
                delta_link=state.delta_token if state else None, reconcile=reconcile,
                linked_ids=linked, mirrored_ids=mirrored, defunct_ids=defunct,
                targeted_ids=targeted_ids or (),
                lookup_column=lookup_column,
            )
            # Staged while the pages arrive (staging/E takes the rows when they are its own).
            stager = PageStager.for_request(store.db_path, entity, archive, request, locked)
            try:
                summary = await fetch_change_set(
                    session, archive, request, definition, attribute_metadata=attributes,
                    on_progress=on_progress,
                    count_total=on_progress is not None,
                    # A key scan is compared with the mirror's versions as its pages arrive.
                    mirrored_versions=lambda ids: mirrored_etags(mirror, entity.name,
                                                                 request.primary_key, ids),
                    page_sink=stager)
            except BaseException:
                if stager is not None:
                    stager.abandon()
                raise
            if stager is not None:
                stager.finish()
            return summary

    try:
        with store.connection() as mirror:
            summary = asyncio.run(run(mirror))
    except Exception:
        with store.connection() as connection:
            mark_sync_status(connection, entity.name, SyncStatus.FAILED)
        raise
    fault_point("fetch.after_archive")
    with store.connection() as connection:
        log_step(connection, entity=entity.name, change_set=change_set, layer="raw",
                 status=SyncStatus.COMPLETED, started_at=started_at, seconds=summary.seconds,
                 details=_json(summary.__dict__))
    return summary, False


def staged_records(connection: sqlite3.Connection, archive: ChangeSetArchive,
                   entity: EntityConfig) -> StagedRecords:
    """The staged rows of an archived change set, produced lazily (schema locked first)."""
    manifest = archive.manifest()
    # Locked by the first change set; later ones are compared with it (and evolve it).
    schema = schema_for_change_set(connection, archive, entity)
    # Labels, lookup targets and option drift from the change set's attribute metadata.
    refresh_attribute_metadata(connection, archive, entity, schema)
    summary = manifest["summary"]
    key_scan = bool(manifest.get("reconciled"))
    # Deletes are established by key scans, snapshots and first syncs: the reconcile clock.
    establishes_deletes = key_scan or manifest["mode"] in SNAPSHOT_MODES or (
        summary.get("watermark_before") is None and manifest["mode"] != Mode.CHANGE_TRACKING
    )
    counts: dict[str, int] = {}
    issues: list[dict] = []
    request = archive.read_json(REQUEST) or {}
    # Rows staged while the fetch ran are taken only for a change set staged from its pages
    # alone (no linked ids in scope, none resolved one by one) with this schema and rule.
    fingerprint = ("" if request.get("id_scope") is not None or manifest.get("missing")
                   else staging_fingerprint(schema, entity.hash_ignore_annotations))
    return StagedRecords(
        entity=entity.name, change_set=archive.change_set, schema=schema,
        mode=manifest["mode"], watermark_after=summary.get("watermark_after"),
        delta_token_after=summary.get("delta_link_after"),
        source_timestamp=summary.get("watermark_after") or manifest.get("finished_at"),
        reconciled=key_scan,
        reconciled_at=manifest.get("started_at") if establishes_deletes else None,
        fetched_at=manifest.get("finished_at"),
        batches=iter_staged_batches(archive, schema, counts, issues,
                                    hash_ignore_annotations=entity.hash_ignore_annotations),
        counts=counts,
        issues=issues,
        divergence=manifest.get("reconcile") or {},
        fingerprint=fingerprint,
    )


def stage(store: MirrorAccess, entity: EntityConfig, change_set: str) -> StagedRecords:
    """Staging as the asset does it (rows are written by the SQLite IO manager, whose
    progress goes to in-process listeners: the CLI's terminal)."""
    with store.connection() as connection:
        archive = store.archive(entity.name, change_set)
        staged = staged_records(connection, archive, entity)
    total = archive.manifest()["summary"].get("records")
    reporter = phase_reporter(entity.name, change_set, "staging")
    staged.batches = _reporting_batches(staged.batches, reporter,
                                        total if isinstance(total, int) else None)
    staged.on_adopted = lambda rows: reporter.finish(0, rows, note="staged while fetching")
    return staged


def _reporting_batches(batches: Iterator[tuple[list[tuple], list[str]]],
                       reporter: ProgressReporter, total: int | None,
                       ) -> Iterator[tuple[list[tuple], list[str]]]:
    """The batches as they are, counted for the reporter (it throttles: a call per batch is a
    clock read, not a line)."""
    count = batches_seen = 0
    for batch in batches:
        count += len(batch[0])
        batches_seen += 1
        reporter(FetchProgress(batches_seen, count, total))
        yield batch
    reporter.finish(batches_seen, count)


def publish(store: MirrorAccess, entity: EntityConfig, change_set: str, *,
            skip: Collection[str] = (),
            warn: Callable[[str], None] | None = None) -> list[PublishResult]:
    """Publish change set K of an entity, after its older unpublished change sets, in order.

    An older change set that was archived but never staged is staged from the archive first;
    those in `skip` (a rebuild's damaged ones) are left out. `warn` (default: this module's
    logger) is told of a publish found cut off.
    """
    check_change_set_key(change_set)
    started = time.perf_counter()
    started_at = utc_now_iso()
    results: list[PublishResult] = []
    with store.connection() as connection:
        # The caller holds the entity's lock: a publish still marked as under way was cut off.
        for key in record_interrupted_publishes(connection, entity.name):
            (warn or logger.warning)(
                f"{entity.name}: the publish of change set {key} stopped without recording "
                "why (its process ended, or the database refused the failure record); "
                "recorded FAILED (interrupted), it is planned again from the start")
        refuse_if_pruned(connection, entity.name, change_set, "publishing it again")
        older = [key for key in _unpublished_before(connection, store, entity.name, change_set)
                 if key not in skip]
        for key in [*older, change_set]:
            operation = "stage"
            try:
                if _staging_lost(connection, entity.name, key) or (
                        key != change_set and staged_row(connection, entity.name, key) is None):
                    write_staged(connection, staged_records(
                        connection, store.archive(entity.name, key), entity))
                operation = "prepare"
                align_canonical_hashes(connection, entity.name, entity.hash_ignore_annotations)
                staged = read_staged(connection, entity.name, key)
                schema = load_locked_schema(connection, entity.name)
                assert schema is not None, "staging locks the schema before publishing"
                fault_point("publish.before_plan")
            except BaseException as exc:
                # Failed (or the run was stopped) before its plan: FAILED with the reason,
                # not left PENDING.
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                # A refusing database (SQLite's or PostgreSQL's error): exc says why.
                with contextlib.suppress(Exception):
                    record_publish_failure(connection, entity.name, key, operation, exc)
                raise
            results.append(publish_change_set(
                connection, schema, key, mode=staged.mode,
                watermark_after=staged.watermark_after,
                delta_token_after=staged.delta_token_after,
                key_scan=staged.reconciled, reconciled_at=staged.reconciled_at,
                chunk_rows=entity.publish_chunk_rows, as_of=staged.fetched_at,
                on_progress=_PublishProgress(entity.name, key),
            ))
            fault_point("publish.after_commit")  # committed with its watermark; run not done
            try:
                dead_letters.mark_succeeded(connection, entity.name, key)
                log_step(connection, entity=entity.name, change_set=key, layer="canonical",
                         status=SyncStatus.COMPLETED, started_at=started_at,
                         seconds=time.perf_counter() - started,
                         details=_json(results[-1].as_dict()))
            except Exception as exc:  # SQLite's or psycopg's; storage_problem tells
                problem = storage_problem(exc)
                if problem is None:
                    raise
                raise StorageError(
                    f"{entity.name}: change set {key} was published (COMPLETE, watermark "
                    f"moved) but its step log could not be written: {problem[0]} "
                    f"({database_path(connection)}: {exc}). Nothing was half-written. "
                    f"To fix: {problem[1]}, then run the sync again.") from None
    return results


class _PublishProgress:
    """Planning, then publishing, of one change set for in-process listeners: the publish's
    final line carries its counts (the terminal's "entity done" line)."""

    def __init__(self, entity: str, change_set: str) -> None:
        self.entity, self.change_set = entity, change_set
        self.reporter: ProgressReporter | None = None

    def __call__(self, phase: str, rows: int, total: int | None = None) -> None:
        if self.reporter is None or self.reporter.phase != phase:
            if self.reporter is not None:
                self.reporter.finish()
            self.reporter = phase_reporter(self.entity, self.change_set, phase)
        self.reporter(FetchProgress(0, rows, total))

    def finish(self, rows: int, note: str) -> None:
        if self.reporter is not None:
            self.reporter.finish(0, rows, note=note)


def _staging_lost(connection: sqlite3.Connection, entity: str, change_set: str) -> bool:
    """Was the change set staged (and not pruned since) but its rows are not in the staging
    file: a new staging file after a crash (store.staging_store)? Then it is staged again."""
    staged = staged_row(connection, entity, change_set)
    return (staged is not None and staged["pruned_at"] is None
            and not staged_here(connection, entity, change_set))


def _unpublished_before(connection: sqlite3.Connection, store: MirrorAccess, entity: str,
                        change_set: str) -> list[str]:
    """Older change sets of the entity, staged or archived, that are not COMPLETE."""
    complete = complete_change_sets(connection, entity)
    staged = staged_change_sets(connection, entity)
    archived = set(list_change_sets(store.archive_storage(), entity))
    # Ordered by the time the keys encode. A key that is not one (stored by an older version
    # that took any partition key) has no archive and is never published: it is left out.
    before = change_set_order(change_set)
    return sorted((k for k in staged | archived
                   if is_change_set_key(k) and change_set_order(k) < before
                   and k not in complete), key=change_set_order)
