"""The asset factory: each configured entity becomes raw/E -> staging/E -> canonical/E.

Nothing here is written per entity; everything comes from the entity's config entry.
"""


from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)

from dataverse_assets import steps
from dataverse_assets.config import EntitiesConfig, EntityConfig
from dataverse_assets.fetch import FetchSummary
from dataverse_assets.publish import canonical_row_count, read_publish_state
from dataverse_assets.resources import MirrorStore, RawChangeSet
from dataverse_assets.sources import DataverseSource
from dataverse_assets.staging import StagedChangeSet, StagedRecords


def change_sets_partitions(group: str) -> DynamicPartitionsDefinition:
    """Change sets are the partitions, one dynamic set per cadence group."""
    return DynamicPartitionsDefinition(name=f"change_sets_{group}")


def build_entity_assets(entity: EntityConfig, config: EntitiesConfig) -> list[AssetsDefinition]:
    """The three assets of one entity."""
    partitions_def = change_sets_partitions(entity.group)
    name = entity.name
    description = entity.description or f"The Dataverse table {name}."
    annotations = config.read_with_annotations(name)
    linked_ins = {
        f"linked_{index}": AssetIn(key=AssetKey(["staging", link.entity]))
        for index, link in enumerate(entity.linked_from)
    }

    @asset(
        key=AssetKey(["raw", name]),
        group_name=entity.group,
        partitions_def=partitions_def,
        io_manager_key="archive_io_manager",
        ins=linked_ins,
        kinds={"dataverse", "json"},
        description=(
            f"Raw API responses of {name} for one change set, archived verbatim.\n\n"
            f"{description}"
        ),
    )
    def raw(context: AssetExecutionContext, source: DataverseSource, store: MirrorStore,
            **linked: StagedChangeSet) -> Output[RawChangeSet]:
        change_set = context.partition_key
        summary, reused = steps.fetch(store, source, entity, change_set,
                                      include_annotations=annotations)
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
            "in the staging table."
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
        description=(
            f"The mirror of {name}: one row per record with typed columns, json_response, "
            f"sync_time, valid_from and updated_at; old versions in {name}__history.\n\n"
            f"{description}"
        ),
    )
    def canonical(context: AssetExecutionContext, store: MirrorStore,
                  staged: StagedChangeSet) -> MaterializeResult:
        results = steps.publish(store, entity, staged.change_set)
        for earlier in results[:-1]:
            context.log.info(f"{name}: published older change set {earlier.change_set} first")
        result = results[-1]
        with store.connection() as connection:
            rows = canonical_row_count(connection, name)
            state = read_publish_state(connection, name, result.change_set)
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
        })

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
