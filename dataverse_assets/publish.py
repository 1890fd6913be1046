"""Publishing a staged change set into the canonical table: plan, then execute, in one
transaction. The watermark commits with the data, so a failure anywhere leaves both as they
were and the change set is simply published again next time: nothing lost, nothing twice.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import asdict, dataclass

import orjson

from dataverse_assets.schema import Column, EntitySchema
from dataverse_assets.store import (
    history_table,
    quote_identifier,
    read_sync_state,
    staging_table,
    table_exists,
    transaction,
    utc_now_iso,
    write_sync_state,
)

SYNC_COLUMNS = (
    ("json_response", "TEXT NOT NULL"),
    ("_content_hash", "TEXT NOT NULL"),
    ("sync_time", "TEXT NOT NULL"),
    ("valid_from", "TEXT"),
    ("updated_at", "TEXT NOT NULL"),
    ("_change_set", "TEXT NOT NULL"),
)
HISTORY_COLUMNS = (("valid_to", "TEXT NOT NULL"), ("change_kind", "TEXT NOT NULL"),
                   ("superseded_in", "TEXT NOT NULL"))
INDEXED_COLUMNS = ("modifiedon", "createdon")


# -- the locked schema --------------------------------------------------------------------

def load_locked_schema(connection: sqlite3.Connection, entity: str) -> EntitySchema | None:
    row = connection.execute(
        "SELECT primary_key, columns_json, decided_from, reasons_json FROM _schema "
        "WHERE entity = ? ORDER BY version DESC LIMIT 1", (entity,)
    ).fetchone()
    if row is None:
        return None
    columns = tuple(Column(c["name"], c["type"], c.get("attribute_type"))
                    for c in orjson.loads(row[1]))
    return EntitySchema(entity, row[0], columns, row[2], tuple(orjson.loads(row[3])))


def lock_schema(connection: sqlite3.Connection, schema: EntitySchema) -> EntitySchema:
    """Store the first schema of an entity; afterwards the stored one wins."""
    locked = load_locked_schema(connection, schema.entity)
    if locked is not None:
        return locked
    connection.execute(
        "INSERT INTO _schema (entity, version, primary_key, columns_json, decided_from,"
        " reasons_json, locked_at) VALUES (?, 1, ?, ?, ?, ?, ?)",
        (schema.entity, schema.primary_key, schema.to_json(), schema.decided_from,
         orjson.dumps(list(schema.reasons)).decode(), utc_now_iso()),
    )
    return schema


def ensure_canonical_tables(connection: sqlite3.Connection, schema: EntitySchema) -> None:
    """Create the entity table and its history table if they do not exist yet."""
    entity = quote_identifier(schema.entity)
    pk = schema.primary_key
    data_columns = [
        f"{quote_identifier(c.name)} {c.sqlite_type}" + (" PRIMARY KEY" if c.name == pk else "")
        for c in schema.columns
    ]
    sync_columns = [f"{quote_identifier(n)} {t}" for n, t in SYNC_COLUMNS]
    connection.execute(
        f"CREATE TABLE IF NOT EXISTS {entity} ({', '.join(data_columns + sync_columns)})"
    )
    history_columns = [f"{quote_identifier(c.name)} {c.sqlite_type}" for c in schema.columns]
    history_columns += [f"{quote_identifier(n)} {t}" for n, t in SYNC_COLUMNS + HISTORY_COLUMNS]
    history = history_table(schema.entity)
    connection.execute(
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(history)} ({', '.join(history_columns)})"
    )
    connection.execute(
        f"CREATE INDEX IF NOT EXISTS {quote_identifier(history + '__pk')} "
        f"ON {quote_identifier(history)} ({quote_identifier(pk)})"
    )
    for column in INDEXED_COLUMNS:
        if column in schema.column_names:
            connection.execute(
                f"CREATE INDEX IF NOT EXISTS {quote_identifier(f'{schema.entity}__{column}')} "
                f"ON {entity} ({quote_identifier(column)})"
            )


# -- plan and execute ---------------------------------------------------------------------

@dataclass
class PublishResult:
    entity: str
    change_set: str
    created: int
    updated: int
    unchanged: int
    stale: int
    deleted: int
    seconds: float
    watermark_before: str | None
    watermark_after: str | None

    def as_dict(self) -> dict:
        return asdict(self)


class PlanValidationError(Exception):
    """The plan does not add up; nothing was written."""


def _plan(connection: sqlite3.Connection, schema: EntitySchema, change_set: str,
          full_snapshot: bool) -> dict[str, int]:
    """Classify every staged row (and, for full snapshots, every vanished row) into `_plan`."""
    entity = quote_identifier(schema.entity)
    staging = quote_identifier(staging_table(schema.entity))
    pk = quote_identifier(schema.primary_key)
    connection.execute("DROP TABLE IF EXISTS temp._plan")
    connection.execute("CREATE TEMP TABLE _plan (pk TEXT PRIMARY KEY, kind TEXT NOT NULL)")
    # A replayed older change set never overwrites a newer row: compare modifiedon.
    connection.execute(
        f"INSERT INTO temp._plan (pk, kind) SELECT s._pk, CASE"
        f" WHEN c.{pk} IS NULL THEN 'create'"
        f" WHEN c._content_hash = s._content_hash THEN 'unchanged'"
        f" WHEN s._modifiedon IS NOT NULL AND c.valid_from IS NOT NULL"
        f"  AND s._modifiedon < c.valid_from THEN 'stale'"
        f" ELSE 'update' END"
        f" FROM {staging} s LEFT JOIN {entity} c ON c.{pk} = s._pk WHERE s._change_set = ?",
        (change_set,),
    )
    if full_snapshot:
        connection.execute(
            f"INSERT INTO temp._plan (pk, kind) SELECT c.{pk}, 'delete' FROM {entity} c"
            f" WHERE NOT EXISTS (SELECT 1 FROM {staging} s WHERE s._change_set = ?"
            f" AND s._pk = c.{pk})",
            (change_set,),
        )
    counts = dict(connection.execute("SELECT kind, count(*) FROM temp._plan GROUP BY kind"))
    staged = connection.execute(
        f"SELECT count(*) FROM {staging} WHERE _change_set = ?", (change_set,)
    ).fetchone()[0]
    planned = sum(v for k, v in counts.items() if k != "delete")
    if planned != staged:
        raise PlanValidationError(
            f"{schema.entity} {change_set}: plan covers {planned} rows but {staged} are staged"
        )
    return counts


def publish_change_set(
    connection: sqlite3.Connection, schema: EntitySchema, change_set: str, *, mode: str,
    watermark_after: str | None,
) -> PublishResult:
    """Plan and execute one change set in one transaction; record it in `_publish_state`."""
    started = time.perf_counter()
    started_at = utc_now_iso()
    state = read_sync_state(connection, schema.entity)
    watermark_before = state.watermark if state else None
    try:
        with transaction(connection):
            ensure_canonical_tables(connection, schema)
            counts = _plan(connection, schema, change_set, full_snapshot=(mode == "full"))
            _execute(connection, schema, change_set)
            new_watermark = watermark_before
            if watermark_after is not None and (
                new_watermark is None or watermark_after > new_watermark
            ):
                new_watermark = watermark_after
            # Same transaction as the data: the watermark can never run ahead of canonical.
            write_sync_state(connection, schema.entity, mode=mode, watermark=new_watermark,
                             delta_token=state.delta_token if state else None,
                             status="completed", change_set=change_set)
            result = PublishResult(
                schema.entity, change_set, counts.get("create", 0), counts.get("update", 0),
                counts.get("unchanged", 0), counts.get("stale", 0), counts.get("delete", 0),
                time.perf_counter() - started, watermark_before, new_watermark,
            )
            _record_publish_state(connection, result, "COMPLETE", started_at, None)
    except Exception as exc:
        with transaction(connection):
            failed = PublishResult(schema.entity, change_set, 0, 0, 0, 0, 0,
                                   time.perf_counter() - started, watermark_before,
                                   watermark_before)
            _record_publish_state(connection, failed, "FAILED", started_at,
                                  f"{type(exc).__name__}: {exc}")
            connection.execute(
                "UPDATE _sync_state SET status = 'failed', updated_at = ? WHERE entity = ?",
                (utc_now_iso(), schema.entity),
            )
        raise
    finally:
        connection.execute("DROP TABLE IF EXISTS temp._plan")
    return result


def _execute(connection: sqlite3.Connection, schema: EntitySchema, change_set: str) -> None:
    entity = quote_identifier(schema.entity)
    staging = quote_identifier(staging_table(schema.entity))
    history = quote_identifier(history_table(schema.entity))
    pk = quote_identifier(schema.primary_key)
    now = utc_now_iso()
    data = [quote_identifier(c) for c in schema.column_names]
    sync = [quote_identifier(n) for n, _ in SYNC_COLUMNS]
    # Superseded and deleted versions move to history before canonical changes.
    connection.execute(
        f"INSERT INTO {history} ({', '.join(data + sync)}, valid_to, change_kind, superseded_in)"
        f" SELECT {', '.join('c.' + c for c in data + sync)},"
        f" COALESCE(s._modifiedon, :now), p.kind, :cs"
        f" FROM {entity} c JOIN temp._plan p ON p.pk = c.{pk}"
        f" LEFT JOIN {staging} s ON s._pk = c.{pk} AND s._change_set = :cs"
        f" WHERE p.kind IN ('update', 'delete')",
        {"now": now, "cs": change_set},
    )
    updates = ", ".join(f"{c} = excluded.{c}" for c in data + sync if c != pk)
    connection.execute(
        f"INSERT INTO {entity} ({', '.join(data + sync)})"
        f" SELECT {', '.join('s.' + c for c in data)}, s.json_response, s._content_hash,"
        f" :now, COALESCE(s._modifiedon, :now), :now, :cs"
        f" FROM {staging} s JOIN temp._plan p ON p.pk = s._pk"
        f" WHERE s._change_set = :cs AND p.kind IN ('create', 'update')"
        f" ON CONFLICT({pk}) DO UPDATE SET {updates}",
        {"now": now, "cs": change_set},
    )
    connection.execute(
        f"DELETE FROM {entity} WHERE {pk} IN (SELECT pk FROM temp._plan WHERE kind = 'delete')"
    )
    connection.execute(
        "INSERT OR REPLACE INTO _defunct (entity, id, change_set, reason, recorded_at)"
        " SELECT ?, pk, ?, 'vanished from full snapshot', ? FROM temp._plan WHERE kind = 'delete'",
        (schema.entity, change_set, now),
    )


def _record_publish_state(connection: sqlite3.Connection, result: PublishResult, status: str,
                          started_at: str, error: str | None) -> None:
    connection.execute(
        "INSERT INTO _publish_state (entity, change_set, status, created, updated, unchanged,"
        " deleted, watermark_before, watermark_after, started_at, finished_at, error)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(entity, change_set) DO UPDATE"
        " SET status=excluded.status, created=excluded.created, updated=excluded.updated,"
        " unchanged=excluded.unchanged, deleted=excluded.deleted,"
        " watermark_before=excluded.watermark_before, watermark_after=excluded.watermark_after,"
        " started_at=excluded.started_at, finished_at=excluded.finished_at, error=excluded.error",
        (result.entity, result.change_set, status, result.created, result.updated,
         result.unchanged, result.deleted, result.watermark_before, result.watermark_after,
         started_at, utc_now_iso(), error),
    )


def canonical_row_count(connection: sqlite3.Connection, entity: str) -> int:
    if not table_exists(connection, entity):
        return 0
    return connection.execute(f"SELECT count(*) FROM {quote_identifier(entity)}").fetchone()[0]
