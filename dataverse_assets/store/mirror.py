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
from pathlib import Path

from dataverse_assets.archive.change_sets import ChangeSetArchive
from dataverse_assets.store import locks
from dataverse_assets.store.db import connect, storage_errors


class MirrorAccess:
    """The methods of a mirror's handle. Whoever inherits them holds `db_path`, `archive_dir`,
    `lock_wait_seconds` and `lock_stale_after_seconds` (a dataclass or a Dagster resource)."""

    db_path: str
    archive_dir: str
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

    def archive(self, entity: str, change_set: str) -> ChangeSetArchive:
        return ChangeSetArchive(Path(self.archive_dir), entity, change_set)


@dataclass(frozen=True)
class Mirror(MirrorAccess):
    """A mirror's database and archive, without Dagster."""

    db_path: str
    archive_dir: str
    lock_wait_seconds: float = locks.DEFAULT_WAIT_SECONDS
    lock_stale_after_seconds: float = locks.DEFAULT_STALE_AFTER_SECONDS
