"""A whole store, as the operations commands handle it: does it hold a mirror, is it reachable
and usable (doctor), is it the same store as another, emptied, a rebuilt one put in place.

A SQLite store is files (the mirror, its -wal and -shm, its staging file); a PostgreSQL store
is a database (tables and views in `public`, the `staging` schema). Nothing above the store
layer does file operations on the mirror or reads either catalog: it calls these.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from dataverse_assets.errors import StorageError
from dataverse_assets.store.backend import (
    PostgresConnection,
    is_postgres_address,
)
from dataverse_assets.store.identifiers import quote_identifier
from dataverse_assets.store.staging_store import STAGING_SCHEMA, staging_files

# Schemas of a PostgreSQL store that hold the mirror (db.connect's search path).
MIRROR_SCHEMAS = ("public", STAGING_SCHEMA)
# A table every mirror has (db.BOOKKEEPING_DDL): a store without it holds no mirror yet.
_MARKER_TABLE = "_sync_state"


def _open_postgres(url: str) -> PostgresConnection:
    """A connection that reads the catalog only: nothing is created (db.connect would make the
    bookkeeping tables). Refused while the PostgreSQL store is unfinished, as db.connect is."""
    return PostgresConnection(url)


def _files(path: Path) -> list[Path]:
    """The mirror file, SQLite's files of it, and its staging file's (moved along with it)."""
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"),
            *staging_files(path)]


def store_exists(address: str | os.PathLike[str]) -> bool:
    """Does the store hold a mirror (a sync made it)? SQLite: its file exists. PostgreSQL:
    the database has the mirror's tables (the database itself is made by its administrator;
    one without them is a mirror not made yet). Nothing is created; a server that cannot be
    reached is a StorageError, not "no mirror"."""
    if not is_postgres_address(address):
        return Path(address).exists()
    with closing(_open_postgres(str(address))) as connection:
        return connection.execute("SELECT to_regclass(?) IS NOT NULL",
                                  (f"public.{_MARKER_TABLE}",)).fetchone()[0]


def target_problem(address: str | os.PathLike[str], *, force: bool) -> str | None:
    """Why a fresh mirror cannot be written at `address` (rebuild --into), or None. SQLite: a
    directory, or a file that is not empty (unless `force`: it is replaced at the end).
    PostgreSQL: a database that holds rows or views (unless `force`: they are dropped
    first)."""
    if not is_postgres_address(address):
        path = Path(address)
        if path.is_dir():
            return "is a directory; give the path of the new database file"
        if path.exists() and path.stat().st_size > 0 and not force:
            return ("already exists and is not empty; rebuild writes a fresh database: "
                    "choose a new path, or pass --force to replace it")
        return None
    with closing(_open_postgres(str(address))) as connection:
        holding = _holding(connection)
    if holding and not force:
        return (f"already exists and is not empty ({holding}); rebuild writes a fresh "
                "mirror: create an empty database (CREATE DATABASE) and name it, or pass "
                "--force to drop every table and view of its public and staging schemas")
    return None


def _relations(connection: PostgresConnection) -> list[tuple[str, str, str]]:
    """(schema, name, kind: r table, v view, m materialized view, p partitioned table) of
    the mirror's schemas."""
    return connection.execute(
        "SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n"
        " ON n.oid = c.relnamespace WHERE n.nspname = ANY(?) AND c.relkind IN"
        " ('r', 'v', 'm', 'p', 'f') ORDER BY 1, 2", (list(MIRROR_SCHEMAS),)).fetchall()


def _holding(connection: PostgresConnection) -> str:
    """What a PostgreSQL store holds, in a few words ('' when nothing: no view, no row; the
    empty tables db.connect makes do not count)."""
    relations = _relations(connection)
    views = [name for _, name, kind in relations if kind in ("v", "m")]
    filled = [name for schema, name, kind in relations if kind in ("r", "p", "f")
              and connection.execute(
                  f"SELECT EXISTS (SELECT 1 FROM {quote_identifier(schema)}."
                  f"{quote_identifier(name)})").fetchone()[0]]
    parts = [f"{len(filled)} table(s) with rows, e.g. {filled[0]}"] if filled else []
    parts += [f"{len(views)} view(s), e.g. {views[0]}"] if views else []
    return ", ".join(parts)


def building_address(into: str | os.PathLike[str]) -> str:
    """Where a rebuild into `into` writes (see move_into_place). SQLite: a file beside it
    (`<into>.rebuilding`, leftovers of an earlier attempt deleted), so `into` stays as it is
    until the rebuild is done. PostgreSQL: `into` itself, emptied first (a database cannot be
    built beside another and renamed over it while anyone is connected, and renaming needs
    its owner): what was there is dropped now (target_problem has let it through: empty, or
    --force)."""
    if is_postgres_address(into):
        discard(str(into))
        return str(into)
    path = Path(into)
    building = path.with_name(path.name + ".rebuilding")
    for leftover in _files(building):
        leftover.unlink(missing_ok=True)
    return str(building)


def discard(address: str | os.PathLike[str]) -> None:
    """Delete a store's mirror. SQLite: its files. PostgreSQL: every table and view of the
    mirror's schemas (the staging schema with them), in one transaction."""
    if not is_postgres_address(address):
        for file in _files(Path(address)):
            file.unlink(missing_ok=True)
        return
    with closing(_open_postgres(str(address))) as connection:
        connection.execute("BEGIN")
        try:
            connection.execute(f"DROP SCHEMA IF EXISTS {STAGING_SCHEMA} CASCADE")
            for schema, name, kind in _relations(connection):
                what = {"v": "VIEW", "m": "MATERIALIZED VIEW", "f": "FOREIGN TABLE"}.get(
                    kind, "TABLE")
                connection.execute(f"DROP {what} IF EXISTS {quote_identifier(schema)}."
                                   f"{quote_identifier(name)} CASCADE")
        except BaseException:
            connection.rollback()
            raise
        connection.commit()


def move_into_place(building: str, into: str | os.PathLike[str]) -> None:
    """A finished rebuild at `building` becomes the store at `into`. SQLite: its files
    replace `into`'s (every connection is closed: SQLite has folded the WAL into the file,
    which can move). PostgreSQL: it is there already (building_address)."""
    if is_postgres_address(into):
        return
    for old in _files(Path(into)):
        old.unlink(missing_ok=True)
    for built, target in zip(_files(Path(building)), _files(Path(into)), strict=True):
        if built.exists():
            built.replace(target)


def nothing_written(into: str | os.PathLike[str]) -> str:
    """What a rebuild that stopped says of `into` once its work is discarded."""
    if is_postgres_address(into):
        return (f"Nothing was written to {into}: what the rebuild wrote was dropped, and the "
                "database holds no table or view in its public and staging schemas")
    return f"Nothing was written to {into}"


def same_store(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> bool:
    """Do two addresses name the same store? SQLite: the same file. PostgreSQL: the same
    database of the same running server, as the servers say (so `localhost` and `127.0.0.1`,
    or two spellings of one URL, are the same); by the URLs' host, port and database when
    one cannot be reached."""
    if is_postgres_address(first) != is_postgres_address(second):
        return False
    if not is_postgres_address(first):
        return Path(first).resolve() == Path(second).resolve()
    try:
        return _server_identity(str(first)) == _server_identity(str(second))
    except StorageError:
        return _url_identity(str(first)) == _url_identity(str(second))


def _server_identity(url: str) -> tuple:
    with closing(_open_postgres(url)) as connection:
        return connection.execute(
            "SELECT d.oid, d.datname, pg_postmaster_start_time(), current_setting('port')"
            " FROM pg_database d WHERE d.datname = current_database()").fetchone()


def _url_identity(url: str) -> tuple:
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = parts.hostname or (query.get("host") or [""])[0] or "localhost"
    return (host, parts.port or 5432, parts.path.lstrip("/"))


# -- what the doctor says of the store ------------------------------------------------------

@dataclass
class StoreReport:
    """A store as the doctor describes it: read only, nothing created."""

    address: str
    ok: bool
    detail: str
    fix: str = ""


def inspect_store(address: str | os.PathLike[str], entities: Sequence[str]) -> StoreReport:
    """Can the mirror be read and written at `address`? SQLite: the file is a database (or
    its folder can hold one). PostgreSQL: the server answers, and the user may create what a
    first sync creates (tables in `public`; the `staging` schema). Nothing is written."""
    if is_postgres_address(address):
        return _inspect_postgres(str(address), entities)
    path = Path(address)
    if not path.exists():
        folder = next((p for p in path.absolute().parents if p.exists()), None)
        if folder is None or not os.access(folder, os.W_OK | os.X_OK):
            return StoreReport(str(path), False,
                               f"SQLite file {path} does not exist and {folder} is not writable",
                               "make the folder writable or set DATAVERSE_DB_PATH (or "
                               "DATAVERSE_STORE_URL) to a writable place")
        return StoreReport(str(path), True, f"SQLite file {path} does not exist yet: the "
                           "first sync creates it")
    try:
        with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)) as db:
            tables = {name for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        return StoreReport(str(path), False, f"SQLite file {path} cannot be read: {exc}",
                           "check DATAVERSE_DB_PATH; if it is the mirror, restore it from a "
                           "backup or rebuild it from the archive (dataverse-assets rebuild)")
    mirrored = sum(1 for entity in entities if entity in tables)
    return StoreReport(str(path), True, f"SQLite file {path}: {_mirrored(mirrored, entities)}")


def _mirrored(count: int, entities: Sequence[str]) -> str:
    if count == 0:
        return "no entity mirrored yet (the first sync creates the tables)"
    return f"{count} of {len(entities)} configured entities mirrored"


def _inspect_postgres(url: str, entities: Sequence[str]) -> StoreReport:
    try:
        connection = _open_postgres(url)
    except StorageError as exc:
        return StoreReport(url, False, str(exc).split(". To fix: ")[0],
                           "check that the server runs and DATAVERSE_STORE_URL names it, and "
                           "the password (PGPASSWORD or ~/.pgpass)")
    with closing(connection):
        version, user, database, create_in_public, create_schema, staging = connection.execute(
            "SELECT current_setting('server_version'), current_user, current_database(),"
            " has_schema_privilege('public', 'CREATE'),"
            " has_database_privilege(current_database(), 'CREATE'),"
            " to_regnamespace(?) IS NOT NULL", (STAGING_SCHEMA,)).fetchone()
        mirrored = connection.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = ANY(?)",
            (list(entities),)).fetchone()[0]
    where = f"PostgreSQL {version}, database {database} as {user}"
    if not create_in_public:
        return StoreReport(url, False, f"{where}: the user may not create tables in schema "
                           "public", f"GRANT CREATE ON SCHEMA public TO {user} (PostgreSQL "
                           "15 no longer lets every user create there), or connect as the "
                           "database's owner")
    if not staging and not create_schema:
        return StoreReport(url, False, f"{where}: the user may not create the schema "
                           f"{STAGING_SCHEMA}", f"GRANT CREATE ON DATABASE {database} TO "
                           f"{user}, or create it: CREATE SCHEMA {STAGING_SCHEMA} AUTHORIZATION "
                           f"{user}")
    return StoreReport(url, True, f"{where}: {_mirrored(mirrored, entities)}")
