"""`dataverse-assets fixtures record`: capture real responses into a fixtures directory that
`FixtureSource` replays (`<dir>/<entity>/page-00001.json`, `entity_definition.json`,
`records/<id>.json`).

Each entity is fetched the way its first sync would fetch it (`fetch_plan.plan_fetch` and
`fetch.fetch_change_set`, with a throwaway archive) through a session that writes what passes
through it: the metadata, at most `max_pages` pages of each query, and the single records a
filtered entity asks for. Only response bodies are written: never headers, so never the
Authorization header or a token.

Scrubbing replaces the values of named columns (and their formatted-value annotations) with
stable fakes: the same input gives the same fake everywhere in one recording, so a scrubbed
key still matches the lookups and junction rows that name it (when those are scrubbed too).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson

from dataverse_assets.archive.change_sets import ChangeSetArchive
from dataverse_assets.config import EntitiesConfig, EntityConfig
from dataverse_assets.names import change_set_key, is_guid
from dataverse_assets.source.base import DataverseSource, SourceSession
from dataverse_assets.source.client import Page
from dataverse_assets.source.query import PageQuery
from dataverse_assets.store.db import utc_now_iso
from dataverse_assets.sync.fetch import fetch_change_set
from dataverse_assets.sync.fetch_plan import plan_fetch
from dataverse_assets.sync.stage import LOOKUP_TARGET_ANNOTATION

FORMATTED_VALUE = "@OData.Community.Display.V1.FormattedValue"
RECORDING_MANIFEST = "recording.json"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_PHONE = re.compile(r"^[+()\d][\d\s().+-]{4,}$")
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})")


class Scrubber:
    """Stable fake values for named columns: HMAC of the value under a per-recording salt,
    shaped like the original (GUID, email, phone, date, number, text)."""

    def __init__(self, columns: Iterable[str], salt: bytes | None = None) -> None:
        self.columns = frozenset(columns)
        self._salt = salt if salt is not None else os.urandom(32)

    def __bool__(self) -> bool:
        return bool(self.columns)

    def _digest(self, value: object) -> bytes:
        text = str(value).lower() if isinstance(value, str) and is_guid(value) else str(value)
        return hmac.new(self._salt, text.encode("utf-8"), hashlib.sha256).digest()

    def fake(self, value: object) -> object:
        """The fake for one value (None and booleans stay as they are)."""
        if value is None or isinstance(value, bool):
            return value
        digest = self._digest(value)
        if isinstance(value, int):
            digits = max(1, len(str(abs(value))))
            return int.from_bytes(digest[:8], "big") % (10 ** digits)
        if isinstance(value, float):
            scale = 10 ** max(1, len(str(int(abs(value)))))
            return round(int.from_bytes(digest[:8], "big") % (scale * 100) / 100, 2)
        text = str(value)
        if is_guid(text):
            return str(uuid.UUID(bytes=digest[:16], version=4))
        if _EMAIL.match(text):
            return f"{digest.hex()[:12]}@example.invalid"
        if _DATE.match(text):
            day = int.from_bytes(digest[:4], "big") % (365 * 50)
            year, rest = 1950 + day // 365, day % 365
            month, dom = 1 + rest // 31 % 12, 1 + rest % 28
            return f"{year:04d}-{month:02d}-{dom:02d}" + text[10:]
        if _PHONE.match(text) and sum(c.isdigit() for c in text) >= 5:
            numbers = iter(str(int.from_bytes(digest, "big")))
            return "".join(next(numbers) if c.isdigit() else c for c in text)
        return f"scrubbed-{digest.hex()[:10]}"

    def record(self, record: dict) -> dict:
        """A copy with the named columns faked, and their formatted values with them; the
        formatted values of every lookup too (they repeat the linked record's name)."""
        scrubbed = {}
        for key, value in record.items():
            column, at, annotation = key.partition("@")
            if not at and column in self.columns:
                value = self.fake(value)
            elif at + annotation == FORMATTED_VALUE and (
                column in self.columns or (column.startswith("_") and column.endswith("_value"))
            ):
                value = self.fake(value)
            scrubbed[key] = value
        return scrubbed

    def link(self, url: object) -> object:
        """Paging links carry keys and filters in their query: keep only the path."""
        return url.split("?", 1)[0] + "?scrubbed" if isinstance(url, str) else url

    def body(self, payload: dict) -> bytes:
        """A page or single-record body with every record scrubbed."""
        out = {}
        for key, value in payload.items():
            if key == "value" and isinstance(value, list):
                out[key] = [self.record(r) if isinstance(r, dict) else r for r in value]
            elif key in ("@odata.nextLink", "@odata.deltaLink"):
                out[key] = self.link(value)
            else:
                out[key] = value
        if "value" not in payload:
            out = self.record(out)
        return orjson.dumps(out, option=orjson.OPT_INDENT_2)


@dataclass
class RecordedEntity:
    entity: str
    pages: int = 0
    records: int = 0
    single_records: int = 0
    metadata: bool = False
    mode: str = ""
    truncated_queries: int = 0  # queries that had more pages than were recorded
    raw_records: list[dict] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {"entity": self.entity, "pages": self.pages, "records": self.records,
                "single_records": self.single_records, "metadata": self.metadata,
                "mode": self.mode, "truncated_queries": self.truncated_queries}


class RecordingSession(SourceSession):
    """A session that passes everything through and writes what it saw to `directory`."""

    def __init__(self, inner: SourceSession, directory: Path, max_pages: int,
                 scrubber: Scrubber) -> None:
        self.inner = inner
        self.stats = inner.stats
        self.directory = directory
        self.max_pages = max_pages
        self.scrubber = scrubber
        self.recorded: dict[str, RecordedEntity] = {}

    def entity(self, entity_set: str) -> RecordedEntity:
        if entity_set not in self.recorded:
            self.recorded[entity_set] = RecordedEntity(entity_set)
        return self.recorded[entity_set]

    def _write(self, path: Path, body: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)

    async def entity_definition(self, entity_set: str) -> dict | None:
        definition = await self.inner.entity_definition(entity_set)
        if definition is not None:  # metadata: names and types, no data to scrub
            self._write(self.directory / entity_set / "entity_definition.json",
                        orjson.dumps(definition, option=orjson.OPT_INDENT_2))
            self.entity(entity_set).metadata = True
        return definition

    async def attribute_metadata(self, entity_set: str, definition: dict) -> dict | None:
        metadata = await self.inner.attribute_metadata(entity_set, definition)
        if metadata is not None:  # option labels and targets: metadata, nothing to scrub
            self._write(self.directory / entity_set / "attribute_metadata.json",
                        orjson.dumps(metadata, option=orjson.OPT_INDENT_2))
        return metadata

    async def iter_pages(self, entity_set: str, query: PageQuery,
                         start_url: str | None = None) -> AsyncIterator[Page]:
        recorded = self.entity(entity_set)
        async with aclosing(self.inner.iter_pages(entity_set, query, start_url)) as pages:
            seen = 0
            async for page in pages:
                seen += 1
                recorded.pages += 1
                recorded.records += len(page.records)
                recorded.raw_records.extend(page.records)
                body = self.scrubber.body(page.payload) if self.scrubber else page.body
                self._write(self.directory / entity_set / f"page-{recorded.pages:05d}.json",
                            body)
                yield page
                if seen >= self.max_pages:
                    if page.next_link:
                        recorded.truncated_queries += 1
                    break

    async def get_record(self, entity_set: str, record_id: str,
                         select: tuple[str, ...] = ()) -> tuple[str, bytes, dict]:
        url, body, record = await self.inner.get_record(entity_set, record_id, select)
        recorded = self.entity(entity_set)
        recorded.single_records += 1
        recorded.raw_records.append(record)
        name, saved = record_id, body
        if self.scrubber:
            saved = self.scrubber.body(record)
            if any(column in self.scrubber.columns and str(value).lower() == record_id.lower()
                   for column, value in record.items()):
                name = str(self.scrubber.fake(record_id))  # the key itself is scrubbed
        self._write(self.directory / entity_set / "records" / f"{name}.json", saved)
        return url, body, record


def recording_order(config: EntitiesConfig, names: list[str] | None) -> list[EntityConfig]:
    """The entities to record: the ones asked for (all by default) plus the tables that link
    to filtered ones (their ids come from there), linking tables first."""
    wanted = set(names or [e.name for e in config.entities])
    for entity in config.entities:
        if entity.name in wanted:
            wanted |= {link.entity for link in entity.linked_from}
    chosen = [e for e in config.entities if e.name in wanted]
    return [e for e in chosen if not e.filtered] + [e for e in chosen if e.filtered]


def linked_ids(entity: EntityConfig, recorded: dict[str, RecordedEntity]) -> set[str]:
    """The ids a filtered entity's first sync would ask for, from what its linking tables
    returned in this recording."""
    ids: set[str] = set()
    for link in entity.linked_from:
        for record in recorded.get(link.entity, RecordedEntity(link.entity)).raw_records:
            value = record.get(link.column)
            if value is None:
                continue
            if link.lookup_target and (
                record.get(link.column + LOOKUP_TARGET_ANNOTATION) != link.lookup_target
            ):
                continue
            ids.add(str(value))
    return ids


def key_columns(config: EntitiesConfig, definitions: dict[str, dict | None]) -> set[str]:
    """Columns that carry keys (primary keys, lookups, junction ids): scrubbing one of them
    breaks links unless every column naming the same records is scrubbed too."""
    keys = {e.primary_key for e in config.entities if e.primary_key}
    keys |= {link.column for e in config.entities for link in e.linked_from}
    for definition in definitions.values():
        if not definition:
            continue
        if definition.get("PrimaryIdAttribute"):
            keys.add(definition["PrimaryIdAttribute"])
        for attribute in definition.get("Attributes", []):
            if attribute.get("AttributeType") in ("Lookup", "Customer", "Owner"):
                keys.add(f"_{attribute.get('LogicalName')}_value")
    return keys


async def record_fixtures(source: DataverseSource, config: EntitiesConfig, out: Path, *,
                          entities: list[str] | None = None, max_pages: int = 2,
                          page_size: int | None = None, scrub: Iterable[str] = (),
                          salt: bytes | None = None) -> list[RecordedEntity]:
    """Record the entities' first-sync responses into `out` (their folders are replaced)."""
    if max_pages < 1:
        raise ValueError("--pages must be at least 1")
    if page_size is not None and not 1 <= page_size <= 5000:
        raise ValueError("--page-size must be between 1 and 5000")
    order = recording_order(config, entities)
    scrubber = Scrubber(scrub, salt)
    out.mkdir(parents=True, exist_ok=True)
    for entity in order:
        shutil.rmtree(out / entity.name, ignore_errors=True)
    # The fetch runs as a change set of a throwaway archive, under a real key.
    key = change_set_key(datetime.now(UTC))
    with tempfile.TemporaryDirectory(prefix="dataverse-recording-") as scratch:
        async with source.open_session() as inner:
            session = RecordingSession(inner, out, max_pages, scrubber)
            for entity in order:
                if page_size is not None:
                    entity = entity.model_copy(update={"page_size": page_size})
                definition = await session.entity_definition(entity.name)
                attributes = (await session.attribute_metadata(entity.name, definition)
                              if definition is not None else None)
                request = plan_fetch(
                    entity, key, definition, watermark=None,
                    linked_ids=linked_ids(entity, session.recorded) if entity.filtered else (),
                )
                archive = ChangeSetArchive(scratch, entity.name, key)
                await fetch_change_set(session, archive, request, definition,
                                       attribute_metadata=attributes)
                session.entity(entity.name).mode = request.mode
    recorded = [session.recorded[e.name] for e in order]
    (out / RECORDING_MANIFEST).write_bytes(orjson.dumps({
        "recorded_at": utc_now_iso(),
        "max_pages_per_query": max_pages,
        "page_size": page_size,
        "scrubbed_columns": sorted(scrubber.columns),
        "entities": [r.as_dict() for r in recorded],
    }, option=orjson.OPT_INDENT_2))
    return recorded
