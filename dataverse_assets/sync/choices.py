"""A change set's attribute metadata into the mirror: the labels of its choices, the targets
of its lookups, the language the readable view shows (store.choices), and what changed in the
options since the last change set, recorded as schema drift (`_schema_drift`, kinds
`option_added`, `option_relabelled`: info; `option_removed`: warning).

Runs when a change set is staged, after its schema is compared (sync.drift), in one
transaction. A change set older than the one the stored metadata came from (a retry staging
late) changes nothing: labels never go back in time.
"""

from __future__ import annotations

import sqlite3

from dataverse_assets.archive.change_sets import (
    ATTRIBUTE_METADATA,
    ENTITY_DEFINITION,
    ChangeSetArchive,
)
from dataverse_assets.config import EntityConfig
from dataverse_assets.names import change_set_order
from dataverse_assets.store.backend import dialect_of
from dataverse_assets.store.choices import (
    OptionChange,
    column_descriptions,
    ensure_choice_tables,
    option_changes,
    parse_attribute_metadata,
    set_view_language,
    store_attribute_metadata,
    stored_metadata,
)
from dataverse_assets.store.db import transaction, utc_now_iso
from dataverse_assets.store.schema import EntitySchema
from dataverse_assets.sync.drift import DRIFT_COLUMNS, DRIFT_KEY

OPTION_SEVERITY = {"option_added": "info", "option_relabelled": "info",
                   "option_removed": "warning"}
_ACTION = {
    "option_added": "label stored; E__readable shows it",
    "option_relabelled": "label replaced; E__readable shows the new one",
    "option_removed": "label dropped; rows still holding the value show no label",
}


def refresh_attribute_metadata(connection: sqlite3.Connection, archive: ChangeSetArchive,
                               entity: EntityConfig, schema: EntitySchema
                               ) -> list[OptionChange]:
    """Store the change set's attribute metadata if it is new; returns the option changes
    recorded as drift."""
    raw = archive.read_json(ATTRIBUTE_METADATA)
    language = entity.labels.language_code if entity.labels else None
    with transaction(connection):
        ensure_choice_tables(connection)
        stored = stored_metadata(connection, entity.name)
        if not isinstance(raw, dict) or (
                stored is not None
                and change_set_order(stored["change_set"]) > change_set_order(
                    archive.change_set)):
            set_view_language(connection, entity.name, language)
            return []
        parsed = parse_attribute_metadata(raw)
        lookup_columns = {attribute: f"_{attribute}_value" for attribute in parsed.lookups
                          if attribute != schema.primary_key}
        changes = option_changes(connection, entity.name, parsed)
        written = store_attribute_metadata(
            connection, entity.name, archive.change_set, raw, parsed, lookup_columns,
            column_descriptions(archive.read_json(ENTITY_DEFINITION)))
        set_view_language(connection, entity.name, language)
        if not written:
            return []
        now = utc_now_iso()
        connection.executemany(
            dialect_of(connection).upsert("_schema_drift", DRIFT_COLUMNS, DRIFT_KEY),
            [(entity.name, archive.change_set, c.kind, f"{c.attribute}={c.value}",
              OPTION_SEVERITY[c.kind], None, None, None, None, _ACTION[c.kind], _detail(c),
              now) for c in changes])
    return changes


def _detail(change: OptionChange) -> str:
    if change.kind == "option_added":
        return f"{change.attribute} {change.value}: {change.after!r}"
    if change.kind == "option_removed":
        return f"{change.attribute} {change.value}: was {change.before!r}"
    return f"{change.attribute} {change.value}: {change.before!r} -> {change.after!r}"
