"""The locked schema of each entity (`_schema`): stored by its first change set, read by every
later step (staging, publish, drift, checks, sensors)."""

from __future__ import annotations

import sqlite3

import orjson

from dataverse_assets.store.db import (
    utc_now_iso,
)
from dataverse_assets.store.schema import (
    Column,
    EntitySchema,
)


def load_locked_schema(connection: sqlite3.Connection, entity: str) -> EntitySchema | None:
    row = connection.execute(
        "SELECT primary_key, columns_json, decided_from, reasons_json FROM _schema "
        "WHERE entity = ? ORDER BY version DESC LIMIT 1", (entity,)
    ).fetchone()
    if row is None:
        return None
    columns = tuple(Column.from_json(c) for c in orjson.loads(row[1]))
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


def schema_version(connection: sqlite3.Connection, entity: str) -> int:
    row = connection.execute("SELECT max(version) FROM _schema WHERE entity = ?",
                             (entity,)).fetchone()
    return row[0] or 0


