"""Persistence resources: the mirror store and the two IO managers.

- `ArchiveIOManager`: raw/E lives in the archive (pages are streamed there by the asset); the
  manager hands downstream steps a `RawChangeSet` pointing at it.
- `SQLiteIOManager`: staging/E rows are written into SQLite as they are produced; downstream
  steps get a `StagedChangeSet` handle, not the rows.
"""


from dataclasses import dataclass

from dagster import (
    ConfigurableIOManager,
    ConfigurableResource,
    InputContext,
    OutputContext,
)
from pydantic import Field

from dataverse_assets.names import check_change_set_key
from dataverse_assets.store import locks
from dataverse_assets.store.bookkeeping import StagedChangeSet, read_staged
from dataverse_assets.store.mirror import MirrorAccess
from dataverse_assets.sync.faults import fault_point
from dataverse_assets.sync.stage import StagedRecords, write_staged


class MirrorStore(ConfigurableResource, MirrorAccess):
    """Where the mirror lives: the SQLite database and the raw archive (store.mirror's methods:
    a connection, an entity's lock, a change set's archive)."""

    db_path: str
    archive_dir: str
    lock_wait_seconds: float = Field(
        locks.DEFAULT_WAIT_SECONDS, ge=0,
        description="How long a step waits for another run's lock on the same entity.")
    lock_stale_after_seconds: float = Field(
        locks.DEFAULT_STALE_AFTER_SECONDS, gt=0,
        description="A lock older than this is taken over (a dead process's is at once).")


@dataclass(frozen=True)
class RawChangeSet:
    entity: str
    change_set: str
    path: str


def _entity_and_partition(context: OutputContext | InputContext) -> tuple[str, str]:
    key = context.asset_key.path
    return key[-1], check_change_set_key(context.asset_partition_key)


class ArchiveIOManager(ConfigurableIOManager):
    """raw/E: the archived change set is the asset's value."""

    store: MirrorStore

    def handle_output(self, context: OutputContext, obj: RawChangeSet) -> None:
        archive = self.store.archive(obj.entity, obj.change_set)
        archive.manifest()  # raises with a clear message if the fetch did not complete

    def load_input(self, context: InputContext) -> RawChangeSet:
        entity, change_set = _entity_and_partition(context)
        archive = self.store.archive(entity, change_set)
        archive.manifest()
        return RawChangeSet(entity, change_set, str(archive.path))


class SQLiteIOManager(ConfigurableIOManager):
    """staging/E: rows go into `_staging__E` (one transaction per change set)."""

    store: MirrorStore

    def handle_output(self, context: OutputContext, obj: StagedRecords) -> None:
        with self.store.entity_lock(obj.entity, owner=context.run_id, purpose="staging",
                                    warn=context.log.warning if context.log else None), \
                self.store.connection() as connection:
            rows = write_staged(connection, obj)
        fault_point("staging.after_write")  # staged, not yet published
        context.add_output_metadata({"rows_written": rows})

    def load_input(self, context: InputContext) -> StagedChangeSet:
        entity, change_set = _entity_and_partition(context)
        with self.store.connection() as connection:
            return read_staged(connection, entity, change_set)
