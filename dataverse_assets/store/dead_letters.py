"""Retry tiers past the run, and the dead-letter table.

Tier 1 (immediate) and tier 2 (exponential backoff) live inside a run: the client's retry
policy. Tier 3 is here: a failed entity change set is retried on later sensor ticks after a
growing delay; after the last attempt it becomes a dead letter, with its reason, diagnostics
and retry history, which `dataverse-assets dlq` lists, shows, requeues or drops.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from dataverse_assets.store.backend import POSTGRES, dialect_of
from dataverse_assets.store.bookkeeping import read_publish_state, read_sync_state
from dataverse_assets.store.db import table_exists, transaction, utc_now_iso

# Delays before scheduled retries 1, 2, 3; then the change set is dead-lettered.
SCHEDULED_RETRY_DELAYS = (timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=2))

DDL = """
CREATE TABLE IF NOT EXISTS _retry_queue (
    entity TEXT NOT NULL,
    change_set TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at TEXT NOT NULL,
    last_error TEXT,
    history TEXT NOT NULL,
    PRIMARY KEY (entity, change_set)
);
CREATE TABLE IF NOT EXISTS _dead_letter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    entity TEXT NOT NULL,
    change_set TEXT NOT NULL,
    reason TEXT NOT NULL,
    diagnostics TEXT NOT NULL,
    retry_history TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ensure_tables(connection: sqlite3.Connection) -> None:
    if dialect_of(connection) is not POSTGRES:
        connection.executescript(DDL)
    elif not (table_exists(connection, "_retry_queue") and table_exists(connection,
                                                                         "_dead_letter")):
        # (Two sessions creating one table at once: one fails. One writer at a time does it.)
        with transaction(connection):
            connection.executescript(POSTGRES.render_ddl(DDL))


@dataclass(frozen=True)
class DueRetry:
    entity: str
    change_set: str
    attempt: int


def record_failure(connection: sqlite3.Connection, entity: str, change_set: str, error: str,
                   *, run_id: str | None = None, now: datetime | None = None,
                   delays: tuple[timedelta, ...] = SCHEDULED_RETRY_DELAYS) -> str:
    """A run failed for this entity and change set: schedule the next retry, or dead-letter it.

    Returns "scheduled" or "dead_letter".
    """
    moment = _now(now)
    ensure_tables(connection)
    with transaction(connection):
        row = connection.execute(
            "SELECT attempts, history FROM _retry_queue WHERE entity = ? AND change_set = ?",
            (entity, change_set)).fetchone()
        attempts = row[0] if row else 0
        history = orjson.loads(row[1]) if row else []
        history.append({"at": _iso(moment), "error": error[:2000], "run_id": run_id,
                        "attempt": attempts})
        if attempts >= len(delays):
            diagnostics = _diagnostics(connection, entity, change_set)
            connection.execute(
                "INSERT INTO _dead_letter (entity, change_set, reason, diagnostics,"
                " retry_history, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 'open', ?, ?)",
                (entity, change_set, error[:2000], orjson.dumps(diagnostics).decode(),
                 orjson.dumps(history).decode(), _iso(moment), _iso(moment)),
            )
            connection.execute("DELETE FROM _retry_queue WHERE entity = ? AND change_set = ?",
                               (entity, change_set))
            return "dead_letter"
        connection.execute(
            "INSERT INTO _retry_queue (entity, change_set, attempts, next_attempt_at,"
            " last_error, history) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity, change_set)"
            " DO UPDATE SET attempts = excluded.attempts,"
            " next_attempt_at = excluded.next_attempt_at, last_error = excluded.last_error,"
            " history = excluded.history",
            (entity, change_set, attempts + 1, _iso(moment + delays[attempts]), error[:2000],
             orjson.dumps(history).decode()),
        )
        return "scheduled"


def _diagnostics(connection: sqlite3.Connection, entity: str, change_set: str) -> dict:
    publish = read_publish_state(connection, entity, change_set)
    state = read_sync_state(connection, entity)
    return {"publish_state": {k: publish[k] for k in ("status", "failed_operation",
                                                      "error_code", "error", "retry_count")}
            if publish else None,
            "sync_state": {"mode": state.mode, "watermark": state.watermark,
                           "status": state.status} if state else None}


def due_retries(connection: sqlite3.Connection, now: datetime | None = None) -> list[DueRetry]:
    """Retries whose delay has passed, oldest change set first."""
    ensure_tables(connection)
    return [DueRetry(*row) for row in connection.execute(
        "SELECT entity, change_set, attempts FROM _retry_queue WHERE next_attempt_at <= ?"
        " ORDER BY change_set, entity", (_iso(_now(now)),))]


def mark_succeeded(connection: sqlite3.Connection, entity: str, change_set: str) -> None:
    """The change set was published: it leaves the retry queue (and any open dead letter)."""
    ensure_tables(connection)
    with transaction(connection):
        connection.execute("DELETE FROM _retry_queue WHERE entity = ? AND change_set = ?",
                           (entity, change_set))
        connection.execute(
            "UPDATE _dead_letter SET status = 'resolved', updated_at = ? WHERE entity = ?"
            " AND change_set = ? AND status IN ('open', 'requeued')",
            (utc_now_iso(), entity, change_set))


def list_dead_letters(connection: sqlite3.Connection, *,
                      include_closed: bool = False) -> list[dict]:
    ensure_tables(connection)
    where = "" if include_closed else " WHERE status IN ('open', 'requeued')"
    cursor = connection.execute(
        "SELECT id, entity, change_set, status, reason, created_at, updated_at FROM _dead_letter"
        + where + " ORDER BY id")
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def get_dead_letter(connection: sqlite3.Connection, letter_id: int) -> dict:
    ensure_tables(connection)
    cursor = connection.execute("SELECT * FROM _dead_letter WHERE id = ?", (letter_id,))
    row = cursor.fetchone()
    if row is None:
        raise LookupError(f"no dead letter with id {letter_id}")
    letter = dict(zip([d[0] for d in cursor.description], row, strict=True))
    letter["diagnostics"] = orjson.loads(letter["diagnostics"])
    letter["retry_history"] = orjson.loads(letter["retry_history"])
    return letter


def set_dead_letter_status(connection: sqlite3.Connection, letter_id: int, status: str) -> dict:
    letter = get_dead_letter(connection, letter_id)
    with transaction(connection):
        connection.execute("UPDATE _dead_letter SET status = ?, updated_at = ? WHERE id = ?",
                           (status, utc_now_iso(), letter_id))
    return letter
