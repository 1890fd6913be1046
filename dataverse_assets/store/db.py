"""The SQLite store: one way to open the database, one identifier quoter, the bookkeeping tables.

Sync state lives here, in the target database, so any orchestrator can run a sync statelessly.
"""

from __future__ import annotations

import atexit
import functools
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

from dataverse_assets.errors import StorageError
from dataverse_assets.store.backend import (
    MIRROR_WRITE_LOCK,
    POSTGRES,
    STAGING_WRITE_LOCK,
    PostgresConnection,
    dialect_of,
    is_postgres_address,
    postgres_problem,
)
from dataverse_assets.store.identifiers import quote_identifier
from dataverse_assets.store.staging_store import (
    STAGING_SCHEMA,
    attach_staging,
    is_staging_file,
    is_staging_table,
    postgres_staging_prepared,
    prepare_postgres_staging,
    staging_path,
)


def utc_now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


BOOKKEEPING_DDL = """
CREATE TABLE IF NOT EXISTS _sync_state (
    entity TEXT PRIMARY KEY,
    mode TEXT,
    watermark TEXT,
    delta_token TEXT,
    reconciled_at TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    last_change_set TEXT,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _sync_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    entity TEXT NOT NULL,
    change_set TEXT NOT NULL,
    layer TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    seconds REAL,
    details TEXT
);
CREATE TABLE IF NOT EXISTS _publish_state (
    entity TEXT NOT NULL,
    change_set TEXT NOT NULL,
    status TEXT NOT NULL,
    source_timestamp TEXT,
    staged_at TEXT,
    plan_started_at TEXT,
    plan_finished_at TEXT,
    started_at TEXT,
    finished_at TEXT,
    created INTEGER NOT NULL DEFAULT 0,
    updated INTEGER NOT NULL DEFAULT 0,
    unchanged INTEGER NOT NULL DEFAULT 0,
    stale INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    rows_applied INTEGER NOT NULL DEFAULT 0,
    seconds REAL,
    watermark_before TEXT,
    watermark_after TEXT,
    failed_operation TEXT,
    error_code TEXT,
    error TEXT,
    retry_count INTEGER NOT NULL DEFAULT 0,
    bulk_create INTEGER NOT NULL DEFAULT 0,
    delete_unknown INTEGER,
    PRIMARY KEY (entity, change_set)
);
CREATE TABLE IF NOT EXISTS _schema (
    entity TEXT NOT NULL,
    version INTEGER NOT NULL,
    primary_key TEXT NOT NULL,
    columns_json TEXT NOT NULL,
    decided_from TEXT NOT NULL,
    reasons_json TEXT NOT NULL,
    locked_at TEXT NOT NULL,
    PRIMARY KEY (entity, version)
);
CREATE TABLE IF NOT EXISTS _defunct (
    entity TEXT NOT NULL,
    id TEXT NOT NULL,
    change_set TEXT NOT NULL,
    reason TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (entity, id)
);
CREATE TABLE IF NOT EXISTS _staged (
    entity TEXT NOT NULL,
    change_set TEXT NOT NULL,
    mode TEXT NOT NULL,
    rows INTEGER NOT NULL,
    upserts INTEGER,
    watermark_after TEXT,
    delta_token_after TEXT,
    reconciled INTEGER NOT NULL DEFAULT 0,
    reconciled_at TEXT,
    fetched_at TEXT,
    staged_at TEXT NOT NULL,
    pruned_at TEXT,
    reconcile_scanned INTEGER,
    reconcile_missing INTEGER,
    reconcile_stale INTEGER,
    PRIMARY KEY (entity, change_set)
);
CREATE TABLE IF NOT EXISTS _change_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    entity TEXT NOT NULL,
    change_set TEXT NOT NULL,
    record_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    changes TEXT,
    applied_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS _change_history__record ON _change_history (entity, record_id);
CREATE TABLE IF NOT EXISTS _key_check (
    entity TEXT PRIMARY KEY,
    passed INTEGER NOT NULL,
    checked_through INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    scope TEXT NOT NULL,
    checked_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _locks (
    entity TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    purpose TEXT NOT NULL,
    acquired_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _issues (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    entity TEXT NOT NULL,
    change_set TEXT NOT NULL,
    record_id TEXT,
    field TEXT,
    problem TEXT NOT NULL,
    context TEXT,
    recorded_at TEXT NOT NULL,
    last_seen_at TEXT,
    last_change_set TEXT,
    occurrences INTEGER NOT NULL DEFAULT 1,
    resolved_at TEXT
);
"""
# One open issue per (entity, record, field, problem): the same problem of the same record
# seen again counts, it is not a new row (record_issue). A resolved issue seen again opens a
# new one. A problem of a record without a key (which record it was, only its page says) is a
# row of its own each time.
OPEN_ISSUE_KEY = "entity, record_id, coalesce(field, ''), problem"
OPEN_ISSUE = "resolved_at IS NULL AND record_id IS NOT NULL"
OPEN_ISSUES_INDEX = (f"CREATE UNIQUE INDEX IF NOT EXISTS _issues__open ON _issues"
                      f" ({OPEN_ISSUE_KEY}) WHERE {OPEN_ISSUE}")
# PostgreSQL's B-tree refuses an entry past ~8 KB (a record id or problem can be a megabyte of
# hostile text): the key there is the digests of the long parts (record_issue's ON CONFLICT
# names the same expressions).
POSTGRES_OPEN_ISSUE_KEY = ("entity, md5(record_id), md5(coalesce(field, '')), md5(problem)")
POSTGRES_OPEN_ISSUES_INDEX = (f"CREATE UNIQUE INDEX IF NOT EXISTS _issues__open ON _issues"
                              f" ({POSTGRES_OPEN_ISSUE_KEY}) WHERE {OPEN_ISSUE}")


def open_issue_key(connection) -> str:
    """The open-issue key's expressions, as the store's unique index has them."""
    return POSTGRES_OPEN_ISSUE_KEY if dialect_of(connection) is POSTGRES else OPEN_ISSUE_KEY


# How long a statement waits for another process's write lock on the file before SQLite
# gives up with "database is locked" (entity locks make such waits short and rare).
BUSY_TIMEOUT_SECONDS = 60.0


def connect(db_path: str | Path) -> sqlite3.Connection:
    """Open the mirror database (WAL, foreign keys off, autocommit off) creating it if needed.

    The one place a connection is made, so pragmas and bookkeeping tables are always in place.
    A file that cannot be opened or used (read-only, corrupt, not a database, locked, a full
    disk) is a StorageError naming the file and what to do. `db_path` is a store address
    (store.backend): a SQLite file, or a `postgresql://` URL, for which this returns a
    PostgresConnection with the same surface.
    """
    if is_postgres_address(db_path):
        return connect_postgres(str(db_path))  # type: ignore[return-value]
    path = Path(db_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"{path}: cannot create the mirror database's folder ({exc.strerror}). To fix: "
            "make the folder writable or set DATAVERSE_DB_PATH to a writable place") from None
    with storage_errors(path, "opening the mirror database", "nothing was read or written"):
        connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
                                     factory=MirrorConnection)
        try:
            # One connection of this process prepares a file at a time: on a new file (still
            # in rollback-journal mode until WAL is set) two threads creating the bookkeeping
            # tables at once can deadlock, and SQLite then answers "locked" without waiting.
            with _PREPARING:
                _prepare(connection)
                attach_staging(connection, path)
        except BaseException:
            connection.close()
            raise
    connection.path = str(path.resolve())
    connection.staging_path = str(staging_path(connection.path))
    return connection


_PREPARING = threading.Lock()


def connect_postgres(url: str) -> PostgresConnection:
    """A connection to the PostgreSQL store, its bookkeeping tables in place (see
    store.backend; refused while that store is not finished)."""
    connection = PostgresConnection(url)
    try:
        with storage_errors(url, "opening the mirror database", "nothing was read or written"):
            # Staging tables are found by name, as in SQLite's attached file.
            connection.execute(f"SET search_path TO public, {STAGING_SCHEMA}")
            if not (_postgres_prepared(connection) and postgres_staging_prepared(connection)):
                with transaction(connection):  # one connection prepares at a time
                    prepare_postgres_staging(connection)
                    connection.executescript(POSTGRES.render_ddl(BOOKKEEPING_DDL))
                    connection.execute(POSTGRES_OPEN_ISSUES_INDEX)
                    _add_missing_postgres_columns(connection)
    except BaseException:
        connection.close()
        raise
    return connection


def _postgres_prepared(connection: PostgresConnection) -> bool:
    """Are every bookkeeping table and column there (the usual case: one query, no lock)?"""
    wanted = _bookkeeping_columns()
    found = connection.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public'"
        " AND table_name = ANY(?)", (list(wanted),)).fetchone()[0]
    return found == sum(len(columns) for columns in wanted.values())


def _add_missing_postgres_columns(connection: PostgresConnection) -> None:
    """A store made by an older version gains the columns added since (never loses any)."""
    for table, columns in _bookkeeping_columns().items():
        for name, declaration in columns:
            connection.execute(
                f"ALTER TABLE {quote_identifier(table)} ADD COLUMN IF NOT EXISTS"
                f" {quote_identifier(name)} {POSTGRES.render_ddl(declaration)}")


def _prepare(connection: sqlite3.Connection) -> None:
    # 16 KB pages for new databases (a no-op on existing ones): wide rows (~1.7 KB with
    # json_response) load ~25% faster than with 4 KB pages (benchmarks/run_all.py).
    connection.execute("PRAGMA page_size=16384")
    # Space freed by deletes (retention) can be given back to the file system a few pages at
    # a time (`PRAGMA incremental_vacuum`, maintenance.shrink_database) instead of only by a
    # VACUUM that rewrites the whole file. Takes effect for a new database; an older one is
    # converted once by maintenance. Only asked of a file with no tables yet: on an existing
    # file the pragma waits for the write lock, so every reader (status, the sensors, the UI)
    # would wait for a running publish to commit.
    if not connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
        connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
    connection.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable across application crashes in WAL mode; only an OS crash can lose
    # the last transaction, and the watermark commits with the data, so nothing is skipped.
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
    # 64 MB of page cache (default 2 MB): large change sets touch big indexes. Temp storage
    # stays on file: in memory, the primary-key check's sort alone took 150 MB at 1M rows.
    connection.execute("PRAGMA cache_size=-65536")
    # Checkpoints run on a thread, not inside this connection's commits (see MirrorConnection).
    connection.execute("PRAGMA wal_autocheckpoint=0")
    connection.executescript(BOOKKEEPING_DDL)
    _add_missing_bookkeeping_columns(connection)
    _index_open_issues(connection)


def _index_open_issues(connection: sqlite3.Connection) -> None:
    """The open-issue key; a database from before it had one row per sighting: those rows are
    folded into one each (count, first and last sighting) once, first."""
    try:
        connection.execute(OPEN_ISSUES_INDEX)
        return
    except sqlite3.IntegrityError:
        pass
    with transaction(connection):
        connection.execute(
            "UPDATE _issues SET last_seen_at = recorded_at, last_change_set = change_set"
            " WHERE last_seen_at IS NULL")
        same = ("o.resolved_at IS NULL AND o.entity = _issues.entity"
                " AND o.record_id = _issues.record_id"
                " AND coalesce(o.field, '') = coalesce(_issues.field, '')"
                " AND o.problem = _issues.problem")
        first_of_each = (f"SELECT min(id) FROM _issues WHERE {OPEN_ISSUE}"
                         f" GROUP BY {OPEN_ISSUE_KEY}")
        connection.execute(
            f"UPDATE _issues SET occurrences = (SELECT count(*) FROM _issues o WHERE {same}),"
            f" last_seen_at = (SELECT max(o.recorded_at) FROM _issues o WHERE {same}),"
            f" last_change_set = (SELECT o.change_set FROM _issues o WHERE {same}"
            f"  ORDER BY o.id DESC LIMIT 1)"
            f" WHERE {OPEN_ISSUE} AND id IN ({first_of_each})")
        connection.execute(
            f"DELETE FROM _issues WHERE {OPEN_ISSUE} AND id NOT IN ({first_of_each})")
        connection.execute(OPEN_ISSUES_INDEX)


@functools.cache
def _bookkeeping_columns() -> dict[str, list[tuple[str, str]]]:
    """Each bookkeeping table's columns and declarations, read from the DDL itself."""
    scratch = sqlite3.connect(":memory:")
    scratch.executescript(BOOKKEEPING_DDL)
    tables = [row[0] for row in scratch.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '\\_%' ESCAPE '\\'")]
    columns = {}
    for table in tables:
        columns[table] = [
            (name, f"{kind} NOT NULL DEFAULT {default}" if notnull and default is not None
             else kind)
            for _, name, kind, notnull, default, _ in scratch.execute(
                f"PRAGMA table_info({quote_identifier(table)})")
        ]
    scratch.close()
    return columns


def _add_missing_bookkeeping_columns(connection: sqlite3.Connection) -> None:
    """A database made by an older version gains the columns added since (never loses any)."""
    for table, columns in _bookkeeping_columns().items():
        existing = {row[1] for row in connection.execute(
            f"PRAGMA table_info({quote_identifier(table)})")}
        for name, declaration in columns:
            if name not in existing:
                connection.execute(f"ALTER TABLE {quote_identifier(table)} ADD COLUMN "
                                   f"{quote_identifier(name)} {declaration}")


# Statements that write nothing but take a file's write lock (waiting for it as BEGIN
# IMMEDIATE does): a transaction locks the files it writes, not every attached one.
_LOCK_MIRROR = "UPDATE main._sync_state SET entity = entity WHERE 0"
_LOCK_STAGING = f"UPDATE {STAGING_SCHEMA}._staged_here SET entity = entity WHERE 0"


@contextmanager
def transaction(connection: sqlite3.Connection, *, mirror: bool = True,
                staging: bool = False) -> Iterator[sqlite3.Connection]:
    """A write transaction, committed at the end and rolled back on any exception.

    It holds the write lock of the mirror file (unless `mirror` is false) and, with `staging`,
    the staging file's (store.staging_store): taken before anything is read, in that order, by
    every transaction, so none has to give up (SQLite's BUSY_SNAPSHOT) and none waits in a
    cycle. So a publish (the mirror file) and another entity's staged rows (the staging file)
    are written side by side; BEGIN IMMEDIATE would lock every attached file. Anything that
    writes a staging table passes `staging=True`.

    In PostgreSQL the same two locks are transaction-level advisory locks, taken in the same
    order: one writer at a time, as in SQLite, until each module is reviewed for concurrent
    writers (docs/store-backends.md)."""
    if dialect_of(connection) is POSTGRES:
        connection.execute("BEGIN")
        try:
            for wanted, key in ((mirror, MIRROR_WRITE_LOCK), (staging, STAGING_WRITE_LOCK)):
                if wanted:
                    connection.execute("SELECT pg_advisory_xact_lock(?, ?)", key)
        except BaseException:
            connection.rollback()
            raise
    elif getattr(connection, "staging_path", ""):
        connection.execute("BEGIN")
        try:
            if mirror:
                connection.execute(_LOCK_MIRROR)
            if staging:
                connection.execute(_LOCK_STAGING)
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
    else:
        connection.execute("BEGIN IMMEDIATE")  # a connection without a staging file
    try:
        yield connection
    except BaseException:
        # SQLite rolls back by itself on some errors (a full disk, an I/O error); a second
        # ROLLBACK would raise "no transaction is active" and hide the real error.
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    if isinstance(connection, MirrorConnection):
        connection.committed()


# -- checkpoints off the critical path ----------------------------------------------------
#
# In WAL mode SQLite copies the log into the database file (a checkpoint, fsyncs included:
# synchronous=NORMAL syncs there) inside whichever commit passes `wal_autocheckpoint` pages,
# and inside the close of the last connection. For a large change set that is a second full
# write of it, and the disk's time, in the middle of a step. Here every connection made by
# `connect` has the automatic checkpoint off; its commits (`transaction`) and its close ask a
# thread of this process to checkpoint instead, while the pipeline goes on (SQLite releases
# the GIL while it works). That thread keeps a connection of its own open while there is work,
# so a step's close is never the last one; it closes it after a few idle seconds, and when the
# process exits (atexit), and then SQLite does its final checkpoint there.
#
# Durability does not change: a committed transaction is in the log, which survives a crash
# of the process (the chaos tests kill processes), and whoever opens the database next
# checkpoints what is left.

CHECKPOINT_IDLE_SECONDS = 5.0
_checkpoint_lock = threading.Lock()
_checkpointers: dict[tuple[int, str], _Checkpointer] = {}


class _Checkpointer:
    def __init__(self, path: str) -> None:
        self.path = path
        self.key = (os.getpid(), path)
        self.condition = threading.Condition(_checkpoint_lock)
        self.requested = 0  # requests so far
        self.done = 0  # requests covered by a finished checkpoint
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="sqlite-wal-checkpoint",
                                       daemon=True)

    def _run(self) -> None:
        connection = None
        try:
            # mode=rw: a database deleted meanwhile is not created again, empty.
            connection = sqlite3.connect(f"{Path(self.path).as_uri()}?mode=rw", uri=True,
                                         timeout=60, isolation_level=None)
            connection.execute("PRAGMA wal_autocheckpoint=0")
            if is_staging_file(self.path):
                connection.execute("PRAGMA synchronous=OFF")  # the staging file: never synced
            while True:
                with self.condition:
                    if self.requested == self.done and not self.stopping:
                        self.condition.wait(CHECKPOINT_IDLE_SECONDS)
                    if self.requested == self.done:
                        # Idle, or the process is exiting: later requests start a new thread.
                        self._unregister()
                        break
                    target = self.requested
                with suppress(sqlite3.Error):  # a full disk: the next request tries again
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
                with self.condition:
                    self.done = target
                    self.condition.notify_all()
        except sqlite3.Error:
            pass  # cannot open it (deleted, unreadable): the last close checkpoints instead
        finally:
            with self.condition:
                self._unregister()
                self.done = self.requested  # nobody waits for this thread any more
                self.condition.notify_all()
            if connection is not None:
                with suppress(sqlite3.Error):
                    connection.close()  # the last connection to close checkpoints the rest

    def _unregister(self) -> None:  # with _checkpoint_lock held
        if _checkpointers.get(self.key) is self:
            del _checkpointers[self.key]


def request_checkpoint(path: str) -> _Checkpointer:
    """Have this process's checkpoint thread for `path` checkpoint soon (starting it)."""
    with _checkpoint_lock:
        checkpointer = _checkpointers.get((os.getpid(), path))
        if checkpointer is None:
            checkpointer = _Checkpointer(path)
            _checkpointers[checkpointer.key] = checkpointer
            checkpointer.thread.start()
        checkpointer.requested += 1
        checkpointer.condition.notify_all()
        return checkpointer


def wait_for_checkpoint(path: str, timeout: float = 60) -> None:
    """Checkpoint `path` now and wait for it (tests, and before copying a database file)."""
    checkpointer = request_checkpoint(str(Path(path).resolve()))
    target = checkpointer.requested
    with checkpointer.condition:
        checkpointer.condition.wait_for(lambda: checkpointer.done >= target, timeout)


@atexit.register
def _finish_checkpoints() -> None:
    with _checkpoint_lock:
        running = [c for c in _checkpointers.values() if c.key[0] == os.getpid()]
        for checkpointer in running:
            checkpointer.stopping = True
            checkpointer.condition.notify_all()
    for checkpointer in running:
        checkpointer.thread.join(120)


class MirrorConnection(sqlite3.Connection):
    """A connection made by `connect`: it knows its file, and hands checkpoints to the
    checkpoint thread (see above)."""

    path = ""
    staging_path = ""  # its staging file (store.staging_store), checkpointed the same way

    def committed(self) -> None:
        for path in (self.path, self.staging_path):
            if path:
                request_checkpoint(path)

    def close(self) -> None:
        for path in (self.path, self.staging_path):
            if path:
                request_checkpoint(path)  # first, so this close is not the last one
        super().close()


_REBUILD = ("restore it from a backup, or rebuild the mirror from the archive "
            "(`dataverse-assets rebuild --into NEW.db`) and point DATAVERSE_DB_PATH at it")
# (what SQLite says, what is wrong, what to do): matched in this order.
_STORAGE_PROBLEMS = (
    ("database or disk is full", "the disk is full", "free disk space"),
    ("readonly", "the database is read-only",
     "make the database file, its -wal and -shm files and their folder writable"),
    ("read-only", "the database is read-only",
     "make the database file, its -wal and -shm files and their folder writable"),
    ("disk i/o error", "the disk reported an I/O error", "check the disk"),
    ("database is locked", "another process held the database's write lock for more than "
     "{busy:g} s", "let the other program that writes this file finish (or "
     "stop it: a sync of this mirror runs one writer at a time), then run again"),
    ("file is not a database", "the file is not a SQLite database (corrupt, or another kind "
     "of file)", "check DATAVERSE_DB_PATH; if it is the mirror, " + _REBUILD),
    ("malformed", "the database file is corrupt", _REBUILD),
    ("unable to open database file", "the database file cannot be opened",
     "check that DATAVERSE_DB_PATH names a file in a folder that exists and is writable"),
)


def storage_problem(exc: BaseException) -> tuple[str, str] | None:
    """(what is wrong, what to do) when a SQLite error means the database cannot be written
    (or a PostgreSQL error that the store cannot be used)."""
    if not isinstance(exc, sqlite3.Error):
        return postgres_problem(exc)
    text = str(exc).lower()
    for needle, problem, remedy in _STORAGE_PROBLEMS:
        if needle in text:
            return problem.format(busy=BUSY_TIMEOUT_SECONDS), remedy
    return None


def storage_error(exc: BaseException, path: str | Path, doing: str,
                  state: str) -> StorageError | None:
    """The StorageError for a SQLite error that means the file cannot be used (None for
    other errors): one line with the file, what is wrong, what `state` the data is in, and
    what to do."""
    problem = storage_problem(exc)
    if problem is None:
        return None
    what, remedy = problem
    database = "SQLite" if isinstance(exc, sqlite3.Error) else "PostgreSQL"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StorageError(f"{path}: {what} while {doing} ({database}: {text}). {state[:1].upper()}"
                        f"{state[1:]}. To fix: {remedy}.")


@contextmanager
def storage_errors(path: str | Path, doing: str,
                   state: str = "nothing was written") -> Iterator[None]:
    """Turn a SQLite error raised in the block that means the file cannot be used into a
    StorageError (see storage_error); other errors pass as they are."""
    try:
        yield
    except Exception as exc:  # SQLite's or psycopg's; storage_error tells which matter
        error = storage_error(exc, path, doing, state)
        if error is None:
            raise
        raise error from None  # its message carries SQLite's own words


def connect_staging_writer(db_path: str | Path, lock_wait_seconds: float
                           ) -> tuple[sqlite3.Connection | PostgresConnection, str]:
    """A connection that writes staged rows beside the step's own (sync.prestage), and the
    schema its staging bookkeeping tables are in there: SQLite, the staging file itself (its
    tables in `main`), never synced; PostgreSQL, another connection to the store (`staging`).
    A write lock not had within `lock_wait_seconds` is an error."""
    if is_postgres_address(db_path):
        connection = connect_postgres(str(db_path))
        connection.execute(f"SET lock_timeout = '{int(lock_wait_seconds * 1000)}ms'")
        return connection, STAGING_SCHEMA
    connection = sqlite3.connect(staging_path(db_path), timeout=lock_wait_seconds,
                                 isolation_level=None)
    connection.execute("PRAGMA synchronous=OFF")
    return connection, "main"


def database_path(connection: sqlite3.Connection) -> str:
    if dialect_of(connection) is POSTGRES:
        return connection.path
    return connection.execute("PRAGMA database_list").fetchone()[2]


def table_exists(connection: sqlite3.Connection, table: str) -> bool:
    """Is there such a table: in the mirror file, or for a staging table also in the staging
    file (store.staging_store) when the connection has it attached."""
    if dialect_of(connection) is POSTGRES:  # the search path has the staging schema
        return connection.execute("SELECT to_regclass(?) IS NOT NULL",
                                  (quote_identifier(table),)).fetchone()[0]
    row = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)
    ).fetchone()
    if row is None and is_staging_table(table):
        try:
            row = connection.execute(
                f"SELECT 1 FROM {STAGING_SCHEMA}.sqlite_master WHERE type='table' AND name=?",
                (table,)).fetchone()
        except sqlite3.OperationalError:  # not attached (a connection not made by connect)
            return False
    return row is not None


def table_columns(connection: sqlite3.Connection, table: str) -> list[str]:
    if dialect_of(connection) is POSTGRES:
        return [row[0] for row in connection.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(?) AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum", (quote_identifier(table),))]
    return [row[1] for row in connection.execute(f"PRAGMA table_info({quote_identifier(table)})")]


def view_names(connection: sqlite3.Connection) -> set[str]:
    """The views of the mirror (the readable views, store.readable)."""
    if dialect_of(connection) is POSTGRES:
        return {name for (name,) in connection.execute(
            "SELECT viewname FROM pg_views WHERE schemaname = 'public'")}
    return {name for (name,) in connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'view'")}
