"""Issues: problems of records that could not be staged or fetched, one open row per record
and problem, resolved when the record stages cleanly."""

from __future__ import annotations

import sqlite3

from dataverse_assets.store.backend import dialect_of
from dataverse_assets.store.db import (
    OPEN_ISSUE,
    open_issue_key,
    quote_identifier,
    table_exists,
    utc_now_iso,
)


def record_issue(
    connection: sqlite3.Connection,
    *,
    entity: str,
    change_set: str,
    record_id: str | None,
    field: str | None,
    problem: str,
    context: str | None = None,
) -> None:
    """An issue, or one more sighting of the same open one (its count, last sighting, last
    change set and context move; `change_set` and `recorded_at` stay the first)."""
    now = utc_now_iso()
    differs = dialect_of(connection).is_distinct
    connection.execute(
        "INSERT INTO _issues (entity, change_set, record_id, field, problem, context,"
        " recorded_at, last_seen_at, last_change_set) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        f" ON CONFLICT ({open_issue_key(connection)}) WHERE {OPEN_ISSUE} DO UPDATE SET"
        " occurrences = _issues.occurrences + CASE WHEN _issues.last_change_set"
        f" {differs} excluded.last_change_set THEN 1 ELSE 0 END,"
        " last_seen_at = excluded.last_seen_at, last_change_set = excluded.last_change_set,"
        " context = excluded.context",
        (entity, change_set, record_id, field, problem, context, now, now, change_set),
    )


def resolve_issues(connection: sqlite3.Connection, entity: str, change_set: str,
                   staged_table: str) -> int:
    """Open issues of records this change set staged without that issue: resolved (the record
    now stages cleanly). Issues without a record stay open. Returns how many."""
    differs = dialect_of(connection).is_distinct
    return connection.execute(
        f"UPDATE _issues SET resolved_at = ? WHERE entity = ? AND resolved_at IS NULL"
        f" AND record_id IS NOT NULL AND last_change_set {differs} ?"
        f" AND record_id IN (SELECT _pk FROM {quote_identifier(staged_table)}"
        f"  WHERE _change_set = ?)",
        (utc_now_iso(), entity, change_set, change_set)).rowcount


def list_issues(connection: sqlite3.Connection, entity: str | None = None,
                limit: int = 100, include_resolved: bool = False) -> list[dict]:
    """Issues, newest sighting first: open ones (or every one with `include_resolved`), each
    once with how many change sets saw it, when first and last, and when it was resolved."""
    if not table_exists(connection, "_issues"):
        return []
    conditions = ([] if include_resolved else ["resolved_at IS NULL"]) + (
        ["entity = ?"] if entity else [])
    cursor = connection.execute(
        "SELECT id, entity, change_set, last_change_set, record_id, field, problem, context,"
        " occurrences, recorded_at, last_seen_at, resolved_at FROM _issues"
        + (f" WHERE {' AND '.join(conditions)}" if conditions else "")
        + " ORDER BY coalesce(last_seen_at, recorded_at) DESC, id DESC LIMIT ?",
        ((entity, limit) if entity else (limit,)))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]
