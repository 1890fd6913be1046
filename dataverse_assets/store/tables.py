"""The mirror's tables: their names, the canonical and history tables' columns and indexes,
and what is read from them by key."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

import orjson

from dataverse_assets.errors import ConfigError
from dataverse_assets.store.backend import POSTGRES, dialect_for_address, dialect_of
from dataverse_assets.store.db import (
    quote_identifier,
    table_exists,
)
from dataverse_assets.store.schema import EntitySchema, to_postgres_value


def history_table(entity: str) -> str:
    return f"{entity}__history"


def staging_table(entity: str) -> str:
    return f"_staging__{entity}"


def staging_keys_table(entity: str) -> str:
    """Keys seen by a change set's key-only reconciliation scan."""
    return f"_staging_keys__{entity}"


def entity_identifiers(entity: str) -> list[str]:
    """Every table, view and index name the mirror derives from an entity's name (besides the
    child tables of multi-select columns, which readable.multi_select_table leaves out when
    their names are too long). A test checks it against a PostgreSQL mirror's catalog."""
    history, staging = history_table(entity), staging_table(entity)
    keys = staging_keys_table(entity)
    return [entity, history, f"{history}__pk", f"{entity}__modifiedon", f"{entity}__createdon",
            f"{entity}{NOCASE_SUFFIX}", f"{entity}__readable",
            staging, f"{staging}__key", f"{staging}__op", keys]


def refuse_long_entity_names(address: object, entities: list[str], source: object) -> None:
    """A store that cuts long names short (PostgreSQL: 63 bytes) cannot hold an entity whose
    derived names do not fit: two of its objects, or two entities', could end up with one
    name. One line names the entities file, the entity and what fits."""
    dialect = dialect_for_address(address)
    for index, entity in enumerate(entities):
        too_long = [n for n in entity_identifiers(entity) if not dialect.fits(n)]
        if too_long:
            longest = max(entity_identifiers("x"), key=len)
            room = dialect.max_identifier_bytes - (len(longest) - 1)
            raise ConfigError(
                f"{source}: entity {entity!r} (entities[{index}]), field 'name':"
                f" {len(entity.encode())} bytes is too long for a PostgreSQL store: the names"
                f" the mirror makes from it (such as {too_long[-1]!r}) must fit PostgreSQL's"
                f" {dialect.max_identifier_bytes} bytes, so an entity's name can have at most"
                f" {room} bytes (keep this entity in a SQLite store, or leave it out)")


def delete_staged_rows(connection: sqlite3.Connection, entity: str, change_set: str) -> int:
    """Delete a change set's staged rows and key-scan keys (inside the caller's transaction;
    tables not made yet have none). Returns the staged rows deleted."""
    deleted = {table: connection.execute(
        f"DELETE FROM {quote_identifier(table)} WHERE _change_set = ?", (change_set,)).rowcount
        for table in (staging_table(entity), staging_keys_table(entity))
        if table_exists(connection, table)}
    return deleted.get(staging_table(entity), 0)


# Ids per lookup: far below SQLite's bound-parameter limit (32,766), a page's worth at once.
_IDS_PER_LOOKUP = 5000


def mirrored_etags(connection: sqlite3.Connection, entity: str, primary_key: str,
                   ids: list[str]) -> dict[str, str | None]:
    """The `@odata.etag` of the mirrored version of each id (ids not mirrored are left out;
    ids as staging keys them)."""
    if not ids or not table_exists(connection, entity):
        return {}
    column = quote_identifier(primary_key)
    found: dict[str, str | None] = {}
    for start in range(0, len(ids), _IDS_PER_LOOKUP):
        batch = ids[start:start + _IDS_PER_LOOKUP]
        found.update(connection.execute(
            f"SELECT {column}, {dialect_of(connection).json_text('json_response', '@odata.etag')}"
            f" FROM {quote_identifier(entity)} WHERE {column} IN ({', '.join('?' * len(batch))})",
            batch))
    return found


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
# Indexed columns an update (almost) never changes: left out of the update's SET and set
# apart where they changed (see _apply_chunk), which saved ~9% of a 1% incremental's writes
# (docs/performance.md).
STABLE_INDEXED_COLUMNS = ("createdon",)
NOCASE_SUFFIX = "__pk_nocase"
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
    for name, column in secondary_indexes(schema, dialect_of(connection)).items():
        connection.execute(f"CREATE INDEX IF NOT EXISTS {quote_identifier(name)} "
                           f"ON {entity} ({column})")


def secondary_indexes(schema: EntitySchema, dialect=None) -> dict[str, str]:
    """The canonical table's indexes besides its primary key: {index name: indexed column}.

    On modifiedon and createdon, and on the primary key without case (NOCASE folds ASCII,
    as SQLite's lower() does): the primary-key check reads that index in order instead of
    sorting every key (0.7 s at 1M rows). Updates never change a key, so it costs creates only.
    """
    dialect = dialect or dialect_of(None)
    indexes = {f"{schema.entity}__{column}": quote_identifier(column)
               for column in INDEXED_COLUMNS if column in schema.column_names}
    indexes[f"{schema.entity}{NOCASE_SUFFIX}"] = (
        dialect.nocase(quote_identifier(schema.primary_key)))
    return indexes


def canonical_row_count(connection: sqlite3.Connection, entity: str) -> int:
    if not table_exists(connection, entity):
        return 0
    return connection.execute(f"SELECT count(*) FROM {quote_identifier(entity)}").fetchone()[0]




def fill_column_from_json(connection: sqlite3.Connection, table: str, column: str,
                          sqlite_type: str) -> None:
    """A column added to `table` filled from each row's json_response (inside the caller's
    transaction). SQLite: json_each, not json_extract (a JSON path cannot address every key,
    'a"b'); PostgreSQL: each value converted to the column's type (one that does not fit stays
    NULL, as staging has it: docs/store-backends.md)."""
    quoted, name = quote_identifier(table), quote_identifier(column)
    if dialect_of(connection) is not POSTGRES:
        connection.execute(
            f"UPDATE {quoted} SET {name} = (SELECT j.value FROM json_each({quoted}.json_response)"
            f" j WHERE j.key = ?)", (column,))
        return
    updates = []
    for row_id, body in connection.execute(f"SELECT ctid::text, json_response FROM {quoted}"
                                           ).fetchall():
        value, _ = to_postgres_value(orjson.loads(body).get(column), sqlite_type)
        if value is not None:
            updates.append((value, row_id))
    connection.executemany(f"UPDATE {quoted} SET {name} = ? WHERE ctid = ?::tid", updates)


def row_id_column(connection: sqlite3.Connection) -> str:
    """What names a row of a table for an update of it read a moment before: SQLite's
    rowid, PostgreSQL's ctid (as text; valid until the row is updated)."""
    return "ctid::text" if dialect_of(connection) is POSTGRES else "rowid"


def row_id_match(connection: sqlite3.Connection) -> str:
    """`WHERE` condition for one `row_id_column` value bound as `?`."""
    return "ctid = ?::tid" if dialect_of(connection) is POSTGRES else "rowid = ?"


def rewrite_matching_rows(connection: sqlite3.Connection, table: str, column: str,
                          needles: Sequence[str], columns: Sequence[str],
                          rewrite: Callable[[str], Sequence[object] | None], *,
                          condition: str = "TRUE", parameters: Sequence[object] = (),
                          batch: int = 2000) -> int:
    """Rewrite the rows of `table` whose text `column` contains any of `needles` (and that
    match `condition`, SQL with `?` bound to `parameters`): `rewrite(value of column)` gives
    the new values of `columns`, or None to leave the row. A batch at a time in row order,
    inside the caller's transaction (never a cursor open on rows being rewritten). A row a
    rewrite moved further on (PostgreSQL writes a new row version) is read again, and left
    when it no longer matches or `rewrite` gives None. Returns the rows rewritten."""
    postgres = dialect_of(connection) is POSTGRES
    quoted, text = quote_identifier(table), quote_identifier(column)
    row_id, cast, start = (("ctid", "?::tid", "(0,0)") if postgres
                           else ("rowid", "?", -(2**63)))
    contains = " OR ".join((f"strpos({text}, ?) > 0" if postgres else f"instr({text}, ?) > 0")
                           for _ in needles)
    assignments = ", ".join(f"{quote_identifier(c)} = ?" for c in columns)
    after: object = start
    rewritten = 0
    while rows := connection.execute(
            f"SELECT {row_id_column(connection)}, {text} FROM {quoted}"
            f" WHERE {row_id} > {cast} AND ({condition}) AND ({contains})"
            f" ORDER BY {row_id} LIMIT {int(batch)}",
            [after, *parameters, *needles]).fetchall():
        after = rows[-1][0]
        updates = []
        for found, value in rows:
            values = rewrite(value)
            if values is not None:
                updates.append((*values, found))
        if updates:
            connection.executemany(
                f"UPDATE {quoted} SET {assignments} WHERE {row_id_match(connection)}",
                updates)
            rewritten += len(updates)
    return rewritten


def set_plan_changes(connection, entity: str, change_set: str, changes) -> None:
    """`_publish_plan.changes` of the given (pk, changes) rows, through a temporary table
    filled by COPY (PostgreSQL: sync.publish_plan computes changes in Python there)."""
    connection.execute("DROP TABLE IF EXISTS pg_temp._plan_changes")
    connection.execute("CREATE TEMP TABLE _plan_changes (pk TEXT PRIMARY KEY, changes TEXT)"
                       " ON COMMIT DROP")
    connection.copy_rows("pg_temp._plan_changes", ("pk", "changes"), changes)
    connection.execute(
        "UPDATE _publish_plan p SET changes = n.changes FROM pg_temp._plan_changes n"
        " WHERE p.entity = ? AND p.change_set = ? AND p.pk = n.pk", (entity, change_set))
