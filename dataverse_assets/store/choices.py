"""What the source's attribute metadata says about an entity's columns, beyond name and type:
the labels of its choices (`_choice_labels`), the tables its lookups point at
(`_lookup_targets`), and which date columns are calendar dates.

The metadata arrives with each change set (source: `attribute_metadata`; archived verbatim as
`attribute_metadata.json`) and is stored when the change set is staged, so a rebuild from the
archive gives the same labels. Parsing is pure (`parse_attribute_metadata`); storing compares
a digest first, so a sync whose metadata did not change writes nothing, and otherwise says
which options were added, relabelled or removed (drift: sync.drift).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from dataverse_assets.store.backend import dialect_of
from dataverse_assets.store.db import table_columns, utc_now_iso

# The attribute metadata types a choice column can have, and the AttributeTypeName values
# (AttributeType alone says "Virtual" for a multi-select choice).
CHOICE_KINDS = ("Picklist", "MultiSelectPicklist", "State", "Status", "Boolean")
LOOKUP_KINDS = ("Lookup", "Customer", "Owner")
MULTI_SELECT = "MultiSelectPicklist"
DATE_ONLY = "DateOnly"

CHOICE_DDL = (
    """CREATE TABLE IF NOT EXISTS _choice_labels (
        entity TEXT NOT NULL,
        attribute TEXT NOT NULL,
        option_value INTEGER NOT NULL,
        label TEXT,
        language_code INTEGER NOT NULL,
        is_global INTEGER NOT NULL,
        option_set_name TEXT,
        state_value INTEGER,
        option_order INTEGER NOT NULL,
        kind TEXT NOT NULL,
        PRIMARY KEY (entity, attribute, option_value, language_code)
    )""",
    """CREATE TABLE IF NOT EXISTS _lookup_targets (
        entity TEXT NOT NULL,
        attribute TEXT NOT NULL,
        target_entity TEXT,
        target_logical_name TEXT NOT NULL,
        PRIMARY KEY (entity, attribute, target_logical_name)
    )""",
    """CREATE TABLE IF NOT EXISTS _attribute_metadata (
        entity TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        change_set TEXT NOT NULL,
        base_language_code INTEGER,
        view_language_code INTEGER,
        choice_columns TEXT NOT NULL,
        lookup_columns TEXT NOT NULL,
        date_only_columns TEXT NOT NULL,
        column_descriptions TEXT,
        updated_at TEXT NOT NULL
    )""",
)


@dataclass(frozen=True)
class ChoiceOption:
    attribute: str
    value: int
    labels: tuple[tuple[int, str], ...]  # (language code, label), in the source's order
    is_global: bool
    option_set_name: str | None
    state_value: int | None  # a status option's state
    order: int  # position in its option set
    kind: str


@dataclass(frozen=True)
class OptionChange:
    """An option added, relabelled or removed since the entity's last stored metadata."""

    kind: str  # "option_added" | "option_relabelled" | "option_removed"
    attribute: str
    value: int
    before: str | None
    after: str | None


@dataclass
class AttributeMetadata:
    """One entity's parsed attribute metadata."""

    base_language_code: int | None = None
    options: list[ChoiceOption] = field(default_factory=list)
    # attribute -> its choice kind (Picklist, MultiSelectPicklist, State, Status, Boolean)
    choice_columns: dict[str, str] = field(default_factory=dict)
    # lookup attribute (logical name) -> its targets' logical names
    lookups: dict[str, list[str]] = field(default_factory=dict)
    date_only: list[str] = field(default_factory=list)
    # target logical name -> entity set name
    entity_sets: dict[str, str] = field(default_factory=dict)
    skipped: int = 0  # items of a malformed shape, left out

    @property
    def multi_select_columns(self) -> list[str]:
        return [a for a, kind in self.choice_columns.items() if kind == MULTI_SELECT]


def _items(payload: object) -> list[dict]:
    value = payload.get("value") if isinstance(payload, dict) else None
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _labels(label: object) -> tuple[tuple[int, str], ...]:
    localized = label.get("LocalizedLabels") if isinstance(label, dict) else None
    if not isinstance(localized, list):
        return ()
    return tuple((item["LanguageCode"], item["Label"]) for item in localized
                 if isinstance(item, dict) and isinstance(item.get("LanguageCode"), int)
                 and isinstance(item.get("Label"), str))


def _option_set(item: dict) -> tuple[dict | None, bool]:
    """The attribute's option set and whether it is global (a global set may come as
    GlobalOptionSet only, or as both)."""
    local, shared = item.get("OptionSet"), item.get("GlobalOptionSet")
    chosen = local if isinstance(local, dict) else shared if isinstance(shared, dict) else None
    if chosen is None:
        return None, False
    return chosen, bool(chosen.get("IsGlobal")) or isinstance(shared, dict)


def parse_attribute_metadata(raw: object) -> AttributeMetadata:
    """`attribute_metadata.json` (the verbatim responses, by kind) parsed; items of a shape
    the parser does not know are skipped and counted, never guessed at."""
    parsed = AttributeMetadata()
    if not isinstance(raw, dict):
        return parsed
    organizations = _items(raw.get("organization"))
    if organizations and isinstance(organizations[0].get("languagecode"), int):
        parsed.base_language_code = organizations[0]["languagecode"]
    for kind in CHOICE_KINDS:
        for item in _items(raw.get(kind)):
            name = item.get("LogicalName")
            option_set, is_global = _option_set(item)
            if not isinstance(name, str) or option_set is None:
                parsed.skipped += 1
                continue
            parsed.choice_columns[name] = kind
            set_name = option_set.get("Name") if isinstance(option_set.get("Name"), str) else None
            if kind == "Boolean":
                options = [option_set.get("FalseOption"), option_set.get("TrueOption")]
            else:
                options = option_set.get("Options")
                options = options if isinstance(options, list) else []
            for order, option in enumerate(options):
                if not isinstance(option, dict) or not isinstance(option.get("Value"), int) \
                        or isinstance(option.get("Value"), bool):
                    parsed.skipped += 1
                    continue
                state = option.get("State") if kind == "Status" else None
                parsed.options.append(ChoiceOption(
                    name, option["Value"], _labels(option.get("Label")), is_global, set_name,
                    state if isinstance(state, int) else None, order, kind))
    for item in _items(raw.get("Lookup")):
        name, targets = item.get("LogicalName"), item.get("Targets")
        if not isinstance(name, str) or not isinstance(targets, list):
            parsed.skipped += 1
            continue
        parsed.lookups[name] = [t for t in targets if isinstance(t, str)]
    for item in _items(raw.get("DateTime")):
        behavior = item.get("DateTimeBehavior")
        behavior = behavior.get("Value") if isinstance(behavior, dict) else None
        if isinstance(item.get("LogicalName"), str) and (
                behavior == DATE_ONLY or (behavior is None and item.get("Format") == DATE_ONLY)):
            parsed.date_only.append(item["LogicalName"])
    for item in _items(raw.get("EntitySets")):
        if isinstance(item.get("LogicalName"), str) and isinstance(item.get("EntitySetName"),
                                                                    str):
            parsed.entity_sets[item["LogicalName"]] = item["EntitySetName"]
    return parsed


def digest(raw: object) -> str:
    """The metadata's fingerprint: unchanged metadata is not written again."""
    return hashlib.blake2b(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS),
                           digest_size=16).hexdigest()


def ensure_choice_tables(connection: sqlite3.Connection) -> None:
    for statement in CHOICE_DDL:
        connection.execute(statement)
    columns = set(table_columns(connection, "_attribute_metadata"))
    if "column_descriptions" not in columns:  # a table made before descriptions were kept
        connection.execute("ALTER TABLE _attribute_metadata ADD COLUMN column_descriptions TEXT")


def column_descriptions(definition: object) -> dict[str, str]:
    """Row key -> what the org says of the column: its display name and, where a maker wrote
    one, its description (the user's language's labels of EntityDefinitions/Attributes)."""
    attributes = definition.get("Attributes") if isinstance(definition, dict) else None
    found: dict[str, str] = {}
    for attribute in attributes if isinstance(attributes, list) else ():
        if not isinstance(attribute, dict) or not isinstance(attribute.get("LogicalName"), str):
            continue
        name, kind = attribute["LogicalName"], attribute.get("AttributeType")
        text = [_label_text(attribute.get("DisplayName")),
                _label_text(attribute.get("Description"))]
        if any(text):
            column = f"_{name}_value" if kind in ("Lookup", "Customer", "Owner") else name
            found[column] = ": ".join(t for t in text if t)
    return found


def _label_text(label: object) -> str | None:
    user = label.get("UserLocalizedLabel") if isinstance(label, dict) else None
    text = user.get("Label") if isinstance(user, dict) else None
    return text.strip() if isinstance(text, str) and text.strip() else None


def stored_metadata(connection: sqlite3.Connection, entity: str) -> dict | None:
    """What the entity's stored metadata says (None before its first metadata)."""
    ensure_choice_tables(connection)
    row = connection.execute(
        "SELECT digest, change_set, base_language_code, choice_columns, lookup_columns,"
        " date_only_columns, view_language_code, column_descriptions FROM _attribute_metadata"
        " WHERE entity = ?", (entity,)).fetchone()
    if row is None:
        return None
    return {"digest": row[0], "change_set": row[1], "base_language_code": row[2],
            "choice_columns": orjson.loads(row[3]), "lookup_columns": orjson.loads(row[4]),
            "date_only_columns": orjson.loads(row[5]), "view_language_code": row[6],
            "column_descriptions": orjson.loads(row[7] or "{}")}


def set_view_language(connection: sqlite3.Connection, entity: str,
                      language_code: int | None) -> bool:
    """The language `E__readable` shows labels in (None: the org's base language); returns
    whether it changed."""
    changed = connection.execute(
        "UPDATE _attribute_metadata SET view_language_code = ? WHERE entity = ?"
        f" AND view_language_code {dialect_of(connection).is_distinct} ?",
        (language_code, entity, language_code))
    return changed.rowcount > 0


def _label_in(labels: Iterable[tuple[int, str]], language: int | None) -> str | None:
    labels = list(labels)
    for code, text in labels:
        if code == language:
            return text
    return labels[0][1] if labels else None


def option_changes(connection: sqlite3.Connection, entity: str,
                   parsed: AttributeMetadata) -> list[OptionChange]:
    """Options added, relabelled (in the base language) or removed against what is stored,
    for attributes present on both sides (a column appearing or going is column drift)."""
    language = parsed.base_language_code
    before: dict[tuple[str, int], str | None] = {}
    for attribute, value, label, code in connection.execute(
            "SELECT attribute, option_value, label, language_code FROM _choice_labels"
            " WHERE entity = ? ORDER BY attribute, option_value, language_code", (entity,)):
        if (attribute, value) not in before or code == language:
            before[(attribute, value)] = label
    if not before:
        return []
    attributes_before = {attribute for attribute, _ in before}
    after = {(o.attribute, o.value): _label_in(o.labels, language) for o in parsed.options
             if o.attribute in attributes_before}
    attributes = attributes_before & {o.attribute for o in parsed.options}
    changes = []
    for key in sorted(set(before) | set(after)):
        if key[0] not in attributes:
            continue
        if key not in before:
            changes.append(OptionChange("option_added", key[0], key[1], None, after[key]))
        elif key not in after:
            changes.append(OptionChange("option_removed", key[0], key[1], before[key], None))
        elif before[key] != after[key]:
            changes.append(OptionChange("option_relabelled", key[0], key[1], before[key],
                                        after[key]))
    return changes


def store_attribute_metadata(connection: sqlite3.Connection, entity: str, change_set: str,
                             raw: object, parsed: AttributeMetadata,
                             lookup_columns: dict[str, str],
                             descriptions: dict[str, str] | None = None) -> bool:
    """Replace the entity's labels and lookup targets when the metadata changed (inside the
    caller's transaction). `lookup_columns`: lookup attribute -> its row key (`_x_value`);
    `descriptions`: row key -> what the org says of the column (see column_descriptions).
    Returns whether anything was written."""
    ensure_choice_tables(connection)
    fingerprint = digest([raw, descriptions or {}])
    row = connection.execute("SELECT digest FROM _attribute_metadata WHERE entity = ?",
                             (entity,)).fetchone()
    if row is not None and row[0] == fingerprint:
        return False
    connection.execute("DELETE FROM _choice_labels WHERE entity = ?", (entity,))
    connection.executemany(
        dialect_of(connection).upsert(
            "_choice_labels", ("entity", "attribute", "option_value", "label", "language_code",
                               "is_global", "option_set_name", "state_value", "option_order",
                               "kind"),
            ("entity", "attribute", "option_value", "language_code")),
        [(entity, o.attribute, o.value, text, code, int(o.is_global), o.option_set_name,
          o.state_value, o.order, o.kind)
         for o in parsed.options for code, text in o.labels])
    connection.execute("DELETE FROM _lookup_targets WHERE entity = ?", (entity,))
    connection.executemany(
        dialect_of(connection).insert_ignore(
            "_lookup_targets", ("entity", "attribute", "target_entity", "target_logical_name")),
        [(entity, attribute, parsed.entity_sets.get(target), target)
         for attribute, targets in parsed.lookups.items() for target in targets])
    connection.execute(
        "INSERT INTO _attribute_metadata (entity, digest, change_set, base_language_code,"
        " choice_columns, lookup_columns, date_only_columns, column_descriptions, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (entity) DO UPDATE SET"
        " digest = excluded.digest, change_set = excluded.change_set,"
        " base_language_code = excluded.base_language_code,"
        " choice_columns = excluded.choice_columns, lookup_columns = excluded.lookup_columns,"
        " date_only_columns = excluded.date_only_columns,"
        " column_descriptions = excluded.column_descriptions, updated_at = excluded.updated_at",
        (entity, fingerprint, change_set, parsed.base_language_code,
         orjson.dumps(parsed.choice_columns).decode(), orjson.dumps(lookup_columns).decode(),
         orjson.dumps(parsed.date_only).decode(), orjson.dumps(descriptions or {}).decode(),
         utc_now_iso()))
    return True


def label_counts(connection: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """Entity -> (choice columns, labels stored), for doctor and status."""
    ensure_choice_tables(connection)
    return {entity: (columns, labels) for entity, columns, labels in connection.execute(
        "SELECT entity, count(DISTINCT attribute), count(*) FROM _choice_labels"
        " GROUP BY entity ORDER BY entity")}

