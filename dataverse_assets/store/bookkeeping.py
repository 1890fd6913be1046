"""The state of every sync and publish: every query of `_sync_state`, `_publish_state`,
`_staged` and `_sync_log` lives here."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from dataverse_assets.errors import StagingPrunedError
from dataverse_assets.modes import (
    PUBLISHING_STATUSES,
    PublishStatus,
)
from dataverse_assets.names import KEY_GLOB
from dataverse_assets.store.db import (
    transaction,
    utc_now_iso,
)


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
        " reconciled_at=COALESCE(excluded.reconciled_at, reconciled_at),"
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
    cursor = connection.execute(
        "SELECT * FROM _publish_state WHERE entity = ? AND change_set GLOB ?"
        + (" AND status = ?" if status else "") + " ORDER BY change_set DESC LIMIT 1",
        (entity, KEY_GLOB, status) if status else (entity, KEY_GLOB))
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
    entity's sync state says failed."""
    with transaction(connection):
        retries = connection.execute(
            "SELECT retry_count FROM _publish_state WHERE entity = ? AND change_set = ?",
            (entity, change_set)).fetchone()
        set_publish_state(
            connection, entity, change_set, PublishStatus.FAILED, failed_operation=operation,
            error_code=getattr(exc, "code", None) or type(exc).__name__,
            error=f"{type(exc).__name__}: {exc}", finished_at=utc_now_iso(),
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
