"""Per-entity operational status and the change sets' publish state, from the database alone
(no credentials, no request to the source)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

from dagster._utils.schedules import cron_string_iterator

from dataverse_assets.config import EntitiesConfig
from dataverse_assets.modes import PUBLISHING_STATUSES, PublishStatus
from dataverse_assets.source.query import parse_datetime
from dataverse_assets.store import dead_letters
from dataverse_assets.store.bookkeeping import (
    INTERRUPTED,
    latest_publish_state,
    read_sync_state,
)
from dataverse_assets.store.locks import is_held
from dataverse_assets.store.tables import canonical_row_count


def _age_seconds(timestamp: str | None, now: datetime) -> float | None:
    if not timestamp:
        return None
    try:
        return round((now - parse_datetime(timestamp)).total_seconds(), 1)
    except ValueError:
        return None


def shown_publish_status(connection: sqlite3.Connection, entity: str, status: str | None,
                         error: str | None) -> tuple[str | None, str | None]:
    """A publish's status and error as the commands show them: one marked as under way while
    no run holds the entity was cut off (the next publish records that), so FAILED
    (interrupted), never "EXECUTING"."""
    if status in PUBLISHING_STATUSES and not is_held(connection, entity):
        return str(PublishStatus.FAILED), INTERRUPTED
    return status, error


def entity_status(connection: sqlite3.Connection, config: EntitiesConfig,
                  now: datetime | None = None) -> list[dict]:
    """One dict per configured entity: last change set, publish status, watermark / delta
    link age, rows, open issues, dead letters, queued retries."""
    now = now or datetime.now(UTC)
    dead_letters.ensure_tables(connection)
    rows = []
    for entity in config.entities:
        state = read_sync_state(connection, entity.name)
        last = latest_publish_state(connection, entity.name)
        if last:
            status, error = shown_publish_status(connection, entity.name, last["status"],
                                                 last["error"])
            last = {**last, "status": status, "error": error}
        delta_issued = (latest_publish_state(connection, entity.name, PublishStatus.COMPLETE)
                        if state and state.delta_token else None)
        rows.append({
            "entity": entity.name,
            "group": entity.group,
            "mode": state.mode if state else None,
            "sync_status": state.status if state else "never synced",
            "last_change_set": last["change_set"] if last else None,
            "publish_status": last["status"] if last else None,
            "last_error": last["error"] if last else None,
            "published_age_seconds": _age_seconds(last["finished_at"], now) if last else None,
            "watermark": state.watermark if state else None,
            "watermark_age_seconds": _age_seconds(state.watermark, now) if state else None,
            "delta_link_age_seconds": _age_seconds(delta_issued["finished_at"], now)
            if delta_issued else None,
            "rows": canonical_row_count(connection, entity.name),
            "open_issues": connection.execute(
                "SELECT count(*) FROM _issues WHERE entity = ? AND resolved_at IS NULL",
                (entity.name,)).fetchone()[0],
            "dead_letters": connection.execute(
                "SELECT count(*) FROM _dead_letter WHERE entity = ? AND status = 'open'",
                (entity.name,)).fetchone()[0],
            "queued_retries": connection.execute(
                "SELECT count(*) FROM _retry_queue WHERE entity = ?",
                (entity.name,)).fetchone()[0],
        })
    return rows


def next_run(cron: str, now: datetime | None = None) -> datetime:
    """The group schedule's next tick after `now` (schedules run in UTC), by Dagster's own
    cron arithmetic, so it is the tick the schedule will take."""
    now = now or datetime.now(UTC)
    return next(cron_string_iterator(now.timestamp(), cron, "UTC"))


def change_set_list(connection: sqlite3.Connection, entity: str | None = None,
                    limit: int = 50, now: datetime | None = None) -> list[dict]:
    """The newest `limit` change sets (of one entity, or of all), newest first, with where
    their publish stands: status, mode, counts, when it finished and why it failed."""
    now = now or datetime.now(UTC)
    rows = connection.execute(
        "SELECT p.entity, p.change_set, p.status, s.mode, p.created, p.updated, p.deleted,"
        " p.unchanged, p.stale, p.finished_at, p.error FROM _publish_state p"
        " LEFT JOIN _staged s ON s.entity = p.entity AND s.change_set = p.change_set"
        + (" WHERE p.entity = ?" if entity is not None else "")
        + " ORDER BY p.change_set DESC, p.entity LIMIT ?",
        (*([entity] if entity is not None else []), limit)).fetchall()
    listed = []
    for (name, change_set, status, mode, created, updated, deleted, unchanged, stale,
         finished_at, error) in rows:
        status, error = shown_publish_status(connection, name, status, error)
        listed.append({
            "entity": name, "change_set": change_set, "status": status, "mode": mode,
            "created": created, "updated": updated, "deleted": deleted,
            "unchanged": unchanged, "stale": stale,
            "finished_age_seconds": _age_seconds(finished_at, now),
            "error": error,
        })
    return listed
