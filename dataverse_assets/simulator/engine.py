"""Query execution over one table: filtered, ordered, keyset-paged reads and delta windows.

Default order (primary key) pages are a bisect into the sorted key index plus a scan that stops
after `limit + 1` matches, so a full sync is O(rows) overall rather than O(rows) per page. Pure
primary-key or-chains and key ranges skip the scan entirely. Custom `$orderby` sorts the matching
rows once and caches the order until the table next changes.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from .model import EntityTable
from .odata import (
    CATEGORY_BY_TYPE,
    FilterExpr,
    Predicate,
    conjuncts,
    guid_order_key,
    key_bounds,
    key_equalities,
    sort_value,
)
from .paging import PageCursor

_CACHE_LIMIT = 32


class _Rev:
    """Inverts ordering of a sort-key component (for `desc`) without knowing its type."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Rev) and self.value == other.value

    def __lt__(self, other: _Rev) -> bool:
        return other.value < self.value

    def __hash__(self) -> int:
        return hash(self.value)


@dataclass
class CollectionQuery:
    """A parsed collection request against one table."""

    table: EntityTable
    filter_text: str | None = None
    filter_expr: FilterExpr | None = None
    predicate: Predicate | None = None
    order: list[tuple[str, bool]] = field(default_factory=list)

    @property
    def primary_key(self) -> str:
        """The table's primary key column."""
        return self.table.spec.primary_id_attribute

    @property
    def default_order(self) -> bool:
        """True when rows come in primary-key order (no `$orderby`, or only the key asc)."""
        return not self.order or self.order == [(self.primary_key, False)]

    @property
    def key_descending(self) -> bool:
        """True for `$orderby=<pk> desc`: the key index walked backwards, nothing sorted."""
        return self.order == [(self.primary_key, True)]

    @property
    def order_columns(self) -> list[str]:
        """Columns the paging cookie must carry besides the primary key."""
        return [] if self.default_order else [column for column, _ in self.order]


def _sort_key_function(query: CollectionQuery) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    types = query.table.column_types
    parts = [(col, desc, CATEGORY_BY_TYPE.get(types[col], "string")) for col, desc in query.order]
    pk = query.primary_key

    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        out: list[Any] = []
        for column, descending, category in parts:
            value = row.get(column)
            # Nulls sort first ascending and last descending, as in SQL Server.
            component = (0,) if value is None else (1, sort_value(value, category))
            out.append(_Rev(component) if descending else component)
        # Ties are broken by the primary key, so the order is total and paging is stable.
        out.append(guid_order_key(row[pk]))
        return tuple(out)

    return key


def _key_candidates(query: CollectionQuery) -> tuple[list[str] | None, int, int, bool]:
    """(explicit sorted key list or None, lo, hi, whether rows still need the predicate)
    bounding which keys can match the filter."""
    table = query.table
    keys = table.order_keys
    lo, hi = 0, len(keys)
    key_set: set[str] | None = None
    if query.filter_expr is None:
        return None, lo, hi, False
    pk = query.primary_key
    parts = conjuncts(query.filter_expr)
    bounds = key_bounds(query.filter_expr, pk)
    # A filter made only of key-range conditions is fully answered by the bounds below.
    needs_predicate = len(bounds) != len(parts)
    for part in parts:
        equalities = key_equalities(part, pk)
        if equalities is not None:
            found = {guid_order_key(g) for g in equalities if g in table.rows}
            key_set = found if key_set is None else key_set & found
    for op, guid in bounds:
        key = guid_order_key(guid)
        if op == "gt":
            lo = max(lo, bisect.bisect_right(keys, key))
        elif op == "ge":
            lo = max(lo, bisect.bisect_left(keys, key))
        elif op == "lt":
            hi = min(hi, bisect.bisect_left(keys, key))
        else:
            hi = min(hi, bisect.bisect_right(keys, key))
    return (sorted(key_set) if key_set is not None else None), lo, hi, needs_predicate


def _scan(
    query: CollectionQuery, after_key: str | None, limit: int | None
) -> list[dict[str, Any]]:
    """Matching rows in key order after `after_key`; at most `limit` (None = all)."""
    table = query.table
    rows, key_to_pk, keys = table.rows, table.key_to_pk, table.order_keys
    key_list, lo, hi, needs_predicate = _key_candidates(query)
    predicate = query.predicate if needs_predicate else None
    source: Iterable[str]
    if key_list is not None:
        start = bisect.bisect_right(key_list, after_key) if after_key is not None else 0
        source = key_list[start:]
    else:
        start = lo if after_key is None else max(lo, bisect.bisect_right(keys, after_key))
        if predicate is None:
            stop = hi if limit is None else min(hi, start + limit)
            return table.rows_in_order(start, max(start, stop))
        source = table.iter_order_keys(start, hi)
    out: list[dict[str, Any]] = []
    for key in source:
        row = rows[key_to_pk[key]]
        if predicate is None or predicate(row):
            out.append(row)
            if limit is not None and len(out) >= limit:
                break
    return out


def _scan_descending(
    query: CollectionQuery, before_key: str | None, limit: int
) -> list[dict[str, Any]]:
    """Matching rows in descending key order before `before_key`; at most `limit`."""
    table = query.table
    rows, key_to_pk, keys = table.rows, table.key_to_pk, table.order_keys
    key_list, lo, hi, needs_predicate = _key_candidates(query)
    predicate = query.predicate if needs_predicate else None
    source: Iterable[str]
    if key_list is not None:
        end = bisect.bisect_left(key_list, before_key) if before_key is not None else len(
            key_list)
        source = reversed(key_list[:end])
    else:
        end = hi if before_key is None else min(hi, bisect.bisect_left(keys, before_key))
        if predicate is None:
            return table.rows_in_order(max(lo, end - limit), end)[::-1]
        source = (keys[i] for i in range(end - 1, lo - 1, -1))
    out: list[dict[str, Any]] = []
    for key in source:
        row = rows[key_to_pk[key]]
        if predicate is None or predicate(row):
            out.append(row)
            if len(out) >= limit:
                break
    return out


def _ordered(query: CollectionQuery) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:
    """All matching rows under a custom order, cached until the table changes."""
    table = query.table
    cache_key = ("order", query.filter_text, tuple(query.order))
    cached = table.cache.get(cache_key)
    if cached is not None:
        return cached
    key = _sort_key_function(query)
    entries = [(key(row), row) for row in _scan(query, None, None)]
    entries.sort(key=itemgetter(0))
    result = ([k for k, _ in entries], [row for _, row in entries])
    if len(table.cache) >= _CACHE_LIMIT:
        table.cache.clear()
    table.cache[cache_key] = result
    return result


def fetch_page(
    query: CollectionQuery, cursor: PageCursor | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """Up to `limit` stored rows after the cursor, and whether more rows follow."""
    if query.default_order:
        after = guid_order_key(cursor.last_pk) if cursor and cursor.last_pk else None
        rows = _scan(query, after, limit + 1)
        return rows[:limit], len(rows) > limit
    if query.key_descending:
        before = guid_order_key(cursor.last_pk) if cursor and cursor.last_pk else None
        rows = _scan_descending(query, before, limit + 1)
        return rows[:limit], len(rows) > limit
    keys, rows = _ordered(query)
    start = 0
    if cursor is not None and cursor.last_pk is not None:
        probe = dict(zip(query.order_columns, cursor.last_values, strict=True))
        probe[query.primary_key] = cursor.last_pk
        start = bisect.bisect_right(keys, _sort_key_function(query)(probe))
    page = rows[start : start + limit]
    return page, start + limit < len(rows)


def fetch_page_by_number(query: CollectionQuery, page_number: int,
                         limit: int) -> tuple[list[dict[str, Any]], bool]:
    """Legacy paging: the `page_number`-th slice of `limit` rows of the result as it is now.
    A row inserted, deleted or moved ahead of the slice since the last page shifts it, so one
    row is served twice or skipped, as Dataverse does when it cannot use a paging cookie."""
    start = (page_number - 1) * limit
    if query.default_order:
        rows = _scan(query, None, start + limit + 1)
    elif query.key_descending:
        rows = _scan_descending(query, None, start + limit + 1)
    else:
        rows = _ordered(query)[1]
    return rows[start:start + limit], len(rows) > start + limit


def count_matching(query: CollectionQuery, cap: int) -> int:
    """`@odata.count`: matching rows, capped like Dataverse caps it."""
    if not query.default_order and not query.key_descending:
        return min(len(_ordered(query)[1]), cap)
    return len(_scan(query, None, cap))


def delta_items(table: EntityTable, from_version: int, to_version: int) -> list[tuple[str, str]]:
    """(pk, "upsert" | "delete") for rows changed in (from, to]: upserts first, then deletes.

    Each row appears once, with its final state in the window deciding the kind; a row created
    and deleted inside the window is a delete. The list depends only on the append-only change
    log, so paging through it by position is stable while new changes arrive.
    """
    cache_key = ("delta", from_version, to_version)
    cached = table.cache.get(cache_key)
    if cached is not None:
        return cached
    lo = bisect.bisect_right(table.change_versions, from_version)
    hi = bisect.bisect_right(table.change_versions, to_version)
    last: dict[str, tuple[int, str]] = {}
    for version, pk, kind in table.changes[lo:hi]:
        last[pk] = (version, kind)
    upserts = sorted((v, pk) for pk, (v, kind) in last.items() if kind == "upsert")
    deletes = sorted((v, pk) for pk, (v, kind) in last.items() if kind == "delete")
    items = [(pk, "upsert") for _, pk in upserts] + [(pk, "delete") for _, pk in deletes]
    if len(table.cache) >= _CACHE_LIMIT:
        table.cache.clear()
    table.cache[cache_key] = items
    return items
