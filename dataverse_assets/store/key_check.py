"""The primary-key check's reads and its record (`_key_check`).

Keys never change in place: a case variant can only arrive as a create. So once every key has
been seen unique, a later check needs only the keys created since (`_change_history` ids past
the last check), each looked up in the NOCASE index: the cost follows the change, not the
table. Which of the two reads to do is `scoped_check_allowed`, a pure decision; the verdict
drawn from the findings is the check's own (defs.checks.primary_key_verdict).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from dataverse_assets.store.backend import POSTGRES, dialect_of
from dataverse_assets.store.db import quote_identifier, transaction, utc_now_iso
from dataverse_assets.store.tables import canonical_row_count

# A scoped primary-key check probes each new key (an index seek, ~10 µs); reading the whole
# NOCASE index costs ~0.3 µs a row. Past one new key in SCOPED_KEY_CHECK_RATIO rows, read it all.
SCOPED_KEY_CHECK_RATIO = 20

ALL_KEYS = "all keys"


@dataclass(frozen=True)
class LastKeyCheck:
    passed: bool
    checked_through: int  # the last `_change_history` id it covered
    rows: int


@dataclass(frozen=True)
class KeyFindings:
    """What one read of the key column found."""

    missing: int  # rows with a NULL or empty key
    duplicates: list[tuple[str, int]]  # (key in lower case, rows holding it), in key order
    scope: str  # ALL_KEYS, or how many new keys were looked up
    checked_through: int
    rows: int


def scoped_check_allowed(last: LastKeyCheck | None, rows: int, new_keys: int,
                         deleted: int) -> bool:
    """Whether looking up only the keys created since the last check is enough.

    Not on a first check or after a failed one; not when the row count is not the last check's
    plus the creates minus the deletes since (rows written around publish, e.g. by hand: the
    history does not explain them); not when the new keys are many (reading it all is cheaper).
    """
    if last is None or not last.passed:
        return False
    return (rows == last.rows + new_keys - deleted
            and new_keys * SCOPED_KEY_CHECK_RATIO <= rows)


def find_key_problems(connection: sqlite3.Connection, entity: str,
                      primary_key: str) -> KeyFindings:
    """NULL or empty keys and case-insensitive duplicates in `entity`'s canonical table, read
    in one snapshot (no write lock held while reading)."""
    table, pk = quote_identifier(entity), quote_identifier(primary_key)
    postgres = dialect_of(connection) is POSTGRES
    # (PostgreSQL: one snapshot for the transaction, not one per statement; `+entity` keeps
    # SQLite off an index, PostgreSQL has no unary plus for text.)
    connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if postgres
                       else "BEGIN")
    by_entity = "entity" if postgres else "+entity"
    try:
        missing = connection.execute(
            f"SELECT count(*) FROM {table} WHERE {pk} IS NULL OR {pk} = ''").fetchone()[0]
        through = connection.execute(
            "SELECT coalesce(max(id), 0) FROM _change_history").fetchone()[0]
        rows = canonical_row_count(connection, entity)
        last = _last_check(connection, entity)
        new_keys = deleted = 0
        if last is not None and last.passed:
            # By id range (+entity: not the (entity, record_id) index, which would read every
            # change the entity ever had).
            new_keys, deleted = connection.execute(
                "SELECT count(*) FILTER (WHERE kind = 'create'),"
                " count(*) FILTER (WHERE kind = 'delete') FROM _change_history"
                f" WHERE id > ? AND id <= ? AND {by_entity} = ?",
                (last.checked_through, through, entity),
            ).fetchone()
        if scoped_check_allowed(last, rows, new_keys, deleted):
            scope = f"{new_keys} keys created since the last check"
            if postgres:  # the NOCASE index is on lower(key) there (store.tables)
                query = (
                    f"SELECT key, n FROM (SELECT key, (SELECT count(*) FROM {table} c"
                    f"  WHERE lower(c.{pk}) = key) AS n"
                    f" FROM (SELECT DISTINCT lower(record_id) AS key FROM _change_history"
                    f"  WHERE id > ? AND id <= ? AND entity = ? AND kind = 'create') k) counted"
                    f" WHERE n > 1 ORDER BY 1")
            else:
                query = (
                    f"SELECT key, (SELECT count(*) FROM {table} c"
                    f"  WHERE c.{pk} = key COLLATE NOCASE) AS n"
                    f" FROM (SELECT DISTINCT lower(record_id) AS key FROM _change_history"
                    f"  WHERE id > ? AND id <= ? AND +entity = ? AND kind = 'create')"
                    f" WHERE n > 1 ORDER BY 1")
            duplicates = connection.execute(
                query, (last.checked_through, through, entity)).fetchall()
        else:
            scope = ALL_KEYS
            # Grouped without case: NOCASE folds ASCII as lower() does, and the canonical
            # table's NOCASE index on the key (store.tables) gives the groups in order.
            group = f"lower({pk})" if postgres else f"{pk} COLLATE NOCASE"
            duplicates = connection.execute(
                f"SELECT lower({pk}), count(*) FROM {table} WHERE {pk} IS NOT NULL"
                f" GROUP BY {group} HAVING count(*) > 1 ORDER BY 1").fetchall()
    finally:
        connection.execute("COMMIT")
    return KeyFindings(missing, [(k, n) for k, n in duplicates], scope, through, rows)


def record_key_check(connection: sqlite3.Connection, entity: str, findings: KeyFindings,
                     passed: bool) -> None:
    """Store the verdict, kept only if no later check (a concurrent run) recorded a newer one."""
    with transaction(connection):
        connection.execute(
            "INSERT INTO _key_check (entity, passed, checked_through, rows, scope, checked_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (entity) DO UPDATE SET"
            " passed = excluded.passed, checked_through = excluded.checked_through,"
            " rows = excluded.rows, scope = excluded.scope, checked_at = excluded.checked_at"
            " WHERE excluded.checked_through >= _key_check.checked_through",
            (entity, int(passed), findings.checked_through, findings.rows, findings.scope,
             utc_now_iso()))


def _last_check(connection: sqlite3.Connection, entity: str) -> LastKeyCheck | None:
    row = connection.execute(
        "SELECT passed, checked_through, rows FROM _key_check WHERE entity = ?",
        (entity,)).fetchone()
    return None if row is None else LastKeyCheck(bool(row[0]), row[1], row[2])
