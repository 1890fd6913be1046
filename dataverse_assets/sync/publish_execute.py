"""Publishing a staged change set into the canonical table: the plan (publish_plan), then
executing it, and the whole publish around both (`publish_change_set`).

- Execute: apply the plan in chunks (one transaction each; one chunk for all but very large
  change sets). Superseded and deleted versions move to `E__history`, deleted ids to
  `_defunct`. The watermark / delta token advance in the transaction of the last chunk.

A failure anywhere rolls back the open transaction and records FAILED; publishing the change
set again re-plans against canonical as it now is, so applied chunks show as unchanged:
nothing is lost and nothing is applied twice.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import asdict, dataclass
from typing import Protocol

from dataverse_assets.errors import StorageError
from dataverse_assets.modes import Mode, PublishStatus, SyncStatus
from dataverse_assets.store.backend import dialect_of
from dataverse_assets.store.bookkeeping import (
    is_bulk_create,
    publish_status,
    read_publish_state,
    read_sync_state,
    record_publish_failure,
    set_publish_state,
    write_sync_state,
)
from dataverse_assets.store.db import (
    database_path,
    quote_identifier,
    storage_problem,
    transaction,
    utc_now_iso,
)
from dataverse_assets.store.readable import (
    child_rows_sql,
    ensure_multi_select_tables,
    ensure_readable_view,
    multi_select_table,
)
from dataverse_assets.store.schema import EntitySchema
from dataverse_assets.store.tables import (
    NOCASE_SUFFIX,
    STABLE_INDEXED_COLUMNS,
    SYNC_COLUMNS,
    ensure_canonical_tables,
    history_table,
    secondary_indexes,
    staging_table,
)
from dataverse_assets.sync.faults import fault_point
from dataverse_assets.sync.publish_plan import plan_change_set

DEFAULT_CHUNK_ROWS = 50_000


# -- results ------------------------------------------------------------------------------

class PublishProgress(Protocol):
    """Told where a publish is: the phase, rows written so far and the rows to write; then
    the rows written and a one-line summary when it is done."""

    def __call__(self, phase: str, rows: int, total: int | None = None) -> None: ...

    def finish(self, rows: int, note: str) -> None: ...


@dataclass
class PublishResult:
    entity: str
    change_set: str
    created: int
    updated: int
    unchanged: int
    stale: int
    deleted: int
    seconds: float
    watermark_before: str | None
    watermark_after: str | None
    already_published: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


# -- execute ------------------------------------------------------------------------------

def execute_plan(
    connection: sqlite3.Connection, schema: EntitySchema, change_set: str, *, mode: str,
    watermark_after: str | None, delta_token_after: str | None, counts: dict[str, int],
    reconciled_at: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
    as_of: str | None = None, on_progress: PublishProgress | None = None,
) -> PublishResult:
    """Apply the stored plan chunk by chunk; the last chunk also advances the watermark."""
    started = time.perf_counter()
    to_write = sum(counts.get(kind, 0) for kind in ("create", "update", "delete"))

    def progress(rows: int) -> None:
        if on_progress is not None:
            on_progress("publishing", rows, to_write)

    state = read_sync_state(connection, schema.entity)
    watermark_before = state.watermark if state else None
    with transaction(connection):
        set_publish_state(connection, schema.entity, change_set, PublishStatus.EXECUTING,
                          started_at=utc_now_iso())
    applied = 0
    dialect = dialect_of(connection)
    chunk = dialect.temp_table("_chunk")
    with transaction(connection):
        # Multi-select child tables: made (and filled from E) before the first chunk, kept by
        # every chunk in its own transaction.
        multi_select = ensure_multi_select_tables(connection, schema)
    if is_bulk_create(connection, schema.entity, change_set):
        applied = _execute_bulk_creates(connection, schema, change_set, chunk_rows,
                                        as_of or utc_now_iso(), multi_select)
    progress(applied)
    after = ""  # chunks follow the plan's key order: each starts where the last one ended
    while True:
        if applied:
            fault_point("publish.after_chunk_commit")  # a chunk committed, watermark not yet
        with transaction(connection):
            connection.execute(f"DROP TABLE IF EXISTS {chunk}")
            # Keyed, so every join on the chunk is an index lookup (unkeyed, SQLite may scan it
            # once per plan row: quadratic in the change set's size).
            connection.execute("CREATE TEMP TABLE _chunk (pk TEXT PRIMARY KEY, kind TEXT)")
            # pk > after: the plan's primary key index starts each chunk where the previous one
            # ended, instead of stepping over every applied row again (quadratic).
            connection.execute(
                f"INSERT INTO {chunk} (pk, kind) SELECT pk, kind FROM _publish_plan"
                " WHERE entity = ? AND change_set = ? AND pk > ? AND applied = 0"
                " AND kind IN ('create', 'update', 'delete', 'delete_unknown')"
                " ORDER BY pk LIMIT ?",
                (schema.entity, change_set, after, chunk_rows),
            )
            size, last_pk = connection.execute(
                f"SELECT count(*), max(pk) FROM {chunk}").fetchone()
            after = last_pk if last_pk is not None else after
            _apply_chunk(connection, schema, change_set, as_of or utc_now_iso(), multi_select)
            fault_point("publish.mid_execute")
            connection.execute(
                f"{dialect.or_fail('UPDATE')} _publish_plan SET applied = 1 WHERE entity = ?"
                f" AND change_set = ? AND pk IN (SELECT pk FROM {chunk})",
                (schema.entity, change_set))
            connection.execute(f"DROP TABLE {chunk}")
            applied += size
            progress(applied)
            last = size < chunk_rows
            if not last:
                set_publish_state(connection, schema.entity, change_set,
                                  PublishStatus.EXECUTING, rows_applied=applied)
                continue
            fault_point("publish.before_watermark")
            ensure_readable_view(connection, schema)
            new_watermark = watermark_before
            if watermark_after is not None and (
                new_watermark is None or watermark_after > new_watermark
            ):
                new_watermark = watermark_after
            # The watermark commits with the last chunk: it never runs ahead of canonical.
            write_sync_state(
                connection, schema.entity,
                # The entity's mode, not this change set's detour (a resync, a targeted refresh).
                mode={Mode.TARGETED: state.mode if state else None,
                      Mode.INITIAL: str(Mode.CHANGE_TRACKING),
                      Mode.CHANGE_TRACKING_RESYNC: str(Mode.CHANGE_TRACKING)}.get(mode, mode),
                watermark=new_watermark,
                delta_token=delta_token_after or (state.delta_token if state else None),
                status=SyncStatus.COMPLETED, change_set=change_set, reconciled_at=reconciled_at,
            )
            result = PublishResult(
                schema.entity, change_set, counts["create"], counts["update"],
                counts["unchanged"], counts["stale"], counts["delete"],
                time.perf_counter() - started, watermark_before, new_watermark,
            )
            set_publish_state(
                connection, schema.entity, change_set, PublishStatus.COMPLETE,
                rows_applied=applied,
                finished_at=utc_now_iso(), watermark_before=watermark_before,
                watermark_after=new_watermark, seconds=result.seconds, error=None,
                error_code=None, failed_operation=None,
            )
            return result


def _canonical_expressions(data: list[str]) -> list[str]:
    """What turns a staged row `s` into a canonical row (data columns, then SYNC_COLUMNS), one
    expression a column: times are the change set's (`:now`), valid_from is modifiedon when
    there is one."""
    return [*(f"s.{c}" for c in data), "s.json_response", "s._content_hash", ":now",
            "COALESCE(s._modifiedon, :now)", ":now", ":cs"]


def _canonical_values(data: list[str]) -> str:
    """The SELECT list of _canonical_expressions, for the row-by-row and the bulk inserts."""
    return ", ".join(_canonical_expressions(data))


def _execute_bulk_creates(connection: sqlite3.Connection, schema: EntitySchema,
                          change_set: str, chunk_rows: int, as_of: str,
                          multi_select: list[str]) -> int:
    """Insert every staged upsert of a `bulk_create` plan, in chunks of staged keys (one
    transaction each, in key order, so the primary-key index grows at its end). A failure
    leaves earlier chunks committed; the next publish plans against the now non-empty table,
    where they show as unchanged. Returns the rows inserted."""
    entity = quote_identifier(schema.entity)
    staging = quote_identifier(staging_table(schema.entity))
    pk = quote_identifier(schema.primary_key)
    data = [quote_identifier(c) for c in schema.column_names]
    sync = [quote_identifier(n) for n, _ in SYNC_COLUMNS]
    applied, after = 0, ""
    # The modifiedon/createdon indexes are built once at the end instead of being grown row by
    # row in random order (3 s less at 1M rows; a crash before then: the next plan creates
    # them). The NOCASE key index grows in key order, as the rows go in: it stays.
    indexes = [n for n in secondary_indexes(schema, dialect_of(connection))
               if not n.endswith(NOCASE_SUFFIX)]
    with transaction(connection):
        for name in indexes:
            connection.execute(f"DROP INDEX IF EXISTS {quote_identifier(name)}")
    while True:
        if applied:
            fault_point("publish.after_chunk_commit")
        with transaction(connection):
            # The chunk is the staged keys in (after, last]; the staging key index finds both.
            last = connection.execute(
                f"SELECT _pk FROM {staging} WHERE _change_set = ? AND _pk > ?"
                " ORDER BY _pk LIMIT 1 OFFSET ?", (change_set, after, chunk_rows - 1)
            ).fetchone()
            upper = "" if last is None else " AND s._pk <= :last"
            params = {"cs": change_set, "after": after, "now": as_of,
                      "last": last[0] if last else None, "entity": schema.entity}
            size = connection.execute(
                f"INSERT INTO {entity} ({', '.join(data + sync)})"
                f" SELECT {_canonical_values(data)}"
                f" FROM {staging} s WHERE s._change_set = :cs AND s._op = 'upsert'"
                f" AND s._pk > :after{upper} ORDER BY s._pk", params,
            ).rowcount
            fault_point("publish.mid_execute")
            # The table held nothing before this publish, so its keys in the chunk's range are
            # the chunk's creates: read from its primary-key index, not the wide staged rows.
            connection.execute(
                "INSERT INTO _change_history (entity, change_set, record_id, kind, changes,"
                " applied_at)"
                f" SELECT :entity, :cs, {pk}, 'create', NULL, :now FROM {entity}"
                f" WHERE {pk} > :after{'' if last is None else f' AND {pk} <= :last'}"
                f" ORDER BY {pk}", params,
            )
            in_chunk = f"c.{pk} > :after{'' if last is None else f' AND c.{pk} <= :last'}"
            for column in multi_select:
                connection.execute(child_rows_sql(schema.entity, schema.primary_key, column,
                                                  in_chunk, dialect_of(connection)), params)
            applied += size
            if last is None:
                ensure_canonical_tables(connection, schema)
                return applied
            after = last[0]
            set_publish_state(connection, schema.entity, change_set, PublishStatus.EXECUTING,
                              rows_applied=applied)


def _apply_chunk(connection: sqlite3.Connection, schema: EntitySchema, change_set: str,
                 as_of: str, multi_select: list[str] = ()) -> None:
    """Apply one chunk of the plan (temp._chunk), inside the caller's transaction.

    Every statement is `OR FAIL`, and the updates are an UPDATE rather than an upsert: a
    multi-row statement that may ABORT on a constraint makes SQLite copy each page it changes
    to a statement journal first (~340 MB of temp-file writes for a 1% incremental of 1M
    rows, as much as the changes themselves). FAIL needs no such copy, and loses nothing here:
    any error rolls back the whole transaction (publish_change_set).
    """
    entity = quote_identifier(schema.entity)
    staging = quote_identifier(staging_table(schema.entity))
    history = quote_identifier(history_table(schema.entity))
    pk = quote_identifier(schema.primary_key)
    # Row timestamps come from the change set (when it was fetched), not the clock: replaying
    # the archive into a new database yields the same tables.
    now = as_of
    data = [quote_identifier(c) for c in schema.column_names]
    sync = [quote_identifier(n) for n, _ in SYNC_COLUMNS]
    params = {"now": now, "cs": change_set}
    dialect = dialect_of(connection)
    chunk = dialect.temp_table("_chunk")
    insert, update = dialect.or_fail("INSERT"), dialect.or_fail("UPDATE")
    # Superseded and deleted versions move to history before canonical changes.
    connection.execute(
        f"{insert} INTO {history} ({', '.join(data + sync)}, valid_to, change_kind,"
        f" superseded_in)"
        f" SELECT {', '.join('c.' + c for c in data + sync)},"
        f" COALESCE(s._modifiedon, :now), p.kind, :cs"
        f" FROM {entity} c JOIN {chunk} p ON p.pk = c.{pk}"
        f" LEFT JOIN {staging} s ON s._pk = c.{pk} AND s._change_set = :cs"
        f" WHERE p.kind IN ('update', 'delete')",
        params,
    )
    # An indexed column that an update does not change keeps its index entry only if the SET
    # leaves it out (SQLite rewrites the entry of every column SET names): createdon, which
    # Dataverse never changes, is set by itself below, for the rows whose plan lists it among
    # the changed fields (or has no changed fields: a version that is not a JSON object).
    stable = [c for c in STABLE_INDEXED_COLUMNS
              if c in schema.column_names and c != schema.primary_key]
    set_apart = {pk, *map(quote_identifier, stable)}
    values = dict(zip(data + sync, _canonical_expressions(data), strict=True))
    updated = [c for c in data + sync if c not in set_apart]

    def staged(columns: list[str]) -> str:
        return (f"(SELECT {', '.join(values[c] for c in columns)} FROM {staging} s"
                f" WHERE s._change_set = :cs AND s._pk = {entity}.{pk})")

    updates = f" WHERE {pk} IN (SELECT pk FROM {chunk} WHERE kind = 'update')"
    connection.execute(
        f"{update} {entity} SET ({', '.join(updated)}) = {staged(updated)}{updates}",
        params)
    for name in stable:
        column = quote_identifier(name)
        connection.execute(
            f"{update} {entity} SET {column} = {staged([column])}"
            f" WHERE {pk} IN (SELECT c.pk FROM {chunk} c JOIN _publish_plan p"
            "  ON p.entity = :entity AND p.change_set = :cs AND p.pk = c.pk"
            "  WHERE c.kind = 'update'"
            f"  AND (p.changes IS NULL OR {dialect.json_text('p.changes', name)} IS NOT NULL))",
            {**params, "entity": schema.entity})
    connection.execute(
        f"{insert} INTO {entity} ({', '.join(data + sync)})"
        f" SELECT {_canonical_values(data)}"
        f" FROM {staging} s JOIN {chunk} p ON p.pk = s._pk"
        f" WHERE s._change_set = :cs AND p.kind = 'create'",
        params,
    )
    connection.execute(
        f"DELETE FROM {entity} WHERE {pk} IN (SELECT pk FROM {chunk} WHERE kind = 'delete')"
    )
    # Each multi-select child table follows its column: the chunk's records' rows replaced.
    for column in multi_select:
        table = quote_identifier(multi_select_table(schema.entity, column, dialect))
        connection.execute(f"DELETE FROM {table} WHERE record_id IN (SELECT pk FROM {chunk})")
        written = f"c.{pk} IN (SELECT pk FROM {chunk} WHERE kind IN ('create', 'update'))"
        connection.execute(child_rows_sql(schema.entity, schema.primary_key, column, written,
                                          dialect))
    reason = dialect.json_text("s.json_response", "reason")
    connection.execute(
        dialect.upsert_select(
            "_defunct", ("entity", "id", "change_set", "reason", "recorded_at"),
            ("entity", "id"),
            "SELECT ?, p.pk, ?, CASE"
            f"  WHEN s._op = 'delete' AND {reason} = 'deleted' THEN 'deleted in source'"
            f"  WHEN s._op = 'delete' THEN {reason}"
            "  ELSE 'no longer in the source' END, ?"
            f" FROM {chunk} p LEFT JOIN {staging} s ON s._pk = p.pk AND s._change_set = ?"
            " WHERE p.kind IN ('delete', 'delete_unknown')"),
        (schema.entity, change_set, now, change_set),
    )
    # One row per applied change, with the changed fields: what happened to a record, when.
    connection.execute(
        f"{insert} INTO _change_history (entity, change_set, record_id, kind, changes,"
        " applied_at)"
        f" SELECT ?, ?, c.pk, c.kind, p.changes, ? FROM {chunk} c JOIN _publish_plan p"
        " ON p.entity = ? AND p.change_set = ? AND p.pk = c.pk",
        (schema.entity, change_set, now, schema.entity, change_set),
    )


# -- the whole publish --------------------------------------------------------------------

def publish_change_set(
    connection: sqlite3.Connection, schema: EntitySchema, change_set: str, *, mode: str,
    watermark_after: str | None, delta_token_after: str | None = None,
    key_scan: bool = False, reconciled_at: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS, as_of: str | None = None,
    on_progress: PublishProgress | None = None,
) -> PublishResult:
    """Plan and execute one change set; a COMPLETE change set is not published twice.

    key_scan: the change set carries a key-only scan (absent keys are deletes);
    reconciled_at: when deletes were last fully established (stored with the watermark);
    as_of: when the change set was fetched: sync_time, updated_at and valid_to of deletes;
    on_progress: told the phase (planning, publishing), the rows written and the total, after
    each chunk, and the result at the end (see PublishProgress).
    """
    done = read_publish_state(connection, schema.entity, change_set)
    if done.get("status") == PublishStatus.COMPLETE:
        return PublishResult(schema.entity, change_set, done["created"], done["updated"],
                             done["unchanged"], done["stale"], done["deleted"], 0.0,
                             done["watermark_before"], done["watermark_after"],
                             already_published=True)
    if publish_status(connection, schema.entity, change_set) == PublishStatus.FAILED:
        with transaction(connection):
            set_publish_state(connection, schema.entity, change_set, PublishStatus.RETRYING)
    operation, failed = "plan", False
    try:
        if on_progress is not None:
            on_progress("planning", 0)
        counts = plan_change_set(connection, schema, change_set, mode, reconciled=key_scan)
        operation = "execute"
        result = execute_plan(
            connection, schema, change_set, mode=mode, watermark_after=watermark_after,
            delta_token_after=delta_token_after, counts=counts, reconciled_at=reconciled_at,
            chunk_rows=chunk_rows, as_of=as_of, on_progress=on_progress,
        )
        if on_progress is not None:
            on_progress.finish(result.created + result.updated + result.deleted,
                               f"{result.created:,} created, {result.updated:,} updated, "
                               f"{result.deleted:,} deleted, {result.unchanged:,} unchanged, "
                               f"{result.stale:,} stale")
        return result
    except BaseException as exc:
        failed = True
        # Also a run stopped mid-publish (Dagster's termination, Ctrl-C: not Exceptions): the
        # database can still be written, so the state says FAILED, not EXECUTING.
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        problem = storage_problem(exc)
        try:
            record_publish_failure(connection, schema.entity, change_set, operation, exc)
        except Exception:  # SQLite's or psycopg's
            if problem is None and isinstance(exc, Exception):
                raise
            # The same full disk or read-only file refuses the FAILED record too; the error
            # below must still say what happened (not "disk full while recording a failure").
            # The next publish of the entity records it (interrupted), and until then `status`
            # and `plan show` say so.
        if problem is not None:
            raise _storage_error(connection, schema.entity, change_set, problem, exc) from None
        raise
    finally:
        # After a failure the connection may be gone (PostgreSQL's server ended the session):
        # the cleanup must not replace the error that says why.
        with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
            connection.execute(
                f"DROP TABLE IF EXISTS {dialect_of(connection).temp_table('_chunk')}")


def _storage_error(connection: sqlite3.Connection, entity: str, change_set: str,
                   problem: tuple[str, str], exc: BaseException) -> StorageError:
    what, remedy = problem
    try:
        applied = read_publish_state(connection, entity, change_set).get("rows_applied") or 0
    except Exception:  # SQLite's or psycopg's: the connection is gone (the server ended it)
        applied = None
    state = (
        f"{applied} rows were applied by earlier chunks (committed, counted as unchanged when it "
        "runs again); nothing else was written" if applied else
        "Nothing of this change set was written (its transaction rolled back)" if applied == 0
        else "Its open transaction rolled back: nothing of it was kept (chunks committed before"
        " it stay, counted as unchanged when it runs again)"
    )
    said = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return StorageError(
        f"{entity}: cannot publish change set {change_set}: {what} ({database_path(connection)}:"
        f" {said}). {state} and the watermark did not move. To fix: {remedy}, then run"
        " the sync again; it publishes this change set first."
    )
