"""Keeping the mirror bounded: bookkeeping retention and giving freed space back to the file
system. The `maintenance` job runs these after archive compaction and retention (compaction.py)
on its schedule; `dataverse-assets compact` runs the same.

What grows with every change set, and what is kept (`maintenance` in the entities file):
- `_publish_plan` (what `plan show` lists): rows of change sets published longer ago than
  `publish_plan_days` (30) go; their counts stay in `_publish_state`.
- `_change_history`: rows older than `change_history_days` (90) go, never one the next scoped
  primary-key check still reads (`_key_check`).
- `_sync_log`: `sync_log_days` (30). Resolved issues: `resolved_issues_days` (30); open ones
  stay. Resolved or dropped dead letters: `closed_dead_letters_days` (90); open ones stay.
- `E__history`: everything, unless `history_days` is set.
- Kept for good, one small row per entity and change set: `_publish_state`, `_staged` (its
  staged rows are pruned by staging retention), `_schema_check`, `_schema_drift` rows.

Rows go in batches of BATCH_ROWS, one short transaction each, so a sync running meanwhile
waits a moment at most. The file shrinks by incremental vacuum (`shrink_database`).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dataverse_assets.config import EntitiesConfig
from dataverse_assets.store.backend import POSTGRES, dialect_of, is_postgres_address
from dataverse_assets.store.db import (
    connect,
    quote_identifier,
    table_exists,
    transaction,
    wait_for_checkpoint,
)
from dataverse_assets.store.staging_store import STAGING_SCHEMA, staging_path
from dataverse_assets.store.tables import history_table

BATCH_ROWS = 20_000
# Pages given back per transaction: 2,048 pages of 16 KB, 32 MB.
VACUUM_PAGES_PER_STEP = 2048
# How long the final checkpoint tries again while another one holds SQLite's checkpoint lock
# (this process's checkpoint thread, store/db.py, runs one after every commit).
CHECKPOINT_WAIT_SECONDS = 30.0


def _cutoff(now: datetime, days: float) -> str:
    return (now - timedelta(days=days)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _delete_in_batches(connection: sqlite3.Connection, table: str, condition: str,
                       params: tuple, *, dry_run: bool) -> int:
    """Delete the rows of `table` matching `condition`, BATCH_ROWS per transaction."""
    if not table_exists(connection, table):
        return 0
    quoted = quote_identifier(table)
    if dry_run:
        return connection.execute(f"SELECT count(*) FROM {quoted} WHERE {condition}",
                                  params).fetchone()[0]
    deleted = 0
    row_id = "ctid" if dialect_of(connection) is POSTGRES else "rowid"
    while True:
        with transaction(connection):
            count = connection.execute(
                f"DELETE FROM {quoted} WHERE {row_id} IN (SELECT {row_id} FROM {quoted}"
                f" WHERE {condition} LIMIT {BATCH_ROWS})", params).rowcount
        deleted += count
        if count < BATCH_ROWS:
            return deleted


def retain_bookkeeping(connection: sqlite3.Connection, config: EntitiesConfig,
                       now: datetime | None = None, *, dry_run: bool = False) -> dict[str, int]:
    """Delete what the retention settings no longer keep; returns rows deleted per table (or,
    with `dry_run`, the rows that would be)."""
    policy = config.maintenance
    now = now or datetime.now(UTC)
    deleted: dict[str, int] = {}

    def retain(table: str, days: float | None, condition: str, *params: object) -> None:
        if days is not None:
            deleted[table] = _delete_in_batches(
                connection, table, condition, (_cutoff(now, days), *params), dry_run=dry_run)

    # Plan rows of published change sets; a change set planned before `delete_unknown` was
    # counted keeps them (archive retention reads them to tell a no-op: compaction).
    retain("_publish_plan", policy.publish_plan_days,
           "EXISTS (SELECT 1 FROM _publish_state s WHERE s.entity = _publish_plan.entity"
           " AND s.change_set = _publish_plan.change_set AND s.status = 'COMPLETE'"
           " AND s.finished_at < ? AND s.delete_unknown IS NOT NULL)")
    # Rows past an entity's last primary-key check are that check's next input.
    retain("_change_history", policy.change_history_days,
           "applied_at < ? AND id <= coalesce((SELECT k.checked_through FROM _key_check k"
           " WHERE k.entity = _change_history.entity), 9223372036854775807)")
    retain("_sync_log", policy.sync_log_days, "coalesce(finished_at, started_at) < ?")
    retain("_issues", policy.resolved_issues_days,
           "resolved_at IS NOT NULL AND resolved_at < ?")
    retain("_dead_letter", policy.closed_dead_letters_days,
           "status IN ('resolved', 'dropped') AND updated_at < ?")
    if policy.history_days is not None:
        for entity in config.entities:
            retain(history_table(entity.name), policy.history_days, "valid_to < ?")
    return deleted


@dataclass
class Shrink:
    """What giving freed space back did: the mirror file's bytes (with its WAL) before and
    after, and its staging file's; or, for a PostgreSQL store (`vacuumed`), the database's
    bytes before and after its VACUUM (ANALYZE), and nothing else: there is no file, staging
    is a schema of the same database, and no page is counted."""

    bytes_before: int
    bytes_after: int
    pages_freed: int
    converted: bool = False  # an older database was switched to incremental vacuum (VACUUM)
    staging_bytes_before: int = 0
    staging_bytes_after: int = 0
    # Files whose WAL could not be checkpointed within CHECKPOINT_WAIT_SECONDS (another
    # connection kept checkpointing, or a reader kept an old snapshot): their freed pages
    # leave the file at the next checkpoint instead.
    not_truncated: tuple[str, ...] = ()
    # A PostgreSQL store: its tables were vacuumed (no pages, no file: sizes are the
    # database's).
    vacuumed: bool = False

    @property
    def bytes_freed(self) -> int:
        return (max(0, self.bytes_before - self.bytes_after)
                + max(0, self.staging_bytes_before - self.staging_bytes_after))

    def warnings(self) -> list[str]:
        """One line per file whose freed pages are still in it (not_truncated)."""
        return [f"{file}: its write-ahead log could not be checkpointed (other connections kept"
                " it busy); the freed pages leave the file at its next checkpoint"
                for file in self.not_truncated]

    def metadata(self) -> dict[str, int | bool | str]:
        """The numbers measured, each named for what it measured (the maintenance job's
        output metadata)."""
        if self.vacuumed:
            return {"vacuum": "VACUUM (ANALYZE)", "database_bytes_before": self.bytes_before,
                    "database_bytes_after": self.bytes_after, "bytes_freed": self.bytes_freed}
        return {"file_bytes_before": self.bytes_before, "file_bytes_after": self.bytes_after,
                "staging_file_bytes_before": self.staging_bytes_before,
                "staging_file_bytes_after": self.staging_bytes_after,
                "bytes_freed": self.bytes_freed, "pages_freed": self.pages_freed,
                "converted_to_incremental_vacuum": self.converted}


def _file_bytes(path: Path) -> int:
    """A database's bytes on disk: its file and its WAL."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal"))
               if p.exists())


def shrink_database(db_path: str | os.PathLike[str], *,
                    exclusive: Callable[[], ExitStack] | None = None) -> Shrink:
    """Give the free pages back to the file system, a step at a time (incremental vacuum),
    then truncate the WAL. A database made before incremental vacuum was on is converted
    once by a VACUUM, which rewrites the whole file: `exclusive()` should hold every entity's
    lock for it, so syncs wait for their lock rather than for the file.

    A PostgreSQL store has no file to shrink: its tables are vacuumed (the server's own
    autovacuum does the same in time), and the sizes are the database's
    (`pg_database_size`); nothing is converted, no page counted."""
    if is_postgres_address(db_path):
        return _vacuum_postgres(str(db_path))
    path = Path(db_path)
    staging = staging_path(path)
    wait_for_checkpoint(path)  # the WAL folded in first: sizes compare like with like
    wait_for_checkpoint(staging)
    before, staging_before = _file_bytes(path), _file_bytes(staging)
    converted = False
    freed = 0
    not_truncated: list[str] = []
    with closing(connect(path)) as connection:
        if connection.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: incremental
            with exclusive() if exclusive is not None else ExitStack():
                connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
                connection.execute("VACUUM")
            converted = True
        # The mirror file, then the staging file (made with incremental vacuum on).
        for schema in ("main", STAGING_SCHEMA):
            while (free := connection.execute(
                    f"PRAGMA {schema}.freelist_count").fetchone()[0]) > 0:
                # A script, not execute(): the pragma frees one page per step, and the sqlite3
                # module steps a statement without result rows only once.
                connection.executescript(
                    f"PRAGMA {schema}.incremental_vacuum({VACUUM_PAGES_PER_STEP});")
                freed += min(free, VACUUM_PAGES_PER_STEP)
            # The file shrinks when the WAL is checkpointed; TRUNCATE also empties the WAL.
            if not _checkpoint_truncate(connection, schema):
                not_truncated.append(str(path if schema == "main" else staging))
    return Shrink(before, _file_bytes(path), freed, converted, staging_before,
                  _file_bytes(staging), tuple(not_truncated))


def _checkpoint_truncate(connection: sqlite3.Connection, schema: str) -> bool:
    """Checkpoint the whole WAL of `schema` into its file and empty the WAL. SQLite answers
    "busy" at once, without its busy handler, while another connection checkpoints (the
    checkpoint thread does after every commit of a sync): try again until it is done, for
    CHECKPOINT_WAIT_SECONDS at most. False if it never was."""
    deadline = time.monotonic() + CHECKPOINT_WAIT_SECONDS
    while True:
        busy = connection.execute(f"PRAGMA {schema}.wal_checkpoint(TRUNCATE)").fetchone()[0]
        if not busy:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _vacuum_postgres(url: str) -> Shrink:
    with closing(connect(url)) as connection:
        size = "SELECT pg_database_size(current_database())"
        before = connection.execute(size).fetchone()[0]
        connection.execute("VACUUM (ANALYZE)")  # (autocommit: VACUUM cannot be in a transaction)
        after = connection.execute(size).fetchone()[0]
    return Shrink(before, after, 0, vacuumed=True)
