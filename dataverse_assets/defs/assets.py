"""The asset factory: each configured entity becomes raw/E -> staging/E -> canonical/E, one
builder per layer. Nothing here is written per entity; everything comes from the entity's
config entry. Each asset is a few lines: the work is sync.steps', and each layer's output is
persisted by its IO manager (defs.io_managers: the archive, staging, the canonical tables).
"""

from collections.abc import Iterator

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    Config,
    MetadataValue,
    Output,
    PartitionsDefinition,
    asset,
)
from pydantic import Field

from dataverse_assets.config import EntitiesConfig, EntityConfig
from dataverse_assets.defs.asset_keys import (
    API_POOL,
    canonical_key,
    entity_pool,
    raw_key,
    staging_key,
)
from dataverse_assets.defs.checks import canonical_check_specs, evaluate_canonical_checks
from dataverse_assets.defs.io_managers import PublishRequest, RawChangeSet
from dataverse_assets.defs.parallel_fetch import fetch_in_parallel, locked_fetch
from dataverse_assets.defs.partitions import PARTITION_NOTE, change_sets_partitions
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.names import check_change_set_key
from dataverse_assets.source.base import DataverseSource
from dataverse_assets.store.bookkeeping import StagedChangeSet
from dataverse_assets.sync import steps
from dataverse_assets.sync.fetch import FetchSummary
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


def build_entity_assets(entity: EntityConfig, config: EntitiesConfig,
                        parallel_entities: int = 1) -> list[AssetsDefinition]:
    """The three assets of one entity."""
    partitions_def = change_sets_partitions(entity.group)
    return [build_raw_asset(entity, config, partitions_def, parallel_entities),
            build_staging_asset(entity, partitions_def),
            build_canonical_asset(entity, partitions_def)]


def _kinds(layer: str, *technologies: str) -> set[str]:
    """The asset's kinds: its layer and what it is made of. The graph labels a node with the
    last part of its key only (three nodes read `accounts`); kinds are drawn on every node (a
    default facet of Dagster's asset graph), so the layer shows there."""
    return {layer, *technologies}


# Steps of a run that are ready at the same moment run highest priority first (Dagster's
# executors sort by the op tag `dagster/priority`). Staging and publishing an entity whose
# fetch is done come before the next raw step, so in one process they run while the other
# entities' fetches continue on their threads (defs.parallel_fetch), instead of every raw
# step first and all the writing after.
_STEP_ORDER = {"staging": {"dagster/priority": "1"}, "canonical": {"dagster/priority": "2"}}


def _described(entity: EntityConfig) -> str:
    return entity.description or f"The Dataverse table {entity.name}."


def build_raw_asset(entity: EntityConfig, config: EntitiesConfig,
                    partitions_def: PartitionsDefinition,
                    parallel_entities: int = 1) -> AssetsDefinition:
    """raw/E: one change set fetched from the source, every response archived verbatim.
    `parallel_entities` > 1: fetched at the same time as the run's other entities, that many
    at once (defs.parallel_fetch)."""
    name = entity.name
    entities = config
    # Ordering only: the ids are read from the store, from the linking table's staging when it
    # was staged in this change set and from its canonical table otherwise, so raw/E can also
    # run on its own (a targeted refresh, a sensor run of just the changed entities).
    linking_tables = sorted({staging_key(link.entity) for link in entity.linked_from})

    @asset(
        key=raw_key(name), group_name=entity.group, partitions_def=partitions_def,
        io_manager_key="archive_io_manager", deps=linking_tables, pool=API_POOL,
        kinds=_kinds("raw", "dataverse", "json"),
        description=(f"Raw API responses of {name} for one change set, archived verbatim.\n\n"
                     f"{_described(entity)}\n\n{PARTITION_NOTE}"),
    )
    def raw(context: AssetExecutionContext, config: RawConfig, source: DataverseSource,
            store: MirrorStore) -> Output[RawChangeSet]:
        # Checked before anything else: the key becomes the archive folder's name.
        change_set = check_change_set_key(context.partition_key)
        if parallel_entities > 1 and not (config.ids or config.lookup_column
                                          or config.reconcile):
            # Started with the run's other entities (defs.parallel_fetch); its log lines
            # come here, under this step.
            fetched = fetch_in_parallel(context, entity, entities, store=store, source=source,
                                        change_set=change_set, workers=parallel_entities)
            for level, message in fetched.log:
                (context.log.warning if level == "warning" else context.log.info)(message)
            summary, reused = fetched.summary, fetched.reused
        else:
            summary, reused = locked_fetch(store, source, entity, change_set,
                                           owner=context.run.run_id, info=context.log.info,
                                           warning=context.log.warning,
                                           targeted_ids=config.ids,
                                           lookup_column=config.lookup_column,
                                           reconcile=config.reconcile)
        if reused:
            # An archived change set is immutable: replaying it must stage the same rows.
            context.log.info(f"{name} {change_set}: already archived, not fetched again")
        location = store.archive(name, change_set).location
        return Output(RawChangeSet(name, change_set, location),
                      metadata=_fetch_metadata(summary, location, reused=reused))

    return raw


def build_staging_asset(entity: EntityConfig,
                        partitions_def: PartitionsDefinition) -> AssetsDefinition:
    """staging/E: the archived pages parsed into typed rows (written by its IO manager)."""
    name = entity.name

    @asset(
        key=staging_key(name), group_name=entity.group, partitions_def=partitions_def,
        io_manager_key="sqlite_io_manager", pool=entity_pool(name),
        ins={"raw_change_set": AssetIn(key=raw_key(name))}, kinds=_kinds("staging", "sqlite"),
        op_tags=_STEP_ORDER["staging"],
        description=(f"{name} records of one change set, parsed into typed columns plus "
                     f"json_response, in the staging table.\n\n{PARTITION_NOTE}"),
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

    return staging


def build_canonical_asset(entity: EntityConfig,
                          partitions_def: PartitionsDefinition) -> AssetsDefinition:
    """canonical/E: the staged change set published into the mirror by its IO manager (plan,
    then execute), then the per-change-set checks on the result."""
    name = entity.name

    @asset(
        key=canonical_key(name), group_name=entity.group, partitions_def=partitions_def,
        io_manager_key="canonical_io_manager", pool=entity_pool(name),
        ins={"staged": AssetIn(key=staging_key(name))},
        kinds=_kinds("canonical", "dataverse", "sqlite"),
        check_specs=canonical_check_specs(entity, partitions_def),
        op_tags=_STEP_ORDER["canonical"],
        description=(f"The mirror of {name}: one row per record with typed columns, "
                     "json_response, sync_time, valid_from and updated_at; old versions in "
                     f"{name}__history.\n\n{_described(entity)}\n\n{PARTITION_NOTE}"),
    )
    def canonical(context: AssetExecutionContext, store: MirrorStore,
                  staged: StagedChangeSet) -> Iterator[Output | AssetCheckResult]:
        request = PublishRequest(entity, staged.change_set)
        # The IO manager publishes it here (handle_output runs as the output is yielded) and
        # records what it published in the request.
        yield Output(request)
        for earlier in request.results[:-1]:
            context.log.info(f"{name}: published older change set {earlier.change_set} first")
        published = [r.change_set for r in request.results] or [staged.change_set]
        with store.connection() as connection:
            yield from evaluate_canonical_checks(connection, entity, published)

    return canonical


def _fetch_metadata(summary: FetchSummary, location: str, *, reused: bool) -> dict:
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
        "archive": MetadataValue.path(location),
        "reused_archive": reused,
    }


def build_all_assets(config: EntitiesConfig,
                     parallel_entities: int = 1) -> list[AssetsDefinition]:
    assets: list[AssetsDefinition] = []
    for entity in config.entities:
        assets.extend(build_entity_assets(entity, config, parallel_entities))
    return assets
