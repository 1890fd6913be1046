"""Planning a publish: the staged change set diffed against canonical by primary key and content
hash into creates, updates, unchanged, stale (an older version than canonical holds) and
deletes, validated, and stored in `_publish_plan` before anything is written (executed by
publish_execute)."""

from __future__ import annotations

import sqlite3

import orjson

from dataverse_assets.errors import PlanValidationError
from dataverse_assets.modes import SNAPSHOT_MODES, PublishStatus
from dataverse_assets.store.backend import POSTGRES, dialect_of
from dataverse_assets.store.bookkeeping import set_publish_state
from dataverse_assets.store.db import quote_identifier, transaction, utc_now_iso
from dataverse_assets.store.schema import EntitySchema, json_bytes
from dataverse_assets.store.tables import (
    ensure_canonical_tables,
    set_plan_changes,
    staging_keys_table,
    staging_table,
)
from dataverse_assets.sync.faults import fault_point
from dataverse_assets.sync.stage import count_staged, count_staged_by_op

PLAN_KINDS = ("create", "update", "delete", "unchanged", "stale", "delete_unknown")
# A canonical row `c` written by a change set newer than :cs. Keys have one fixed width, so
# their text order is their time order; a row an older version wrote under a key that is not
# one (any partition key was taken then) is never newer.
def _written_in_newer(dialect) -> str:
    return f"c._change_set > :cs AND c._change_set {dialect.key_match} :key_glob"

PLAN_DDL = """
CREATE TABLE IF NOT EXISTS _publish_plan (
    entity TEXT NOT NULL,
    change_set TEXT NOT NULL,
    pk TEXT NOT NULL,
    kind TEXT NOT NULL,
    changes TEXT,
    applied INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (entity, change_set, pk)
);
"""


def plan_change_set(connection: sqlite3.Connection, schema: EntitySchema, change_set: str,
                    mode: str, reconciled: bool = False) -> dict[str, int]:
    """Classify the staged change set against canonical and store the plan (one transaction).

    Returns the counts per kind (unchanged included; unchanged rows are not stored).
    """
    entity = quote_identifier(schema.entity)
    staging = quote_identifier(staging_table(schema.entity))
    pk = quote_identifier(schema.primary_key)
    keys = quote_identifier(staging_keys_table(schema.entity))
    full_snapshot = mode in SNAPSHOT_MODES
    dialect = dialect_of(connection)
    postgres = dialect is POSTGRES
    newer = _written_in_newer(dialect)
    key_glob = dialect.key_pattern
    connection.executescript(PLAN_DDL)
    with transaction(connection):
        ensure_canonical_tables(connection, schema)
        set_publish_state(connection, schema.entity, change_set, PublishStatus.PLANNING,
                          plan_started_at=utc_now_iso())
        connection.execute("DELETE FROM _publish_plan WHERE entity = ? AND change_set = ?",
                           (schema.entity, change_set))
        if connection.execute(f"SELECT 1 FROM {entity} LIMIT 1").fetchone() is None:
            return _plan_into_empty_table(connection, schema, change_set)
        # Newer data is never overwritten by an older change set: modifiedon decides where
        # both have one, the change set order decides otherwise.
        newer_in_canonical = (
            f"(({newer}) OR (s._modifiedon IS NOT NULL AND c.valid_from IS NOT NULL"
            " AND s._modifiedon < c.valid_from))"
        )
        # Each update's changed fields are computed in the same pass (a SQL function over
        # both versions' JSON), streaming: no second read of the rows, nothing held in memory.
        # PostgreSQL runs no Python in SQL: there they are computed after (_plan_changes).
        if not postgres:
            connection.create_function(CHANGED_FIELDS_FUNCTION, 2, changed_fields,
                                       deterministic=True)
        changes = "NULL" if postgres else f"{CHANGED_FIELDS_FUNCTION}(old, new)"
        connection.execute(
            f"{dialect.or_fail('INSERT')} INTO _publish_plan (entity, change_set, pk, kind,"
            f" changes)"
            f" SELECT :entity, :cs, pk, kind,"
            f"  CASE WHEN kind = 'update' THEN {changes} END"
            f" FROM (SELECT s._pk AS pk, CASE"
            f"  WHEN s._op = 'delete' AND c.{pk} IS NULL THEN 'delete_unknown'"
            f"  WHEN c.{pk} IS NULL THEN 'create'"
            f"  WHEN {newer_in_canonical} THEN 'stale'"
            f"  WHEN s._op = 'delete' THEN 'delete'"
            f"  WHEN c._content_hash = s._content_hash THEN 'unchanged'"
            f"  ELSE 'update' END AS kind, c.json_response AS old, s.json_response AS new"
            f" FROM {staging} s LEFT JOIN {entity} c ON c.{pk} = s._pk"
            f" WHERE s._change_set = :cs) AS plan",
            {"entity": schema.entity, "cs": change_set, "key_glob": key_glob},
        )
        if postgres:
            _plan_changes(connection, schema, change_set)
        fault_point("publish.mid_plan")
        if full_snapshot:
            # Rows the snapshot no longer has are deletes (unless a newer change set wrote them).
            connection.execute(
                f"INSERT INTO _publish_plan (entity, change_set, pk, kind)"
                f" SELECT :entity, :cs, c.{pk}, 'delete' FROM {entity} c"
                f" WHERE NOT ({newer}) AND NOT EXISTS (SELECT 1 FROM {staging} s"
                f"  WHERE s._change_set = :cs AND s._pk = c.{pk})",
                {"entity": schema.entity, "cs": change_set, "key_glob": key_glob},
            )
        elif reconciled:
            # Key-only scan: a mirrored row whose key the source no longer lists is deleted,
            # unless this change set staged it (created after the scan) or a newer one wrote it.
            connection.execute(
                f"INSERT INTO _publish_plan (entity, change_set, pk, kind)"
                f" SELECT :entity, :cs, c.{pk}, 'delete' FROM {entity} c"
                f" WHERE NOT ({newer})"
                f" AND NOT EXISTS (SELECT 1 FROM {keys} k WHERE k._change_set = :cs"
                f"  AND k._pk = c.{pk})"
                f" AND NOT EXISTS (SELECT 1 FROM {staging} s WHERE s._change_set = :cs"
                f"  AND s._pk = c.{pk})",
                {"entity": schema.entity, "cs": change_set, "key_glob": key_glob},
            )
        counts = {kind: 0 for kind in PLAN_KINDS}
        counts.update(connection.execute(
            "SELECT kind, count(*) FROM _publish_plan WHERE entity = ? AND change_set = ?"
            " GROUP BY kind", (schema.entity, change_set)))
        covered = connection.execute(
            f"SELECT count(*) FROM _publish_plan p JOIN {staging} s"
            " ON s._pk = p.pk AND s._change_set = p.change_set"
            " WHERE p.entity = ? AND p.change_set = ?", (schema.entity, change_set),
        ).fetchone()[0]
        _check_plan_covers_staging(connection, schema.entity, change_set, covered)
        # Unchanged rows need no work; only their count is kept.
        connection.execute(
            "DELETE FROM _publish_plan WHERE entity = ? AND change_set = ? AND kind = 'unchanged'",
            (schema.entity, change_set),
        )
        set_publish_state(
            connection, schema.entity, change_set, PublishStatus.PLAN_COMPLETE,
            plan_finished_at=utc_now_iso(), created=counts["create"], updated=counts["update"],
            deleted=counts["delete"], unchanged=counts["unchanged"], stale=counts["stale"],
            delete_unknown=counts["delete_unknown"], bulk_create=0,
        )
    return counts


def _plan_changes(connection, schema: EntitySchema, change_set: str) -> None:
    """Each planned update's changed fields (PostgreSQL: computed here from both versions,
    where SQLite computes them in the plan's statement). Inside the plan's transaction."""
    entity = quote_identifier(schema.entity)
    staging = quote_identifier(staging_table(schema.entity))
    pk = quote_identifier(schema.primary_key)
    rows = connection.execute(
        f"SELECT p.pk, c.json_response, s.json_response FROM _publish_plan p"
        f" JOIN {entity} c ON c.{pk} = p.pk"
        f" JOIN {staging} s ON s._change_set = p.change_set AND s._pk = p.pk"
        f" WHERE p.entity = ? AND p.change_set = ? AND p.kind = 'update'",
        (schema.entity, change_set))
    set_plan_changes(connection, schema.entity, change_set,
                     ((key, changed_fields(old, new)) for key, old, new in rows))


def _check_plan_covers_staging(connection: sqlite3.Connection, entity: str, change_set: str,
                               covered: int, staged: int | None = None) -> None:
    """Every staged row classified exactly once, or nothing is written (`staged`: the change
    set's staged rows, when the caller counted them)."""
    if staged is None:
        staged = count_staged(connection, entity, change_set)
    if covered != staged:
        raise PlanValidationError(
            f"{entity} {change_set}: the plan covers {covered} staged rows but {staged} are "
            "staged"
        )


def _plan_into_empty_table(connection: sqlite3.Connection, schema: EntitySchema,
                           change_set: str) -> dict[str, int]:
    """The plan of a change set published into an empty canonical table (a first sync, or
    after a snapshot deleted everything): every staged upsert is a create, every staged delete
    a delete of a record never mirrored; nothing is unchanged, stale or superseded.

    The creates are stored as that one rule (`bulk_create` in `_publish_state`), not as a row
    each: a 1M-row first sync would write a million plan rows only to read them back. The
    deletes keep their plan rows. Called inside plan_change_set's transaction.
    """
    staging = quote_identifier(staging_table(schema.entity))
    connection.execute(
        f"INSERT INTO _publish_plan (entity, change_set, pk, kind)"
        f" SELECT ?, ?, _pk, 'delete_unknown' FROM {staging}"
        f" WHERE _change_set = ? AND _op = 'delete'",
        (schema.entity, change_set, change_set))
    fault_point("publish.mid_plan")
    counts = {kind: 0 for kind in PLAN_KINDS}
    staged = count_staged_by_op(connection, schema.entity, change_set)
    counts["create"] = staged.get("upsert", 0)
    counts["delete_unknown"] = connection.execute(
        "SELECT count(*) FROM _publish_plan WHERE entity = ? AND change_set = ?",
        (schema.entity, change_set)).fetchone()[0]
    _check_plan_covers_staging(connection, schema.entity, change_set,
                               counts["create"] + counts["delete_unknown"],
                               staged=sum(staged.values()))
    set_publish_state(
        connection, schema.entity, change_set, PublishStatus.PLAN_COMPLETE,
        plan_finished_at=utc_now_iso(),
        created=counts["create"], updated=0, deleted=0, unchanged=0, stale=0,
        delete_unknown=counts["delete_unknown"], bulk_create=1,
    )
    return counts


CHANGED_FIELDS_FUNCTION = "dataverse_changed_fields"


def changed_fields(old_json: str | None, new_json: str | None) -> str | None:
    """{field: [old, new]} for the fields that differ between two versions of a record (a
    missing field counts as null), as JSON with sorted keys: what `plan show` prints and
    `_change_history` keeps. None when either side is not a JSON object (nothing to compare;
    the update itself still goes ahead)."""
    try:
        old, new = orjson.loads(old_json), orjson.loads(new_json)
    except (orjson.JSONDecodeError, TypeError):
        return None
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None
    # One pass over each side (most fields are equal), then only the changed keys sorted.
    changed = {k for k, v in old.items() if new.get(k) != v}
    changed.update(k for k, v in new.items() if k not in old and v is not None)
    return json_bytes({k: [old.get(k), new.get(k)] for k in sorted(changed)}).decode()


