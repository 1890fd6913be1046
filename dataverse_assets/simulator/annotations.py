"""`Prefer: odata.include-annotations` support: formatted values and lookup annotations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .model import BASE_CURRENCY, EntityTable, SimAttribute

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


def _format_date(text: str) -> str:
    # A DateOnly value is a calendar day: en-US, no time and no time zone shift.
    return f"{int(text[5:7])}/{int(text[8:10])}/{int(text[0:4])}"


def formatted_value(value_type: str, value: Any, *, symbol: str = "$",
                    decimals: int = 2) -> str | None:
    """The FormattedValue Dataverse would send for a non-null value that is not a choice,
    or None. `symbol` is the money's currency symbol, `decimals` a number's precision."""
    if value_type == "Money":
        return f"{symbol}{value:,.2f}"
    if value_type in ("Integer", "BigInt"):
        return f"{value:,}"
    if value_type in ("Decimal", "Double"):
        return f"{value:,.{decimals}f}"
    if value_type == "DateTime":
        return _format_datetime(value)
    if value_type == "Date":
        return _format_date(value)
    return None


# exchangerate has Dataverse's fixed precision of 10 decimals.
_DECIMALS = {"exchangerate": 10}


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
        self.pk = table.spec.primary_id_attribute
        self.entity_set = table.spec.entity_set_name
        self._plan_keys: Sequence[str] | None = None
        self._plan: list[tuple[str, object, SimAttribute | None, Any]] = []

    def __call__(self, row: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
        """A copy of row restricted to keys, each value preceded by its annotations."""
        if keys is not self._plan_keys:  # the same keys for every row of a response
            self._plan = [self._step(key) for key in keys]
            self._plan_keys = keys
        out: dict[str, Any] = {}
        pk = row[self.pk]
        for key, kind, attribute, extra in self._plan:
            value = row[key]
            if kind is _PLAIN or value is None:
                out[key] = value
                continue
            if kind is _LOOKUP:
                target = (self.sim.lookup_target(self.entity_set, pk, key, attribute)
                          or "systemuser")
                if self.formatted:
                    name = self.sim.primary_name(target, value)
                    if name is not None:
                        out[extra[0]] = name
                if self.navigation:
                    # A polymorphic lookup has one navigation property per target.
                    out[extra[1]] = (f"{attribute.logical_name}_{target}" if extra[3]
                                     else attribute.logical_name)
                if self.logical:
                    out[extra[2]] = target
            else:
                if kind is _CHOICE:
                    text = self.sim.formatted_choice(self.table.spec, attribute, value)
                elif kind is _MONEY:
                    text = formatted_value("Money", value, symbol=self.sim.currency(
                        row.get("_transactioncurrencyid_value")).symbol)
                else:
                    text = formatted_value(attribute.value_type, value,
                                           symbol=BASE_CURRENCY.symbol, decimals=extra)
                if text is not None:
                    out[f"{key}@{FORMATTED}"] = text
            out[key] = value
        return out

    def _step(self, key: str) -> tuple[str, object, SimAttribute | None, Any]:
        """How a column is annotated, worked out once per response: (key, kind, attribute,
        what the kind needs)."""
        attribute = self.attributes.get(key)
        if attribute is None:
            return key, _PLAIN, None, None
        if attribute.is_lookup:
            polymorphic = attribute.attribute_type != "Owner" and len(attribute.targets) > 1
            return key, _LOOKUP, attribute, (f"{key}@{FORMATTED}", f"{key}@{NAVIGATION_PROPERTY}",
                                             f"{key}@{LOOKUP_LOGICAL_NAME}", polymorphic)
        if not self.formatted:
            return key, _PLAIN, attribute, None
        if attribute.is_choice:
            return key, _CHOICE, attribute, None
        if attribute.attribute_type == "Money" and not attribute.is_base_currency:
            return key, _MONEY, attribute, None
        if attribute.value_type not in _FORMATTED_TYPES:
            return key, _PLAIN, attribute, None  # no formatted value (text, GUIDs, ...)
        return key, _OTHER, attribute, _DECIMALS.get(attribute.logical_name, 2)


# What a column's annotation step is (Annotator._step).
_PLAIN, _LOOKUP, _CHOICE, _MONEY, _OTHER = (object() for _ in range(5))
_FORMATTED_TYPES = frozenset(("Money", "Integer", "BigInt", "Decimal", "Double", "DateTime",
                              "Date"))
