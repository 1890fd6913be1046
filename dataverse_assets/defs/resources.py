"""Persistence resources: the mirror store and the two IO managers.

- `ArchiveIOManager`: raw/E lives in the archive (pages are streamed there by the asset); the
  manager hands downstream steps a `RawChangeSet` pointing at it.
- `SQLiteIOManager`: staging/E rows are written into SQLite as they are produced; downstream
  steps get a `StagedChangeSet` handle, not the rows.
"""



from dagster import (
    ConfigurableResource,
)
from pydantic import Field

from dataverse_assets.store import locks
from dataverse_assets.store.mirror import MirrorAccess


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
