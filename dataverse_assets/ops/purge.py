"""`dataverse-assets purge --entity E --column C`: erase a column the entity no longer selects,
for a team that must erase personal data.

What goes: the column's values in `E`, `E__history` and the staging table (set to NULL), the
field and its annotations in every json_response there, in the change log (`_change_history`,
`_publish_plan`: the changed fields), in the issues that quote it, the multi-select child
table `E__C`, and the field in every archived page of the entity (page files rewritten in
place, compacted parts rewritten and checked). Content hashes are recomputed, so the next sync
sees unchanged records as unchanged. The column itself stays in the tables, NULL (the locked
schema still lists it; a new mirror from the archive never fills it again).

Refused while the entities file still selects the column (the next sync would fetch it
back), and done under the entity's lock, so no sync writes the entity meanwhile.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

import orjson

from dataverse_assets.archive.change_sets import ChangeSetArchive, list_change_sets
from dataverse_assets.archive.compacted import rewrite_pages
from dataverse_assets.config import EntityConfig
from dataverse_assets.errors import ConfigError
from dataverse_assets.names import check_column_name
from dataverse_assets.store.db import quote_identifier, table_columns, table_exists, transaction
from dataverse_assets.store.mirror import MirrorAccess
from dataverse_assets.store.readable import drop_multi_select_table
from dataverse_assets.store.schema_registry import load_locked_schema
from dataverse_assets.store.staging_store import is_staging_table
from dataverse_assets.store.tables import history_table, rewrite_matching_rows, staging_table
from dataverse_assets.sync.stage import content_hash

_BATCH = 2000


@dataclass
class PurgeResult:
    entity: str
    column: str
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows rewritten
    change_log_rows: int = 0
    issues: int = 0
    archive_pages: int = 0
    change_sets: int = 0


def purged_keys(column: str) -> tuple[str, ...]:
    """The row keys a column can have: its name, and a lookup's `_<name>_value`."""
    if column.startswith("_") and column.endswith("_value"):
        return (column,)
    return (column, f"_{column}_value")


def _strip(value: object, keys: tuple[str, ...]) -> bool:
    """Remove the keys and their annotations (`key@...`) from a dict; returns whether any."""
    if not isinstance(value, dict):
        return False
    doomed = [k for k in value if k in keys or any(k.startswith(f"{key}@") for key in keys)]
    for k in doomed:
        del value[k]
    return bool(doomed)


def strip_page(body: bytes, shape: str, keys: tuple[str, ...]) -> bytes | None:
    """An archived page without the keys in any record; None when it held none."""
    payload = orjson.loads(body)
    records = [payload] if shape == "record" else (
        payload.get("value") if isinstance(payload, dict) else None) or []
    changed = False
    for record in records:
        changed |= _strip(record, keys)
    return orjson.dumps(payload) if changed else None


def check_purgeable(entity: EntityConfig, column: str) -> None:
    """The column must be one the entities file no longer selects."""
    check_column_name(column)
    if entity.select is None:
        raise ConfigError(
            f"{entity.name}: every column is mirrored (no 'select' in the entities file), so "
            f"{column!r} would come back with the next sync; list the columns to keep in "
            "'select', sync once, then purge")
    selected = {k.lower() for name in entity.select for k in purged_keys(name)}
    if any(k.lower() in selected for k in purged_keys(column)):
        raise ConfigError(
            f"{entity.name}: {column!r} is still in 'select'; take it out of 'select' in the "
            "entities file (and sync once) before purging it")


def purge_column(mirror: MirrorAccess, entity: EntityConfig, column: str) -> PurgeResult:
    """Erase `column` from the entity's tables, change log and archive (see the module)."""
    check_purgeable(entity, column)
    keys = purged_keys(column)
    result = PurgeResult(entity.name, column)
    with mirror.connection() as connection:
        schema = load_locked_schema(connection, entity.name)
        for table in (entity.name, history_table(entity.name), staging_table(entity.name)):
            if table_exists(connection, table):
                result.rows[table] = _purge_table(connection, table, keys,
                                                  entity.hash_ignore_annotations)
        result.change_log_rows = _purge_change_log(connection, entity.name, keys)
        with transaction(connection):
            result.issues = connection.execute(
                "UPDATE _issues SET context = NULL WHERE entity = ? AND field IN"
                f" ({', '.join('?' * len(keys))}) AND context IS NOT NULL",
                (entity.name, *keys)).rowcount if table_exists(connection, "_issues") else 0
            for key in keys:
                if schema is not None:
                    drop_multi_select_table(connection, schema, key)
    storage = mirror.archive_storage()
    for change_set in list_change_sets(storage, entity.name):
        archive = ChangeSetArchive(storage, entity.name, change_set)
        pages = rewrite_pages(archive, lambda body, shape: strip_page(body, shape, keys))
        result.archive_pages += pages
        result.change_sets += bool(pages)
    return result


def _needles(keys: tuple[str, ...]) -> list[str]:
    """Text a JSON document holding one of the keys contains: the key after its quote."""
    return [f'"{key}' for key in keys]


def _purge_table(connection: sqlite3.Connection, table: str, keys: tuple[str, ...],
                 ignore_annotations: bool) -> int:
    """NULL the column, strip the field from json_response and hash again, in batches."""
    quoted = quote_identifier(table)
    columns = table_columns(connection, table)
    present = [k for k in keys if k in columns]
    hashed = "_content_hash" in columns

    def rewrite(body: str) -> tuple | None:
        record = orjson.loads(body)
        if not _strip(record, keys):
            return None
        text = orjson.dumps(record).decode()
        return (text, content_hash(record, ignore_annotations)) if hashed else (text,)

    with transaction(connection, staging=is_staging_table(table)):
        for key in present:
            connection.execute(f"UPDATE {quoted} SET {quote_identifier(key)} = NULL")
        return rewrite_matching_rows(
            connection, table, "json_response", _needles(keys),
            ("json_response", "_content_hash") if hashed else ("json_response",), rewrite,
            batch=_BATCH)


def _purge_change_log(connection: sqlite3.Connection, entity: str,
                      keys: tuple[str, ...]) -> int:
    """The changed fields kept per change ({field: [old, new]}) lose the column's."""

    def rewrite(changes: str) -> tuple | None:
        value = orjson.loads(changes)
        if not _strip(value, keys):
            return None
        return (orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode() if value else None,)

    rewritten = 0
    with transaction(connection):
        for table in ("_change_history", "_publish_plan"):
            if table_exists(connection, table):
                rewritten += rewrite_matching_rows(
                    connection, table, "changes", _needles(keys), ("changes",), rewrite,
                    condition="entity = ?", parameters=(entity,), batch=_BATCH)
    return rewritten
