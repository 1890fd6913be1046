"""Where a mirror lives: its SQLite database and its raw archive, and the three ways a step
uses them (a connection, an entity's lock, a change set's archive folder).

`Mirror` is the plain handle the sync steps, rebuild and the command line take; Dagster's
`MirrorStore` resource (defs.resources) is the same thing configured from the UI, and shares
these methods (`MirrorAccess`), so a step runs the same under Dagster or without it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dataverse_assets.archive.change_sets import ChangeSetArchive
from dataverse_assets.archive.storage import ArchiveStorage, open_storage
from dataverse_assets.config import Settings
from dataverse_assets.store import locks
from dataverse_assets.store.db import connect, storage_errors


class MirrorAccess:
    """The methods of a mirror's handle. Whoever inherits them holds `db_path`, `archive_dir`
    (a folder or s3://bucket/prefix, with `s3_endpoint_url` and `s3_region`),
    `lock_wait_seconds` and `lock_stale_after_seconds` (a dataclass or a Dagster resource)."""

    db_path: str
    archive_dir: str
    s3_endpoint_url: str | None
    s3_region: str | None
    lock_wait_seconds: float
    lock_stale_after_seconds: float

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A connection to the mirror; a SQLite error in the block that means the file cannot
        be used (full, read-only, corrupt, locked) becomes a StorageError saying so."""
        connection = connect(self.db_path)
        try:
            with storage_errors(self.db_path, "writing the mirror",
                                "the write that failed rolled back: nothing of it was kept"):
                yield connection
        finally:
            connection.close()

    @contextmanager
    def entity_lock(self, entity: str, *, owner: str, purpose: str,
                    warn: Callable[[str], None] | None = None) -> Iterator[locks.LockHolder]:
        """Hold the entity's lock in the database for a step that writes it (see locks)."""
        with locks.entity_lock(self.db_path, entity, owner=owner, purpose=purpose,
                               wait_seconds=self.lock_wait_seconds,
                               stale_after_seconds=self.lock_stale_after_seconds,
                               warn=warn) as holder:
            yield holder

    def archive_storage(self) -> ArchiveStorage:
        """The archive (archive.storage): a folder, or objects on S3."""
        return open_storage(self.archive_dir, endpoint_url=self.s3_endpoint_url,
                            region=self.s3_region)

    def archive(self, entity: str, change_set: str) -> ChangeSetArchive:
        return ChangeSetArchive(self.archive_storage(), entity, change_set)


@dataclass(frozen=True)
class Mirror(MirrorAccess):
    """A mirror's database and archive, without Dagster."""

    db_path: str
    archive_dir: str
    lock_wait_seconds: float = locks.DEFAULT_WAIT_SECONDS
    lock_stale_after_seconds: float = locks.DEFAULT_STALE_AFTER_SECONDS
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    @classmethod
    def of(cls, settings: Settings, **overrides: object) -> Mirror:
        """The mirror and archive the settings name (DATAVERSE_STORE_URL or DATAVERSE_DB_PATH,
        DATAVERSE_ARCHIVE_URL or DATAVERSE_ARCHIVE_DIR, DATAVERSE_S3_*)."""
        values: dict = {"db_path": settings.store.address,
                        "archive_dir": settings.archive_location,
                        "lock_wait_seconds": settings.lock_wait_seconds,
                        "s3_endpoint_url": settings.s3_endpoint_url,
                        "s3_region": settings.s3_region}
        return cls(**{**values, **overrides})
