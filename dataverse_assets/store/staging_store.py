"""The staging store: staged rows live in a file of their own beside the mirror, written cheaply.

Staging (`_staging__E`, `_staging_keys__E`) is derived from the archive: any change set can be
staged again from its archived pages. So it need not be durable, and the mirror file need not
hold every row twice. It lives in `<mirror>-staging` (`data/dataverse.db-staging`), attached
to every connection `db.connect` makes as the schema `staging`, in WAL mode with
`synchronous=OFF`: a commit there never waits for the disk. Statements name staging tables
without a schema (SQLite finds them in the attached file); only the statements that create
them say `staging.`.

What a crash can cost, and how it heals:

- A process that dies (SIGKILL, a crash) loses nothing committed: the pages are in the
  operating system's cache, and WAL keeps the file consistent.
- An operating-system crash or power loss can lose the last commits or damage the file, since
  nothing was synced. Such a crash is a reboot, so a staging file written during an earlier
  boot (its `_staging_meta.boot_id` is not this boot's) is discarded when the mirror is next
  opened, as is one SQLite cannot read.
- Whatever the cause, a change set counts as staged only if the staging file itself says so
  (`_staged_here`, committed with its rows). A change set the mirror recorded as staged
  (`_staged`) but whose rows the staging file lacks is staged again from the archive before it
  is published (`sync.steps.publish`).

A mirror made before this file existed has its staging tables moved here the first time it is
opened (once; their change sets stay staged).

In PostgreSQL (store.backend) `staging` is a schema of the mirror's own database, its tables
UNLOGGED (not written to the server's WAL: cheap, and emptied by a server crash, which the
`_staged_here` rule above heals the same way). There is no boot to outlive and no file to
attach; the functions below that take a connection work on either.
"""

from __future__ import annotations

import fcntl
import functools
import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dataverse_assets.store.backend import POSTGRES, dialect_of
from dataverse_assets.store.identifiers import quote_identifier

STAGING_SCHEMA = "staging"
STAGING_TABLE_PREFIXES = ("_staging__", "_staging_keys__")
_MARKERS = "_staged_here"
_PRESTAGED = "_prestaged"
_META = "_staging_meta"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


_SUFFIX = "-staging"


def staging_path(db_path: str | Path) -> Path:
    """The staging file of the mirror at `db_path`: beside it, named like its -wal file."""
    path = Path(db_path)
    return path.with_name(path.name + _SUFFIX)


def is_staging_file(path: str | Path) -> bool:
    return str(path).endswith(_SUFFIX)


def staging_files(db_path: str | Path) -> list[Path]:
    """The staging file, SQLite's files of it (WAL, shared memory) and its lock file."""
    path = staging_path(db_path)
    return [*_sqlite_files(path), _lock_file(path)]


def _lock_file(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _sqlite_files(path: Path) -> list[Path]:
    return [path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))]


def is_staging_table(table: str) -> bool:
    return table.startswith(STAGING_TABLE_PREFIXES)


@functools.cache
def this_boot() -> str | None:
    """This boot of the machine (Linux's boot id); None where the system does not say."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


@contextmanager
def _exclusively(path: Path) -> Iterator[None]:
    """Held by one process at a time while a staging file is made or discarded."""
    with open(_lock_file(path), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _usable(connection: sqlite3.Connection) -> bool:
    """Is the attached staging file ready for use: readable, set up, of this boot?"""
    try:
        if connection.execute(
                f"SELECT count(*) FROM {STAGING_SCHEMA}.sqlite_master WHERE name IN (?, ?)",
                (_MARKERS, _PRESTAGED)).fetchone()[0] < 2:
            return False
        row = connection.execute(
            f"SELECT value FROM {STAGING_SCHEMA}.{_META} WHERE name = 'boot_id'").fetchone()
    except sqlite3.DatabaseError:
        return False
    boot = this_boot()
    return row is not None and (boot is None or row[0] == boot)


def _attach(connection: sqlite3.Connection, path: Path) -> None:
    connection.execute(f"ATTACH DATABASE ? AS {STAGING_SCHEMA}", (str(path),))


def _attached(connection: sqlite3.Connection) -> bool:
    return any(row[1] == STAGING_SCHEMA for row in connection.execute("PRAGMA database_list"))


def _attached_and_usable(connection: sqlite3.Connection, path: Path) -> bool:
    """Attach the file at `path` (if not yet) and say whether it is ready for use."""
    if not _attached(connection):
        try:
            _attach(connection, path)
        except sqlite3.DatabaseError:  # not a database: SQLite refuses to attach it
            return False
    return _usable(connection)


_MARKER_COLUMNS = ("entity", "change_set", "rows", "staged_at")
_PRESTAGED_COLUMNS = ("entity", "change_set", "fingerprint", "rows", "present", "counts",
                      "issues")
_STAGING_TABLES_DDL = (
    f"CREATE {{unlogged}}TABLE IF NOT EXISTS {STAGING_SCHEMA}.{_MARKERS}"
    " (entity TEXT NOT NULL, change_set TEXT NOT NULL, rows INTEGER"
    " NOT NULL, staged_at TEXT NOT NULL, PRIMARY KEY (entity, change_set))",
    f"CREATE {{unlogged}}TABLE IF NOT EXISTS {STAGING_SCHEMA}.{_PRESTAGED}"
    " (entity TEXT NOT NULL, change_set TEXT NOT NULL, fingerprint TEXT"
    " NOT NULL, rows INTEGER NOT NULL, present INTEGER NOT NULL, counts TEXT"
    " NOT NULL, issues TEXT NOT NULL, PRIMARY KEY (entity, change_set))",
)


def prepare_postgres_staging(connection) -> None:
    """The `staging` schema and its bookkeeping tables in a PostgreSQL store (inside the
    transaction of db.connect that prepares the store)."""
    connection.execute(f"CREATE SCHEMA IF NOT EXISTS {STAGING_SCHEMA}")
    for statement in _STAGING_TABLES_DDL:
        connection.execute(POSTGRES.render_ddl(statement.format(unlogged="UNLOGGED ")))


def postgres_staging_prepared(connection) -> bool:
    return connection.execute(
        "SELECT to_regclass(?) IS NOT NULL AND to_regclass(?) IS NOT NULL",
        (f"{STAGING_SCHEMA}.{_MARKERS}", f"{STAGING_SCHEMA}.{_PRESTAGED}")).fetchone()[0]


def _make(connection: sqlite3.Connection, path: Path) -> None:
    """Discard whatever is at `path` (an unreadable file, one of an earlier boot) and make a
    new staging file there, attached. Called holding _exclusively(path)."""
    if _attached(connection):
        connection.execute(f"DETACH DATABASE {STAGING_SCHEMA}")
    for file in _sqlite_files(path):
        file.unlink(missing_ok=True)
    _attach(connection, path)
    # Before the first table: the mirror's page size, and space freed by retention can be
    # given back a few pages at a time.
    connection.execute(f"PRAGMA {STAGING_SCHEMA}.page_size=16384")
    connection.execute(f"PRAGMA {STAGING_SCHEMA}.auto_vacuum=INCREMENTAL")
    connection.execute(f"PRAGMA {STAGING_SCHEMA}.journal_mode=WAL")
    connection.execute("BEGIN IMMEDIATE")
    connection.execute(f"CREATE TABLE IF NOT EXISTS {STAGING_SCHEMA}.{_META}"
                       " (name TEXT PRIMARY KEY, value TEXT)")
    connection.execute(f"INSERT OR REPLACE INTO {STAGING_SCHEMA}.{_META} VALUES"
                       " ('boot_id', ?)", (this_boot() or "",))
    for statement in _STAGING_TABLES_DDL:
        connection.execute(statement.format(unlogged=""))
    connection.execute("COMMIT")


def attach_staging(connection: sqlite3.Connection, db_path: str | Path) -> None:
    """Attach the mirror's staging file to `connection` as `staging` (making it, or a new one
    in place of one that cannot be trusted; see the module), and move an older mirror's
    staging tables into it. Called by db.connect for every connection."""
    path = staging_path(db_path)
    if not _attached_and_usable(connection, path):
        with _exclusively(path):
            # Again: another process may have made it meanwhile.
            if not _attached_and_usable(connection, path):
                _make(connection, path)
    # (WAL is the file's own, set by _make.) Nothing here is synced: see the module for why
    # that is safe.
    connection.execute(f"PRAGMA {STAGING_SCHEMA}.synchronous=OFF")
    connection.execute(f"PRAGMA {STAGING_SCHEMA}.cache_size=-32768")
    if _tables_in_main(connection):
        _move_from_main(connection)


def _tables_in_main(connection: sqlite3.Connection) -> list[str]:
    return [name for (name,) in connection.execute(
        "SELECT name FROM main.sqlite_master WHERE type = 'table'"
        " AND (name LIKE '\\_staging\\_\\_%' ESCAPE '\\'"
        " OR name LIKE '\\_staging\\_keys\\_\\_%' ESCAPE '\\')")]


_CREATE = re.compile(r"^CREATE (UNIQUE )?(TABLE|INDEX) ")


def _move_from_main(connection: sqlite3.Connection) -> None:
    """Move a mirror's staging tables (made before the staging file) into the staging file,
    with their indexes, and mark their change sets staged there: once, in one transaction."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        for table in _tables_in_main(connection):  # again: another process may have moved them
            objects = connection.execute(
                "SELECT type, sql FROM main.sqlite_master WHERE tbl_name = ? AND sql IS NOT"
                " NULL ORDER BY type = 'index'", (table,)).fetchall()
            quoted = quote_identifier(table)
            connection.execute(f"DROP TABLE IF EXISTS {STAGING_SCHEMA}.{quoted}")
            for kind, sql in objects:
                connection.execute(_CREATE.sub(
                    lambda m: f"CREATE {m.group(1) or ''}{m.group(2)} {STAGING_SCHEMA}.", sql,
                    count=1))
                if kind == "table":
                    connection.execute(f"INSERT INTO {STAGING_SCHEMA}.{quoted}"
                                       f" SELECT * FROM main.{quoted}")
            connection.execute(f"DROP TABLE main.{quoted}")
        if connection.execute("SELECT 1 FROM main.sqlite_master WHERE name = '_staged'"
                              ).fetchone():
            connection.execute(
                f"INSERT OR REPLACE INTO {STAGING_SCHEMA}.{_MARKERS}"
                " SELECT entity, change_set, rows, staged_at FROM main._staged"
                " WHERE pruned_at IS NULL")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def mark_staged_here(connection: sqlite3.Connection, entity: str, change_set: str,
                     rows: int, staged_at: str) -> None:
    """The change set's rows are in the staging file (inside the transaction that wrote them)."""
    connection.execute(
        dialect_of(connection).upsert(f"{STAGING_SCHEMA}.{_MARKERS}", _MARKER_COLUMNS,
                                      ("entity", "change_set")),
        (entity, change_set, rows, staged_at))


def forget_staged_here(connection: sqlite3.Connection, entity: str,
                       change_set: str | None = None) -> None:
    """The change set's (or every change set's) rows are gone from the staging file."""
    if change_set is None:
        connection.execute(f"DELETE FROM {STAGING_SCHEMA}.{_MARKERS} WHERE entity = ?",
                           (entity,))
    else:
        connection.execute(f"DELETE FROM {STAGING_SCHEMA}.{_MARKERS} WHERE entity = ?"
                           " AND change_set = ?", (entity, change_set))


def staged_here(connection: sqlite3.Connection, entity: str, change_set: str) -> bool:
    """Are the change set's staged rows in the staging file?"""
    return connection.execute(
        f"SELECT 1 FROM {STAGING_SCHEMA}.{_MARKERS} WHERE entity = ? AND change_set = ?",
        (entity, change_set)).fetchone() is not None


# -- rows staged while a fetch ran (sync.prestage) ---------------------------------------------
# Written by a connection to the staging file itself (its tables in `main` there); read and
# taken by a mirror connection (`staging.`). `schema` says which.

def record_prestaged(connection: sqlite3.Connection, entity: str, change_set: str,
                     fingerprint: str, rows: int, counts: dict, issues: list[dict], *,
                     schema: str = STAGING_SCHEMA) -> None:
    """The fetch of the change set completed and its pages are staged, with `fingerprint`:
    `rows` written, and the rows and keys present now (checked again when they are taken)."""
    connection.execute(
        dialect_of(connection).upsert(f"{schema}.{_PRESTAGED}", _PRESTAGED_COLUMNS,
                                      ("entity", "change_set")),
        (entity, change_set, fingerprint, rows, present_rows(connection, entity, change_set),
         json.dumps(counts), json.dumps(issues)))


def present_rows(connection: sqlite3.Connection, entity: str, change_set: str) -> int:
    """The change set's rows and key-scan keys in the staging tables (their indexes count)."""
    total = 0
    postgres = dialect_of(connection) is POSTGRES
    for prefix in STAGING_TABLE_PREFIXES:
        quoted = quote_identifier(prefix + entity)
        if postgres:  # (a failed statement would abort the caller's transaction)
            if connection.execute("SELECT to_regclass(?) IS NOT NULL",
                                  (f"{STAGING_SCHEMA}.{quoted}",)).fetchone()[0]:
                total += connection.execute(
                    f"SELECT count(*) FROM {STAGING_SCHEMA}.{quoted} WHERE _change_set = ?",
                    (change_set,)).fetchone()[0]
            continue
        try:
            total += connection.execute(f"SELECT count(*) FROM {quoted} WHERE _change_set = ?",
                                        (change_set,)).fetchone()[0]
        except sqlite3.OperationalError:  # no such table (no key scan yet)
            pass
    return total


def prestaged_change_sets(connection: sqlite3.Connection, entity: str) -> set[str]:
    return {row[0] for row in connection.execute(
        f"SELECT change_set FROM {STAGING_SCHEMA}.{_PRESTAGED} WHERE entity = ?", (entity,))}


def prestaged_exists(connection: sqlite3.Connection, entity: str, change_set: str) -> bool:
    return connection.execute(
        f"SELECT 1 FROM {STAGING_SCHEMA}.{_PRESTAGED} WHERE entity = ? AND change_set = ?",
        (entity, change_set)).fetchone() is not None


def take_prestaged(connection: sqlite3.Connection, entity: str, change_set: str,
                   fingerprint: str) -> tuple[int, dict, list[dict]] | None:
    """(rows, counts, issues) of the change set's rows staged during its fetch if they were
    staged with `fingerprint` and are all still there (None otherwise); the record of them is
    gone either way."""
    row = connection.execute(
        f"SELECT fingerprint, rows, present, counts, issues FROM {STAGING_SCHEMA}.{_PRESTAGED}"
        " WHERE entity = ? AND change_set = ?", (entity, change_set)).fetchone()
    forget_prestaged(connection, entity, change_set)
    if row is None or row[0] != fingerprint:
        return None
    if present_rows(connection, entity, change_set) != row[2]:
        return None  # rows went missing since (retention took them for orphans): not these
    return row[1], json.loads(row[3]), json.loads(row[4])


def forget_prestaged(connection: sqlite3.Connection, entity: str, change_set: str, *,
                     schema: str = STAGING_SCHEMA) -> None:
    connection.execute(f"DELETE FROM {schema}.{_PRESTAGED} WHERE entity = ? AND change_set = ?",
                       (entity, change_set))
