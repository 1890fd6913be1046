"""The state of every sync and publish: every query of `_sync_state`, `_publish_state`,
`_staged` and `_sync_log` lives here."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime

import orjson

from dataverse_assets.errors import NotStagedError, StagingPrunedError
from dataverse_assets.modes import (
    PUBLISHING_STATUSES,
    PublishStatus,
)
from dataverse_assets.store.backend import dialect_of
from dataverse_assets.store.db import table_exists, transaction, utc_now_iso


@dataclass(frozen=True)
class SyncState:
    entity: str
    mode: str | None
    watermark: str | None
    delta_token: str | None
    status: str
    last_change_set: str | None
    reconciled_at: str | None


def read_sync_state(connection: sqlite3.Connection, entity: str) -> SyncState | None:
    row = connection.execute(
        "SELECT entity, mode, watermark, delta_token, status, last_change_set, reconciled_at "
        "FROM _sync_state WHERE entity = ?",
        (entity,),
    ).fetchone()
    return SyncState(*row) if row else None


def write_sync_state(
    connection: sqlite3.Connection,
    entity: str,
    *,
    mode: str | None,
    watermark: str | None,
    delta_token: str | None,
    status: str,
    change_set: str,
    reconciled_at: str | None = None,
) -> None:
    """Advance an entity's state (reconciled_at only moves when given)."""
    connection.execute(
        "INSERT INTO _sync_state (entity, mode, watermark, delta_token, status, last_change_set,"
        " reconciled_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(entity) DO"
        " UPDATE SET mode=excluded.mode, watermark=excluded.watermark,"
        " delta_token=excluded.delta_token, status=excluded.status,"
        " last_change_set=excluded.last_change_set,"
        " reconciled_at=COALESCE(excluded.reconciled_at, _sync_state.reconciled_at),"
        " updated_at=excluded.updated_at",
        (entity, mode, watermark, delta_token, status, change_set, reconciled_at,
         utc_now_iso()),
    )


def mark_sync_status(connection: sqlite3.Connection, entity: str, status: str) -> None:
    """Set only the status, creating the row if this entity was never synced."""
    connection.execute(
        "INSERT INTO _sync_state (entity, status, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT(entity) DO UPDATE SET status=excluded.status, updated_at=excluded.updated_at",
        (entity, status, utc_now_iso()),
    )


def log_step(
    connection: sqlite3.Connection,
    *,
    entity: str,
    change_set: str,
    layer: str,
    status: str,
    started_at: str,
    seconds: float,
    details: str,
) -> None:
    connection.execute(
        "INSERT INTO _sync_log (entity, change_set, layer, status, started_at, finished_at,"
        " seconds, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (entity, change_set, layer, status, started_at, utc_now_iso(), seconds, details),
    )


def latest_publish_state(connection: sqlite3.Connection, entity: str,
                         status: str | None = None) -> dict | None:
    """The `_publish_state` row of the entity's newest change set (of one status), newest by
    the time its key encodes; rows an older version stored under a key that is not a
    change-set key (any partition key was taken then) are never the newest."""
    dialect = dialect_of(connection)
    cursor = connection.execute(
        f"SELECT * FROM _publish_state WHERE entity = ? AND change_set {dialect.key_match} ?"
        + (" AND status = ?" if status else "") + " ORDER BY change_set DESC LIMIT 1",
        (entity, dialect.key_pattern, status) if status else (entity, dialect.key_pattern))
    row = cursor.fetchone()
    return dict(zip([d[0] for d in cursor.description], row, strict=True)) if row else None


INTERRUPTED = ("interrupted: the publish stopped without recording why (its process ended, or "
               "the database refused the failure record); it is planned again from the start")


def record_interrupted_publishes(connection: sqlite3.Connection, entity: str) -> list[str]:
    """Publishes of the entity still marked as under way, recorded FAILED (interrupted).

    Call only while no publish of the entity can be running (holding its lock): a state left
    PLANNING or EXECUTING is then a run that stopped without recording its failure (killed,
    or the disk refused the FAILED record). Returns their change sets."""
    statuses = ", ".join("?" * len(PUBLISHING_STATUSES))
    keys = [row[0] for row in connection.execute(
        f"SELECT change_set FROM _publish_state WHERE entity = ? AND status IN ({statuses})",
        (entity, *PUBLISHING_STATUSES))]
    if not keys:
        return keys  # the usual case: no write at all
    with transaction(connection):
        for key in keys:
            connection.execute(
                "UPDATE _publish_state SET status = 'FAILED', failed_operation = 'interrupted',"
                " error_code = 'interrupted', error = ?, finished_at = ?,"
                " retry_count = retry_count + 1 WHERE entity = ? AND change_set = ?",
                (INTERRUPTED, utc_now_iso(), entity, key))
    return keys


def set_publish_state(connection: sqlite3.Connection, entity: str, change_set: str,
                      status: str, **fields: object) -> None:
    """Upsert one change set's publish state; only the given fields change."""
    columns = ["status", *fields]
    values = [status, *fields.values()]
    assignments = ", ".join(f"{c} = excluded.{c}" for c in columns)
    connection.execute(
        f"INSERT INTO _publish_state (entity, change_set, {', '.join(columns)})"
        f" VALUES (?, ?, {', '.join('?' for _ in columns)})"
        f" ON CONFLICT(entity, change_set) DO UPDATE SET {assignments}",
        (entity, change_set, *values),
    )


def publish_status(connection: sqlite3.Connection, entity: str, change_set: str) -> str | None:
    row = connection.execute(
        "SELECT status FROM _publish_state WHERE entity = ? AND change_set = ?",
        (entity, change_set),
    ).fetchone()
    return row[0] if row else None


def is_bulk_create(connection: sqlite3.Connection, entity: str, change_set: str) -> bool:
    row = connection.execute(
        "SELECT bulk_create FROM _publish_state WHERE entity = ? AND change_set = ?",
        (entity, change_set)).fetchone()
    return bool(row and row[0])


def record_publish_failure(connection: sqlite3.Connection, entity: str, change_set: str,
                           operation: str, exc: BaseException) -> None:
    """FAILED, with the operation that failed, the error and one more retry counted; the
    entity's sync state says failed. `exc` may be a run being stopped (not an Exception)."""
    error = f"{type(exc).__name__}: {exc}" if str(exc) else (
        f"{type(exc).__name__}: the run was stopped" if not isinstance(exc, Exception)
        else type(exc).__name__)
    with transaction(connection):
        retries = connection.execute(
            "SELECT retry_count FROM _publish_state WHERE entity = ? AND change_set = ?",
            (entity, change_set)).fetchone()
        set_publish_state(
            connection, entity, change_set, PublishStatus.FAILED, failed_operation=operation,
            error_code=getattr(exc, "code", None) or type(exc).__name__,
            error=error, finished_at=utc_now_iso(),
            retry_count=(retries[0] or 0) + 1 if retries else 1,
        )
        connection.execute(
            "UPDATE _sync_state SET status = 'failed', updated_at = ? WHERE entity = ?",
            (utc_now_iso(), entity),
        )


def read_publish_state(connection: sqlite3.Connection, entity: str, change_set: str) -> dict:
    """The `_publish_state` row of a change set as a dict (empty if none)."""
    cursor = connection.execute(
        "SELECT * FROM _publish_state WHERE entity = ? AND change_set = ?", (entity, change_set))
    row = cursor.fetchone()
    return dict(zip([d[0] for d in cursor.description], row, strict=True)) if row else {}


def pruned_at(connection: sqlite3.Connection, entity: str, change_set: str) -> str | None:
    """When staging retention deleted this change set's staged rows, or None."""
    row = connection.execute(
        "SELECT pruned_at FROM _staged WHERE entity = ? AND change_set = ?",
        (entity, change_set)).fetchone()
    return row[0] if row is not None else None


def refuse_if_pruned(connection: sqlite3.Connection, entity: str, change_set: str,
                     purpose: str) -> None:
    """Raise StagingPrunedError (saying what to do) when the staged rows are gone."""
    when = pruned_at(connection, entity, change_set)
    if when is not None:
        raise StagingPrunedError(
            f"{entity}: the staged rows of change set {change_set} were deleted by staging "
            f"retention (`dataverse-assets compact`, at {when}), and {purpose} needs them. "
            f"Materialize staging/{entity} for partition {change_set} to stage it again from "
            "the archive, then retry.")


# -- which change sets are where -------------------------------------------------------------

def complete_change_sets(connection: sqlite3.Connection, entity: str) -> set[str]:
    """The entity's published change sets."""
    return {row[0] for row in connection.execute(
        "SELECT change_set FROM _publish_state WHERE entity = ? AND status = ?",
        (entity, PublishStatus.COMPLETE))}


def every_complete_change_set(connection: sqlite3.Connection) -> set[tuple[str, str]]:
    """(entity, change set) of every published change set."""
    return {(row[0], row[1]) for row in connection.execute(
        "SELECT entity, change_set FROM _publish_state WHERE status = ?",
        (PublishStatus.COMPLETE,))}


def change_sets_that_wrote(connection: sqlite3.Connection, entity: str) -> set[str]:
    """Change sets whose publish changed something (a create, update, delete or stale row, or a
    delete of a record never mirrored), from their counts. A database from before
    `delete_unknown` was counted (NULL) still has those change sets' plan rows, read here."""
    wrote = {row[0] for row in connection.execute(
        "SELECT change_set FROM _publish_state WHERE entity = ? AND (created + updated"
        " + deleted + stale + coalesce(delete_unknown, 0) > 0)", (entity,))}
    if table_exists(connection, "_publish_plan"):
        wrote |= {row[0] for row in connection.execute(
            "SELECT DISTINCT p.change_set FROM _publish_plan p JOIN _publish_state s"
            " ON s.entity = p.entity AND s.change_set = p.change_set"
            " WHERE p.entity = ? AND s.delete_unknown IS NULL", (entity,))}
    return wrote


def last_complete_publish(connection: sqlite3.Connection, entity: str) -> datetime | None:
    """When the entity's latest publish finished."""
    row = connection.execute(
        "SELECT max(finished_at) FROM _publish_state WHERE entity = ? AND status = ?",
        (entity, PublishStatus.COMPLETE)).fetchone()
    return datetime.fromisoformat(row[0]) if row and row[0] else None


def publish_history(connection: sqlite3.Connection, entity: str, limit: int) -> list[tuple]:
    """The entity's newest `limit` change sets' publish records, newest first: change set,
    status, source timestamp, finished at, created, updated, deleted, seconds, retries."""
    dialect = dialect_of(connection)
    return connection.execute(
        "SELECT change_set, status, source_timestamp, finished_at, created, updated,"
        f" deleted, seconds, retry_count FROM _publish_state WHERE entity = ?"
        f" AND change_set {dialect.key_match} ? ORDER BY change_set DESC LIMIT ?",
        (entity, dialect.key_pattern, limit)).fetchall()


def change_set_used(connection: sqlite3.Connection, change_set: str,
                    entities: list[str]) -> bool:
    """Whether any of the entities has a publish record of this change set."""
    return connection.execute(
        "SELECT 1 FROM _publish_state WHERE change_set = ? AND entity IN"
        f" ({', '.join('?' * len(entities))}) LIMIT 1",
        (change_set, *entities)).fetchone() is not None


# -- staged change sets ------------------------------------------------------------------------

@dataclass(frozen=True)
class StagedChangeSet:
    """A staged change set ready to publish (`_staged`; the value of staging/E downstream)."""

    entity: str
    change_set: str
    mode: str
    rows: int
    watermark_after: str | None
    delta_token_after: str | None
    reconciled: bool
    reconciled_at: str | None
    fetched_at: str | None


def read_staged(connection: sqlite3.Connection, entity: str, change_set: str) -> StagedChangeSet:
    row = connection.execute(
        "SELECT mode, rows, watermark_after, delta_token_after, reconciled, reconciled_at,"
        " fetched_at FROM _staged"
        " WHERE entity = ? AND change_set = ?",
        (entity, change_set),
    ).fetchone()
    if row is None:
        raise NotStagedError(
            f"{entity}: change set {change_set} is not staged; materialize staging/{entity} "
            "for this partition first"
        )
    return StagedChangeSet(entity, change_set, row[0], row[1], row[2], row[3], bool(row[4]),
                           row[5], row[6])


def staged_row(connection: sqlite3.Connection, entity: str, change_set: str) -> dict | None:
    """The `_staged` row of a change set as a dict (None if it was never staged)."""
    cursor = connection.execute(
        "SELECT * FROM _staged WHERE entity = ? AND change_set = ?", (entity, change_set))
    row = cursor.fetchone()
    return dict(zip([d[0] for d in cursor.description], row, strict=True)) if row else None


def staged_change_sets(connection: sqlite3.Connection, entity: str) -> set[str]:
    return {row[0] for row in connection.execute(
        "SELECT change_set FROM _staged WHERE entity = ?", (entity,))}


def staged_with_status(connection: sqlite3.Connection, entity: str) -> list[tuple]:
    """(change set, rows, pruned at, publish status) of each staged change set."""
    return connection.execute(
        "SELECT s.change_set, s.rows, s.pruned_at, p.status FROM _staged s"
        " LEFT JOIN _publish_state p ON p.entity = s.entity AND p.change_set = s.change_set"
        " WHERE s.entity = ?", (entity,)).fetchall()


_STAGED_COLUMNS = ("entity", "change_set", "mode", "rows", "upserts", "watermark_after",
                   "delta_token_after", "reconciled", "reconciled_at", "fetched_at", "staged_at",
                   "reconcile_scanned", "reconcile_missing", "reconcile_stale", "pruned_at")


def record_staged(connection: sqlite3.Connection, *, entity: str, change_set: str, mode: str,
                  rows: int, upserts: int, watermark_after: str | None,
                  delta_token_after: str | None, reconciled: bool,
                  reconciled_at: str | None, fetched_at: str | None,
                  source_timestamp: str | None, divergence: dict[str, int]) -> None:
    """The marker that a change set is fully staged (publishing refuses without it), and its
    publish PENDING; a change set already COMPLETE stays so (its archive, and so its staged
    rows, cannot have changed). Inside the caller's transaction."""
    now = utc_now_iso()
    connection.execute(
        dialect_of(connection).upsert("_staged", _STAGED_COLUMNS, ("entity", "change_set")),
        (entity, change_set, mode, rows, upserts, watermark_after, delta_token_after,
         int(reconciled), reconciled_at, fetched_at, now, divergence.get("scanned"),
         divergence.get("missing"), divergence.get("stale"), None),
    )
    connection.execute(
        "INSERT INTO _publish_state (entity, change_set, status, staged_at, source_timestamp)"
        " VALUES (:entity, :cs, :pending, :now, :source) ON CONFLICT(entity, change_set) DO"
        " UPDATE SET status = CASE WHEN _publish_state.status = :complete"
        " THEN _publish_state.status ELSE :pending END,"
        " staged_at = excluded.staged_at, source_timestamp = excluded.source_timestamp",
        {"entity": entity, "cs": change_set, "pending": PublishStatus.PENDING, "now": now,
         "source": source_timestamp, "complete": PublishStatus.COMPLETE},
    )


def mark_pruned(connection: sqlite3.Connection, entity: str, change_set: str) -> None:
    """Staging retention deleted the change set's staged rows (inside its transaction)."""
    connection.execute(
        "UPDATE _staged SET pruned_at = ? WHERE entity = ? AND change_set = ?",
        (utc_now_iso(), entity, change_set))


# -- the step log ------------------------------------------------------------------------------

def step_details(connection: sqlite3.Connection, entity: str, change_set: str,
                 layer: str) -> dict:
    """What the latest `layer` step of a change set logged (its summary), {} if none."""
    row = connection.execute(
        "SELECT details FROM _sync_log WHERE entity = ? AND change_set = ? AND layer = ?"
        " ORDER BY id DESC LIMIT 1", (entity, change_set, layer)).fetchone()
    return orjson.loads(row[0]) if row and row[0] else {}


def fetch_details(connection: sqlite3.Connection) -> dict[tuple[str, str], dict]:
    """Every logged fetch's summary, by (entity, change set), with when the fetch started
    (`fetch_started_at`); the latest wins."""
    details: dict[tuple[str, str], dict] = {}
    for entity, change_set, started_at, text in connection.execute(
            "SELECT entity, change_set, started_at, details FROM _sync_log"
            " WHERE layer = 'raw' ORDER BY id"):
        try:
            summary = orjson.loads(text or "{}")
        except orjson.JSONDecodeError:
            summary = {}
        details[(entity, change_set)] = {**summary, "fetch_started_at": started_at}
    return details
