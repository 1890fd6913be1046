"""EntityDefinitions and `$metadata` (CSDL) documents derived from the table specs.

Metadata is generated from the same specs the rows are generated from, so a client that
discovers its schema from metadata sees exactly the columns the data carries (plus the Virtual
attributes, which real orgs list but never return in rows).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Any
from xml.sax.saxutils import quoteattr

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

_METADATA_CLASS = {
    "Uniqueidentifier": "UniqueIdentifier",
    "Customer": "Lookup",
    "Owner": "Lookup",
    "State": "State",
    "Status": "Status",
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


def attribute_definition(spec: SimEntity, attribute: SimAttribute) -> dict[str, Any]:
    """The full AttributeMetadata object for one attribute."""
    kind = attribute.attribute_type
    metadata_class = "AttributeMetadata" if kind == "Virtual" else (
        f"{_METADATA_CLASS.get(kind, kind)}AttributeMetadata"
    )
    out: dict[str, Any] = {
        "@odata.type": f"#Microsoft.Dynamics.CRM.{metadata_class}",
        "MetadataId": metadata_id(spec.logical_name, attribute.logical_name),
        "LogicalName": attribute.logical_name,
        "SchemaName": _schema_name(attribute.logical_name),
        "AttributeType": kind,
        "AttributeTypeName": {"Value": f"{kind}Type"},
        "AttributeOf": attribute.attribute_of,
        "EntityLogicalName": spec.logical_name,
        "IsPrimaryId": attribute.logical_name == spec.primary_id_attribute,
        "IsPrimaryName": attribute.logical_name == spec.primary_name_attribute,
        "IsValidForRead": True,
        "IsCustomAttribute": _is_custom(attribute.logical_name),
    }
    if attribute.is_lookup:
        out["Targets"] = list(attribute.targets)
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
            edm = EDM_BY_TYPE.get(attribute.attribute_type, "Edm.String")
            lines.append(f"<Property Name={quoteattr(attribute.column)} Type={quoteattr(edm)} />")
        lines.append("</EntityType>")
    lines.append('<EntityContainer Name="System">')
    for spec in specs:
        lines.append(
            f"<EntitySet Name={quoteattr(spec.entity_set_name)} "
            f"EntityType={quoteattr('Microsoft.Dynamics.CRM.' + spec.logical_name)} />"
        )
    lines += ["</EntityContainer>", "</Schema>", "</edmx:DataServices>", "</edmx:Edmx>"]
    return "\n".join(lines)
