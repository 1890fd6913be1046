"""The `$skiptoken` paging cookie, in the shape Dataverse uses.

`<cookie pagenumber="2" pagingcookie="<url-encoded XML>" istracking="False" />`, where the XML is
`<cookie page="1"><name last=".." first=".." /><accountid last="{GUID}" first="{GUID}" /></cookie>`:
the sort values of the previous page's last (and first) row. Paging is keyset-based, so rows
added or removed between pages never shift later pages. A few extra attributes carry what the
simulator needs to pin a change-tracking snapshot (`simversion`) or a delta position
(`simposition`).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from .odata import CATEGORY_BY_TYPE, ODataQueryError

_OUTER_RE = re.compile(
    r'^\s*<cookie\s+pagenumber="(\d+)"\s+pagingcookie="([^"]*)"\s+istracking="(True|False)"\s*/>\s*$'
)


@dataclass(frozen=True)
class PageCursor:
    """Where the next page starts."""

    page_number: int
    last_values: tuple[Any, ...] = ()
    last_pk: str | None = None
    version: int | None = None
    position: int | None = None
    tracking: bool = False


def _encode_value(value: Any, category: str) -> str:
    if category == "guid":
        return "{" + str(value).upper() + "}"
    if category == "bool":
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _decode_value(text: str, category: str) -> Any:
    if category == "guid":
        return text.strip("{}").lower()
    if category == "bool":
        return text == "1"
    if category == "int":
        return int(text)
    if category == "number":
        return float(text)
    return text


def _set_value(element: ET.Element, prefix: str, value: Any, category: str) -> None:
    if value is None:
        element.set(f"{prefix}null", "1")
    else:
        element.set(prefix, _encode_value(value, category))


def encode_skiptoken(
    page_number: int,
    order_columns: Sequence[str],
    primary_key: str,
    column_types: Mapping[str, str],
    last_row: Mapping[str, Any] | None,
    first_row: Mapping[str, Any] | None,
    *,
    version: int | None = None,
    position: int | None = None,
    tracking: bool = False,
) -> str:
    """The `$skiptoken` value (not yet URL-encoded) that asks for page `page_number`."""
    root = ET.Element("cookie", page=str(page_number - 1))
    if version is not None:
        root.set("simversion", str(version))
    if position is not None:
        root.set("simposition", str(position))
    if last_row is not None:
        for column in [*order_columns, primary_key]:
            category = CATEGORY_BY_TYPE.get(column_types.get(column, ""), "string")
            element = ET.SubElement(root, column)
            _set_value(element, "last", last_row.get(column), category)
            if first_row is not None:
                _set_value(element, "first", first_row.get(column), category)
    inner = quote(ET.tostring(root, encoding="unicode"), safe="")
    return (
        f'<cookie pagenumber="{page_number}" pagingcookie="{inner}" '
        f'istracking="{"True" if tracking else "False"}" />'
    )


def _invalid(token: str) -> ODataQueryError:
    return ODataQueryError(f"The $skiptoken '{token[:200]}' is not a valid paging cookie.")


def decode_skiptoken(
    token: str,
    order_columns: Sequence[str],
    primary_key: str,
    column_types: Mapping[str, str],
) -> PageCursor:
    """Parse a `$skiptoken`; raises ODataQueryError if it does not fit the current query."""
    match = _OUTER_RE.match(token)
    if not match:
        raise _invalid(token)
    page_number = int(match.group(1))
    try:
        root = ET.fromstring(unquote(match.group(2)))
    except ET.ParseError as exc:
        raise _invalid(token) from exc
    if root.tag != "cookie":
        raise _invalid(token)
    try:
        version = int(root.attrib["simversion"]) if "simversion" in root.attrib else None
        position = int(root.attrib["simposition"]) if "simposition" in root.attrib else None
    except ValueError as exc:
        raise _invalid(token) from exc
    children = list(root)
    values: list[Any] = []
    last_pk: str | None = None
    if children:
        expected = [*order_columns, primary_key]
        if [child.tag for child in children] != expected:
            # The cookie was made for a different $orderby.
            raise _invalid(token)
        try:
            for column, child in zip(expected, children, strict=True):
                category = CATEGORY_BY_TYPE.get(column_types.get(column, ""), "string")
                if child.get("lastnull") == "1":
                    value = None
                elif "last" in child.attrib:
                    value = _decode_value(child.attrib["last"], category)
                else:
                    raise _invalid(token)
                values.append(value)
        except ValueError as exc:
            raise _invalid(token) from exc
        last_pk = values.pop()
        if not isinstance(last_pk, str):
            raise _invalid(token)
    return PageCursor(
        page_number=page_number,
        last_values=tuple(values),
        last_pk=last_pk,
        version=version,
        position=position,
        tracking=match.group(3) == "True",
    )
