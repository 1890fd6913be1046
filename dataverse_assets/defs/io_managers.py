"""The IO managers: where each layer's output is persisted, and what the next step gets.

- `ArchiveIOManager`: raw/E lives in the archive (pages are streamed there by the asset); the
  manager checks the change set is complete and hands downstream steps a `RawChangeSet`.
- `SQLiteIOManager`: staging/E rows are written into `_staging__E` as they are produced;
  downstream steps get a `StagedChangeSet` handle, not the rows.
- `CanonicalIOManager`: canonical/E's change set is published into `E` and `E__history` (plan,
  then execute); a downstream asset gets a `CanonicalTable` handle.

Swapping one (a test's, another store's) changes no asset code.

Each takes the mirror's location as config (`MirrorLocation`), not the `store` resource nested
in it: Dagster 1.13 initialises a nested, fully configured resource through
`InitResourceContext.replace_config`, which reads the deprecated `dagster_run` and warns once
per IO manager per run.
"""

from dataclasses import dataclass, field

from dagster import (
    ConfigurableIOManager,
    InputContext,
    MetadataValue,
    OutputContext,
)

from dataverse_assets.config import EntityConfig
from dataverse_assets.defs.checks import canonical_metadata
from dataverse_assets.defs.resources import MirrorLocation
from dataverse_assets.names import check_change_set_key
from dataverse_assets.store.bookkeeping import StagedChangeSet, read_publish_state, read_staged
from dataverse_assets.store.tables import canonical_row_count
from dataverse_assets.sync import steps
from dataverse_assets.sync.faults import fault_point
from dataverse_assets.sync.publish_execute import PublishResult
from dataverse_assets.sync.stage import StagedRecords, write_staged


@dataclass(frozen=True)
class RawChangeSet:
    entity: str
    change_set: str
    path: str  # where the change set is archived: its folder or s3:// URL


def _entity_and_partition(context: OutputContext | InputContext) -> tuple[str, str]:
    key = context.asset_key.path
    return key[-1], check_change_set_key(context.asset_partition_key)


class ArchiveIOManager(ConfigurableIOManager):
    """raw/E: the archived change set is the asset's value."""

    store: MirrorLocation

    def handle_output(self, context: OutputContext, obj: RawChangeSet) -> None:
        archive = self.store.archive(obj.entity, obj.change_set)
        archive.manifest()  # raises with a clear message if the fetch did not complete

    def load_input(self, context: InputContext) -> RawChangeSet:
        entity, change_set = _entity_and_partition(context)
        archive = self.store.archive(entity, change_set)
        archive.manifest()
        return RawChangeSet(entity, change_set, archive.location)


class SQLiteIOManager(ConfigurableIOManager):
    """staging/E: rows go into `_staging__E` (one transaction per change set)."""

    store: MirrorLocation

    def handle_output(self, context: OutputContext, obj: StagedRecords) -> None:
        with self.store.entity_lock(obj.entity, owner=context.run_id, purpose="staging",
                                    warn=context.log.warning if context.log else None), \
                self.store.connection() as connection:
            rows = write_staged(connection, obj)
        fault_point("staging.after_write")  # staged, not yet published
        context.add_output_metadata({
            "rows_written": rows,
            # Staged by the fetch as its pages arrived (sync.prestage), not from the archive.
            "staged_while_fetching": obj.adopted})

    def load_input(self, context: InputContext) -> StagedChangeSet:
        entity, change_set = _entity_and_partition(context)
        with self.store.connection() as connection:
            return read_staged(connection, entity, change_set)


@dataclass
class PublishRequest:
    """canonical/E's output: publish this change set of this entity (after its older
    unpublished ones). The manager that publishes it records what it published in `results`
    (the asset reads them right after: Dagster runs handle_output as the output is yielded)."""

    entity: EntityConfig
    change_set: str
    results: list[PublishResult] = field(default_factory=list)


@dataclass(frozen=True)
class CanonicalTable:
    """What an asset downstream of canonical/E gets: the table and the database it is in."""

    entity: str
    table: str
    db_path: str


class CanonicalIOManager(ConfigurableIOManager):
    """canonical/E: the change set is published into `E` and `E__history` (sync.steps.publish:
    plan, then execute), holding the entity's lock; the materialization's metadata says what
    changed, and carries the table's column schema and row count."""

    store: MirrorLocation

    def handle_output(self, context: OutputContext, obj: PublishRequest) -> None:
        name = obj.entity.name
        warn = context.log.warning if context.log else None
        with self.store.entity_lock(name, owner=context.run_id, purpose="publish", warn=warn):
            obj.results = steps.publish(self.store, obj.entity, obj.change_set, warn=warn)
        result = obj.results[-1]
        with self.store.connection() as connection:
            rows = canonical_row_count(connection, name)
            state = read_publish_state(connection, name, result.change_set)
            schema_metadata = canonical_metadata(connection, name, self.store.db_path)
        timings = {k: state.get(k) or "" for k in (
            "source_timestamp", "staged_at", "plan_started_at", "started_at", "finished_at")}
        context.add_output_metadata({
            "publish_status": state.get("status", ""),
            "publish_timestamps": timings,
            "created": result.created,
            "updated": result.updated,
            "unchanged": result.unchanged,
            "deleted": result.deleted,
            "stale_skipped": result.stale,
            "rows_in_table": rows,
            "older_change_sets_published": [r.change_set for r in obj.results[:-1]],
            "already_published": result.already_published,
            "watermark_before": result.watermark_before or "",
            "watermark_after": result.watermark_after or "",
            "seconds": round(result.seconds, 3),
            "plan": MetadataValue.md(
                f"{result.created} to create, {result.updated} to update, "
                f"{result.deleted} to delete, {result.unchanged:,} unchanged"
            ),
            "dagster/row_count": rows,
            **schema_metadata,
        })

    def load_input(self, context: InputContext) -> CanonicalTable:
        entity = context.asset_key.path[-1]
        return CanonicalTable(entity, entity, self.store.db_path)
