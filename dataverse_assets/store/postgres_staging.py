"""Staged rows in a PostgreSQL store: the statements of sync.stage.StagingWriter that differ
from SQLite's (docs/store-backends.md, "Staging in PostgreSQL").

- A staging table is `UNLOGGED`, in the `staging` schema, its column types PostgreSQL's, its
  unique (_change_set, _pk) index made with the table (SQLite builds it after a first change
  set's rows; PostgreSQL does not need that, see below), and its text and binary columns
  compressed with lz4 where the server has it: pglz, PostgreSQL's default, spent more of the
  server's time than anything else in staging (a record's JSON is ~2.5 KB, past the 2 KB at
  which PostgreSQL compresses a row), lz4 a third of it for nearly the same size.
- Rows are COPYed straight into the staging table (binary COPY when the table's column types
  are the schema's). A key staged twice keeps its last version (page order, as SQLite's
  INSERT OR REPLACE): within a batch by keeping the last row of a key before COPY; across
  batches by deleting the change set's earlier rows of the batch's keys first (an index probe
  per key that nearly always finds nothing; the first batch after `start`, which deleted the
  change set's rows, skips it); not a savepoint per batch catching the conflict: a 1M-row
  change set would hold ~200 subtransactions, past the 64 PostgreSQL tracks per transaction,
  which slows other sessions' visibility checks while it runs. A change set staged again over
  a killed fetch's rows replaces them (StagingWriter.start deletes them).
- Every value is converted to its column's type first (schema.to_postgres_value): one that
  does not fit is NULL in that column, exact in json_response, and an issue naming the record
  and column. PostgreSQL would refuse the whole row, and abort the transaction with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from dataverse_assets.store.backend import POSTGRES
from dataverse_assets.store.identifiers import quote_identifier
from dataverse_assets.store.schema import SQLITE_INTEGER_RANGE, to_postgres_value
from dataverse_assets.store.staging_store import STAGING_SCHEMA

# The type OIDs binary COPY sends each kind of column as (pg_type: text, int8, float8, bytea).
_OIDS = {"TEXT": 25, "INTEGER": 20, "REAL": 701, "BLOB": 17}
# What a value of each kind already is when nothing needs converting.
_PYTHON_TYPES = {"TEXT": str, "INTEGER": int, "REAL": float, "BLOB": bytes}
_INFINITIES = (float("inf"), float("-inf"))
_IN_INT64 = SQLITE_INTEGER_RANGE.__contains__
_NONE = type(None)


def staged_name(table: str) -> str:
    return f"{STAGING_SCHEMA}.{quote_identifier(table)}"


def has_key_index(connection, table: str) -> bool:
    return connection.execute(
        "SELECT 1 FROM pg_index WHERE indrelid = to_regclass(?) AND indisunique",
        (staged_name(table),)).fetchone() is not None


def _lz4(connection) -> bool:
    """Whether the server compresses with lz4 (PostgreSQL 14 on, built with it)."""
    row = connection.execute(
        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings"
        " WHERE name = 'default_toast_compression'").fetchone()
    return bool(row and row[0])


def _column_definition(name: str, sqlite_type: str, lz4: bool) -> str:
    kind = POSTGRES.column_type(sqlite_type)
    if lz4 and sqlite_type.upper() in ("TEXT", "BLOB"):
        base, _, collation = kind.partition(" ")  # COMPRESSION goes before COLLATE
        kind = f"{base} COMPRESSION lz4 {collation}".rstrip()
    return f"{quote_identifier(name)} {kind}"


def create_staging_table(connection, table: str, columns: Sequence[str],
                         types: dict[str, str]) -> None:
    lz4 = _lz4(connection)
    definitions = ", ".join(_column_definition(c, types.get(c, "TEXT"), lz4) for c in columns)
    connection.execute(f"CREATE UNLOGGED TABLE IF NOT EXISTS {staged_name(table)}"
                       f" ({definitions})")


def add_staging_column(connection, table: str, column: str, sqlite_type: str) -> None:
    connection.execute(f"ALTER TABLE {staged_name(table)} ADD COLUMN IF NOT EXISTS"
                       f" {_column_definition(column, sqlite_type, _lz4(connection))}")


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


def copy_types(connection, table: str, columns: Sequence[str],
               types: dict[str, str]) -> list[int] | None:
    """The type OIDs to COPY `columns` in binary as, when the table's columns have exactly the
    types `typed_rows` converts values to; None otherwise (a kind binary COPY does not know,
    or a column made with another type: text COPY lets the server convert)."""
    wanted = [_OIDS.get(types.get(c, "TEXT").upper()) for c in columns]
    found = dict(connection.execute(
        "SELECT attname, atttypid::bigint FROM pg_attribute WHERE attrelid = to_regclass(?)"
        " AND attnum > 0 AND NOT attisdropped", (staged_name(table),)).fetchall())
    actual = [found.get(c) for c in columns]
    return wanted if actual == wanted and None not in wanted else None


def typed_rows(rows: Iterable[tuple], columns: Sequence[str], types: dict[str, str],
               first_data: int, data_count: int, issues: list[dict], change_set: str,
               entity: str, plans: dict | None = None) -> Iterator[Sequence]:
    """The rows with each schema column's value converted to its type (one that does not fit:
    NULL and an issue).

    Nearly every value is already of its column's type and fits: a row is converted only
    where its values' Python types (a signature, planned once) say so, or where an integer or
    float is out of range. Text values are looked at for a NUL only when the row's last
    column, json_response (the record's own JSON, as orjson writes it), holds the escape
    `\\u0000`: a text value with a NUL is written so. `plans`: the plans of earlier batches
    of the same columns and types, kept by the caller (a dict it hands to every call)."""
    names = columns[first_data:first_data + data_count]
    kinds = [types.get(c, "TEXT") for c in names]
    wanted = [_PYTHON_TYPES.get(kind.upper()) for kind in kinds]
    last = first_data + data_count
    plans = {} if plans is None else plans
    for row in rows:
        data = row[first_data:last]
        signature = tuple(map(type, data))
        plan = plans.get(signature)
        if plan is None:
            plan = plans[signature] = _plan(signature, wanted)
        convert, integers, floats, texts = plan
        body = row[-1]
        if texts and not (isinstance(body, str) and "\\u0000" not in body):
            convert = (*convert, *texts)
        # (map and all: the common case, every number in range, without a Python loop)
        if integers and not all(map(_IN_INT64, map(data.__getitem__, integers))):
            convert = (*convert, *(i for i in integers if not _IN_INT64(data[i])))
        if floats and any(map(_INFINITIES.__contains__, map(data.__getitem__, floats))):
            convert = (*convert, *(i for i in floats if data[i] in _INFINITIES))
        if not convert:
            yield row
            continue
        values = list(row)
        for index in convert:
            converted, problem = to_postgres_value(data[index], kinds[index])
            if problem is not None:
                issues.append({
                    "record_id": row[1], "field": names[index],
                    "problem": f"{problem}: the {kinds[index]} column is NULL, json_response"
                               " holds the exact value",
                    "context": f"change set {change_set} ({entity})"})
            values[first_data + index] = converted
        # Meta columns are ours (text, numbers); json_response is the record's own JSON
        # text, in which orjson escapes a NUL character.
        yield values


def _plan(signature: tuple, wanted: list) -> tuple[tuple[int, ...], ...]:
    """For a row's value types: the columns to convert (a value not of its column's type),
    the integers and floats to check against their range (only values of exactly those
    types: `in range(...)` counts through the range for anything else), and the texts to
    check for NUL. A boolean in a number column goes as it is: psycopg sends it as 0 or 1
    (PostgresConnection's dumper in text, the integer it is in binary), as SQLite binds it."""
    convert, integers, floats, texts = [], [], [], []
    for index, (kind, expected) in enumerate(zip(signature, wanted, strict=True)):
        if kind is _NONE or (kind is bool and expected in (int, float)):
            continue
        if kind is not expected:
            convert.append(index)
        elif kind is int:
            integers.append(index)
        elif kind is float:
            floats.append(index)
        elif kind is str:
            texts.append(index)
    return tuple(convert), tuple(integers), tuple(floats), tuple(texts)


def write_rows(connection, table: str, columns: Sequence[str], change_set: str,
               rows: Iterable[Sequence], *, replace: bool, types: list[int] | None) -> int:
    """Write a batch of one change set's (typed) rows: the last row of a key wins, over the
    batch's earlier rows of it and (`replace`) over rows of it written before. Returns how
    many more of the change set's rows are upserts than before (an earlier upsert replaced
    counts -1)."""
    latest = {row[1]: row for row in rows}  # (a key's place is its first row's: no matter)
    upserts = sum(1 for row in latest.values() if row[2] == "upsert")
    if replace and latest:
        # (psycopg's `%b`: the keys as a binary array, which costs the client a fifth of a
        # text one's quoting; PostgresConnection.execute knows only `?`.)
        replaced = connection.raw.execute(
            f"DELETE FROM {_percent(staged_name(table))} WHERE _change_set = %s AND _pk = ANY(%b)"
            " RETURNING _op", (change_set, list(latest))).fetchall()
        upserts -= sum(1 for (op,) in replaced if op == "upsert")
    connection.copy_rows(staged_name(table), columns, latest.values(), types=types)
    return upserts


def _percent(name: str) -> str:
    """A name in a statement with psycopg's placeholders: a `%` in it doubled."""
    return name.replace("%", "%%")


def write_keys(connection, keys_table: str, change_set: str, keys: Iterable[str]) -> None:
    connection.raw.execute(  # (`%b`: as in write_rows)
        f"INSERT INTO {_percent(staged_name(keys_table))} (_change_set, _pk)"
        " SELECT %s, k FROM unnest(%b::text[]) AS k ON CONFLICT DO NOTHING",
        (change_set, list(keys)))
