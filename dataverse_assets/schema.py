"""Schema decisions: columns and types from metadata or samples, and the primary key.

Pure functions; every decision carries its reason so it can be stored and shown.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

# Dataverse AttributeType -> SQLite column type. DateTime stays ISO-8601 TEXT (UTC, sortable).
ATTRIBUTE_TYPE_TO_SQLITE: dict[str, str] = {
    "String": "TEXT",
    "Memo": "TEXT",
    "EntityName": "TEXT",
    "Integer": "INTEGER",
    "BigInt": "INTEGER",
    "Boolean": "INTEGER",
    "Picklist": "INTEGER",
    "State": "INTEGER",
    "Status": "INTEGER",
    "Double": "REAL",
    "Decimal": "REAL",
    "Money": "REAL",
    "DateTime": "TEXT",
    "Uniqueidentifier": "TEXT",
    "Lookup": "TEXT",
    "Customer": "TEXT",
    "Owner": "TEXT",
}
LOOKUP_TYPES = {"Lookup", "Customer", "Owner"}
# Columns the sync itself adds to canonical tables; an API column with one of these names
# would collide, so it keeps living in json_response only.
RESERVED_COLUMNS = {"json_response", "sync_time", "valid_from", "updated_at", "_content_hash",
                    "_change_set"}


@dataclass(frozen=True)
class Column:
    name: str
    sqlite_type: str
    attribute_type: str | None = None


@dataclass(frozen=True)
class EntitySchema:
    """The shape of one entity's tables, with where each decision came from."""

    entity: str
    primary_key: str
    columns: tuple[Column, ...]
    decided_from: str  # "metadata" or "sample"
    reasons: tuple[str, ...] = field(default_factory=tuple)
    change_tracking: bool | None = None

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def has_modifiedon(self) -> bool:
        return any(c.name == "modifiedon" for c in self.columns)

    def to_json(self) -> str:
        return orjson.dumps(
            [{"name": c.name, "type": c.sqlite_type, "attribute_type": c.attribute_type}
             for c in self.columns]
        ).decode()


def singular(entity_set: str) -> str:
    """accounts -> account, vin_candidates -> vin_candidate, businesses -> business."""
    if entity_set.endswith("ies"):
        return entity_set[:-3] + "y"
    for suffix in ("sses", "shes", "ches", "xes"):
        if entity_set.endswith(suffix):
            return entity_set[:-2]
    if entity_set.endswith("set"):
        return entity_set[:-3]
    if entity_set.endswith("s") and not entity_set.endswith("ss"):
        return entity_set[:-1]
    return entity_set


def detect_primary_key(
    entity_set: str, columns: Iterable[str], override: str | None = None,
    metadata_primary: str | None = None,
) -> tuple[str, str]:
    """The primary key and why: config, metadata, then the fallback chain of DESIGN.md."""
    names = list(columns)
    if override:
        return override, "primary_key set in entities_config.json"
    if metadata_primary:
        return metadata_primary, "PrimaryIdAttribute from EntityDefinitions"
    lowered = {n.lower(): n for n in names}
    for candidate, why in (
        (f"{entity_set}id", "<entity>id"),
        (f"{singular(entity_set)}id", "singular + id"),
    ):
        if candidate.lower() in lowered:
            return lowered[candidate.lower()], f"column {why} exists"
    id_columns = [n for n in names if n.lower().endswith("id") and not n.startswith("_")]
    if id_columns:
        shortest = min(id_columns, key=lambda n: (len(n), n))
        return shortest, "shortest column ending in 'id' not starting with '_'"
    if names:
        return names[0], "first column (no better candidate)"
    return f"{singular(entity_set)}id", "no columns seen; assumed singular + id"


def _is_data_key(key: str) -> bool:
    return "@" not in key and key not in RESERVED_COLUMNS


def schema_from_metadata(
    entity_set: str, definition: dict, primary_key_override: str | None = None
) -> EntitySchema:
    """Columns from an EntityDefinitions entry with its Attributes expanded."""
    columns: list[Column] = []
    for attribute in definition.get("Attributes", []):
        attribute_type = attribute.get("AttributeType")
        name = attribute.get("LogicalName")
        if not name or attribute_type not in ATTRIBUTE_TYPE_TO_SQLITE:
            continue  # Virtual and unknown kinds are not returned as plain columns
        if attribute_type in LOOKUP_TYPES and name != definition.get("PrimaryIdAttribute"):
            name = f"_{name}_value"
        if _is_data_key(name):
            columns.append(Column(name, ATTRIBUTE_TYPE_TO_SQLITE[attribute_type], attribute_type))
    primary_key, why = detect_primary_key(
        entity_set, [c.name for c in columns], primary_key_override,
        definition.get("PrimaryIdAttribute"),
    )
    columns = _primary_key_first(columns, primary_key)
    return EntitySchema(
        entity=entity_set, primary_key=primary_key, columns=tuple(columns),
        decided_from="metadata", reasons=(f"primary key {primary_key!r}: {why}",
                                         "columns and types from EntityDefinitions"),
        change_tracking=definition.get("ChangeTrackingEnabled"),
    )


def sqlite_type_of(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool | int):
        return "INTEGER"
    if isinstance(value, float):
        return "REAL"
    return "TEXT"


def _widen(current: str | None, new: str | None) -> str | None:
    if current is None:
        return new
    if new is None or new == current:
        return current
    if {current, new} == {"INTEGER", "REAL"}:
        return "REAL"
    return "TEXT"


def infer_schema_from_records(
    entity_set: str, records: Iterable[dict], primary_key_override: str | None = None
) -> EntitySchema:
    """Columns from sampled records: types from every non-null value seen, TEXT if never seen."""
    types: dict[str, str | None] = {}
    for record in records:
        for key, value in record.items():
            if _is_data_key(key):
                types[key] = _widen(types.get(key), sqlite_type_of(value))
    primary_key, why = detect_primary_key(entity_set, types, primary_key_override)
    columns = [Column(name, sqlite_type or "TEXT") for name, sqlite_type in types.items()]
    if primary_key not in types:
        columns.insert(0, Column(primary_key, "TEXT"))
    columns = _primary_key_first(columns, primary_key)
    return EntitySchema(
        entity=entity_set, primary_key=primary_key, columns=tuple(columns),
        decided_from="sample", reasons=(f"primary key {primary_key!r}: {why}",
                                       "columns and types inferred from sampled records"),
    )


def _primary_key_first(columns: list[Column], primary_key: str) -> list[Column]:
    return sorted(columns, key=lambda c: c.name != primary_key)


def to_sqlite_value(value: object) -> object:
    """A JSON value as SQLite stores it: booleans as 0/1, objects and lists as JSON text."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return value
