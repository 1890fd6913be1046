"""The mirror as people read it: multi-select child tables (`E__<column>`) and the readable
view of each entity (`E__readable`).

- `E__<column>` (record_id, option_value): one row per chosen option of a multi-select
  column, kept by the publish in the transaction that writes the record (sync.publish_execute),
  so it always equals the column's comma-separated codes in `E`.
- `E__readable`: a view (no writes, nothing to keep in step) with every column of `E`, plus
  `<column>_label` for each choice column, `<column>_labels` for each multi-select column
  (labels in option order, "; "-joined), and for each lookup `<attribute>_name` (the
  formatted value Dataverse sent) and `<attribute>_table` (the entity set it points at: the
  row's lookuplogicalname annotation, else the lookup's only target). Labels come from
  `_choice_labels` in one language: `labels.language_code` in the entities file, else the
  org's base language. A derived name that is already a column is left out (the column wins).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3

import orjson

from dataverse_assets.store.backend import POSTGRES, SQLITE, Dialect, dialect_of
from dataverse_assets.store.choices import MULTI_SELECT, stored_metadata
from dataverse_assets.store.db import quote_identifier, table_columns, table_exists, view_names
from dataverse_assets.store.schema import EntitySchema, sqlite_fold

READABLE_SUFFIX = "__readable"
FORMATTED = "@OData.Community.Display.V1.FormattedValue"
LOOKUP_LOGICAL_NAME = "@Microsoft.Dynamics.CRM.lookuplogicalname"
# Names a JSON path and a derived column can carry without quoting doubts.
_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# `E__<column>` must not be one of the names the mirror gives an entity's other objects.
_TAKEN_SUFFIXES = {"history", "readable", "pk", "pk_nocase", "modifiedon", "createdon"}
_CHILD_COLUMNS = ["record_id", "option_value"]


def readable_view(entity: str) -> str:
    return f"{entity}{READABLE_SUFFIX}"


def multi_select_table(entity: str, column: str, dialect: Dialect = SQLITE) -> str | None:
    """The child table of a multi-select column, or None when its name is taken or too long
    for the database (PostgreSQL would cut it to 63 bytes, and two columns' tables could then
    be one: the column keeps its codes in `E`, without a child table or labels column)."""
    if sqlite_fold(column) in _TAKEN_SUFFIXES or not _PLAIN_NAME.match(column):
        return None
    table = f"{entity}__{column}"
    return table if dialect.fits(table) else None


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def codes_are_plain(column_sql: str, dialect: Dialect = SQLITE) -> str:
    """SQL: the column holds a comma-separated list of integers (what json_each may read;
    in PostgreSQL, what string_to_array and a bigint cast may read)."""
    if dialect is POSTGRES:
        return f"{column_sql} ~ '^-?[0-9]+(,-?[0-9]+)*$'"
    return (f"{column_sql} IS NOT NULL AND {column_sql} <> ''"
            f" AND {column_sql} NOT GLOB '*[^0-9,-]*'")


def child_rows_sql(entity: str, primary_key: str, column: str, where: str,
                   dialect: Dialect = SQLITE) -> str:
    """INSERT the child rows of the records of `entity` matching `where` (SQL over `c`)."""
    table = multi_select_table(entity, column, dialect)
    assert table is not None
    col = f"c.{quote_identifier(column)}"
    if dialect is POSTGRES:
        return (f"INSERT INTO {quote_identifier(table)} (record_id, option_value)"
                f" SELECT c.{quote_identifier(primary_key)}, j::bigint"
                f" FROM {quote_identifier(entity)} c,"
                f" unnest(string_to_array({col}, ',')) j"
                f" WHERE ({where}) AND {codes_are_plain(col, dialect)} ON CONFLICT DO NOTHING")
    return (f"INSERT OR IGNORE INTO {quote_identifier(table)} (record_id, option_value)"
            f" SELECT c.{quote_identifier(primary_key)}, j.value"
            f" FROM {quote_identifier(entity)} c, json_each('[' || {col} || ']') j"
            f" WHERE ({where}) AND {codes_are_plain(col)}")


def ensure_multi_select_tables(connection: sqlite3.Connection, schema: EntitySchema
                               ) -> list[str]:
    """Create (and fill from `E`) the child table of each multi-select column of the entity
    that has one; returns the columns whose child tables the publish keeps."""
    metadata = stored_metadata(connection, schema.entity)
    if metadata is None:
        return []
    kept = []
    for column, kind in metadata["choice_columns"].items():
        table = multi_select_table(schema.entity, column, dialect_of(connection))
        if kind != MULTI_SELECT or table is None or column not in schema.column_names:
            continue
        if table_exists(connection, table):
            if table_columns(connection, table) != _CHILD_COLUMNS:
                continue  # someone else's table under that name: not ours to write
        else:
            dialect = dialect_of(connection)
            connection.execute(
                f"CREATE TABLE {quote_identifier(table)} (record_id TEXT NOT NULL,"
                f" option_value INTEGER NOT NULL, PRIMARY KEY (record_id, option_value))"
                + (" WITHOUT ROWID" if dialect is SQLITE else ""))
            if table_exists(connection, schema.entity):
                connection.execute(child_rows_sql(schema.entity, schema.primary_key, column,
                                                  "TRUE", dialect))
        kept.append(column)
    return kept


def readable_view_sql(connection: sqlite3.Connection, schema: EntitySchema) -> str | None:
    """The CREATE VIEW statement of `E__readable`, from the stored metadata (None before the
    entity has any)."""
    metadata = stored_metadata(connection, schema.entity)
    if metadata is None or not table_exists(connection, schema.entity):
        return None
    dialect = dialect_of(connection)
    base = metadata["base_language_code"] or 1033
    language = metadata.get("view_language_code") or base
    entity, entity_literal = schema.entity, _literal(schema.entity)
    existing = {sqlite_fold(c) for c in table_columns(connection, entity)}
    derived: list[str] = []

    def add(name: str, expression: str) -> None:
        if sqlite_fold(name) in existing:
            return  # a real column of that name wins
        if not dialect.fits(name):
            return  # cut short, it could be another column's name: left out
        existing.add(sqlite_fold(name))
        derived.append(f"{expression} AS {quote_identifier(name)}")

    def _language_of(value: str) -> str:
        """The view's language for an option that has a label in it, else (as Dataverse shows
        an untranslated option) the org's base language."""
        if language == base:
            return str(int(language))
        return (f"(CASE WHEN EXISTS (SELECT 1 FROM _choice_labels v WHERE v.entity ="
                f" {entity_literal} AND v.attribute = {attribute} AND v.option_value = {value}"
                f" AND v.language_code = {int(language)}) THEN {int(language)}"
                f" ELSE {int(base)} END)")

    for column, kind in metadata["choice_columns"].items():
        if column not in schema.column_names or not _PLAIN_NAME.match(column):
            continue
        attribute = _literal(column)
        if kind == MULTI_SELECT:
            table = multi_select_table(entity, column, dialect)
            if table is None or not table_exists(connection, table):
                continue
            add(f"{column}_labels",
                f"(SELECT {dialect.string_agg('label', '; ', 'option_order')} FROM"
                f" (SELECT l.label, l.option_order FROM"
                f" {quote_identifier(table)} m JOIN _choice_labels l ON l.entity = "
                f"{entity_literal} AND l.attribute = {attribute} AND l.option_value ="
                f" m.option_value AND l.language_code = {_language_of('m.option_value')}"
                f" WHERE m.record_id = t.{quote_identifier(schema.primary_key)}"
                f" ORDER BY l.option_order){' AS m' if dialect is POSTGRES else ''})")
        else:
            value = f"t.{quote_identifier(column)}"
            add(f"{column}_label",
                f"(SELECT l.label FROM _choice_labels l WHERE l.entity = {entity_literal}"
                f" AND l.attribute = {attribute} AND l.option_value = {value}"
                f" AND l.language_code = {_language_of(value)})")
    for attribute, column in metadata["lookup_columns"].items():
        if column not in schema.column_names or not _PLAIN_NAME.match(column) \
                or not _PLAIN_NAME.match(attribute):
            continue
        annotation = dialect.json_text("t.json_response", column + LOOKUP_LOGICAL_NAME)
        add(f"{attribute}_name", dialect.json_text("t.json_response", column + FORMATTED))
        add(f"{attribute}_table",
            f"CASE WHEN t.{quote_identifier(column)} IS NULL THEN NULL ELSE"
            f" (SELECT coalesce(lt.target_entity, lt.target_logical_name) FROM _lookup_targets lt"
            f" WHERE lt.entity = {entity_literal} AND lt.attribute = {_literal(attribute)}"
            f" AND (lt.target_logical_name = {annotation} OR ({annotation} IS NULL AND"
            f" (SELECT count(*) FROM _lookup_targets n WHERE n.entity = {entity_literal}"
            f" AND n.attribute = {_literal(attribute)}) = 1))) END")
    select = ", ".join(["t.*", *derived])
    return (f"CREATE VIEW {quote_identifier(readable_view(entity))} AS SELECT {select}"
            f" FROM {quote_identifier(entity)} t")


def ensure_readable_view(connection: sqlite3.Connection, schema: EntitySchema) -> bool:
    """(Re)create `E__readable` when what it should say differs from what it says; returns
    whether it was written."""
    sql = readable_view_sql(connection, schema)
    if sql is None:
        return False
    name = readable_view(schema.entity)
    if dialect_of(connection) is POSTGRES:
        return _ensure_postgres_view(connection, name, sql, schema.entity)
    row = connection.execute("SELECT type, sql FROM sqlite_master WHERE name = ? COLLATE NOCASE",
                             (name,)).fetchone()
    if row is not None and row[0] == "view" and row[1] == sql:
        return False
    if row is not None and row[0] != "view":
        return False  # a table of that name is not ours to drop
    connection.execute(f"DROP VIEW IF EXISTS {quote_identifier(name)}")
    connection.execute(sql)
    return True


def _ensure_postgres_view(connection, name: str, sql: str, entity: str) -> bool:
    """As ensure_readable_view, in PostgreSQL: the server keeps a view's text rewritten, and
    expands `t.*` when the view is made, so the view carries (as its comment) a digest of the
    statement and of the table's columns, and is made again when either differs."""
    digest = hashlib.blake2b(
        orjson.dumps([sql, table_columns(connection, entity)]), digest_size=16).hexdigest()
    row = connection.execute(
        "SELECT c.relkind, obj_description(c.oid, 'pg_class') FROM pg_class c"
        " WHERE c.oid = to_regclass(?)", (quote_identifier(name),)).fetchone()
    if row is not None and row[0] != "v":
        return False  # a table of that name is not ours to drop
    if row is not None and row[1] == digest:
        return False
    connection.execute(f"DROP VIEW IF EXISTS {quote_identifier(name)}")
    connection.execute(sql)
    connection.execute(f"COMMENT ON VIEW {quote_identifier(name)} IS '{digest}'")
    return True


def drop_multi_select_table(connection: sqlite3.Connection, schema: EntitySchema,
                            column: str) -> bool:
    """Drop the child table of a multi-select column (purge: the column is erased), and make
    the readable view again without its labels (inside the caller's transaction): PostgreSQL
    refuses to drop a table a view reads, and SQLite's view would name a table that is gone.
    The next publish makes the child table again from `E` if the column is still mirrored.
    Returns whether there was one."""
    table = multi_select_table(schema.entity, column, dialect_of(connection))
    if table is None or not table_exists(connection, table):
        return False
    view = readable_view(schema.entity)
    if view in view_names(connection):
        connection.execute(f"DROP VIEW {quote_identifier(view)}")
    connection.execute(f"DROP TABLE {quote_identifier(table)}")
    ensure_readable_view(connection, schema)
    return True


def column_roles(connection: sqlite3.Connection, entity: str) -> dict[str, str]:
    """What the metadata says a column is, for a person reading the table's schema: its
    display name and description in the org, choice columns (labels in `E__readable`),
    lookups (with their targets), calendar dates."""
    metadata = stored_metadata(connection, entity)
    if metadata is None:
        return {}
    view = readable_view(entity)
    roles = {column: f"choice ({kind}): labels in {view}"
             for column, kind in metadata["choice_columns"].items()}
    targets: dict[str, list[str]] = {}
    for attribute, target in connection.execute(
            "SELECT attribute, COALESCE(target_entity, target_logical_name)"
            " FROM _lookup_targets WHERE entity = ? ORDER BY 1, 2", (entity,)):
        targets.setdefault(attribute, []).append(target)
    for attribute, column in metadata["lookup_columns"].items():
        roles[column] = f"lookup {attribute} to {', '.join(targets.get(attribute, [])) or '?'}"
    for column in metadata["date_only_columns"]:
        roles[column] = "calendar date (DateOnly, no time zone)"
    for column, text in metadata["column_descriptions"].items():
        roles[column] = f"{text}; {roles[column]}" if column in roles else text
    return roles
