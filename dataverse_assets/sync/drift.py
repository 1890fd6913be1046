"""Schema drift: each change set's live schema against the locked one, and `evolve` mode.

- The first staged change set of an entity locks its schema (`_schema` version 1).
- Every later change set is compared once, when it is staged: its live schema comes from the
  EntityDefinitions archived with it, or from its records when there is no metadata. Added
  columns are info; removed columns and type changes are breaking; API fields that cannot be
  SQLite columns (empty, NUL, a sync column's name, a case variant of another column) are
  reported once, when first seen. Findings go to `_schema_drift`, one row per column, and
  `_schema_check` says what each change set was compared against.
- Data keeps flowing either way: staging writes the locked columns, every field stays in
  json_response.
- `schema_evolution: evolve` adds new columns to the canonical, history and staging tables
  (`ALTER TABLE ... ADD COLUMN`), fills them from json_response and stores the next `_schema`
  version, all in the transaction that records the drift. Removed columns stay (NULL from
  then on); a changed type keeps the locked declaration (SQLite cannot alter it).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import orjson

from dataverse_assets.archive.change_sets import ENTITY_DEFINITION, REQUEST, ChangeSetArchive
from dataverse_assets.config import EntityConfig
from dataverse_assets.store.backend import dialect_of
from dataverse_assets.store.db import (
    quote_identifier,
    table_columns,
    table_exists,
    transaction,
    utc_now_iso,
)
from dataverse_assets.store.schema import (
    ADDED,
    DESELECTED,
    EXCLUDED,
    FILTER_CHANGED,
    INFO,
    REMOVED,
    TYPE_CHANGED,
    Column,
    EntitySchema,
    SchemaChange,
    compare_schemas,
    excluded_as_changes,
    mark_deselected,
    observed_types,
    only_selected,
    schema_from_metadata,
    schema_from_observed_types,
    sqlite_fold,
)
from dataverse_assets.store.schema_registry import load_locked_schema, lock_schema, schema_version
from dataverse_assets.store.tables import fill_column_from_json, history_table, staging_table
from dataverse_assets.sync.stage import decide_schema, is_deleted_entity

DRIFT_DDL = (
    """CREATE TABLE IF NOT EXISTS _schema_check (
        entity TEXT NOT NULL,
        change_set TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        live_from TEXT NOT NULL,
        outcome TEXT NOT NULL,
        checked_at TEXT NOT NULL,
        PRIMARY KEY (entity, change_set)
    )""",
    """CREATE TABLE IF NOT EXISTS _schema_drift (
        entity TEXT NOT NULL,
        change_set TEXT NOT NULL,
        kind TEXT NOT NULL,
        column_name TEXT NOT NULL,
        severity TEXT NOT NULL,
        locked_type TEXT,
        live_type TEXT,
        locked_attribute_type TEXT,
        live_attribute_type TEXT,
        action TEXT NOT NULL,
        detail TEXT,
        recorded_at TEXT NOT NULL,
        PRIMARY KEY (entity, change_set, kind, column_name)
    )""",
)


DRIFT_COLUMNS = ("entity", "change_set", "kind", "column_name", "severity", "locked_type",
                 "live_type", "locked_attribute_type", "live_attribute_type", "action",
                 "detail", "recorded_at")
DRIFT_KEY = ("entity", "change_set", "kind", "column_name")


def ensure_drift_tables(connection: sqlite3.Connection) -> None:
    # Plain statements, not executescript: that would commit an open transaction.
    for statement in DRIFT_DDL:
        connection.execute(statement)
    # The filter each change set was fetched with (added after the first release).
    if "row_filter" not in table_columns(connection, "_schema_check"):
        connection.execute("ALTER TABLE _schema_check ADD COLUMN row_filter TEXT")


def live_schema(archive: ChangeSetArchive, primary_key: str,
                name_limit: int | None = None) -> tuple[EntitySchema | None, str]:
    """The change set's own schema and where it came from ("metadata" or "records"); (None,
    "none") when it holds no metadata and no records, so there is nothing to compare."""
    definition = archive.read_json(ENTITY_DEFINITION)
    if isinstance(definition, dict) and definition.get("Attributes"):
        request = archive.read_json(REQUEST) or {}
        return only_selected(schema_from_metadata(archive.entity, definition, primary_key,
                                                  name_limit),
                             request.get("select")), "metadata"
    types: dict[str, str | None] = {}
    records_seen = 0
    for page, records in archive.iter_page_records():
        if page.get("kind") == "keys":
            continue  # a key-only scan selects one column: it says nothing about the rest
        records = [r for r in records if not is_deleted_entity(r)]
        records_seen += len(records)
        observed_types(records, types)
    if not records_seen:
        return None, "none"
    return schema_from_observed_types(archive.entity, types, primary_key,
                                      name_limit), "records"


def schema_for_change_set(connection: sqlite3.Connection, archive: ChangeSetArchive,
                          entity: EntityConfig) -> EntitySchema:
    """The schema to stage a change set with: locked by the first change set, compared (and
    in evolve mode extended) by every later one. Each change set is compared once."""
    ensure_drift_tables(connection)
    change_set = archive.change_set
    request = archive.read_json(REQUEST) or {}
    row_filter = request.get("row_filter")
    locked = load_locked_schema(connection, entity.name)
    name_limit = dialect_of(connection).max_identifier_bytes
    if locked is None:
        decided = decide_schema(archive, entity.primary_key, name_limit)
        with transaction(connection):
            locked = lock_schema(connection, decided)
            if locked is decided:  # this change set locked it
                live_from = "metadata" if decided.decided_from == "metadata" else "records"
                _record(connection, entity.name, change_set, 1, live_from, "locked",
                        excluded_as_changes(decided), lambda change: _action(change, None),
                        row_filter)
        return locked
    if _checked(connection, entity.name, change_set):
        return locked
    live, live_from = live_schema(archive, locked.primary_key, name_limit)
    changes = compare_schemas(locked, live, name_limit) if live is not None else []
    changes = mark_deselected(changes, request.get("select"), _metadata_columns(archive))
    with transaction(connection, staging=True):  # evolve adds columns to the staging table
        if _checked(connection, entity.name, change_set):  # another run got here first
            return load_locked_schema(connection, entity.name) or locked
        locked = load_locked_schema(connection, entity.name) or locked
        changes = _not_reported_before(connection, entity.name, change_set, changes)
        changes += _filter_change(connection, entity.name, change_set, row_filter)
        version = schema_version(connection, entity.name)
        schema = locked
        addable = [c for c in changes if c.kind == ADDED and c.live_type is not None]
        evolved: EntitySchema | None = None
        if entity.schema_evolution == "evolve" and addable:
            version += 1
            evolved = schema = evolve(connection, locked, addable, change_set, version)
        outcome = ("no evidence" if live is None else "evolved" if evolved is not None
                   else "drift" if changes else "unchanged")
        _record(connection, entity.name, change_set, version, live_from, outcome, changes,
                lambda change: _action(change, entity.schema_evolution, evolved, version),
                row_filter)
    return schema


def evolve(connection: sqlite3.Connection, locked: EntitySchema, additions: list[SchemaChange],
           change_set: str, version: int) -> EntitySchema:
    """Add columns to the entity's tables, fill them from json_response, store the version.
    Runs inside the caller's transaction: all of it commits together or not at all."""
    new_columns = [Column(c.column, c.live_type or "TEXT", c.live_attribute_type)
                   for c in additions]
    for table in (locked.entity, history_table(locked.entity), staging_table(locked.entity)):
        if not table_exists(connection, table):
            continue  # created later from the new version, with the columns
        existing = {sqlite_fold(name) for name in table_columns(connection, table)}
        for column in new_columns:
            if sqlite_fold(column.name) in existing:
                continue
            connection.execute(
                f"ALTER TABLE {quote_identifier(table)} ADD COLUMN"
                f" {quote_identifier(column.name)} {column.sqlite_type}"
            )
            fill_column_from_json(connection, table, column.name, column.sqlite_type)
    names = ", ".join(f"{c.name} {c.sqlite_type}" for c in new_columns)
    schema = EntitySchema(
        locked.entity, locked.primary_key, (*locked.columns, *new_columns), locked.decided_from,
        (*locked.reasons, f"version {version} (change set {change_set}): evolve added {names}"),
        locked.change_tracking,
    )
    connection.execute(
        "INSERT INTO _schema (entity, version, primary_key, columns_json, decided_from,"
        " reasons_json, locked_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (schema.entity, version, schema.primary_key, schema.to_json(), schema.decided_from,
         orjson.dumps(list(schema.reasons)).decode(), utc_now_iso()),
    )
    return schema


def _metadata_columns(archive: ChangeSetArchive) -> set[str]:
    """Every column the change set's metadata lists (whatever `select` asked for)."""
    definition = archive.read_json(ENTITY_DEFINITION)
    if not isinstance(definition, dict) or not definition.get("Attributes"):
        return set()
    return set(schema_from_metadata(archive.entity, definition).column_names)


def _filter_change(connection: sqlite3.Connection, entity: str, change_set: str,
                   row_filter: str | None) -> list[SchemaChange]:
    """The entity's `filter` against the one the previous change set was fetched with."""
    previous = connection.execute(
        "SELECT row_filter FROM _schema_check WHERE entity = ? AND change_set < ?"
        " ORDER BY change_set DESC LIMIT 1", (entity, change_set)).fetchone()
    if previous is None or previous[0] == row_filter:
        return []
    return [SchemaChange(FILTER_CHANGED, "(filter)", INFO, detail=(
        f"{previous[0]!r} -> {row_filter!r}; records outside the new filter leave the mirror "
        "as the key-and-version scan finds them"))]


def _checked(connection: sqlite3.Connection, entity: str, change_set: str) -> bool:
    return connection.execute(
        "SELECT 1 FROM _schema_check WHERE entity = ? AND change_set = ?", (entity, change_set)
    ).fetchone() is not None


def _not_reported_before(connection: sqlite3.Connection, entity: str, change_set: str,
                         changes: list[SchemaChange]) -> list[SchemaChange]:
    """Fields that cannot be columns are reported once, in the change set that first has them
    (nothing can fix them later); everything else is a difference from the lock every time."""
    known = {row[0] for row in connection.execute(
        "SELECT column_name FROM _schema_drift WHERE entity = ? AND kind = ?"
        " AND change_set < ?", (entity, EXCLUDED, change_set))}
    return [c for c in changes if not (c.kind == EXCLUDED and c.column in known)]


def _action(change: SchemaChange, mode: str | None, evolved: EntitySchema | None = None,
            version: int | None = None) -> str:
    if change.kind == ADDED:
        if evolved is not None and evolved.column(change.column) is not None:
            return (f"added as {change.live_type} to {evolved.entity} and "
                    f"{history_table(evolved.entity)}, filled from json_response "
                    f"(schema version {version})")
        if mode == "evolve":
            return "not added yet: only nulls seen, type unknown; kept in json_response"
        return "kept in json_response (schema_evolution: freeze)"
    if change.kind == REMOVED:
        return "column kept; NULL in rows that no longer carry it"
    if change.kind == DESELECTED:
        return ("column kept, NULL in rows fetched from now on; `dataverse-assets purge "
                "--entity E --column C` erases its old values")
    if change.kind == FILTER_CHANGED:
        return "the new filter applies from this change set"
    if change.kind == TYPE_CHANGED:
        return (f"column keeps its locked type {change.locked_type}; json_response holds "
                "the values as sent")
    return "kept in json_response only"


def _record(connection: sqlite3.Connection, entity: str, change_set: str, version: int,
            live_from: str, outcome: str, changes: list[SchemaChange], action,
            row_filter: str | None) -> None:
    now = utc_now_iso()
    dialect = dialect_of(connection)
    connection.execute(
        dialect.upsert("_schema_check", ("entity", "change_set", "schema_version", "live_from",
                                         "outcome", "checked_at", "row_filter"),
                       ("entity", "change_set")),
        (entity, change_set, version, live_from, outcome, now, row_filter),
    )
    connection.execute("DELETE FROM _schema_drift WHERE entity = ? AND change_set = ?",
                       (entity, change_set))
    connection.executemany(
        dialect.upsert("_schema_drift", DRIFT_COLUMNS, DRIFT_KEY),
        [(entity, change_set, c.kind, c.column, c.severity, c.locked_type, c.live_type,
          c.locked_attribute_type, c.live_attribute_type, action(c), c.detail or None, now)
         for c in changes],
    )


# -- reading it back (checks, CLI) --------------------------------------------------------

@dataclass(frozen=True)
class SchemaCheck:
    """How one change set's schema compared, and what it found."""

    change_set: str
    schema_version: int
    live_from: str
    outcome: str
    findings: list[dict]


def read_schema_checks(connection: sqlite3.Connection, entity: str,
                       change_sets: list[str]) -> list[SchemaCheck]:
    """The comparisons of the given change sets that were made (others are left out)."""
    ensure_drift_tables(connection)
    checks = []
    for change_set in change_sets:
        row = connection.execute(
            "SELECT schema_version, live_from, outcome FROM _schema_check"
            " WHERE entity = ? AND change_set = ?", (entity, change_set)).fetchone()
        if row is None:
            continue
        cursor = connection.execute(
            "SELECT kind, column_name, severity, locked_type, live_type, locked_attribute_type,"
            " live_attribute_type, action, detail FROM _schema_drift"
            " WHERE entity = ? AND change_set = ? ORDER BY kind, column_name",
            (entity, change_set))
        names = [d[0] for d in cursor.description]
        findings = [dict(zip(names, r, strict=True)) for r in cursor]
        checks.append(SchemaCheck(change_set, row[0], row[1], row[2], findings))
    return checks
