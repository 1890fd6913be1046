"""Choices (option sets): their options, labels in several languages, and the metadata shapes
the Web API serves for them.

Every Picklist, MultiSelectPicklist, State, Status and Boolean attribute has an option set:
local (named `<entity>_<attribute>`, used by that attribute only) or global (named, shared by
attributes of several tables; a change to it shows on all of them). An option carries one
label per language the org has a translation for; the org's base language is English (1033),
and a user whose language has no label for an option sees the base-language label, as in
Dataverse. Option sets are state of a simulator (labels can be changed at run time), so this
module holds the templates a simulator copies and pure functions over the copies.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

BASE_LANGUAGE = 1033  # English: the org's base language
GERMAN = 1031

_LABEL_NAMESPACE = uuid.UUID("5d1f0c3e-2b8a-4f7e-9c61-0a4b7d2e8f35")

# Attribute types whose values are options of a set, and the OptionSetType of that set.
OPTION_SET_TYPE = {
    "Picklist": "Picklist",
    "MultiSelectPicklist": "Picklist",
    "State": "State",
    "Status": "Status",
    "Boolean": "Boolean",
}

# English labels of the local sets, by attribute name. Seeded rows draw their values from
# these keys (sorted), so they must not change: a new key would change every later row.
OPTION_LABELS: dict[str, dict[int, str]] = {
    "statecode": {0: "Active", 1: "Inactive"},
    "statuscode": {1: "Active", 2: "Inactive"},
    "industrycode": {
        1: "Accounting",
        2: "Agriculture and Non-petrol Natural Resource Extraction",
        3: "Broadcasting Printing and Publishing",
        6: "Business Services",
        7: "Consulting",
        9: "Design, Direction and Creative Management",
        11: "Doctor's Offices and Clinics",
        12: "Durable Manufacturing",
        18: "Financial",
        24: "Pharmaceuticals",
        33: "Wholesale",
    },
    "teamtype": {0: "Owner", 1: "Access", 2: "Security Group", 3: "Office Group"},
    # Custom option sets start at the solution publisher's prefix value, as in real orgs.
    "vin_stage": {
        100000000: "Screening",
        100000001: "Eligible",
        100000002: "Enrolled",
        100000003: "Withdrawn",
    },
    "vin_phase": {
        100000000: "Phase I",
        100000001: "Phase II",
        100000002: "Phase III",
        100000003: "Phase IV",
    },
}
DEFAULT_OPTIONS = {1: "Option 1", 2: "Option 2", 3: "Option 3"}

# German translations. Options without one have no 1031 label at all, as in an org where a
# translation was never imported for them (industrycode is translated only in part).
_GERMAN_LABELS: dict[str, dict[int, str]] = {
    "statecode": {0: "Aktiv", 1: "Inaktiv"},
    "statuscode": {1: "Aktiv", 2: "Inaktiv"},
    "industrycode": {
        1: "Buchhaltung",
        7: "Beratung",
        18: "Finanzwesen",
        24: "Pharmazeutika",
        33: "Großhandel",
    },
    "vin_stage": {
        100000000: "Vorauswahl",
        100000001: "Geeignet",
        100000002: "Aufgenommen",
        100000003: "Zurückgezogen",
    },
}

# Global sets: name -> value -> language -> label.
GLOBAL_OPTION_SETS: dict[str, dict[int, dict[int, str]]] = {
    "vin_therapeuticarea": {
        100000000: {BASE_LANGUAGE: "Oncology", GERMAN: "Onkologie"},
        100000001: {BASE_LANGUAGE: "Cardiology", GERMAN: "Kardiologie"},
        100000002: {BASE_LANGUAGE: "Neurology", GERMAN: "Neurologie"},
        100000003: {BASE_LANGUAGE: "Immunology", GERMAN: "Immunologie"},
        100000004: {BASE_LANGUAGE: "Rare Diseases", GERMAN: "Seltene Erkrankungen"},
    },
}

_BOOLEAN_LABELS = {
    1: {BASE_LANGUAGE: "Yes", GERMAN: "Ja"},
    0: {BASE_LANGUAGE: "No", GERMAN: "Nein"},
}
# State -> the status a record gets when it enters that state, and its invariant name.
_STATE_DEFAULTS = {0: (1, "Active"), 1: (2, "Inactive")}
# Status -> the state it belongs to.
_STATUS_STATES = {1: 0, 2: 1}


@dataclass
class SimOption:
    """One option: its value, a label per language, and for State/Status how they pair."""

    value: int
    labels: dict[int, str]
    state: int | None = None  # Status options: the state this status belongs to
    default_status: int | None = None  # State options: the status a record enters with
    invariant_name: str | None = None  # State options


@dataclass
class SimOptionSet:
    """A local or global option set, as a simulator holds it (mutable: labels change)."""

    name: str
    option_set_type: str  # Picklist | State | Status | Boolean
    options: list[SimOption] = field(default_factory=list)
    is_global: bool = False
    is_custom: bool = False

    def option(self, value: int) -> SimOption | None:
        """The option with this value, or None."""
        for option in self.options:
            if option.value == value:
                return option
        return None

    def values(self) -> list[int]:
        """Option values in option order."""
        return [option.value for option in self.options]


def is_custom_name(name: str) -> bool:
    """Names with the solution publisher's prefix belong to the org's own (unmanaged) solution."""
    return name.startswith("vin_")


def local_set_name(entity: str, attribute: str) -> str:
    """Dataverse names a local set after its table and column."""
    return f"{entity}_{attribute}"


def _labelled(values: Mapping[int, str], attribute: str) -> list[SimOption]:
    german = _GERMAN_LABELS.get(attribute, {})
    return [
        SimOption(value, {BASE_LANGUAGE: label, **({GERMAN: german[value]} if value in german
                                                   else {})})
        for value, label in values.items()
    ]


def new_option_set(entity: str, attribute: str, attribute_type: str,
                   global_name: str | None) -> SimOptionSet:
    """A fresh copy of the set an attribute uses (its global set, or its local template)."""
    set_type = OPTION_SET_TYPE[attribute_type]
    if global_name is not None:
        options = [SimOption(value, dict(labels))
                   for value, labels in GLOBAL_OPTION_SETS[global_name].items()]
        return SimOptionSet(global_name, set_type, options, is_global=True,
                            is_custom=is_custom_name(global_name))
    name = local_set_name(entity, attribute)
    custom = is_custom_name(entity) or is_custom_name(attribute)
    if set_type == "Boolean":
        options = [SimOption(value, dict(labels)) for value, labels in _BOOLEAN_LABELS.items()]
    else:
        options = _labelled(OPTION_LABELS.get(attribute, DEFAULT_OPTIONS), attribute)
    if set_type == "State":
        for option in options:
            option.default_status, option.invariant_name = _STATE_DEFAULTS.get(
                option.value, (None, None))
    if set_type == "Status":
        for option in options:
            option.state = _STATUS_STATES.get(option.value)
    return SimOptionSet(name, set_type, options, is_custom=custom)


def option_label(option_set: SimOptionSet, value: int, language: int) -> str | None:
    """The label a user of this language sees: theirs, else the base language's."""
    option = option_set.option(value)
    if option is None:
        return None
    return option.labels.get(language, option.labels.get(BASE_LANGUAGE))


def parse_multi_select(text: str) -> list[int]:
    """The option values of a multi-select column's wire value ("1,3,5")."""
    return [int(part) for part in text.split(",") if part.strip()]


def multi_select_value(values: Iterable[int]) -> str:
    """The wire value of a multi-select column: the values comma-separated, no spaces."""
    return ",".join(str(int(v)) for v in values)


def formatted_choice(option_set: SimOptionSet, attribute_type: str, value: Any,
                     language: int) -> str:
    """The FormattedValue of a choice: its label; a multi-select's labels joined by "; " in
    option order. A value no option has (removed since) shows as the number."""
    if attribute_type == "MultiSelectPicklist":
        chosen = set(parse_multi_select(str(value)))
        order = [v for v in option_set.values() if v in chosen]
        order += sorted(chosen - set(order))
        return "; ".join(option_label(option_set, v, language) or str(v) for v in order)
    if attribute_type == "Boolean":
        value = 1 if value else 0
    label = option_label(option_set, value, language)
    return label if label is not None else str(value)


# ---------------------------------------------------------------------------------------------
# Metadata shapes (OptionSetMetadata, BooleanOptionSetMetadata, Label)
# ---------------------------------------------------------------------------------------------


def _metadata_id(*parts: object) -> str:
    return str(uuid.uuid5(_LABEL_NAMESPACE, ":".join(str(p) for p in parts)))


def _localized(text: str, language: int, managed: bool, *key: object) -> dict[str, Any]:
    return {
        "Label": text,
        "LanguageCode": language,
        "IsManaged": managed,
        "MetadataId": _metadata_id(*key, language),
        "HasChanged": None,
    }


def label_metadata(labels: Mapping[int, str], user_language: int, managed: bool,
                   *key: object) -> dict[str, Any]:
    """A Label: every LocalizedLabel, and the user's (else the base language's) one."""
    localized = [_localized(text, language, managed, *key) for language, text in labels.items()]
    user = next((item for item in localized if item["LanguageCode"] == user_language), None)
    if user is None:
        user = next((item for item in localized if item["LanguageCode"] == BASE_LANGUAGE), None)
    return {"LocalizedLabels": localized, "UserLocalizedLabel": user}


_EMPTY_LABEL: dict[str, Any] = {"LocalizedLabels": [], "UserLocalizedLabel": None}


def _option_metadata(option_set: SimOptionSet, option: SimOption,
                     user_language: int) -> dict[str, Any]:
    managed = not option_set.is_custom
    out: dict[str, Any] = {}
    # Options of State and Status sets are derived types inside a collection of
    # OptionMetadata, so OData names their type.
    if option_set.option_set_type in ("State", "Status"):
        out["@odata.type"] = f"#Microsoft.Dynamics.CRM.{option_set.option_set_type}OptionMetadata"
    out.update({
        "Value": option.value,
        "Label": label_metadata(option.labels, user_language, managed,
                                option_set.name, option.value),
        "Description": dict(_EMPTY_LABEL),
        "Color": None,
        "IsManaged": managed,
        "MetadataId": None,
        "HasChanged": None,
    })
    if option_set.option_set_type == "State":
        out["DefaultStatus"] = option.default_status
        out["InvariantName"] = option.invariant_name
    elif option_set.option_set_type == "Status":
        out["State"] = option.state
        out["TransitionData"] = None
    return out


def _display_name(name: str) -> str:
    words = name.split("_", 1)[-1] if is_custom_name(name) else name.split("_")[-1]
    return words.replace("_", " ").title()


def option_set_metadata(option_set: SimOptionSet, user_language: int) -> dict[str, Any]:
    """OptionSetMetadata (BooleanOptionSetMetadata for a Boolean set) as the Web API sends it."""
    managed = not option_set.is_custom
    out: dict[str, Any] = {}
    if option_set.option_set_type == "Boolean":
        by_value = {option.value: option for option in option_set.options}
        out["TrueOption"] = _option_metadata(option_set, by_value[1], user_language)
        out["FalseOption"] = _option_metadata(option_set, by_value[0], user_language)
    else:
        out["Options"] = [_option_metadata(option_set, option, user_language)
                          for option in option_set.options]
    out.update({
        "MetadataId": _metadata_id("optionset", option_set.name),
        "HasChanged": None,
        "IsCustomOptionSet": option_set.is_custom,
        "IsGlobal": option_set.is_global,
        "IsManaged": managed,
        "Name": option_set.name,
        "ExternalTypeName": None,
        "OptionSetType": option_set.option_set_type,
        "IntroducedVersion": "1.0.0.0" if option_set.is_custom else "5.0.0.0",
        "ParentOptionSetName": None,
        "Description": dict(_EMPTY_LABEL),
        "DisplayName": label_metadata({BASE_LANGUAGE: _display_name(option_set.name)},
                                      user_language, managed, option_set.name, "display"),
        "IsCustomizable": {"Value": True, "CanBeChanged": option_set.is_custom,
                           "ManagedPropertyLogicalName": "iscustomizable"},
    })
    return out


_OPTION_SET_BASE_PROPERTIES = (
    "MetadataId", "HasChanged", "IsCustomOptionSet", "IsGlobal", "IsManaged", "Name",
    "ExternalTypeName", "OptionSetType", "IntroducedVersion", "ParentOptionSetName",
    "Description", "DisplayName", "IsCustomizable",
)


def option_set_properties(boolean: bool) -> tuple[str, ...]:
    """What `$select` may name inside `$expand=OptionSet(...)`: BooleanOptionSetMetadata has
    TrueOption and FalseOption where OptionSetMetadata has Options."""
    own = ("TrueOption", "FalseOption") if boolean else ("Options",)
    return own + _OPTION_SET_BASE_PROPERTIES
