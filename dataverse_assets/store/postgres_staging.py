"""Staged rows in a PostgreSQL store: the statements of sync.stage.StagingWriter that differ
from SQLite's (docs/store-backends.md, "Staging in PostgreSQL").

- A staging table is `UNLOGGED`, in the `staging` schema, its column types PostgreSQL's, and
  its unique (_change_set, _pk) index made with the table (SQLite builds it after a first
  change set's rows; PostgreSQL does not need that, see below).
- Rows go in with COPY into a temporary table, then `INSERT ... SELECT DISTINCT ON
  (_change_set, _pk) ... ON CONFLICT DO UPDATE`: a key staged twice keeps its last version
  (the highest row number, as SQLite's INSERT OR REPLACE in page order), and a change set
  staged again over a killed fetch's rows replaces them.
- Every value is converted to its column's type first (schema.to_postgres_value): one that
  does not fit is NULL in that column, exact in json_response, and an issue naming the record
  and column. PostgreSQL would refuse the whole row, and abort the transaction with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dataverse_assets.store.backend import POSTGRES
from dataverse_assets.store.identifiers import quote_identifier
from dataverse_assets.store.schema import to_postgres_value
from dataverse_assets.store.staging_store import STAGING_SCHEMA

_LOAD_SUFFIX = "__load"
_ROW_NUMBER = "_load_row"


def staged_name(table: str) -> str:
    return f"{STAGING_SCHEMA}.{quote_identifier(table)}"


def _load_table(table: str) -> str:
    return quote_identifier(table + _LOAD_SUFFIX)


def has_key_index(connection, table: str) -> bool:
    return connection.execute(
        "SELECT 1 FROM pg_index WHERE indrelid = to_regclass(?) AND indisunique",
        (staged_name(table),)).fetchone() is not None


def create_staging_table(connection, table: str, columns: Sequence[str],
                         types: dict[str, str]) -> None:
    definitions = ", ".join(
        f"{quote_identifier(c)} {POSTGRES.column_type(types.get(c, 'TEXT'))}" for c in columns)
    connection.execute(f"CREATE UNLOGGED TABLE IF NOT EXISTS {staged_name(table)}"
                       f" ({definitions})")


def add_staging_column(connection, table: str, column: str, sqlite_type: str) -> None:
    connection.execute(f"ALTER TABLE {staged_name(table)} ADD COLUMN IF NOT EXISTS"
                       f" {quote_identifier(column)} {POSTGRES.column_type(sqlite_type)}")


def create_indexes(connection, table: str, key_index: str) -> None:
    """The (_change_set, _op) index and the unique key index (both once)."""
    connection.execute(
        f"CREATE INDEX IF NOT EXISTS {quote_identifier(table + '__op')}"
        f" ON {staged_name(table)} (_change_set, _op)")
    if not has_key_index(connection, table):
        dedupe_keys(connection, table)
        connection.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {quote_identifier(key_index)}"
                           f" ON {staged_name(table)} (_change_set, _pk)")


def dedupe_keys(connection, table: str) -> None:
    """Rows of one key staged twice without the key index (none are made so here; a table
    copied from elsewhere): one is kept."""
    connection.execute(
        f"DELETE FROM {staged_name(table)} a USING {staged_name(table)} b"
        " WHERE a._change_set = b._change_set AND a._pk = b._pk AND a.ctid < b.ctid")


def create_keys_table(connection, keys_table: str) -> None:
    connection.execute(
        f"CREATE UNLOGGED TABLE IF NOT EXISTS {staged_name(keys_table)} (_change_set"
        f" {POSTGRES.column_type('TEXT')} NOT NULL, _pk {POSTGRES.column_type('TEXT')}"
        " NOT NULL, PRIMARY KEY (_change_set, _pk))")


def prepare_load(connection, table: str, columns: Sequence[str]) -> None:
    """The temporary table a change set's rows are copied into (dropped at commit)."""
    load = _load_table(table)
    connection.execute(f"DROP TABLE IF EXISTS pg_temp.{load}")
    connection.execute(
        f"CREATE TEMP TABLE {load} ON COMMIT DROP AS SELECT"
        f" {', '.join(quote_identifier(c) for c in columns)}, 0::bigint AS {_ROW_NUMBER}"
        f" FROM {staged_name(table)} WITH NO DATA")


def typed_rows(rows: Iterable[tuple], columns: Sequence[str], types: dict[str, str],
               first_data: int, data_count: int, issues: list[dict], change_set: str,
               entity: str, start: int) -> Iterable[tuple]:
    """The rows with each schema column's value converted to its type (one that does not fit:
    NULL and an issue), numbered from `start`."""
    data_types = [types.get(c, "TEXT") for c in columns[first_data:first_data + data_count]]
    data_names = columns[first_data:first_data + data_count]
    last = first_data + data_count
    for number, row in enumerate(rows, start=start):
        values = []
        for name, kind, value in zip(data_names, data_types, row[first_data:last], strict=True):
            converted, problem = to_postgres_value(value, kind)
            if problem is not None:
                issues.append({
                    "record_id": row[1], "field": name,
                    "problem": f"{problem}: the {kind} column is NULL, json_response holds the"
                               " exact value",
                    "context": f"change set {change_set} ({entity})"})
            values.append(converted)
        # Meta columns are ours (text, numbers); json_response is the record's own JSON
        # text, in which orjson escapes a NUL character.
        yield (*row[:first_data], *values, *row[last:], number)


def write_rows(connection, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> None:
    """COPY numbered rows (`typed_rows`) into the load table, then upsert them by key, the
    last of a key winning."""
    prepare_load(connection, table, columns)
    load = _load_table(table)
    connection.copy_rows(load, [*columns, _ROW_NUMBER], rows)
    names = ", ".join(quote_identifier(c) for c in columns)
    updates = ", ".join(f"{quote_identifier(c)} = excluded.{quote_identifier(c)}"
                        for c in columns if c not in ("_change_set", "_pk"))
    connection.execute(
        f"INSERT INTO {staged_name(table)} ({names}) SELECT DISTINCT ON (_change_set, _pk)"
        f" {names} FROM {load} ORDER BY _change_set, _pk, {_ROW_NUMBER} DESC"
        f" ON CONFLICT (_change_set, _pk) DO UPDATE SET {updates}")


def write_keys(connection, keys_table: str, change_set: str, keys: Iterable[str]) -> None:
    connection.execute(
        f"INSERT INTO {staged_name(keys_table)} (_change_set, _pk)"
        " SELECT ?, k FROM unnest(?::text[]) AS k ON CONFLICT DO NOTHING",
        (change_set, list(keys)))
