"""A stored publish plan, as a person reads it (dataverse-assets plan show)."""

from __future__ import annotations

import sqlite3

import orjson

from dataverse_assets.modes import PublishStatus
from dataverse_assets.ops.status import shown_publish_status
from dataverse_assets.store.bookkeeping import (
    is_bulk_create,
    pruned_at,
    read_publish_state,
)
from dataverse_assets.store.db import (
    quote_identifier,
    table_exists,
)
from dataverse_assets.store.schema import json_bytes
from dataverse_assets.store.tables import (
    staging_table,
)

_KIND_ORDER = (("create", "+"), ("update", "~"), ("delete", "-"), ("delete_unknown", "-"),
               ("stale", "!"))
_KIND_TITLES = {"create": "to create", "update": "to update", "delete": "to delete",
                "delete_unknown": "deletes of records never mirrored",
                "stale": "older than canonical (skipped)"}


def _short(value: object, limit: int = 60) -> str:
    text = json_bytes(value).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_plan(connection: sqlite3.Connection, entity: str, change_set: str,
                max_rows_per_kind: int = 50) -> str:
    """A stored plan the way `terraform plan` shows one: counts first, then rows by kind with
    only the fields that change."""
    state = read_publish_state(connection, entity, change_set)
    if not state or not table_exists(connection, "_publish_plan"):
        raise LookupError(f"no plan for {entity} change set {change_set}")
    created, updated, deleted, unchanged, stale = (
        state[k] for k in ("created", "updated", "deleted", "unchanged", "stale"))
    # As `status` shows it: a publish cut off is FAILED (interrupted), not under way.
    status, error = shown_publish_status(connection, entity, state["status"], state["error"])
    lines = [
        f"Plan for {entity}, change set {change_set} ({status})"
        + (f": {error}" if status == PublishStatus.FAILED and error else ""),
        f"{created:,} to create, {updated:,} to update, {deleted:,} to delete, "
        f"{unchanged:,} unchanged" + (f", {stale:,} stale" if stale else ""),
    ]
    bulk = is_bulk_create(connection, entity, change_set)
    if bulk:
        lines.append("(into an empty table: every staged record is a create)")
        if pruned_at(connection, entity, change_set) is not None:
            lines.append("(its staged rows were deleted by staging retention, so the creates "
                         "are counted but not listed)")
    for kind, sign in _KIND_ORDER:
        if kind == "create" and bulk:
            total = created
            rows = connection.execute(
                f"SELECT _pk, NULL FROM {quote_identifier(staging_table(entity))}"
                " WHERE _change_set = ? AND _op = 'upsert' ORDER BY _pk LIMIT ?",
                (change_set, max_rows_per_kind)).fetchall()
        else:
            total = connection.execute(
                "SELECT count(*) FROM _publish_plan WHERE entity = ? AND change_set = ?"
                " AND kind = ?", (entity, change_set, kind)).fetchone()[0]
            rows = connection.execute(
                "SELECT pk, changes FROM _publish_plan WHERE entity = ? AND change_set = ?"
                " AND kind = ? ORDER BY pk LIMIT ?",
                (entity, change_set, kind, max_rows_per_kind)).fetchall()
        if not total:
            continue
        lines.append("")
        lines.append(f"{sign} {total:,} {_KIND_TITLES[kind]}")
        for pk, changes in rows:
            lines.append(f"  {sign} {pk}")
            for field, (old, new) in (orjson.loads(changes) if changes else {}).items():
                lines.append(f"      {field}: {_short(old)} -> {_short(new)}")
        if total > len(rows):
            lines.append(f"  ... and {total - len(rows):,} more")
    return "\n".join(lines)
