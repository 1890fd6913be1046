"""The asset factory: each configured entity becomes raw/E -> staging/E -> canonical/E.

Nothing here is written per entity; everything comes from the entity's config entry.
"""


from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    Config,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from dataverse_assets.checks import canonical_check_specs, evaluate_canonical_checks
from dataverse_assets.config import EntitiesConfig, EntityConfig
from dataverse_assets.names import check_change_set_key
from dataverse_assets.partitions import PARTITION_NOTE, change_sets_partitions
from dataverse_assets.resources import MirrorStore, RawChangeSet
from dataverse_assets.source.base import DataverseSource
from dataverse_assets.store.bookkeeping import StagedChangeSet, read_publish_state
from dataverse_assets.store.tables import canonical_row_count
from dataverse_assets.sync import steps
from dataverse_assets.sync.fetch import FetchSummary
from dataverse_assets.sync.progress import fetch_reporter
from dataverse_assets.sync.stage import StagedRecords


class RawConfig(Config):
    """Run config of raw/E. Empty: the next incremental change set. With ids: a targeted
    refresh of exactly those records (published as their own change set; the watermark does
    not move)."""

    ids: list[str] = Field(default_factory=list,
                           description="Primary keys to fetch (targeted refresh).")
    lookup_column: str | None = Field(
        None, description="Fetch the records whose lookup column (e.g. _parentcustomerid_value) "
        "names one of `ids` instead: an account's contacts.",
    )
    reconcile: bool = Field(
        False, description="Compare the mirror with the source by key and version now (a "
        "key-and-version scan; missing and stale records are fetched by id, extra ones "
        "deleted), whatever the entity's reconcile cadence.",
    )


def build_entity_assets(entity: EntityConfig, config: EntitiesConfig) -> list[AssetsDefinition]:
    """The three assets of one entity."""
    partitions_def = change_sets_partitions(entity.group)
    name = entity.name
    description = entity.description or f"The Dataverse table {name}."
    annotations = config.read_with_annotations(name)
    # Ordering only: the ids are read from the store, from the linking table's staging when it
    # was staged in this change set and from its canonical table otherwise, so raw/E+ can also
    # run on its own (a targeted refresh, a sensor run of just the changed entities).
    linking_tables = sorted({AssetKey(["staging", link.entity]) for link in entity.linked_from})

    @asset(
        key=AssetKey(["raw", name]),
        group_name=entity.group,
        partitions_def=partitions_def,
        io_manager_key="archive_io_manager",
        deps=linking_tables,
        kinds={"dataverse", "json"},
        description=(
            f"Raw API responses of {name} for one change set, archived verbatim.\n\n"
            f"{description}\n\n{PARTITION_NOTE}"
        ),
    )
    def raw(context: AssetExecutionContext, config: RawConfig, source: DataverseSource,
            store: MirrorStore) -> Output[RawChangeSet]:
        # Checked before anything else: the key becomes the archive folder's name.
        change_set = check_change_set_key(context.partition_key)
        # Pages, rows, rows/s and ETA to the run's log every few seconds (not every page).
        progress = fetch_reporter(name, change_set, context.log.info)
        # The archive directory and the sync state are the entity's: one run at a time.
        with store.entity_lock(name, owner=context.run.run_id, purpose="fetch",
                               warn=context.log.warning):
            summary, reused = steps.fetch(store, source, entity, change_set,
                                          include_annotations=annotations,
                                          targeted_ids=config.ids,
                                          lookup_column=config.lookup_column,
                                          reconcile=config.reconcile,
                                          on_progress=progress)
        if not reused:
            progress.finish(summary.pages, summary.records)
        if reused:
            # An archived change set is immutable: replaying it must stage the same rows.
            context.log.info(f"{name} {change_set}: already archived, not fetched again")
        path = store.archive(name, change_set).path
        return Output(RawChangeSet(name, change_set, str(path)),
                      metadata=_fetch_metadata(summary, path, reused=reused))

    @asset(
        key=AssetKey(["staging", name]),
        group_name=entity.group,
        partitions_def=partitions_def,
        io_manager_key="sqlite_io_manager",
        ins={"raw_change_set": AssetIn(key=AssetKey(["raw", name]))},
        kinds={"sqlite"},
        description=(
            f"{name} records of one change set, parsed into typed columns plus json_response, "
            f"in the staging table.\n\n{PARTITION_NOTE}"
        ),
    )
    def staging(context: AssetExecutionContext, store: MirrorStore,
                raw_change_set: RawChangeSet) -> Output[StagedRecords]:
        staged = steps.stage(store, entity, raw_change_set.change_set)
        return Output(staged, metadata={
            "primary_key": staged.schema.primary_key,
            "columns": len(staged.schema.columns),
            "schema_from": staged.schema.decided_from,
            "mode": staged.mode,
        })

    @asset(
        key=AssetKey(["canonical", name]),
        group_name=entity.group,
        partitions_def=partitions_def,
        ins={"staged": AssetIn(key=AssetKey(["staging", name]))},
        kinds={"sqlite"},
        check_specs=canonical_check_specs(entity, partitions_def),
        description=(
            f"The mirror of {name}: one row per record with typed columns, json_response, "
            f"sync_time, valid_from and updated_at; old versions in {name}__history.\n\n"
            f"{description}\n\n{PARTITION_NOTE}"
        ),
    )
    def canonical(context: AssetExecutionContext, store: MirrorStore,
                  staged: StagedChangeSet) -> MaterializeResult:
        with store.entity_lock(name, owner=context.run.run_id, purpose="publish",
                               warn=context.log.warning):
            results = steps.publish(store, entity, staged.change_set)
        for earlier in results[:-1]:
            context.log.info(f"{name}: published older change set {earlier.change_set} first")
        result = results[-1]
        with store.connection() as connection:
            rows = canonical_row_count(connection, name)
            state = read_publish_state(connection, name, result.change_set)
            checked = evaluate_canonical_checks(connection, entity,
                                                [r.change_set for r in results])
        timings = {k: state.get(k) or "" for k in (
            "source_timestamp", "staged_at", "plan_started_at", "started_at", "finished_at")}
        return MaterializeResult(metadata={
            "publish_status": state.get("status", ""),
            "publish_timestamps": timings,
            "created": result.created,
            "updated": result.updated,
            "unchanged": result.unchanged,
            "deleted": result.deleted,
            "stale_skipped": result.stale,
            "rows_in_table": rows,
            "older_change_sets_published": [r.change_set for r in results[:-1]],
            "already_published": result.already_published,
            "watermark_before": result.watermark_before or "",
            "watermark_after": result.watermark_after or "",
            "seconds": round(result.seconds, 3),
            "plan": MetadataValue.md(
                f"{result.created} to create, {result.updated} to update, "
                f"{result.deleted} to delete, {result.unchanged:,} unchanged"
            ),
            "dagster/row_count": rows,
            **checked.metadata,
        }, check_results=checked.results)

    return [raw, staging, canonical]


def _fetch_metadata(summary: FetchSummary, path, *, reused: bool) -> dict:
    return {
        "mode": summary.mode,
        "pages": summary.pages,
        "records": summary.records,
        "missing_records": summary.missing,
        "bytes_archived": summary.bytes_archived,
        "requests": summary.requests,
        "retries": summary.retries,
        "throttle_wait_seconds": round(summary.throttle_wait, 3),
        "seconds": round(summary.seconds, 3),
        "watermark_before": summary.watermark_before or "",
        "watermark_after": summary.watermark_after or "",
        "reason": summary.reason,
        "archive": MetadataValue.path(str(path)),
        "reused_archive": reused,
    }


def build_all_assets(config: EntitiesConfig) -> list[AssetsDefinition]:
    assets: list[AssetsDefinition] = []
    for entity in config.entities:
        assets.extend(build_entity_assets(entity, config))
    return assets
