"""Schema decisions: columns and types from metadata or samples, and the primary key.

Pure functions; every decision carries its reason so it can be stored and shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

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
    # The chosen options' values, comma-separated, as Dataverse sends them ("1,3"); one row
    # per option in the child table E__<column> (store.readable).
    "MultiSelectPicklist": "TEXT",
    # A file column's value is the file's id; the file itself is not in the row.
    "File": "TEXT",
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
# AttributeType is "Virtual" for these; the AttributeTypeName says what they are.
TYPE_NAME_TO_ATTRIBUTE_TYPE = {"MultiSelectPicklistType": "MultiSelectPicklist",
                               "FileType": "File"}


def attribute_type_of(attribute: dict) -> str | None:
    """An attribute's type as the mirror uses it: AttributeType, except where only the
    AttributeTypeName tells (a multi-select choice, a file column)."""
    type_name = attribute.get("AttributeTypeName")
    type_name = type_name.get("Value") if isinstance(type_name, dict) else None
    return TYPE_NAME_TO_ATTRIBUTE_TYPE.get(type_name or "") or attribute.get("AttributeType")
# Columns the sync itself adds to canonical, history and staging tables; an API column with
# one of these names (in any letter case) would collide, so it lives in json_response only.
RESERVED_COLUMNS = {"json_response", "sync_time", "valid_from", "updated_at", "_content_hash",
                    "_change_set", "valid_to", "change_kind", "superseded_in", "_pk", "_op",
                    "_modifiedon"}

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def sqlite_fold(name: str) -> str:
    """The form under which SQLite compares identifiers: only ASCII letters fold
    ("Name" = "name", but "Ä" != "ä")."""
    return name.translate(_ASCII_LOWER)


_RESERVED_FOLDED = {sqlite_fold(n): n for n in RESERVED_COLUMNS}


@dataclass(frozen=True)
class Column:
    name: str
    sqlite_type: str
    attribute_type: str | None = None
    # False when sampled records only ever held null: the type is a guess (TEXT).
    type_known: bool = True

    def as_json(self) -> dict:
        out = {"name": self.name, "type": self.sqlite_type, "attribute_type": self.attribute_type}
        if not self.type_known:
            out["type_known"] = False
        return out

    @classmethod
    def from_json(cls, item: dict) -> Column:
        return cls(item["name"], item["type"], item.get("attribute_type"),
                   item.get("type_known", True))


@dataclass(frozen=True)
class ExcludedColumn:
    """A field of the API that cannot be a column; it stays in json_response only."""

    name: str
    sqlite_type: str | None
    attribute_type: str | None
    reason: str


@dataclass(frozen=True)
class EntitySchema:
    """The shape of one entity's tables, with where each decision came from."""

    entity: str
    primary_key: str
    columns: tuple[Column, ...]
    decided_from: str  # "metadata" or "sample"
    reasons: tuple[str, ...] = field(default_factory=tuple)
    change_tracking: bool | None = None
    excluded: tuple[ExcludedColumn, ...] = ()

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def has_modifiedon(self) -> bool:
        return any(c.name == "modifiedon" for c in self.columns)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    def to_json(self) -> str:
        return orjson.dumps([c.as_json() for c in self.columns]).decode()


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
    """Annotations (`@odata.etag`, `x@OData.Community...`) are never columns."""
    return "@" not in key


def column_name_problem(name: str, taken: dict[str, str],
                        name_limit: int | None = None) -> str | None:
    """Why a field name cannot become a column next to `taken` (folded name -> name), or
    None. Everything else, however hostile, is stored under its quoted name. `name_limit`:
    the store's longest identifier in bytes (PostgreSQL's 63; SQLite has none), past which a
    name would be cut short."""
    if name == "":
        return "empty name"
    if "\x00" in name:
        return "contains a NUL character, which no SQLite identifier can hold"
    if name_limit is not None and len(name.encode()) > name_limit:
        return (f"longer than {name_limit} bytes, which a PostgreSQL identifier cannot be "
                "(it would be cut short)")
    folded = sqlite_fold(name)
    if folded in _RESERVED_FOLDED:
        return (f"collides with the sync column {_RESERVED_FOLDED[folded]!r} (SQLite column "
                "names are case-insensitive)")
    if folded in taken:
        return (f"differs from the column {taken[folded]!r} only in letter case; SQLite "
                "column names are case-insensitive, so both cannot be columns")
    return None


def split_usable_columns(columns: Iterable[Column], name_limit: int | None = None
                         ) -> tuple[list[Column], list[ExcludedColumn]]:
    """Columns that can be SQLite columns (first come first served) and the rest, with why
    (`name_limit`: see column_name_problem)."""
    kept: list[Column] = []
    excluded: list[ExcludedColumn] = []
    taken: dict[str, str] = {}
    for column in columns:
        problem = column_name_problem(column.name, taken, name_limit)
        if problem is None:
            kept.append(column)
            taken[sqlite_fold(column.name)] = column.name
        else:
            sqlite_type = column.sqlite_type if column.type_known else None
            excluded.append(ExcludedColumn(column.name, sqlite_type, column.attribute_type,
                                           f"{problem}; kept in json_response only"))
    return kept, excluded


def _exclusion_reasons(excluded: list[ExcludedColumn]) -> list[str]:
    return [f"{e.name!r} is not a column: {e.reason}" for e in excluded]


def schema_from_metadata(
    entity_set: str, definition: dict, primary_key_override: str | None = None,
    name_limit: int | None = None,
) -> EntitySchema:
    """Columns from an EntityDefinitions entry with its Attributes expanded."""
    columns: list[Column] = []
    for attribute in definition.get("Attributes", []):
        attribute_type = attribute_type_of(attribute)
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
    columns, excluded = split_usable_columns(_primary_key_first(columns, primary_key),
                                             name_limit)
    return EntitySchema(
        entity=entity_set, primary_key=primary_key, columns=tuple(columns),
        decided_from="metadata", reasons=(f"primary key {primary_key!r}: {why}",
                                         "columns and types from EntityDefinitions",
                                         *_exclusion_reasons(excluded)),
        change_tracking=definition.get("ChangeTrackingEnabled"), excluded=tuple(excluded),
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


def observed_types(records: Iterable[dict], types: dict[str, str | None] | None = None
                   ) -> dict[str, str | None]:
    """Field -> SQLite type over every non-null value seen (None: only nulls), in the order
    fields first appear. Pass `types` to keep accumulating over more records."""
    types = {} if types is None else types
    for record in records:
        for key, value in record.items():
            if _is_data_key(key):
                types[key] = _widen(types.get(key), sqlite_type_of(value))
    return types


def schema_from_observed_types(entity_set: str, types: dict[str, str | None],
                               primary_key_override: str | None = None,
                               name_limit: int | None = None) -> EntitySchema:
    """Columns from observed types; a field only ever null is TEXT with `type_known` False."""
    primary_key, why = detect_primary_key(entity_set, types, primary_key_override)
    columns = [Column(name, sqlite_type or "TEXT", None, sqlite_type is not None)
               for name, sqlite_type in types.items()]
    if primary_key not in types:
        columns.insert(0, Column(primary_key, "TEXT"))
    columns, excluded = split_usable_columns(_primary_key_first(columns, primary_key),
                                             name_limit)
    return EntitySchema(
        entity=entity_set, primary_key=primary_key, columns=tuple(columns),
        decided_from="sample", reasons=(f"primary key {primary_key!r}: {why}",
                                       "columns and types inferred from sampled records",
                                       *_exclusion_reasons(excluded)),
        excluded=tuple(excluded),
    )


def infer_schema_from_records(
    entity_set: str, records: Iterable[dict], primary_key_override: str | None = None,
    name_limit: int | None = None,
) -> EntitySchema:
    """Columns from sampled records: types from every non-null value seen, TEXT if never seen."""
    return schema_from_observed_types(entity_set, observed_types(records), primary_key_override,
                                      name_limit)


def _primary_key_first(columns: list[Column], primary_key: str) -> list[Column]:
    return sorted(columns, key=lambda c: c.name != primary_key)


SQLITE_INTEGER_RANGE = range(-(2**63), 2**63)


def json_bytes(value: object, *, sort_keys: bool = False) -> bytes:
    """JSON bytes of a parsed value, as orjson writes them; values nested deeper than orjson
    writes (254 levels; it reads up to 1024) are written without recursion instead of failing."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except orjson.JSONEncodeError as exc:
        if "recursion" not in str(exc).lower():
            raise
    return _json_without_recursion(value, sort_keys).encode()


def _json_without_recursion(value: object, sort_keys: bool) -> str:
    out: list[str] = []
    # A stack of pending work: values to write, or literal text (closing brackets, commas).
    stack: list[tuple[bool, object]] = [(False, value)]
    while stack:
        is_text, item = stack.pop()
        if is_text:
            out.append(item)  # type: ignore[arg-type]
        elif isinstance(item, dict):
            keys = sorted(item) if sort_keys else list(item)
            out.append("{")
            stack.append((True, "}"))
            for index in range(len(keys) - 1, -1, -1):
                stack.append((False, item[keys[index]]))
                stack.append((True, orjson.dumps(str(keys[index])).decode() + ":"))
                if index:
                    stack.append((True, ","))
        elif isinstance(item, list):
            out.append("[")
            stack.append((True, "]"))
            for index in range(len(item) - 1, -1, -1):
                stack.append((False, item[index]))
                if index:
                    stack.append((True, ","))
        else:
            out.append(orjson.dumps(item).decode())
    return "".join(out)


class OversizedInteger(str):
    """The exact decimal text of an integer SQLite cannot hold (2**63 and up): a TEXT column
    keeps it exactly, an INTEGER or REAL column turns it into an approximate REAL, so staging
    reports it as an issue (json_response always has it exactly)."""


def to_sqlite_value(value: object) -> object:
    """A JSON value as SQLite stores it: booleans as 0/1, objects and lists as JSON text,
    integers beyond SQLite's 64 bits as their exact decimal text (OversizedInteger)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value not in SQLITE_INTEGER_RANGE:
        return OversizedInteger(value)
    if isinstance(value, dict | list):
        return json_bytes(value).decode()
    return value


def to_postgres_value(value: object, sqlite_type: str) -> tuple[object, str | None]:
    """A JSON value as its PostgreSQL column (of the schema's `sqlite_type`) holds it, or
    (None, why) when it does not fit: PostgreSQL refuses a row with such a value, where SQLite
    stores it as it comes. The caller keeps the record exact in json_response and reports the
    reason as an issue (docs/store-backends.md, "Values that do not fit their column")."""
    if value is None:
        return None, None
    kind = sqlite_type.upper()
    if isinstance(value, bool):
        value = int(value)  # as SQLite binds it
    if kind == "INTEGER":
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # SQLite's INTEGER affinity does the same
        elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            value = int(value)
        if isinstance(value, int):
            if value in SQLITE_INTEGER_RANGE:
                return value, None
            return None, f"integer {value} does not fit PostgreSQL's 64-bit bigint"
        return None, f"{_describe(value)} is not an integer"
    if kind == "REAL":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return None, f"{_describe(value)} is not a number"
        if isinstance(value, int | float):
            try:
                number = float(value)
            except OverflowError:
                return None, f"number {value} does not fit PostgreSQL's double precision"
            if number in (float("inf"), float("-inf")):
                return None, f"number {value} does not fit PostgreSQL's double precision"
            return number, None
        return None, f"{_describe(value)} is not a number"
    if kind == "BLOB":
        if isinstance(value, bytes):
            return value, None
        return None, f"{_describe(value)} is not binary data"
    if isinstance(value, dict | list):
        value = json_bytes(value).decode()
    elif isinstance(value, float):
        value = repr(value)
    elif not isinstance(value, str):
        value = str(value)
    if "\x00" in value:
        return None, "text with a NUL character (U+0000), which PostgreSQL's text cannot hold"
    return value, None


def _describe(value: object) -> str:
    if isinstance(value, dict | list):
        return "a JSON " + ("object" if isinstance(value, dict) else "array")
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- drift: the live schema of a change set against the locked one --------------------------

ADDED, REMOVED, TYPE_CHANGED, EXCLUDED = "added", "removed", "type_changed", "excluded"
# Scope changes made by the entities file: a column left out of `select`, another `filter`.
DESELECTED, FILTER_CHANGED = "deselected", "filter_changed"
INFO, BREAKING = "info", "breaking"


@dataclass(frozen=True)
class SchemaChange:
    """One difference between the locked schema and a change set's live schema."""

    kind: str  # added | removed | type_changed | excluded
    column: str
    severity: str  # info | breaking
    locked_type: str | None = None
    live_type: str | None = None
    locked_attribute_type: str | None = None
    live_attribute_type: str | None = None
    detail: str = ""


def _type_change(locked: Column, live: Column, from_records: bool) -> SchemaChange | None:
    if from_records and not live.type_known:
        return None  # only nulls in this change set: no evidence about the type
    change = SchemaChange(TYPE_CHANGED, live.name, BREAKING, locked.sqlite_type,
                          live.sqlite_type, locked.attribute_type, live.attribute_type)
    if locked.sqlite_type == live.sqlite_type:
        if (not from_records and locked.attribute_type and live.attribute_type
                and locked.attribute_type != live.attribute_type):
            return replace(change, severity=INFO, detail=(
                f"AttributeType {locked.attribute_type} -> {live.attribute_type}; "
                f"stored as {live.sqlite_type} either way"))
        return None
    if not locked.type_known:
        return replace(change, severity=INFO, detail=(
            f"locked as TEXT when only nulls had been seen; values are now {live.sqlite_type}"))
    if from_records and (locked.sqlite_type, live.sqlite_type) == ("REAL", "INTEGER"):
        return None  # this change set's numbers happen to be whole: they fit REAL
    if from_records and (locked.sqlite_type, live.sqlite_type) == ("INTEGER", "REAL"):
        return replace(change, severity=INFO, detail=(
            "sampled values are no longer all whole numbers; SQLite keeps them exact as REAL"))
    return replace(change, detail=f"{locked.sqlite_type} -> {live.sqlite_type}")


def compare_schemas(locked: EntitySchema, live: EntitySchema,
                    name_limit: int | None = None) -> list[SchemaChange]:
    """Added columns (info), removed columns and type changes (breaking), and fields that
    cannot be columns (excluded: info). `live` comes from a change set's metadata, or from
    its records (then a field only ever null says nothing about its type)."""
    from_records = live.decided_from == "sample"
    locked_by_name = {c.name: c for c in locked.columns}
    # Names the table already has: a live field matching one only in case cannot be added.
    taken = {sqlite_fold(c.name): c.name for c in locked.columns}
    candidates = [(c, None) for c in live.columns] + [
        (Column(e.name, e.sqlite_type or "TEXT", e.attribute_type, e.sqlite_type is not None),
         e.reason) for e in live.excluded
    ]
    # Locked columns first: which of two case variants the live side kept must not matter.
    candidates.sort(key=lambda item: item[0].name not in locked_by_name)
    changes: list[SchemaChange] = []
    for column, reason in candidates:
        old = locked_by_name.get(column.name)
        if old is not None:
            change = _type_change(old, column, from_records)
            if change is not None:
                changes.append(change)
            continue
        live_type = column.sqlite_type if column.type_known else None
        problem = column_name_problem(column.name, taken, name_limit)
        if problem is None:
            taken[sqlite_fold(column.name)] = column.name
            changes.append(SchemaChange(ADDED, column.name, INFO, None, live_type, None,
                                        column.attribute_type))
        else:
            changes.append(SchemaChange(EXCLUDED, column.name, INFO, None, live_type, None,
                                        column.attribute_type,
                                        reason or f"{problem}; kept in json_response only"))
    live_names = {column.name for column, _ in candidates}
    for column in locked.columns:
        if column.name not in live_names:
            changes.append(SchemaChange(REMOVED, column.name, BREAKING, column.sqlite_type,
                                        None, column.attribute_type, None))
    return changes


def only_selected(schema: EntitySchema, select: list[str] | None) -> EntitySchema:
    """The schema's columns that `select` (row keys, as a request asked for them) keeps, and
    the key; the whole schema when every column was asked for."""
    if not select:
        return schema
    keep = {*select, schema.primary_key}
    return replace(schema, columns=tuple(c for c in schema.columns if c.name in keep),
                   excluded=tuple(e for e in schema.excluded if e.name in keep))


def mark_deselected(changes: list[SchemaChange], select: list[str] | None,
                    metadata_columns: set[str]) -> list[SchemaChange]:
    """A locked column the source still has but `select` no longer asks for is not a removal
    by the source (breaking) but the user's choice (info)."""
    if not select:
        return changes
    return [replace(c, kind=DESELECTED, severity=INFO,
                    detail="left out of 'select'; its old values stay until purged")
            if c.kind == REMOVED and c.column not in select and c.column in metadata_columns
            else c for c in changes]


def excluded_as_changes(schema: EntitySchema) -> list[SchemaChange]:
    """The fields a freshly locked schema could not make columns, as reportable changes."""
    return [SchemaChange(EXCLUDED, e.name, INFO, None, e.sqlite_type, None, e.attribute_type,
                         e.reason) for e in schema.excluded]
