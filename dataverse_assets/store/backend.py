"""The store's two backends, SQLite and PostgreSQL, behind one interface (docs/store-backends.md).

Everything above the store holds a *store address*: a SQLite file's path, or a
`postgresql://` URL. `db.connect(address)` opens either; what is written differently for each
database (types, upserts, JSON, case folding, key patterns, bulk loads, locks) is a `Dialect`'s,
found with `dialect_of(connection)`, so nothing above this layer knows which database it has.

`PostgresConnection` is a psycopg 3 connection with the `sqlite3.Connection` surface the code
uses (`?` and `:name` parameters, tuple rows, explicit BEGIN/COMMIT on an autocommit
connection, `in_transaction`), so modules move to PostgreSQL one at a time. psycopg is imported
only when a PostgreSQL store is opened: SQLite users need not install it.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dataverse_assets.errors import ConfigError, StorageError
from dataverse_assets.store.identifiers import quote_identifier

POSTGRES_SCHEMES = ("postgresql://", "postgres://")

def is_postgres_address(address: object) -> bool:
    return isinstance(address, str) and address.lower().startswith(POSTGRES_SCHEMES)


def postgres_database_name(address: str) -> str:
    """The database a PostgreSQL store URL names (its path; libpq's default, the user's name,
    is not known here: "postgres" then)."""
    from urllib.parse import urlsplit

    return urlsplit(address).path.lstrip("/") or "postgres"


# -- dialects ----------------------------------------------------------------------------------

_DDL_TYPE = re.compile(r'"(?:[^"]|"")*"|\'(?:[^\']|\'\')*\'|\b(TEXT|INTEGER|REAL|BLOB)\b')


@dataclass(frozen=True)
class Dialect:
    """What differs in SQL text between the two databases."""

    name: str
    # The column types the schema registry speaks (SQLite's), as this database calls them.
    types: Mapping[str, str]
    autoincrement_key: str
    # A change-set key pattern test: `<column> <key_match> ?` with `key_pattern` bound.
    key_match: str
    key_pattern: str
    # `a <is_distinct> b`: a null-safe "differs" (SQLite's IS NOT, the standard's IS DISTINCT
    # FROM, which SQLite reads only from 3.39 on).
    is_distinct: str
    # The longest identifier in bytes (None: no limit). PostgreSQL cuts longer names short,
    # silently: a column with such a name is excluded from the schema instead.
    max_identifier_bytes: int | None = None

    def column_type(self, sqlite_type: str) -> str:
        return self.types.get(sqlite_type.upper(), sqlite_type)

    def fits(self, name: str) -> bool:
        """Whether `name` can name a table, view, index or column without being cut short."""
        limit = self.max_identifier_bytes
        return limit is None or len(name.encode()) <= limit

    def render_ddl(self, ddl: str) -> str:
        """DDL written with SQLite's type names, in this database's."""
        if self.name == "sqlite":
            return ddl
        ddl = ddl.replace("INTEGER PRIMARY KEY AUTOINCREMENT", self.autoincrement_key)
        # Type names only: a quoted name or a string literal (a column called "TEXT") stays.
        return _DDL_TYPE.sub(lambda m: self.types[m[1]] if m[1] else m[0], ddl)

    def json_text(self, column: str, key: str) -> str:
        """The text of the top-level member `key` of the JSON text in `column`."""
        if self.name == "sqlite":
            return f"json_extract({column}, {_sql_string('$.' + _json_path_key(key))})"
        # PostgreSQL (15) refuses a `\\u0000` anywhere in a document it reads a member of,
        # `json` as `jsonb`: it is read as U+FFFD (the stored text keeps it; only a member
        # holding a NUL reads differently).
        return (f"(replace({column}, '\\u0000', '\\ufffd')::json"
                f" ->> {_sql_string(key)})")

    def nocase(self, expression: str) -> str:
        """`expression` compared and ordered without ASCII case."""
        return f"{expression} COLLATE NOCASE" if self.name == "sqlite" else f"lower({expression})"

    def upsert(self, table: str, columns: Sequence[str], key: Sequence[str]) -> str:
        """INSERT of `columns` (`?` each) that replaces the row with the same `key`. Name every
        column: SQLite's REPLACE gives the others their defaults, PostgreSQL's keeps them."""
        values = ", ".join("?" for _ in columns)
        return self.upsert_select(table, columns, key, f"VALUES ({values})")

    def upsert_select(self, table: str, columns: Sequence[str], key: Sequence[str],
                      select: str) -> str:
        """INSERT of `select`'s rows into `columns` that replaces a row with the same `key`."""
        names = ", ".join(quote_identifier(c) for c in columns)
        if self.name == "sqlite":
            return f"INSERT OR REPLACE INTO {table} ({names}) {select}"
        others = [c for c in columns if c not in key] or list(key)
        assignments = ", ".join(f"{quote_identifier(c)} = excluded.{quote_identifier(c)}"
                                for c in others)
        return (f"INSERT INTO {table} ({names}) {select} ON CONFLICT"
                f" ({', '.join(quote_identifier(c) for c in key)}) DO UPDATE SET {assignments}")

    def or_fail(self, verb: str) -> str:
        """`INSERT`/`UPDATE` that fails the statement, not the transaction, on a violated
        constraint in SQLite (no statement journal: see sync.publish_execute); PostgreSQL's
        plain statement (any error ends the transaction there, which is what the publish does
        anyway)."""
        return f"{verb} OR FAIL" if self.name == "sqlite" else verb

    def temp_table(self, name: str) -> str:
        """A temporary table of the connection, schema-qualified."""
        return f"{'temp' if self.name == 'sqlite' else 'pg_temp'}.{quote_identifier(name)}"

    def string_agg(self, expression: str, separator: str, order_by: str) -> str:
        """The values of `expression` joined by `separator`, in `order_by` order (SQLite:
        the order of the subquery the caller reads from)."""
        if self.name == "sqlite":
            return f"group_concat({expression}, {_sql_string(separator)})"
        return f"string_agg({expression}, {_sql_string(separator)} ORDER BY {order_by})"

    def insert_ignore(self, table: str, columns: Sequence[str]) -> str:
        """INSERT of `columns` (`?` each) that skips a row whose key is taken."""
        names = ", ".join(quote_identifier(c) for c in columns)
        values = ", ".join("?" for _ in columns)
        if self.name == "sqlite":
            return f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({values})"
        return f"INSERT INTO {table} ({names}) VALUES ({values}) ON CONFLICT DO NOTHING"


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _json_path_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else '"' + key + '"'


_KEY_REGEX = r"^[0-9]{8}T[0-9]{6}Z$"  # names.KEY_GLOB, as a regular expression

SQLITE = Dialect(
    "sqlite", {"TEXT": "TEXT", "INTEGER": "INTEGER", "REAL": "REAL", "BLOB": "BLOB"},
    "INTEGER PRIMARY KEY AUTOINCREMENT", "GLOB",
    "[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]T[0-9][0-9][0-9][0-9][0-9][0-9]Z", "IS NOT")
# Text compares and sorts by code point, as SQLite's BINARY does (a server's default collation
# would order keys, and so chunk boundaries and every ORDER BY, by its locale).
POSTGRES = Dialect(
    "postgresql", {"TEXT": 'text COLLATE "C"', "INTEGER": "bigint", "REAL": "double precision",
                   "BLOB": "bytea"},
    "bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "~", _KEY_REGEX,
    "IS DISTINCT FROM", 63)


def dialect_of(connection: object) -> Dialect:
    return getattr(connection, "dialect", SQLITE)


def dialect_for_address(address: object) -> Dialect:
    """The dialect of the store at `address` (a SQLite path or a PostgreSQL URL)."""
    return POSTGRES if is_postgres_address(address) else SQLITE


def bulk_insert(connection: Any, table: str, columns: Sequence[str],
                rows: Iterable[Sequence[object]]) -> None:
    """Append rows to `table`: executemany in SQLite, COPY in PostgreSQL."""
    if dialect_of(connection).name == "sqlite":
        connection.executemany(
            f"INSERT INTO {table} ({', '.join(quote_identifier(c) for c in columns)})"
            f" VALUES ({', '.join('?' for _ in columns)})", rows)
    else:
        connection.copy_rows(table, columns, rows)


# -- advisory lock keys --------------------------------------------------------------------------

# pg_advisory_lock(namespace, key): the namespace keeps ours apart from anyone else's locks in
# the same database ("DVA" plus a kind).
MIRROR_WRITE_LOCK = (0x44564101, 1)  # what a write transaction of the mirror holds
STAGING_WRITE_LOCK = (0x44564101, 2)  # ... of staging
ENTITY_LOCK_NAMESPACE = 0x44564102


def entity_lock_key(entity: str) -> int:
    """A stable 32-bit key for the entity's advisory lock (two entities sharing one only wait
    for each other)."""
    return int.from_bytes(hashlib.blake2b(entity.encode(), digest_size=4).digest(), "big",
                          signed=True)


# -- parameters: sqlite3's `?` and `:name` as psycopg's `%s` and `%(name)s` -----------------------

_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|::|\?|:[A-Za-z_]\w*|%""")


@functools.lru_cache(maxsize=4096)
def postgres_query(sql: str, with_parameters: bool) -> str:
    """`sql` with sqlite3's placeholders as psycopg's (outside literals, quoted names and
    comments; `::` casts stay), and every `%` doubled: psycopg reads it everywhere when
    there are parameters, literals included. Without parameters `%` is itself."""
    if not with_parameters:
        return sql

    def replace(match: re.Match[str]) -> str:
        token = match[0]
        if token == "?":
            return "%s"
        if token == "%":
            return "%%"
        if token.startswith(":") and token != "::":
            return f"%({token[1:]})s"
        return token.replace("%", "%%")

    return _TOKENS.sub(replace, sql)


# -- the PostgreSQL connection ----------------------------------------------------------------

def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise ConfigError("a postgresql:// DATAVERSE_STORE_URL needs psycopg: install the "
                          "project with its deploy extra (pip install '.[deploy]')") from None
    return psycopg


@functools.cache
def _bool_as_int():
    """A dumper sending bools as 0/1: the mirror's flags are INTEGER columns, as in SQLite."""
    from psycopg.types.numeric import Int8Dumper

    class BoolAsInt(Int8Dumper):
        def dump(self, obj: bool) -> bytes:
            return b"1" if obj else b"0"

    return BoolAsInt


# Table DDL written with SQLite's type names (TEXT, INTEGER, REAL, BLOB, in capitals) is
# rendered with PostgreSQL's as it is executed (Dialect.render_ddl): PostgreSQL reads INTEGER
# as a 32-bit int and REAL as a 4-byte float, which would silently narrow the mirror's values.
_DDL = re.compile(r"\s*(CREATE\s+(UNLOGGED\s+|TEMP\s+|TEMPORARY\s+)?TABLE|ALTER\s+TABLE)\b",
                  re.IGNORECASE)


class PostgresConnection:
    """A psycopg 3 connection with the sqlite3.Connection surface the store's callers use."""

    dialect = POSTGRES
    staging_path = ""  # staging is a schema of the same database (docs/store-backends.md)

    def __init__(self, url: str) -> None:
        psycopg = _psycopg()
        self.path = url  # what messages name, as a SQLite connection's file
        try:
            self.raw = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise StorageError(
                f"{url}: cannot connect to the PostgreSQL store ({_first_line(exc)}). Nothing "
                "was read or written. To fix: check that the server runs and "
                "DATAVERSE_STORE_URL names it (host, port, database, user), and the password "
                "(PGPASSWORD or ~/.pgpass)") from None
        self.raw.adapters.register_dumper(bool, _bool_as_int())

    @property
    def in_transaction(self) -> bool:
        # A connection the server ended (UNKNOWN) has no transaction left: the server rolled
        # it back, and a ROLLBACK would only fail and hide the error that said why.
        status = _psycopg().pq.TransactionStatus
        return self.raw.info.transaction_status not in (status.IDLE, status.UNKNOWN)

    @property
    def closed(self) -> bool:
        """Has the session ended (closed here, or ended by the server or the network)?"""
        return self.raw.closed or self.raw.broken

    def execute(self, sql: str, parameters: Sequence[object] | Mapping[str, object] = ()):
        if _DDL.match(sql):
            sql = POSTGRES.render_ddl(sql)
        has = bool(parameters)
        return self.raw.execute(postgres_query(sql, has), parameters if has else None)

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]):
        cursor = self.raw.cursor()
        cursor.executemany(postgres_query(sql, True), rows)
        return cursor

    def executescript(self, script: str) -> None:
        # Several statements: fine without parameters. DDL as in execute.
        self.raw.execute(POSTGRES.render_ddl(script) if _DDL.search(script) else script)

    def copy_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[object]],
                  types: Sequence[int] | None = None) -> int:
        """COPY rows into `table` (psycopg converts each value as for a parameter). With
        `types` (a type OID per column, each value already of its column's Python type: str,
        int, float, bytes or None), in binary: no text for the client to write nor for the
        server to parse."""
        count = 0
        names = ", ".join(quote_identifier(c) for c in columns)
        binary = " (FORMAT BINARY)" if types is not None else ""
        with self.raw.cursor() as cursor, cursor.copy(
                f"COPY {table} ({names}) FROM STDIN{binary}") as copy:
            if types is not None:
                copy.set_types(types)
            for row in rows:
                copy.write_row(row)
                count += 1
        return count

    def commit(self) -> None:
        if self.in_transaction:
            self.raw.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction:
            self.raw.execute("ROLLBACK")

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> PostgresConnection:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        # As sqlite3's: the block's transaction (if any) ends; the connection stays open.
        if self.in_transaction:
            self.rollback() if kind else self.commit()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# (SQLSTATE prefix, what is wrong, what to do), for db.storage_problem.
POSTGRES_PROBLEMS = (
    ("53100", "the PostgreSQL server's disk is full", "free disk space on the server"),
    ("53", "the PostgreSQL server ran out of resources", "check the server"),
    ("25006", "the PostgreSQL store is read-only (a standby, or a read-only transaction)",
     "point DATAVERSE_STORE_URL at the primary, or turn default_transaction_read_only off for "
     "the mirror's user and database"),
    ("08", "the connection to the PostgreSQL server was lost",
     "check that the server runs and is reachable, then run again"),
    ("57P", "the PostgreSQL server ended the connection (it shut down or restarted, or an "
     "administrator ended the session)", "run again once the server is up"),
    ("57014", "a statement was cancelled: it ran past the PostgreSQL user's statement_timeout "
     "(or was cancelled by an administrator)", "find what held it up (a lock on the table "
     "another program held) or raise statement_timeout for the mirror's user (ALTER ROLE ... "
     "SET statement_timeout), then run again"),
    ("42501", "the PostgreSQL user may not create or change the mirror's tables (permission "
     "denied)", "make the user in DATAVERSE_STORE_URL the database's owner, or grant it "
     "CREATE on the database and USAGE and CREATE on its public schema, then run again"),
    ("55P03", "a lock of the PostgreSQL store was not granted in time",
     "let the other writer finish, then run again"),
    ("28", "the PostgreSQL server refused the credentials",
     "check the user in DATAVERSE_STORE_URL and the password (PGPASSWORD or ~/.pgpass)"),
)


def postgres_problem(exc: BaseException) -> tuple[str, str] | None:
    """(what is wrong, what to do) for a psycopg error that means the store cannot be used."""
    state = getattr(exc, "sqlstate", None)
    if not type(exc).__module__.startswith("psycopg"):
        return None
    if state is None and "connection" in str(exc).lower():
        state = "08"
    for prefix, problem, remedy in POSTGRES_PROBLEMS:
        if state and state.startswith(prefix):
            return problem, remedy
    return None
