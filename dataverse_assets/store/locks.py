"""Per-entity locks in the mirror database: two runs never write one entity at the same time.

A lock is a row of `_locks` (entity, owner run, pid, host, what it is doing, since when), taken
in a short `BEGIN IMMEDIATE` transaction and deleted when the step ends, whatever happens.
Another run that wants the entity waits (polling) up to `wait_seconds`, then fails with
`EntityLockedError` naming the holder. A lock whose process is gone (its pid is not alive on
this host, as after a SIGKILL), or one held from another host for longer than
`stale_after_seconds`, is taken over with a warning, so a killed sync never wedges the mirror.

The database is the lock's home because it is the one thing every run of the mirror shares,
whatever runs it (the CLI, `dagster dev`, a multiprocess executor, another orchestrator).

In PostgreSQL the lock itself is a session-level advisory lock on the connection this holds
for the block: the server releases it when that session ends (the process killed, the
machine gone), on any host, so no pid or age decides a takeover there. The `_locks` row is
still written, so whoever waits (and `status`) can name the holder; a row whose advisory lock
is free is a dead holder's and is overwritten, with the same warning.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dataverse_assets.errors import EntityLockedError
from dataverse_assets.store.backend import (
    ENTITY_LOCK_NAMESPACE,
    POSTGRES,
    dialect_of,
    entity_lock_key,
)
from dataverse_assets.store.db import connect, storage_errors, transaction, utc_now_iso

DEFAULT_WAIT_SECONDS = 600.0
DEFAULT_STALE_AFTER_SECONDS = 6 * 3600.0
_POLL_SECONDS = 0.1

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LockHolder:
    entity: str
    owner: str
    pid: int
    host: str
    purpose: str
    acquired_at: str

    def describe(self) -> str:
        return (f"run {self.owner} (pid {self.pid} on {self.host}, {self.purpose} since "
                f"{self.acquired_at})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    try:  # a killed child not yet reaped by its parent is a zombie: as good as gone
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _age_seconds(acquired_at: str) -> float:
    then = datetime.strptime(acquired_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return (datetime.now(UTC) - then).total_seconds()


def stale_reason(holder: LockHolder, stale_after_seconds: float) -> str | None:
    """Why a lock no longer protects anything, or None while its holder may still be at work."""
    if holder.host == socket.gethostname():
        # On this host the process itself says: a live one is still at work, however long
        # its first sync of a large table takes.
        return None if _pid_alive(holder.pid) else f"its process {holder.pid} is gone"
    # Another host's process cannot be asked: only age can tell.
    age = _age_seconds(holder.acquired_at)
    if age > stale_after_seconds:
        return f"it is {age:,.0f} s old (stale after {stale_after_seconds:,.0f} s)"
    return None


def is_held(connection: sqlite3.Connection, entity: str,
            stale_after_seconds: float = DEFAULT_STALE_AFTER_SECONDS) -> bool:
    """Whether a live run holds the entity's lock (a step of it is working on the entity)."""
    if dialect_of(connection) is POSTGRES:
        return connection.execute(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2"
            " AND classid::bigint = ? AND objid::bigint = ? AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())",
            (ENTITY_LOCK_NAMESPACE, entity_lock_key(entity) & 0xFFFFFFFF)).fetchone() is not None
    holder = read_lock(connection, entity)
    return holder is not None and stale_reason(holder, stale_after_seconds) is None


def read_lock(connection: sqlite3.Connection, entity: str) -> LockHolder | None:
    row = connection.execute(
        "SELECT entity, owner, pid, host, purpose, acquired_at FROM _locks WHERE entity = ?",
        (entity,)).fetchone()
    return LockHolder(*row) if row else None


def _try_acquire(connection: sqlite3.Connection, me: LockHolder, stale_after_seconds: float,
                 warn: Callable[[str], None]) -> LockHolder | None:
    """Take the lock (returns None) or return its live holder."""
    with transaction(connection):
        holder = read_lock(connection, me.entity)
        if holder is not None:
            reason = stale_reason(holder, stale_after_seconds)
            if reason is None:
                return holder
            warn(f"{me.entity}: taking over the lock of {holder.describe()}: {reason}")
        connection.execute(
            "INSERT OR REPLACE INTO _locks (entity, owner, pid, host, purpose, acquired_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (me.entity, me.owner, me.pid, me.host, me.purpose, me.acquired_at))
    return None


def _try_acquire_postgres(connection, me: LockHolder, stale_after_seconds: float,
                          warn: Callable[[str], None]) -> LockHolder | None:
    """Take the entity's advisory lock for this session (returns None) or return its holder."""
    if not connection.execute("SELECT pg_try_advisory_lock(?::integer, ?::integer)",
                              (ENTITY_LOCK_NAMESPACE, entity_lock_key(me.entity))).fetchone()[0]:
        # Its row is written just after the lock is taken (or the key is another entity's).
        return read_lock(connection, me.entity) or LockHolder(
            me.entity, "unknown", 0, "unknown", "a step", "just now")
    try:
        with transaction(connection):
            holder = read_lock(connection, me.entity)
            if holder is not None:  # its session ended without deleting it
                warn(f"{me.entity}: taking over the lock of {holder.describe()}: its database "
                     "session ended")
            connection.execute(
                "INSERT INTO _locks (entity, owner, pid, host, purpose, acquired_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (entity) DO UPDATE SET"
                " owner = excluded.owner, pid = excluded.pid, host = excluded.host,"
                " purpose = excluded.purpose, acquired_at = excluded.acquired_at",
                (me.entity, me.owner, me.pid, me.host, me.purpose, me.acquired_at))
    except BaseException:
        _release_postgres(connection, me.entity)
        raise
    return None


def _release_postgres(connection, entity: str) -> None:
    connection.execute("SELECT pg_advisory_unlock(?::integer, ?::integer)",
                       (ENTITY_LOCK_NAMESPACE, entity_lock_key(entity)))


@contextmanager
def entity_lock(db_path: str | Path, entity: str, *, owner: str, purpose: str,
                wait_seconds: float = DEFAULT_WAIT_SECONDS,
                stale_after_seconds: float = DEFAULT_STALE_AFTER_SECONDS,
                warn: Callable[[str], None] | None = None) -> Iterator[LockHolder]:
    """Hold the entity's lock for the block; wait up to `wait_seconds` for another holder."""
    warn = warn or logger.warning
    connection = connect(db_path)
    postgres = dialect_of(connection) is POSTGRES
    try_acquire = _try_acquire_postgres if postgres else _try_acquire
    try:
        deadline = time.monotonic() + wait_seconds
        waited_for: LockHolder | None = None
        while True:
            me = LockHolder(entity, owner, os.getpid(), socket.gethostname(), purpose,
                            utc_now_iso())
            with storage_errors(db_path, f"taking the lock of {entity} for its {purpose}"):
                holder = try_acquire(connection, me, stale_after_seconds, warn)
            if holder is None:
                break
            if waited_for is None:
                waited_for = holder
                warn(f"{entity}: waiting up to {wait_seconds:g} s for the lock held by "
                     f"{holder.describe()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EntityLockedError(
                    f"{entity} is locked by {holder.describe()}; gave up after waiting "
                    f"{wait_seconds:g} s (DATAVERSE_LOCK_WAIT_SECONDS). Another sync of this "
                    "entity is running: let it finish. A lock whose process is gone is taken "
                    "over automatically."
                )
            time.sleep(min(_POLL_SECONDS, remaining))
        try:
            yield me
        finally:
            try:
                with storage_errors(db_path, f"releasing the lock of {entity}",
                                    "the lock stays until this process has ended; the next "
                                    "run then takes it over"), transaction(connection):
                    connection.execute(
                        "DELETE FROM _locks WHERE entity = ? AND owner = ? AND pid = ?",
                        (entity, me.owner, me.pid))
                if postgres:
                    _release_postgres(connection, entity)  # (closing the session would too)
            except Exception:
                if not (postgres and connection.closed):
                    raise
                # The server ended the session (stopped, restarted, the network cut): the
                # advisory lock went with it, and the next holder overwrites the `_locks`
                # row. Failing here would only hide the error the step itself met.
                warn(f"{entity}: the database session holding its lock ended during the "
                     f"{purpose}; the server released the lock then")
    finally:
        connection.close()


def every_entity_lock(db_path: str | Path, entities: list[str], *, owner: str, purpose: str,
                      wait_seconds: float = DEFAULT_WAIT_SECONDS,
                      warn: Callable[[str], None] | None = None) -> ExitStack:
    """Every entity's lock, taken in name order (a sync holds one at a time, so this never
    deadlocks with one): for work that rewrites the whole database file. Close the stack to
    release them."""
    stack = ExitStack()
    try:
        for entity in sorted(entities):
            stack.enter_context(entity_lock(db_path, entity, owner=owner, purpose=purpose,
                                            wait_seconds=wait_seconds, warn=warn))
    except BaseException:
        stack.close()
        raise
    return stack
