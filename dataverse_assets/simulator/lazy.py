"""Tables too large to hold: rows built on demand from their index, seeded and deterministic.

A lazy table of N rows keeps a few thousand template rows (made by the ordinary generator, so
values, nulls, hazards and lookups look like every other table) and derives row i from its
index alone: the primary key, the template it copies, its etag and its timestamps. Keys are
built so that SQL Server's uniqueidentifier order (last six bytes most significant) is index
order and they spread evenly over the key space; so the sorted key index is a function, a key's
row is found by arithmetic, and a page from the middle of a million rows costs the same as the
first page. Mutations (create, update, delete) are kept in small overlays.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, MutableMapping
from datetime import datetime, timedelta
from functools import cache
from typing import Any, overload

from .odata import guid_order_key

_MASK64 = (1 << 64) - 1
_TOP_BITS = 48  # the last GUID group: SQL Server's most significant bytes
_TOP_SPACE = 1 << _TOP_BITS


def mix64(value: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of an integer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


@cache
def _times_of_day() -> list[str]:
    """"HH:MM:SSZ" for every second of a day (built once: formatting is the hot path)."""
    return [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}Z" for s in range(86400)]


def guid_from_order_key(key: str) -> str:
    """The GUID whose `guid_order_key` is key (the inverse byte shuffle)."""
    k = key
    return (
        f"{k[30:32]}{k[28:30]}{k[26:28]}{k[24:26]}-{k[22:24]}{k[20:22]}-"
        f"{k[18:20]}{k[16:18]}-{k[12:16]}-{k[0:12]}"
    )


class LazyRowSource:
    """Rows 0..count-1 of one table, each a function of (seed, index)."""

    def __init__(self, *, count: int, seed: int, primary_key: str) -> None:
        if count > _TOP_SPACE:
            raise ValueError("a lazy table holds at most 2**48 rows")
        self.count = count
        self.primary_key = primary_key
        self._seed = mix64(seed & _MASK64)
        self._width = _TOP_SPACE // max(count, 1)
        self._templates: list[dict[str, Any]] = []
        self._template_targets: list[dict[str, str]] = []
        self._base_version = 0

    def set_templates(
        self,
        templates: list[dict[str, Any]],
        lookup_targets: list[dict[str, str]],
        *,
        base_version: int,
        stamp_start: datetime,
        stamp_end: datetime,
    ) -> None:
        """The rows values are copied from, the first seed version, and the creation window.

        Keys need none of this, so other tables can reference this one before it is set.
        """
        if not templates:
            raise ValueError("a lazy table needs at least one template row")
        self._templates = templates
        self._template_targets = lookup_targets
        self._base_version = base_version
        first = templates[0]
        self._has_version_column = "versionnumber" in first
        self._has_createdon = "createdon" in first
        self._has_modifiedon = "modifiedon" in first
        self._span = max(1, int((stamp_end - stamp_start).total_seconds()))
        first_day = stamp_start.replace(hour=0, minute=0, second=0)
        self._offset = int((stamp_start - first_day).total_seconds())
        days = (self._offset + 2 * self._span) // 86400 + 2
        self._days = [f"{first_day + timedelta(days=d):%Y-%m-%d}T" for d in range(days)]
        self._times = _times_of_day()

    # -- keys ------------------------------------------------------------------------------------

    def _hash(self, index: int) -> int:
        # Two multiply-xorshift rounds: cheap, and plenty for spreading column values.
        x = (index * 0x9E3779B97F4A7C15 + self._seed) & _MASK64
        x = ((x ^ (x >> 32)) * 0xD6E8FEB86659FD93) & _MASK64
        return x ^ (x >> 32)

    def _top(self, index: int, h: int) -> int:
        # Row i owns the slice [i*W, (i+1)*W) of the 48-bit space; its key lies inside it.
        return index * self._width + h % self._width

    def pk(self, index: int) -> str:
        """The primary key of row `index` (increasing in SQL Server order)."""
        return self._pk_from_hash(index, self._hash(index))

    def _pk_from_hash(self, index: int, h: int) -> str:
        # Random-looking high groups (version 4, RFC variant), the ordered part last.
        value = ((h & 0xFFFFFFFFFFFF0FFF | 0x4000) << 64) | (
            (0x8000 | ((h >> 20) & 0x3FFF)) << 48) | self._top(index, h)
        x = value.to_bytes(16).hex()
        return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"

    def order_key(self, index: int) -> str:
        """`guid_order_key` of row `index`'s primary key."""
        return guid_order_key(self.pk(index))

    def index_of(self, pk: str) -> int | None:
        """The index whose key is pk, or None when pk is not one of this table's seed keys."""
        if len(pk) != 36 or not self.count:
            return None
        try:
            top = int(pk[24:36], 16)
        except ValueError:
            return None
        index = top // self._width
        return index if index < self.count and self.pk(index) == pk else None

    # -- rows ------------------------------------------------------------------------------------

    def _stamp(self, seconds: int) -> str:
        day, second = divmod(seconds + self._offset, 86400)
        return self._days[day] + self._times[second]

    def row(self, index: int) -> dict[str, Any]:
        """Row `index` as the Web API returns it (a new dict each call)."""
        h = self._hash(index)
        template = self._templates[(h >> 7) % len(self._templates)]
        row = template.copy()
        version = self._base_version + index + 1
        row["@odata.etag"] = f'W/"{version}"'
        row[self.primary_key] = self._pk_from_hash(index, h)
        if self._has_version_column:
            row["versionnumber"] = version
        created = (h >> 13) % self._span
        if self._has_createdon:
            row["createdon"] = self._stamp(created)
        if self._has_modifiedon:
            # Like seeded rows: a third never modified, the rest some time after creation.
            modified = created if (h >> 40) % 10 < 3 else created + (h >> 24) % (
                self._span + 1 - created)
            row["modifiedon"] = self._stamp(modified)
        return row

    def lookup_target(self, pk: str, column: str) -> str | None:
        """For polymorphic lookups: the table the seed row's value points at."""
        index = self.index_of(pk)
        if index is None:
            return None
        h = self._hash(index)
        return self._template_targets[(h >> 7) % len(self._templates)].get(column)


class LazyKeyIndex:
    """The sorted order keys of a lazy table: seed keys (a function of their index) minus the
    deleted ones, merged with the keys of created rows. Behaves like the sorted list an eager
    table keeps (len, indexing, slicing, iteration, insert, del), so `bisect` works on it."""

    def __init__(self, count: int, key_at: Callable[[int], str]) -> None:
        self._count = count
        self._key_at = key_at
        self._deleted: list[int] = []  # sorted seed indices no longer present
        self._extra: list[str] = []  # sorted keys of created rows

    @property
    def pristine(self) -> bool:
        """True until the first create or delete: position i is seed row i."""
        return not self._deleted and not self._extra

    def __len__(self) -> int:
        return self._count - len(self._deleted) + len(self._extra)

    def __bool__(self) -> bool:
        return len(self) > 0

    # -- the seed keys still present ---------------------------------------------------------

    def _alive_count(self) -> int:
        return self._count - len(self._deleted)

    def _alive_index(self, rank: int) -> int:
        """The seed index of the rank-th seed key still present."""
        if not self._deleted:
            return rank
        low, high = rank, rank + len(self._deleted)
        while low < high:  # smallest i with (i + 1 - deleted up to i) > rank
            middle = (low + high) // 2
            if middle + 1 - bisect.bisect_right(self._deleted, middle) > rank:
                high = middle
            else:
                low = middle + 1
        return low

    def _alive_key(self, rank: int) -> str:
        return self._key_at(self._alive_index(rank))

    def _alive_rank_of(self, key: str) -> int:
        """How many present seed keys are < key."""
        return bisect.bisect_left(range(self._alive_count()), key, key=self._alive_key)

    def _split(self, position: int) -> tuple[int, int]:
        """(seed keys, extra keys) among the first `position` keys of the merged order."""
        extra = self._extra
        if not extra:
            return position, 0
        alive = self._alive_count()
        low, high = max(0, position - alive), min(position, len(extra))
        while low < high:  # the number e of extras such that the split is consistent
            e = (low + high) // 2
            s = position - e
            if s > 0 and e < len(extra) and self._alive_key(s - 1) > extra[e]:
                low = e + 1
            else:
                high = e
        return position - low, low

    # -- sequence protocol ---------------------------------------------------------------------

    @overload
    def __getitem__(self, position: int) -> str: ...

    @overload
    def __getitem__(self, position: slice) -> list[str]: ...

    def __getitem__(self, position: int | slice) -> str | list[str]:
        size = len(self)
        if isinstance(position, slice):
            start, stop, step = position.indices(size)
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return list(self.iter_range(start, stop))
        if position < 0:
            position += size
        if not 0 <= position < size:
            raise IndexError("key index out of range")
        if self.pristine:
            return self._key_at(position)
        return next(self.iter_range(position, position + 1))

    def __iter__(self) -> Iterator[str]:
        return self.iter_range(0, len(self))

    def iter_range(self, start: int, stop: int) -> Iterator[str]:
        """Keys at merged positions [start, stop), in order."""
        stop = min(stop, len(self))
        if start >= stop:
            return
        if self.pristine:
            key_at = self._key_at
            for index in range(start, stop):
                yield key_at(index)
            return
        seed_rank, extra_rank = self._split(start)
        alive, extra = self._alive_count(), self._extra
        for _ in range(stop - start):
            seed_key = self._alive_key(seed_rank) if seed_rank < alive else None
            if extra_rank < len(extra) and (seed_key is None or extra[extra_rank] < seed_key):
                yield extra[extra_rank]
                extra_rank += 1
            else:
                assert seed_key is not None
                yield seed_key
                seed_rank += 1

    def insert(self, position: int, key: str) -> None:
        """Add a key (`bisect.insort` calls this with the right position)."""
        seed_rank = self._alive_rank_of(key)
        if seed_rank < self._alive_count() and self._alive_key(seed_rank) == key:
            raise ValueError("key already present")
        index = self._seed_index_of(key)
        if index is not None:  # a deleted seed key comes back
            self._deleted.remove(index)
            return
        bisect.insort(self._extra, key)

    def __delitem__(self, position: int) -> None:
        key = self[position]
        at = bisect.bisect_left(self._extra, key)
        if at < len(self._extra) and self._extra[at] == key:
            del self._extra[at]
            return
        index = self._alive_index(self._alive_rank_of(key))
        bisect.insort(self._deleted, index)

    def _seed_index_of(self, key: str) -> int | None:
        low = bisect.bisect_left(range(self._count), key, key=self._key_at)
        return low if low < self._count and self._key_at(low) == key else None


class DerivedKeyMap:
    """order key -> primary key for a lazy table: the inverse shuffle, nothing stored."""

    def __getitem__(self, key: str) -> str:
        return guid_from_order_key(key)

    def get(self, key: str, default: str | None = None) -> str | None:
        return guid_from_order_key(key)

    def __setitem__(self, key: str, pk: str) -> None:
        pass  # derivable; nothing to remember

    def pop(self, key: str, default: str | None = None) -> str | None:
        return guid_from_order_key(key)


class LazyRows(MutableMapping[str, dict[str, Any]]):
    """pk -> row for a lazy table: seed rows built on demand, plus created/updated/deleted."""

    def __init__(self, source: LazyRowSource, keys: LazyKeyIndex) -> None:
        self.source = source
        self._keys = keys
        self.overrides: dict[str, dict[str, Any]] = {}
        self._deleted: set[str] = set()
        self._created: set[str] = set()

    @property
    def pristine(self) -> bool:
        """True while no row was created, updated or deleted."""
        return not self.overrides and not self._deleted

    def _is_seed(self, pk: str) -> bool:
        return self.source.index_of(pk) is not None

    def __getitem__(self, pk: str) -> dict[str, Any]:
        row = self.overrides.get(pk)
        if row is not None:
            return row
        if pk in self._deleted:
            raise KeyError(pk)
        index = self.source.index_of(pk)
        if index is None:
            raise KeyError(pk)
        return self.source.row(index)

    def __contains__(self, pk: object) -> bool:
        if not isinstance(pk, str):
            return False
        if pk in self.overrides:
            return True
        return pk not in self._deleted and self._is_seed(pk)

    def __setitem__(self, pk: str, row: dict[str, Any]) -> None:
        self._deleted.discard(pk)
        if pk not in self.overrides and not self._is_seed(pk):
            self._created.add(pk)
        self.overrides[pk] = row

    def __delitem__(self, pk: str) -> None:
        if pk not in self:
            raise KeyError(pk)
        self.overrides.pop(pk, None)
        if pk in self._created:
            self._created.discard(pk)
        else:
            self._deleted.add(pk)

    def __len__(self) -> int:
        return self.source.count - len(self._deleted) + len(self._created)

    def __iter__(self) -> Iterator[str]:
        for key in self._keys:
            yield guid_from_order_key(key)

    def in_order(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Rows at key positions [start, stop)."""
        if self._keys.pristine:  # position i is seed row i (updates aside)
            build = self.source.row
            rows = [build(index) for index in range(start, min(stop, self.source.count))]
            if self.overrides:
                pk = self.source.primary_key
                rows = [self.overrides.get(row[pk], row) for row in rows]
            return rows
        return [self[guid_from_order_key(key)] for key in self._keys.iter_range(start, stop)]
