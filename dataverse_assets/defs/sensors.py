"""Sensors: new change sets in the source, change sets dropped into the archive, and the
scheduled retry tier (failed change sets retried on later ticks, then dead-lettered)."""

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
from dagster import (
    AssetKey,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from dataverse_assets.archive.change_sets import list_change_sets
from dataverse_assets.config import EntitiesConfig, EntityConfig
from dataverse_assets.defs.asset_keys import entity_asset_keys, entity_of_step
from dataverse_assets.defs.partitions import add_change_sets_request
from dataverse_assets.defs.priorities import priority_tags
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.modes import SNAPSHOT_MODES
from dataverse_assets.names import change_set_key, change_set_order, is_change_set_key
from dataverse_assets.source.base import DataverseSource, SourceSession
from dataverse_assets.source.query import PageQuery, modified_since_filter
from dataverse_assets.store import dead_letters
from dataverse_assets.store.bookkeeping import SyncState, every_complete_change_set, read_sync_state
from dataverse_assets.store.schema_registry import load_locked_schema
from dataverse_assets.store.tables import mirrored_etags

MAX_RUNS_PER_TICK = 25


def root_cause(error) -> str:
    """The innermost error of a Dagster SerializableErrorInfo chain, as 'Type: message'."""
    if error is None:
        return "step failed"
    while getattr(error, "cause", None) is not None:
        error = error.cause
    return f"{error.cls_name}: {error.message.strip()}" if error.cls_name else error.message


# -- probing the source for changes -------------------------------------------------------

async def _first_page_has_rows(session: SourceSession, entity: str, query: PageQuery,
                               start_url: str | None = None) -> bool:
    async for page in session.iter_pages(entity, query, start_url=start_url):
        return bool(page.records)  # one request, never the next page
    return False


# Records stamped in the watermark's own second that a probe compares one by one; more than
# that in one page and the entity counts as changed (a run that finds nothing is harmless).
WATERMARK_PROBE_ROWS = 50

MirroredEtags = Callable[[str, str, list[str]], dict[str, str | None]]


async def _changed_since_watermark(session: SourceSession, entity: EntityConfig,
                                   watermark: str, primary_key: str,
                                   mirrored_etags: MirroredEtags) -> bool:
    """One page of `modifiedon ge <watermark>` (key, stamp and etag only). Changed when a
    record is stamped later than the watermark, or is stamped in its very second (Dataverse
    stamps whole seconds, so a write after the last read can carry the watermark's stamp) with
    an etag other than the mirrored version's. A record of that second the mirror does not
    hold is a change too, except for filtered entities, which skip unlinked records."""
    query = PageQuery(select=(primary_key, "modifiedon"),
                      filter=modified_since_filter(watermark), page_size=WATERMARK_PROBE_ROWS)
    async for page in session.iter_pages(entity.name, query):  # one request, never the next
        records = page.records
        if page.next_link or len(records) >= WATERMARK_PROBE_ROWS:
            return True
        if any(r.get("modifiedon") != watermark for r in records):
            return True
        ids = [str(r.get(primary_key)) for r in records]  # as staging keys them
        known = mirrored_etags(entity.name, primary_key, ids) if ids else {}
        for key, record in zip(ids, records, strict=True):
            if key not in known:
                if not entity.filtered:
                    return True
            elif known[key] != record.get("@odata.etag"):
                return True
        return False
    return False


def canonical_etags(store: MirrorStore) -> MirroredEtags:
    """The `@odata.etag` of the mirrored version of each id (ids not mirrored are left out)."""

    def lookup(entity: str, primary_key: str, ids: list[str]) -> dict[str, str | None]:
        with store.connection() as connection:
            return mirrored_etags(connection, entity, primary_key, ids)

    return lookup


async def probe_entity(session: SourceSession, entity: EntityConfig, state: SyncState | None,
                       primary_key: str | None, mirrored_etags: MirroredEtags) -> bool | None:
    """Has the entity changed since it was last published? One small request, no paging.

    None: cannot be probed cheaply (full snapshots: they run on their schedule).
    """
    if state is None or state.last_change_set is None:
        return True  # never synced
    if state.delta_token:
        return await _first_page_has_rows(
            session, entity.name, PageQuery(page_size=1, track_changes=True), state.delta_token)
    if state.watermark and primary_key:
        return await _changed_since_watermark(session, entity, state.watermark, primary_key,
                                              mirrored_etags)
    if state.mode in SNAPSHOT_MODES:
        return None
    return True


def _probe_group(source: DataverseSource, store: MirrorStore, config: EntitiesConfig,
                 group: str) -> dict[str, bool | None]:
    entities = config.entities_in_group(group)
    with store.connection() as connection:
        states = {e.name: read_sync_state(connection, e.name) for e in entities}
        keys = {e.name: (schema.primary_key if (schema := load_locked_schema(connection, e.name))
                         else None) for e in entities}

    etags = canonical_etags(store)

    async def run() -> dict[str, bool | None]:
        async with source.open_session() as session:
            return {e.name: await probe_entity(session, e, states[e.name], keys[e.name],
                                               etags) for e in entities}

    changed = asyncio.run(run())
    for entity in entities:  # a filtered entity follows its linking tables
        if entity.filtered and any(changed.get(link.entity) for link in entity.linked_from):
            changed[entity.name] = True
    return changed


def build_change_sensor(config: EntitiesConfig, group: str) -> SensorDefinition:
    @sensor(
        name=f"{group}_changes_sensor",
        minimum_interval_seconds=300,
        default_status=DefaultSensorStatus.STOPPED,
        asset_selection=[k for e in config.entities_in_group(group)
                         for k in entity_asset_keys(e.name)],
        description=f"Probes each {group!r} entity for changes (a one-row request) and runs "
                    "just the changed entities for a new change set.",
    )
    def _sensor(context: SensorEvaluationContext, source: DataverseSource, store: MirrorStore):
        cursor = orjson.loads(context.cursor) if context.cursor else {}
        launched: dict[str, str] = cursor.get("launched", {})
        with store.connection() as connection:
            # An entity launched earlier and not yet published is in flight: not again.
            in_flight = {
                entity for entity, key in launched.items()
                if (state := read_sync_state(connection, entity)) is None
                or state.last_change_set is None
                or change_set_order(state.last_change_set) < change_set_order(key)
            }
        changed = _probe_group(source, store, config, group)
        to_run = sorted(e for e, is_changed in changed.items()
                        if is_changed and e not in in_flight)
        if not to_run:
            return SensorResult(skip_reason=SkipReason(
                f"no changes (in flight: {sorted(in_flight) or 'none'})"),
                cursor=orjson.dumps({"launched": launched}).decode())
        key = change_set_key(datetime.now(UTC))
        last_key = cursor.get("last_key")
        if last_key and change_set_order(key) <= change_set_order(last_key):
            return SensorResult(skip_reason=SkipReason("a change set was created this second"))
        launched.update({entity: key for entity in to_run})
        return SensorResult(
            run_requests=[RunRequest(
                run_key=f"{group}:{key}", partition_key=key,
                asset_selection=[k for e in to_run for k in entity_asset_keys(e)],
                tags={"dataverse/change_set": key, "dataverse/trigger": "changes_sensor",
                      "dataverse/entities": ",".join(to_run),
                      **priority_tags(config, to_run)},
            )],
            dynamic_partitions_requests=[add_change_sets_request(group, [key])],
            cursor=orjson.dumps({"launched": launched, "last_key": key}).decode(),
        )

    return _sensor


# -- change sets dropped into the archive by another process ------------------------------

def build_archive_sensor(config: EntitiesConfig) -> SensorDefinition:
    @sensor(
        name="archive_change_sets_sensor",
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.STOPPED,
        asset_selection=[k for e in config.entities
                         for k in entity_asset_keys(e.name, ("staging", "canonical"))],
        description="Stages and publishes change sets that another process fetched into the "
                    "archive (complete folders this instance never materialized), oldest first.",
    )
    def _sensor(context: SensorEvaluationContext, store: MirrorStore):
        requests, additions = [], {}
        with store.connection() as connection:
            published = every_complete_change_set(connection)
        found = []
        storage = store.archive_storage()
        for entity in config.entities:
            materialized = context.instance.get_materialized_partitions(
                AssetKey(["raw", entity.name]))
            for key in list_change_sets(storage, entity.name):
                if key not in materialized and (entity.name, key) not in published:
                    found.append((key, entity))
        for key, entity in sorted(found, key=lambda item: (change_set_order(item[0]),
                                                          item[1].name)):
            if len(requests) >= MAX_RUNS_PER_TICK:
                break
            additions.setdefault(entity.group, set()).add(key)
            requests.append(RunRequest(
                run_key=f"archive:{entity.name}:{key}", partition_key=key,
                asset_selection=entity_asset_keys(entity.name, ("staging", "canonical")),
                tags={"dataverse/change_set": key, "dataverse/trigger": "archive_sensor",
                      **priority_tags(config, [entity.name])},
            ))
        if not requests:
            return SkipReason("no new change sets in the archive")
        return SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[
                add_change_sets_request(group, sorted(keys, key=change_set_order))
                for group, keys in additions.items()
            ],
        )

    return _sensor


# -- the scheduled retry tier ---------------------------------------------------------------

def build_retry_sensors(config: EntitiesConfig) -> list[SensorDefinition]:
    configured = {e.name for e in config.entities}

    @run_failure_sensor(
        name="record_failed_change_sets",
        default_status=DefaultSensorStatus.STOPPED,
        description="Queues each failed entity change set for a scheduled retry, or "
                    "dead-letters it after the last attempt.",
    )
    def record_failures(context: RunFailureSensorContext, store: MirrorStore):
        change_set = context.dagster_run.tags.get("dagster/partition")
        if not is_change_set_key(change_set):
            # No partition, or a key typed by hand that is not a change-set key: the run
            # failed because of the key, and a retry of it would fail the same way.
            return
        errors: dict[str, str] = {}
        for event in context.get_step_failure_events():
            entity = entity_of_step(event.step_key or "")
            if entity in configured and entity not in errors:
                failure = event.step_failure_data
                errors[entity] = root_cause(failure.error if failure else None)
        with store.connection() as connection:
            for entity, error in errors.items():
                outcome = dead_letters.record_failure(connection, entity, change_set, error,
                                                      run_id=context.dagster_run.run_id)
                context.log.info(f"{entity} {change_set}: {outcome}")

    @sensor(
        name="retry_failed_change_sets",
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.STOPPED,
        asset_selection=[k for e in config.entities for k in entity_asset_keys(e.name)],
        description="Runs queued retries whose delay has passed (the scheduled retry tier).",
    )
    def retry_due(context: SensorEvaluationContext, store: MirrorStore):
        with store.connection() as connection:
            due = dead_letters.due_retries(connection)
        requests = [
            RunRequest(
                run_key=f"retry:{retry.entity}:{retry.change_set}:{retry.attempt}",
                partition_key=retry.change_set,
                asset_selection=entity_asset_keys(retry.entity),
                tags={"dataverse/change_set": retry.change_set, "dataverse/trigger": "retry",
                      "dataverse/retry_attempt": str(retry.attempt),
                      **priority_tags(config, [retry.entity])},
            )
            for retry in due
            if retry.entity in configured and is_change_set_key(retry.change_set)
        ][:MAX_RUNS_PER_TICK]
        return requests or SkipReason("no retries due")

    return [record_failures, retry_due]


def build_sensors(config: EntitiesConfig) -> list[SensorDefinition]:
    sensors = [build_change_sensor(config, group) for group in config.groups
               if config.entities_in_group(group)]
    return [*sensors, build_archive_sensor(config), *build_retry_sensors(config)]
