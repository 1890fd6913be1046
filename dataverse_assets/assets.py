"""The asset factory: each configured entity becomes raw/E -> staging/E -> canonical/E.

Nothing here is written per entity; everything comes from the entity's config entry.
"""


import asyncio
import time

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

from dataverse_assets.config import EntitiesConfig, EntityConfig
from dataverse_assets.fetch import fetch_change_set, plan_fetch
from dataverse_assets.publish import (
    canonical_row_count,
    load_locked_schema,
    lock_schema,
    publish_change_set,
)
from dataverse_assets.resources import MirrorStore, RawChangeSet
from dataverse_assets.sources import DataverseSource
from dataverse_assets.staging import (
    StagedChangeSet,
    StagedRecords,
    decide_schema,
    iter_staged_batches,
    staged_ids,
)
from dataverse_assets.store import (
    log_step,
    mark_sync_status,
    quote_identifier,
    read_sync_state,
    table_exists,
    transaction,
    utc_now_iso,
)


def change_sets_partitions(group: str) -> DynamicPartitionsDefinition:
    """Change sets are the partitions, one dynamic set per cadence group."""
    return DynamicPartitionsDefinition(name=f"change_sets_{group}")


def _linked_ids(store: MirrorStore, entity: EntityConfig, change_set: str,
                config: EntitiesConfig) -> tuple[set[str], set[str]]:
    """Ids the linking tables name (this change set's staging, plus canonical for incremental
    linking tables), and the ids already mirrored."""
    linked: set[str] = set()
    mirrored: set[str] = set()
    with store.connection() as connection:
        for link in entity.linked_from:
            linked |= staged_ids(connection, link.entity, change_set, link.column)
            link_state = read_sync_state(connection, link.entity)
            if link_state is not None and link_state.mode != "full":
                linked |= _canonical_values(connection, link.entity, link.column)
        locked = load_locked_schema(connection, entity.name)
        if locked is not None:
            mirrored = _canonical_values(connection, entity.name, locked.primary_key)
    return linked, mirrored


def _canonical_values(connection, table: str, column: str) -> set[str]:
    if not table_exists(connection, table):
        return set()
    return {
        str(row[0]) for row in connection.execute(
            f"SELECT DISTINCT {quote_identifier(column)} FROM {quote_identifier(table)}"
            f" WHERE {quote_identifier(column)} IS NOT NULL"
        )
    }


def build_entity_assets(entity: EntityConfig, config: EntitiesConfig) -> list[AssetsDefinition]:
    """The three assets of one entity."""
    partitions_def = change_sets_partitions(entity.group)
    name = entity.name
    description = entity.description or f"The Dataverse table {name}."
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
        archive = store.archive(name, change_set)
        if archive.is_complete():
            # An archived change set is immutable: replaying it must stage the same rows.
            manifest = archive.manifest()
            context.log.info(f"{name} {change_set}: already archived, not fetched again")
            return Output(RawChangeSet(name, change_set, str(archive.path)),
                          metadata=_fetch_metadata(manifest["summary"], archive.path, reused=True))
        with store.connection() as connection:
            state = read_sync_state(connection, name)
            mark_sync_status(connection, name, "in_progress")
        linked_ids, mirrored_ids = (
            _linked_ids(store, entity, change_set, config) if entity.filtered else (set(), set())
        )
        started_at = utc_now_iso()

        async def run():
            async with source.open_session() as session:
                definition = await session.entity_definition(name)
                request = plan_fetch(
                    entity, change_set, definition, state.watermark if state else None,
                    linked_ids=linked_ids, mirrored_ids=mirrored_ids,
                )
                return await fetch_change_set(session, archive, request, definition)

        try:
            summary = asyncio.run(run())
        except Exception:
            with store.connection() as connection:
                mark_sync_status(connection, name, "failed")
            raise
        with store.connection() as connection:
            log_step(connection, entity=name, change_set=change_set, layer="raw",
                     status="completed", started_at=started_at, seconds=summary.seconds,
                     details=_json(summary.__dict__))
        return Output(RawChangeSet(name, change_set, str(archive.path)),
                      metadata=_fetch_metadata(summary.__dict__, archive.path, reused=False))

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
        archive = store.archive(name, raw_change_set.change_set)
        manifest = archive.manifest()
        with store.connection() as connection:
            schema = load_locked_schema(connection, name)
            if schema is None:
                with transaction(connection):
                    schema = lock_schema(connection, decide_schema(archive, entity.primary_key))
        counts: dict[str, int] = {}
        issues: list[dict] = []
        staged = StagedRecords(
            entity=name, change_set=raw_change_set.change_set, schema=schema,
            mode=manifest["mode"], watermark_after=manifest["summary"]["watermark_after"],
            batches=iter_staged_batches(archive, schema, counts, issues), counts=counts,
            issues=issues,
        )
        return Output(staged, metadata={
            "primary_key": schema.primary_key,
            "columns": len(schema.columns),
            "schema_from": schema.decided_from,
            "mode": manifest["mode"],
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
        started = time.perf_counter()
        started_at = utc_now_iso()
        with store.connection() as connection:
            schema = load_locked_schema(connection, name)
            assert schema is not None, "staging locks the schema before canonical runs"
            result = publish_change_set(connection, schema, staged.change_set,
                                        mode=staged.mode, watermark_after=staged.watermark_after)
            rows = canonical_row_count(connection, name)
            log_step(connection, entity=name, change_set=staged.change_set, layer="canonical",
                     status="completed", started_at=started_at,
                     seconds=time.perf_counter() - started, details=_json(result.as_dict()))
        return MaterializeResult(metadata={
            "created": result.created,
            "updated": result.updated,
            "unchanged": result.unchanged,
            "deleted": result.deleted,
            "stale_skipped": result.stale,
            "rows_in_table": rows,
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


def _fetch_metadata(summary: dict, path, *, reused: bool) -> dict:
    return {
        "mode": summary["mode"],
        "pages": summary["pages"],
        "records": summary["records"],
        "bytes_archived": summary["bytes_archived"],
        "requests": summary["requests"],
        "retries": summary["retries"],
        "throttle_wait_seconds": round(summary["throttle_wait"], 3),
        "seconds": round(summary["seconds"], 3),
        "watermark_before": summary["watermark_before"] or "",
        "watermark_after": summary["watermark_after"] or "",
        "archive": MetadataValue.path(str(path)),
        "reused_archive": reused,
    }


def _json(value: dict) -> str:
    import orjson

    return orjson.dumps(value, default=str).decode()


def build_all_assets(config: EntitiesConfig) -> list[AssetsDefinition]:
    assets: list[AssetsDefinition] = []
    for entity in config.entities:
        assets.extend(build_entity_assets(entity, config))
    return assets
