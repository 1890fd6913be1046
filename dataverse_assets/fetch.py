"""Fetching one change set of one entity into the archive.

The decisions (which mode, which queries) are pure functions; `fetch_change_set` does the I/O:
pages stream from the source straight into the archive, never a whole entity in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from dataverse_assets.archive import ENTITY_DEFINITION, REQUEST, ChangeSetArchive
from dataverse_assets.config import EntityConfig
from dataverse_assets.query import PageQuery, id_filter_batches, modified_since_filter
from dataverse_assets.schema import detect_primary_key
from dataverse_assets.sources import SourceSession
from dataverse_assets.store import utc_now_iso


class FetchConfigError(ValueError):
    """The entity's configuration asks for something this source cannot do."""


def attribute_names(definition: dict | None) -> set[str]:
    if not definition:
        return set()
    return {a.get("LogicalName") for a in definition.get("Attributes", []) if a.get("LogicalName")}


def choose_mode(entity: EntityConfig, definition: dict | None) -> str:
    """The incremental mode: modifiedon when the table has it, else full snapshots."""
    if entity.incremental == "change_tracking":
        raise FetchConfigError(
            f"{entity.name}: incremental 'change_tracking' is not available yet; use 'auto', "
            "'modifiedon' or 'full'"
        )
    if entity.incremental in ("modifiedon", "full"):
        if entity.incremental == "modifiedon" and definition is not None and (
            "modifiedon" not in attribute_names(definition)
        ):
            raise FetchConfigError(
                f"{entity.name}: incremental 'modifiedon' but the table has no modifiedon "
                "column; use 'full'"
            )
        return entity.incremental
    if definition is None:
        return "full"  # without metadata we cannot know a modifiedon exists
    return "modifiedon" if "modifiedon" in attribute_names(definition) else "full"


def primary_key_for(entity: EntityConfig, definition: dict | None) -> str:
    pk, _ = detect_primary_key(
        entity.name, sorted(attribute_names(definition)), entity.primary_key,
        (definition or {}).get("PrimaryIdAttribute"),
    )
    return pk


@dataclass
class FetchRequest:
    """What one change set asks the source for, written to the archive as request.json."""

    entity: str
    change_set: str
    mode: str
    primary_key: str
    watermark_before: str | None
    queries: list[PageQuery] = field(default_factory=list)
    # Filtered entities: the ids this change set may stage (linked now or already mirrored).
    id_scope: list[str] | None = None

    def as_dict(self) -> dict:
        return {
            "entity": self.entity,
            "change_set": self.change_set,
            "mode": self.mode,
            "primary_key": self.primary_key,
            "watermark_before": self.watermark_before,
            "queries": [{"params": q.params(), "prefer": q.prefer()} for q in self.queries],
            "id_scope": self.id_scope,
        }


def plan_fetch(
    entity: EntityConfig,
    change_set: str,
    definition: dict | None,
    watermark: str | None,
    *,
    linked_ids: Iterable[str] = (),
    mirrored_ids: Iterable[str] = (),
) -> FetchRequest:
    """Decide the queries for one change set.

    Filtered entities are fetched in two phases: records changed since the watermark (kept
    only if linked or already mirrored), then linked ids not yet mirrored, by id in batches.
    """
    pk = primary_key_for(entity, definition)
    page_size = entity.page_size
    orderby = tuple(entity.orderby.split(",")) if entity.orderby else ()
    if entity.filtered:
        mode = "filtered"
        mirrored = set(mirrored_ids)
        linked = set(linked_ids)
        queries: list[PageQuery] = []
        if watermark is not None:
            queries.append(PageQuery(
                filter=modified_since_filter(watermark), orderby=("modifiedon asc", f"{pk} asc"),
                page_size=page_size,
            ))
        missing = sorted(linked - mirrored)
        for _, expression in id_filter_batches(pk, missing):
            queries.append(PageQuery(filter=expression, page_size=page_size))
        return FetchRequest(entity.name, change_set, mode, pk, watermark, queries,
                            id_scope=sorted(linked | mirrored))
    mode = choose_mode(entity, definition)
    if mode == "modifiedon":
        query = PageQuery(
            filter=modified_since_filter(watermark),
            orderby=orderby or ("modifiedon asc", f"{pk} asc"), page_size=page_size,
        )
        return FetchRequest(entity.name, change_set, mode, pk, watermark, [query])
    query = PageQuery(orderby=orderby, page_size=page_size)
    return FetchRequest(entity.name, change_set, "full", pk, None, [query])


@dataclass
class FetchSummary:
    entity: str
    change_set: str
    mode: str
    pages: int
    records: int
    bytes_archived: int
    requests: int
    retries: int
    throttle_wait: float
    seconds: float
    watermark_before: str | None
    watermark_after: str | None
    reused: bool = False


async def fetch_change_set(
    session: SourceSession, archive: ChangeSetArchive, request: FetchRequest,
    definition: dict | None,
) -> FetchSummary:
    """Run the request's queries, archiving each page as it arrives; write the manifest last."""
    started = time.perf_counter()
    started_at = utc_now_iso()
    archive.start()
    archive.write_json(REQUEST, request.as_dict())
    if definition is not None:
        archive.write_json(ENTITY_DEFINITION, definition)
    stats = session.stats
    requests_before, retries_before, log_before = stats.requests, stats.retries, len(stats.log)
    wait_before = stats.throttle_wait
    page_number = 0
    records = 0
    archived_bytes = 0
    max_modifiedon = request.watermark_before
    pages: list[dict] = []
    # A filtered entity's watermark comes from its modifiedon phase only: a by-id record
    # fetched later may be newer than a change the first phase has not seen yet.
    watermark_queries = (
        {0} if request.mode == "filtered" and request.watermark_before is not None
        else set(range(len(request.queries)))
    )
    for query_index, query in enumerate(request.queries):
        async for page in session.iter_pages(request.entity, query):
            page_number += 1
            size = archive.write_page(page_number, page.body)
            archived_bytes += size
            count = len(page.records)
            records += count
            for record in page.records if query_index in watermark_queries else ():
                modified = record.get("modifiedon")
                if isinstance(modified, str) and (
                    max_modifiedon is None or modified > max_modifiedon
                ):
                    max_modifiedon = modified
            pages.append({"number": page_number, "query": query_index, "url": page.url,
                          "records": count, "bytes": len(page.body),
                          "next_link": page.next_link, "delta_link": page.delta_link})
    seconds = time.perf_counter() - started
    summary = FetchSummary(
        entity=request.entity, change_set=request.change_set, mode=request.mode,
        pages=page_number, records=records, bytes_archived=archived_bytes,
        requests=stats.requests - requests_before, retries=stats.retries - retries_before,
        throttle_wait=stats.throttle_wait - wait_before, seconds=seconds,
        watermark_before=request.watermark_before,
        watermark_after=max_modifiedon if request.mode in ("modifiedon", "filtered") else None,
    )
    archive.finish({
        "entity": request.entity,
        "change_set": request.change_set,
        "mode": request.mode,
        "primary_key": request.primary_key,
        "started_at": started_at,
        "finished_at": utc_now_iso(),
        "summary": {k: v for k, v in summary.__dict__.items() if k != "reused"},
        "pages": pages,
        "requests": [r.as_dict() for r in stats.log[log_before:]],
    })
    return summary
