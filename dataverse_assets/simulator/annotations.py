"""`Prefer: odata.include-annotations` support: formatted values and lookup annotations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .model import OPTION_LABELS, EntityTable

if TYPE_CHECKING:
    from .model import DataverseSimulator

FORMATTED = "OData.Community.Display.V1.FormattedValue"
LOOKUP_LOGICAL_NAME = "Microsoft.Dynamics.CRM.lookuplogicalname"
NAVIGATION_PROPERTY = "Microsoft.Dynamics.CRM.associatednavigationproperty"


def annotation_allowed(patterns: Sequence[str], name: str) -> bool:
    """Whether an include-annotations value (`*`, names, `Namespace.*`) selects name."""
    for pattern in patterns:
        if pattern == "*" or pattern == name:
            return True
        if pattern.endswith(".*") and name.startswith(pattern[:-1]):
            return True
    return False


def _format_datetime(text: str) -> str:
    # Dataverse formats for the user's locale; the simulator uses en-US in UTC.
    year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
    hour, minute = int(text[11:13]), int(text[14:16])
    suffix = "AM" if hour < 12 else "PM"
    hour12 = hour % 12 or 12
    return f"{month}/{day}/{year} {hour12}:{minute:02d} {suffix}"


def formatted_value(column: str, attribute_type: str, value: Any) -> str | None:
    """The FormattedValue Dataverse would send for a non-null value, or None."""
    if attribute_type in ("Picklist", "State", "Status"):
        return OPTION_LABELS.get(column, {}).get(value, str(value))
    if attribute_type == "Boolean":
        return "Yes" if value else "No"
    if attribute_type == "Money":
        return f"${value:,.2f}"
    if attribute_type in ("Integer", "BigInt"):
        return f"{value:,}"
    if attribute_type in ("Decimal", "Double"):
        return f"{value:,.2f}"
    if attribute_type == "DateTime":
        return _format_datetime(value)
    return None


class Annotator:
    """Builds annotated copies of rows for one table and one include-annotations value."""

    def __init__(
        self, sim: DataverseSimulator, table: EntityTable, patterns: Sequence[str]
    ) -> None:
        self.sim = sim
        self.table = table
        self.formatted = annotation_allowed(patterns, FORMATTED)
        self.logical = annotation_allowed(patterns, LOOKUP_LOGICAL_NAME)
        self.navigation = annotation_allowed(patterns, NAVIGATION_PROPERTY)
        self.attributes = {
            a.column: a for a in table.spec.attributes if not a.is_virtual
        }

    def _lookup_name(self, target: str, guid: str) -> str | None:
        target_table = self.sim.table_by_logical(target)
        if target_table is None:
            return None
        row = target_table.rows.get(guid)
        name_column = target_table.spec.primary_name_attribute
        if row is None or name_column is None:
            return None
        return row.get(name_column)

    def __call__(self, row: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
        """A copy of row restricted to keys, each value preceded by its annotations."""
        out: dict[str, Any] = {}
        pk = row[self.table.spec.primary_id_attribute]
        for key in keys:
            value = row[key]
            attribute = self.attributes.get(key)
            if value is not None and attribute is not None:
                if attribute.is_lookup:
                    target = self.sim.lookup_target(self.table.spec.entity_set_name, pk, key)
                    target = target or "systemuser"
                    if self.formatted:
                        name = self._lookup_name(target, value)
                        if name is not None:
                            out[f"{key}@{FORMATTED}"] = name
                    if self.navigation:
                        navigation = attribute.logical_name
                        if attribute.attribute_type == "Customer":
                            navigation = f"{navigation}_{target}"
                        out[f"{key}@{NAVIGATION_PROPERTY}"] = navigation
                    if self.logical:
                        out[f"{key}@{LOOKUP_LOGICAL_NAME}"] = target
                elif self.formatted:
                    text = formatted_value(key, attribute.attribute_type, value)
                    if text is not None:
                        out[f"{key}@{FORMATTED}"] = text
            out[key] = value
        return out
