"""The store resource: where the mirror lives, as Dagster injects it into assets, sensors and
IO managers (io_managers.py persists each layer through it)."""

from dagster import Config, ConfigurableResource
from pydantic import Field

from dataverse_assets.store import locks
from dataverse_assets.store.mirror import MirrorAccess


class MirrorLocation(Config, MirrorAccess):
    """Where the mirror lives: the SQLite database and the raw archive (store.mirror's methods:
    a connection, an entity's lock, a change set's archive)."""

    db_path: str
    archive_dir: str = Field(description="The archive: a folder or s3://bucket/prefix.")
    s3_endpoint_url: str | None = Field(
        None, description="The S3 endpoint of a store other than AWS (DATAVERSE_S3_ENDPOINT_URL).")
    s3_region: str | None = Field(None, description="The bucket's region (DATAVERSE_S3_REGION).")
    lock_wait_seconds: float = Field(
        locks.DEFAULT_WAIT_SECONDS, ge=0,
        description="How long a step waits for another run's lock on the same entity.")
    lock_stale_after_seconds: float = Field(
        locks.DEFAULT_STALE_AFTER_SECONDS, gt=0,
        description="A lock older than this is taken over (a dead process's is at once).")


class MirrorStore(ConfigurableResource, MirrorLocation):
    """The mirror's location as the `store` resource of assets, checks and sensors."""

    def location(self) -> MirrorLocation:
        """The same location as plain config, for the IO managers (see io_managers)."""
        return MirrorLocation(**{name: getattr(self, name)
                                 for name in MirrorLocation.model_fields})
