"""Splitting one entity set into primary-key ranges that page in parallel. Pure functions.

Dataverse stores keys as SQL Server uniqueidentifiers, which compare by their last six bytes
first, then bytes 8-9, then the first three groups byte-swapped (the .NET layout). `gt` / `lt`
on a key column use that order, so a key's position in it is an integer
(`guid_sql_value`) and ranges of equal width in that integer split evenly spread keys into
equal parts. Each range is an ordinary query: the caller's filter `and` a key condition, its
order ending with the primary key, paged with nextLinks like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from dataverse_assets.names import is_guid
from dataverse_assets.source.query import PageQuery

GUID_SPACE = 1 << 128


def guid_sql_value(guid: str) -> int:
    """The GUID's rank in SQL Server's uniqueidentifier order, as a 128-bit integer."""
    if not is_guid(guid):
        raise ValueError(f"{guid!r} is not a GUID")
    g = guid.lower()
    return int(
        g[24:36] + g[19:23] + g[16:18] + g[14:16] + g[11:13] + g[9:11]
        + g[6:8] + g[4:6] + g[2:4] + g[0:2],
        16,
    )


def guid_from_sql_value(value: int) -> str:
    """The GUID at this rank of SQL Server's order (inverse of guid_sql_value)."""
    if not 0 <= value < GUID_SPACE:
        raise ValueError("a GUID's SQL order value is a 128-bit unsigned integer")
    k = f"{value:032x}"
    return (
        f"{k[30:32]}{k[28:30]}{k[26:28]}{k[24:26]}-{k[22:24]}{k[20:22]}-"
        f"{k[18:20]}{k[16:18]}-{k[12:16]}-{k[0:12]}"
    )


@dataclass(frozen=True)
class KeyRange:
    """Keys from `lower` (inclusive) to `upper` (exclusive); None means unbounded."""

    lower: str | None = None
    upper: str | None = None

    def filter(self, primary_key: str) -> str | None:
        """`pk ge <lower> and pk lt <upper>` (GUID literals unquoted, as key columns take)."""
        terms = []
        if self.lower is not None:
            terms.append(f"{primary_key} ge {self.lower}")
        if self.upper is not None:
            terms.append(f"{primary_key} lt {self.upper}")
        return " and ".join(terms) or None


def key_ranges(count: int, lowest: str | None = None, highest: str | None = None
               ) -> list[KeyRange]:
    """`count` disjoint ranges covering every key, split evenly between the lowest and highest
    key known (the whole GUID space when not known). The first and last range are open-ended,
    so keys created outside [lowest, highest] meanwhile are still covered."""
    if count < 1:
        raise ValueError("count must be at least 1")
    low = guid_sql_value(lowest) if lowest is not None else 0
    high = guid_sql_value(highest) if highest is not None else GUID_SPACE - 1
    if high < low:
        raise ValueError("the highest key is below the lowest")
    width = high - low + 1
    boundaries: list[int] = []
    for k in range(1, count):
        boundary = low + width * k // count
        if boundary > low and (not boundaries or boundary > boundaries[-1]):
            boundaries.append(boundary)
    bounds: list[str | None] = [None, *(guid_from_sql_value(b) for b in boundaries), None]
    return [KeyRange(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def combine_filters(filters: Iterable[str | None]) -> str | None:
    """Filters joined with `and`, each parenthesized so `or` inside one stays inside."""
    present = [f for f in filters if f]
    if len(present) <= 1:
        return present[0] if present else None
    return " and ".join(f"({f})" for f in present)


def deterministic_order(orderby: tuple[str, ...], primary_key: str) -> tuple[str, ...]:
    """The order, ending with the primary key (ties on other columns would skip rows)."""
    if not orderby:
        return (f"{primary_key} asc",)
    last_column = orderby[-1].split()[0]
    return orderby if last_column == primary_key else (*orderby, f"{primary_key} asc")


def range_query(query: PageQuery, primary_key: str, key_range: KeyRange) -> PageQuery:
    """The query restricted to one key range, ordered deterministically."""
    if query.track_changes:
        raise ValueError("change tracking requests take no $filter, so they cannot be split")
    if "$top" in query.extra_params:
        raise ValueError("a query with $top cannot be split into key ranges")
    return replace(
        query,
        filter=combine_filters([query.filter, key_range.filter(primary_key)]),
        orderby=deterministic_order(query.orderby, primary_key),
    )


def ranged_watermark(range_maxima: Iterable[str | None]) -> str | None:
    """The watermark after a first sync read in parallel ranges, each ordered by modifiedon:
    the smallest of the ranges' largest modifiedon (ranges that returned no rows aside).

    A record changed while the sync ran moves to the end of its range and is read, unless its
    range had already finished; then its new modifiedon is no earlier than everything that
    range read, so no earlier than this watermark, and the next change set (`ge`) fetches it.
    """
    present = [m for m in range_maxima if m is not None]
    return min(present) if present else None
