"""Building OData queries for Dataverse: literals, filters, id batches. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

# Dataverse answers long URLs with 414/400 well before 32 KB; 50 GUIDs per or-chain keeps a
# request near 3 KB, and matches what Microsoft suggests for id lookups.
MAX_IDS_PER_FILTER = 50
# The annotations a read asks for: labels, lookup names and formatted values, and the table a
# polymorphic lookup points at. Not "*": other annotations are not needed, and every one
# added makes each page larger.
ANNOTATIONS = ("OData.Community.Display.V1.FormattedValue,"
               "Microsoft.Dynamics.CRM.lookuplogicalname")


def string_literal(value: str) -> str:
    """An OData string literal: single-quoted, with embedded quotes doubled."""
    return "'" + value.replace("'", "''") + "'"


def datetime_literal(value: str | datetime) -> str:
    """An unquoted UTC datetime literal, e.g. 2021-04-28T15:19:30Z."""
    if isinstance(value, str):
        value = parse_datetime(value)
    value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_datetime(value: str) -> datetime:
    """Parse Dataverse's ISO-8601 UTC timestamps (with or without fractional seconds)."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def modified_since_filter(watermark: str | None, column: str = "modifiedon", *,
                          inclusive: bool = True) -> str | None:
    """The incremental filter, or None for a first sync: rows modified in the watermark's
    second or later (`ge`).

    Dataverse stamps in whole seconds, so a record written in the watermark's second after
    the read that set it has the watermark's own stamp: `gt` would never return it. `ge`
    reads that second's records again; unchanged, they publish as nothing. `inclusive=False`
    gives `gt`.
    """
    if watermark is None:
        return None
    return f"{column} {'ge' if inclusive else 'gt'} {datetime_literal(watermark)}"


def id_filter(primary_key: str, ids: Iterable[str]) -> str:
    """`pk eq 'a' or pk eq 'b' ...`, quotes doubled, so any id is safe in the URL."""
    terms = [f"{primary_key} eq {string_literal(str(i))}" for i in ids]
    if not terms:
        raise ValueError("an id filter needs at least one id")
    return " or ".join(terms)


def id_filter_batches(
    primary_key: str, ids: Iterable[str], batch_size: int = MAX_IDS_PER_FILTER
) -> Iterator[tuple[list[str], str]]:
    """Split ids into batches of at most `batch_size`, each with its filter expression."""
    if not 1 <= batch_size <= MAX_IDS_PER_FILTER:
        raise ValueError(f"batch_size must be between 1 and {MAX_IDS_PER_FILTER}")
    batch: list[str] = []
    for item in ids:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch, id_filter(primary_key, batch)
            batch = []
    if batch:
        yield batch, id_filter(primary_key, batch)


@dataclass(frozen=True)
class PageQuery:
    """What to ask an entity set for; the client turns it into URL parameters and headers."""

    select: tuple[str, ...] = ()
    filter: str | None = None
    orderby: tuple[str, ...] = ()
    page_size: int = 5000
    include_annotations: bool = False
    track_changes: bool = False
    extra_params: dict[str, str] = field(default_factory=dict)

    def params(self) -> dict[str, str]:
        if self.track_changes and (self.filter or self.orderby):
            # Dataverse answers 400: change tracking takes no $filter, $orderby or $top.
            raise ValueError("change tracking requests cannot have $filter or $orderby")
        params: dict[str, str] = {}
        if self.select:
            params["$select"] = ",".join(self.select)
        if self.filter:
            params["$filter"] = self.filter
        if self.orderby:
            params["$orderby"] = ",".join(self.orderby)
        params.update(self.extra_params)
        return params

    def prefer(self) -> str:
        preferences = [f"odata.maxpagesize={self.page_size}"]
        if self.track_changes:
            preferences.insert(0, "odata.track-changes")
        if self.include_annotations:
            preferences.append(f'odata.include-annotations="{ANNOTATIONS}"')
        return ",".join(preferences)
