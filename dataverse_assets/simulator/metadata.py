"""EntityDefinitions and `$metadata` (CSDL) documents derived from the table specs.

Metadata is generated from the same specs the rows are generated from, so a client that
discovers its schema from metadata sees exactly the columns the data carries (plus the Virtual
attributes, which real orgs list but never return in rows).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from xml.sax.saxutils import quoteattr

from .choices import BASE_LANGUAGE, label_metadata
from .model import SimAttribute, SimEntity
from .odata import EDM_BY_TYPE, ODataQueryError, property_not_found

_METADATA_NAMESPACE = uuid.UUID("0b7a36f4-3a52-4d4e-8a57-6c1d6f6e2f10")

ENTITY_PROPERTIES = (
    "MetadataId",
    "LogicalName",
    "SchemaName",
    "EntitySetName",
    "PrimaryIdAttribute",
    "PrimaryNameAttribute",
    "ChangeTrackingEnabled",
    "IsIntersect",
    "IsCustomEntity",
)
# Types for filtering EntityDefinitions with the ordinary $filter engine.
ENTITY_PROPERTY_TYPES = {
    "MetadataId": "Uniqueidentifier",
    "LogicalName": "String",
    "SchemaName": "String",
    "EntitySetName": "String",
    "PrimaryIdAttribute": "String",
    "PrimaryNameAttribute": "String",
    "ChangeTrackingEnabled": "Boolean",
    "IsIntersect": "Boolean",
    "IsCustomEntity": "Boolean",
}
ATTRIBUTE_PROPERTIES = (
    "MetadataId",
    "LogicalName",
    "SchemaName",
    "AttributeType",
    "AttributeTypeName",
    "AttributeOf",
    "EntityLogicalName",
    "IsPrimaryId",
    "IsPrimaryName",
    "IsValidForRead",
    "IsCustomAttribute",
    "DisplayName",
    "Description",
)
ATTRIBUTE_PROPERTY_TYPES = {
    "MetadataId": "Uniqueidentifier",
    "LogicalName": "String",
    "SchemaName": "String",
    "AttributeType": "String",
    "AttributeOf": "String",
    "EntityLogicalName": "String",
    "IsPrimaryId": "Boolean",
    "IsPrimaryName": "Boolean",
    "IsValidForRead": "Boolean",
    "IsCustomAttribute": "Boolean",
}

# Attribute kind -> its metadata class (the @odata.type of its AttributeMetadata).
# Customer and Owner columns are LookupAttributeMetadata with their own AttributeType.
_METADATA_CLASS = {
    "Virtual": "AttributeMetadata",
    "Uniqueidentifier": "UniqueIdentifierAttributeMetadata",
    "Customer": "LookupAttributeMetadata",
    "Owner": "LookupAttributeMetadata",
}
# Abstract classes a type cast may name, and the classes derived from them.
_ABSTRACT_CLASSES = {
    "AttributeMetadata": None,  # every attribute
    "EnumAttributeMetadata": frozenset({
        "PicklistAttributeMetadata", "MultiSelectPicklistAttributeMetadata",
        "StateAttributeMetadata", "StatusAttributeMetadata", "EntityNameAttributeMetadata",
    }),
}
# Every AttributeMetadata class the Web API knows (a cast to another name is not a type).
ATTRIBUTE_CLASSES = frozenset({
    "BigIntAttributeMetadata", "BooleanAttributeMetadata", "DateTimeAttributeMetadata",
    "DecimalAttributeMetadata", "DoubleAttributeMetadata", "EntityNameAttributeMetadata",
    "FileAttributeMetadata", "ImageAttributeMetadata", "IntegerAttributeMetadata",
    "LookupAttributeMetadata", "ManagedPropertyAttributeMetadata", "MemoAttributeMetadata",
    "MoneyAttributeMetadata", "MultiSelectPicklistAttributeMetadata",
    "PicklistAttributeMetadata", "StateAttributeMetadata", "StatusAttributeMetadata",
    "StringAttributeMetadata", "UniqueIdentifierAttributeMetadata", *_ABSTRACT_CLASSES,
})
# Other metadata types: a cast of Attributes to one of these is a type that exists but is
# unrelated (400), where an unknown name is no segment at all (404).
UNRELATED_METADATA_CLASSES = frozenset({
    "EntityMetadata", "OptionSetMetadata", "BooleanOptionSetMetadata",
    "OneToManyRelationshipMetadata", "ManyToManyRelationshipMetadata", "EntityKeyMetadata",
})
# Properties a metadata class adds to AttributeMetadata's, with their types for $filter
# (None: not filterable), and its navigation properties (expandable, not selectable).
_CLASS_PROPERTIES: dict[str, dict[str, str | None]] = {
    "LookupAttributeMetadata": {"Targets": None},
    "DateTimeAttributeMetadata": {"Format": "String", "DateTimeBehavior": None},
    "MoneyAttributeMetadata": {"IsBaseCurrency": "Boolean"},
    "ImageAttributeMetadata": {"IsPrimaryImage": "Boolean", "MaxHeight": "Integer",
                               "MaxWidth": "Integer"},
    "FileAttributeMetadata": {"MaxSizeInKB": "Integer"},
}
_CHOICE_NAVIGATION = ("OptionSet", "GlobalOptionSet")
_CLASS_NAVIGATION: dict[str, tuple[str, ...]] = {
    "PicklistAttributeMetadata": _CHOICE_NAVIGATION,
    "MultiSelectPicklistAttributeMetadata": _CHOICE_NAVIGATION,
    "StateAttributeMetadata": _CHOICE_NAVIGATION,
    "StatusAttributeMetadata": _CHOICE_NAVIGATION,
    "BooleanAttributeMetadata": _CHOICE_NAVIGATION,
    "EnumAttributeMetadata": _CHOICE_NAVIGATION,
}


def metadata_id(*parts: str) -> str:
    """A stable MetadataId for an entity or attribute."""
    return str(uuid.uuid5(_METADATA_NAMESPACE, ":".join(parts)))


def _schema_name(logical_name: str) -> str:
    # Custom names keep the publisher prefix in lower case: vin_candidate -> vin_Candidate.
    if logical_name.startswith("vin_"):
        rest = logical_name[4:]
        return f"vin_{rest[:1].upper()}{rest[1:]}"
    return logical_name[:1].upper() + logical_name[1:]


def _is_custom(name: str) -> bool:
    return name.startswith("vin_")


def metadata_class(attribute: SimAttribute) -> str:
    """The AttributeMetadata class of an attribute, e.g. PicklistAttributeMetadata."""
    kind = attribute.attribute_type
    return _METADATA_CLASS.get(kind, f"{kind}AttributeMetadata")


def class_includes(cast: str, attribute: SimAttribute) -> bool:
    """Whether an attribute is of the cast's class or a class derived from it."""
    own = metadata_class(attribute)
    if cast in _ABSTRACT_CLASSES:
        derived = _ABSTRACT_CLASSES[cast]
        return derived is None or own in derived
    return own == cast


def class_properties(cast: str) -> tuple[list[str], dict[str, str], tuple[str, ...]]:
    """(selectable properties, filterable property types, navigation properties) of a class."""
    own = _CLASS_PROPERTIES.get(cast, {})
    selectable = [*ATTRIBUTE_PROPERTIES, *own]
    filterable = {**ATTRIBUTE_PROPERTY_TYPES,
                  **{name: kind for name, kind in own.items() if kind is not None}}
    return selectable, filterable, _CLASS_NAVIGATION.get(cast, ())


# What a maker wrote about some columns (Description); most columns have none, as in orgs.
_DESCRIPTIONS = {
    "statecode": "Status of the record: active or inactive.",
    "statuscode": "Reason for the status of the record.",
    "industrycode": "The account's primary industry, for market segmentation and reports.",
    "vin_stage": "Where the candidate is in the screening process.",
    "vin_phase": "The trial's clinical phase.",
    "teamtype": "The kind of team: owner, access, security group or Office group.",
    "vin_therapeuticareas": "The therapeutic areas the candidate may be enrolled in.",
    "birthdate": "The contact's birthday, a calendar date.",
    "parentcustomerid": "The account or contact the contact belongs to.",
}


def _display_name(logical_name: str) -> str:
    words = logical_name[4:] if _is_custom(logical_name) else logical_name
    return words.replace("_", " ").title()


def attribute_labels(attribute: SimAttribute) -> dict[str, Any]:
    """DisplayName and Description, Label objects in English (the org's base language)."""
    managed = not _is_custom(attribute.logical_name)
    description = _DESCRIPTIONS.get(attribute.logical_name)
    return {
        "DisplayName": label_metadata({BASE_LANGUAGE: _display_name(attribute.logical_name)},
                                      BASE_LANGUAGE, managed, attribute.logical_name, "name"),
        "Description": (label_metadata({BASE_LANGUAGE: description}, BASE_LANGUAGE, managed,
                                       attribute.logical_name, "description")
                        if description else {"LocalizedLabels": [], "UserLocalizedLabel": None}),
    }


def attribute_definition(spec: SimEntity, attribute: SimAttribute) -> dict[str, Any]:
    """The full AttributeMetadata object for one attribute (navigation properties aside)."""
    out: dict[str, Any] = {
        "@odata.type": f"#Microsoft.Dynamics.CRM.{metadata_class(attribute)}",
        "MetadataId": metadata_id(spec.logical_name, attribute.logical_name),
        "LogicalName": attribute.logical_name,
        "SchemaName": _schema_name(attribute.logical_name),
        "AttributeType": attribute.metadata_type,
        "AttributeTypeName": {"Value": attribute.type_name},
        "AttributeOf": attribute.attribute_of,
        "EntityLogicalName": spec.logical_name,
        "IsPrimaryId": attribute.logical_name == spec.primary_id_attribute,
        "IsPrimaryName": attribute.logical_name == spec.primary_name_attribute,
        "IsValidForRead": True,
        "IsCustomAttribute": _is_custom(attribute.logical_name),
        **attribute_labels(attribute),
    }
    if attribute.is_lookup:
        out["Targets"] = list(attribute.targets)
    behavior = attribute.behavior
    if behavior is not None:
        out["Format"] = "DateOnly" if behavior == "DateOnly" else "DateAndTime"
        out["DateTimeBehavior"] = {"Value": behavior}
    if attribute.attribute_type == "Money":
        out["IsBaseCurrency"] = attribute.is_base_currency
    if attribute.attribute_type == "Image":
        out.update({"IsPrimaryImage": True, "MaxHeight": 144, "MaxWidth": 144})
    if attribute.attribute_type == "File":
        out["MaxSizeInKB"] = 32768
    return out


def entity_definition(spec: SimEntity) -> dict[str, Any]:
    """The full EntityMetadata object (without Attributes) for one table."""
    return {
        "MetadataId": metadata_id(spec.logical_name),
        "LogicalName": spec.logical_name,
        "SchemaName": _schema_name(spec.logical_name),
        "EntitySetName": spec.entity_set_name,
        "PrimaryIdAttribute": spec.primary_id_attribute,
        "PrimaryNameAttribute": spec.primary_name_attribute,
        "ChangeTrackingEnabled": spec.change_tracking_enabled,
        "IsIntersect": spec.is_intersect,
        "IsCustomEntity": _is_custom(spec.logical_name),
    }


def parse_property_select(text: str, allowed: Sequence[str], type_name: str) -> list[str]:
    """`$select` over metadata properties."""
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if name not in allowed:
            raise property_not_found(name, type_name)
        if name not in names:
            names.append(name)
    return names


def project(item: dict[str, Any], select: Sequence[str] | None) -> dict[str, Any]:
    """Keep selected properties; MetadataId and @odata.type always come back, as in Dataverse."""
    if select is None:
        return dict(item)
    return {
        key: value
        for key, value in item.items()
        if key in select or key in ("MetadataId", "@odata.type")
    }


_EXPAND_RE = re.compile(r"^\s*Attributes\s*(?:\((.*)\))?\s*$", re.DOTALL)


def parse_attribute_expand(text: str) -> list[str] | None:
    """`$expand=Attributes($select=...)`: returns the attribute select list (None = all)."""
    match = _EXPAND_RE.match(text)
    if not match:
        raise ODataQueryError(
            f"Could not find a property named '{text.split('(')[0].strip()}' on type "
            f"'Microsoft.Dynamics.CRM.EntityMetadata'."
        )
    inner = (match.group(1) or "").strip()
    if not inner:
        return None
    select: list[str] | None = None
    for option in inner.split(";"):
        key, _, value = option.partition("=")
        if key.strip() != "$select":
            raise ODataQueryError(
                f"The simulator supports only $select inside $expand, not '{key.strip()}'."
            )
        select = parse_property_select(value, ATTRIBUTE_PROPERTIES, "AttributeMetadata")
    return select


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses: `A($select=x,y),B` -> ["A($select=x,y)", "B"]."""
    items, depth, current = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items]


_NAVIGATION_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)\s*(?:\((.*)\))?$", re.DOTALL)


def parse_navigation_expand(
    text: str,
    navigation: Sequence[str],
    type_name: str,
    target_properties: Callable[[str], tuple[str, Sequence[str]]],
) -> dict[str, list[str] | None]:
    """`$expand=OptionSet,GlobalOptionSet($select=Options)` on an attribute class: expanded
    navigation property -> its `$select` (None = everything). `target_properties(name)` gives
    the expanded type's name and the properties its `$select` may name."""
    expanded: dict[str, list[str] | None] = {}
    for item in _split_top_level(text):
        match = _NAVIGATION_RE.match(item)
        name = match.group(1) if match else item.split("(")[0].strip()
        if match is None or name not in navigation:
            raise property_not_found(name, type_name)
        select: list[str] | None = None
        for option in filter(None, (o.strip() for o in (match.group(2) or "").split(";"))):
            key, _, value = option.partition("=")
            if key.strip() != "$select":
                raise ODataQueryError(
                    f"The simulator supports only $select inside $expand, not '{key.strip()}'."
                )
            target_type, allowed = target_properties(name)
            select = parse_property_select(value, allowed, target_type)
        expanded[name] = select
    return expanded


# The organization entity set: one row, how a client finds the org's base language.
ORGANIZATION_COLUMNS = {
    "organizationid": "Uniqueidentifier",
    "name": "String",
    "languagecode": "Integer",
    "_basecurrencyid_value": "Lookup",
}


def csdl(specs: Sequence[SimEntity]) -> str:
    """A minimal CSDL document: one EntityType (key + properties) and EntitySet per table."""
    lines = [
        '<?xml version="1.0" encoding="utf-8"?>',
        '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">',
        "<edmx:DataServices>",
        '<Schema Namespace="Microsoft.Dynamics.CRM" Alias="mscrm" '
        'xmlns="http://docs.oasis-open.org/odata/ns/edm">',
    ]
    for spec in specs:
        lines.append(f"<EntityType Name={quoteattr(spec.logical_name)}>")
        lines.append(f"<Key><PropertyRef Name={quoteattr(spec.primary_id_attribute)} /></Key>")
        for attribute in spec.attributes:
            if attribute.is_virtual:
                continue
            edm = EDM_BY_TYPE.get(attribute.value_type, "Edm.String")
            lines.append(f"<Property Name={quoteattr(attribute.column)} Type={quoteattr(edm)} />")
        lines.append("</EntityType>")
    lines.append('<EntityType Name="organization">')
    lines.append('<Key><PropertyRef Name="organizationid" /></Key>')
    for column, kind in ORGANIZATION_COLUMNS.items():
        lines.append(f"<Property Name={quoteattr(column)} Type={quoteattr(EDM_BY_TYPE[kind])} />")
    lines.append("</EntityType>")
    lines.append('<EntityContainer Name="System">')
    for spec in specs:
        lines.append(
            f"<EntitySet Name={quoteattr(spec.entity_set_name)} "
            f"EntityType={quoteattr('Microsoft.Dynamics.CRM.' + spec.logical_name)} />"
        )
    lines.append('<EntitySet Name="organizations" '
                 'EntityType="Microsoft.Dynamics.CRM.organization" />')
    lines += ["</EntityContainer>", "</Schema>", "</edmx:DataServices>", "</edmx:Edmx>"]
    return "\n".join(lines)
