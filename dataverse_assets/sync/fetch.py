"""Fetching one change set of one entity into the archive.

The decisions (which mode, which queries) are pure functions; `fetch_change_set` does the I/O:
pages stream from the source straight into the archive, never a whole entity in memory.

Modes:
- change_tracking: follow the stored delta link (creates, updates, then `$deletedEntity`).
- initial: the first track-changes read of a table (no delta token ever): a full snapshot.
- change_tracking_resync: that read again after the delta token expired: a full snapshot,
  diffed against canonical so vanished rows become deletes.
- modifiedon: `modifiedon ge <watermark>` (the watermark's second is read again: Dataverse stamps
  in whole seconds); deletes come from a key-only reconciliation scan.
- full: the whole table; vanished rows are deletes.
- filtered: records changed since the watermark that are linked or mirrored, then newly
  linked ids by id; ids still not returned are requested one by one (404 -> defunct).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Protocol

import orjson

from dataverse_assets.archive.change_sets import (
    ATTRIBUTE_METADATA,
    ENTITY_DEFINITION,
    REQUEST,
    ChangeSetArchive,
)
from dataverse_assets.errors import (
    DataverseError,
    DataverseRequestError,
    PagingError,
    UnknownEntityError,
)
from dataverse_assets.modes import TRACKING_READ_MODES, Mode
from dataverse_assets.source.base import SourceSession
from dataverse_assets.source.key_ranges import ranged_watermark
from dataverse_assets.source.query import (
    PageQuery,
    id_filter_batches,
)
from dataverse_assets.store.db import utc_now_iso
from dataverse_assets.sync.faults import fault_point
from dataverse_assets.sync.fetch_plan import (
    OUTSIDE_FILTER,
    FetchRequest,
    FetchStep,
    resync_request,
    within_filter,
    without_annotations_for_delta_link,
)
from dataverse_assets.sync.progress import FetchProgress

EXPIRED_DELTA_TOKEN = "0x80044352"


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
    delta_link_after: str | None = None
    missing: int = 0
    reason: str = ""


class _Progress:
    """Counters while a change set streams into the archive."""

    def __init__(self, request: FetchRequest, page_sink: PageSink | None = None) -> None:
        self.page_sink = page_sink
        self.page_number = 0
        self.records = 0
        self.archived_bytes = 0
        self.max_modifiedon = request.watermark_before
        self.delta_link: str | None = None
        self.pages: list[dict] = []
        # Only ids that must come back are checked afterwards; holding every key of a large
        # snapshot would make memory grow with the table.
        self.track_ids = bool(request.expected_ids)
        self.seen_ids: set[str] = set()
        # Pages are compressed and written on a thread (zlib releases the GIL), so the next
        # page is fetched and parsed meanwhile; at most two pages wait to be written.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="archive-writer")
        self._writes: deque[Future[int]] = deque()

    def write_page(self, archive: ChangeSetArchive, number: int, body: bytes) -> None:
        while len(self._writes) >= 2:
            self.archived_bytes += self._writes.popleft().result()
        self._writes.append(self._writer.submit(archive.write_page, number, body))

    def flush(self, *, quiet: bool = False) -> None:
        """Wait for every page write (raising its error unless `quiet`: the fetch failed
        already); the writer stops."""
        try:
            while self._writes:
                try:
                    self.archived_bytes += self._writes.popleft().result()
                except Exception:
                    if not quiet:
                        raise
        finally:
            for pending in self._writes:
                pending.cancel()
            self._writer.shutdown(wait=True)


def _record_page(archive: ChangeSetArchive, progress: _Progress, step_index: int, step: FetchStep,
                 url: str, body: bytes, records: list[dict], *, track_watermark: bool,
                 primary_key: str, next_link: str | None = None,
                 delta_link: str | None = None, shape: str = "collection") -> None:
    progress.page_number += 1
    progress.write_page(archive, progress.page_number, body)
    progress.records += len(records)
    for record in records:
        if track_watermark:
            modified = record.get("modifiedon")
            if isinstance(modified, str) and (
                progress.max_modifiedon is None or modified > progress.max_modifiedon
            ):
                progress.max_modifiedon = modified
        key = record.get(primary_key) if progress.track_ids else None
        if key is not None:
            progress.seen_ids.add(str(key).lower())
    if delta_link:
        progress.delta_link = delta_link
    progress.pages.append({
        "number": progress.page_number, "step": step_index, "kind": step.kind, "shape": shape,
        "url": url, "records": len(records), "bytes": len(body), "next_link": next_link,
        "delta_link": delta_link,
    })
    if progress.page_sink is not None:
        progress.page_sink.page(progress.page_number, progress.pages[-1], records)


ProgressCallback = Callable[[FetchProgress], None]


class PageSink(Protocol):
    """Told of every page as it is archived (sync.prestage stages it meanwhile), and when the
    fetch starts again from its first page."""

    def page(self, number: int, meta: dict, records: list[dict]) -> None: ...

    def abandon(self, reason: str) -> None: ...


# A counted step stops past this many times its expected pages (plus a few). Rows written
# while it reads, a RetrieveTotalRecordCount snapshot that lags the table, and pages shorter
# than page_size all give more pages than the count says, but not ten times as many.
COUNTED_PAGES_FACTOR = 10
COUNTED_PAGES_SLACK = 10


def page_digest(records: list[dict], primary_key: str) -> bytes | None:
    """What a page holds: its records' keys and versions (etags), digested; None for an empty
    page. A record edited between pages comes back with a new etag, so only a page served
    again unchanged digests the same."""
    if not records:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for record in records:
        key = record.get(primary_key, record.get("id"))  # "id": a $deletedEntity marker
        if key is None:
            digest.update(orjson.dumps(record))
        else:
            digest.update(f"{key}\x1f{record.get('@odata.etag')}\x1e".encode())
    return digest.digest()


class PagingGuard:
    """Stops one step whose server pages without end: a page that repeats an earlier page of
    the step (a new nextLink each time, the same records), more pages than `max_pages`, or,
    when the step's records were counted, far more pages than the count needs.

    Holds a 16-byte digest per page, never the keys. Parallel key ranges share one guard:
    their key ranges are disjoint, so a page repeating another range's page is a repeat too.
    """

    def __init__(self, request: FetchRequest, step: FetchStep,
                 counted_records: int | None = None) -> None:
        self.request = request
        self.step = step
        self.counted_records = counted_records
        self.pages = 0
        self._first_page_of: dict[bytes, int] = {}
        self.counted_pages: int | None = None
        self.limit = request.max_pages
        if counted_records is not None:
            # Each key range ends with a page of its own (possibly short or empty).
            self.counted_pages = (math.ceil(counted_records / max(step.query.page_size, 1))
                                  + step.ranges)
            self.limit = min(self.limit,
                             COUNTED_PAGES_FACTOR * self.counted_pages + COUNTED_PAGES_SLACK)

    def check(self, records: list[dict], archive_page: int) -> None:
        """Raise PagingError before page `archive_page` (the change set's numbering) is
        archived, if it shows the server is paging without progress."""
        self.pages += 1
        request = self.request
        where = f"{request.entity}: change set {request.change_set}, {self.step.kind} read"
        stopped = ("so the read stopped: the pages before it stay in the archive, the change set "
                   "stays unfinished and the next run reads these changes again")
        if self.pages > self.limit:
            nth = f"page {archive_page} is its page {self.pages:,}"
            if self.limit == request.max_pages:
                raise PagingError(
                    f"{where}: {nth}, over the entity's max_pages of {request.max_pages:,}, "
                    f"{stopped}. If the table really needs more pages (more than max_pages x "
                    "page_size records), raise max_pages for this entity in the entities config")
            raise PagingError(
                f"{where}: {nth}, far more than the {self.counted_records:,} records Dataverse "
                f"counted for it need ({self.counted_pages:,} pages of "
                f"{self.step.query.page_size:,}): the server keeps sending pages, {stopped}. If "
                "the table really grew that much since it was counted, run again; otherwise "
                "check that DATAVERSE_URL is the org itself")
        digest = page_digest(records, request.primary_key)
        if digest is None:
            return
        earlier = self._first_page_of.setdefault(digest, archive_page)
        if earlier != archive_page:
            raise PagingError(
                f"{where}: page {archive_page} repeats page {earlier} (the same {len(records)} "
                f"keys and versions, under a new nextLink): the server is paging without "
                f"progress, {stopped}. If this happens again, check that DATAVERSE_URL is the "
                "org itself and not a proxy")


def _reads_whole_table(request: FetchRequest, step: FetchStep) -> bool:
    """Steps long enough to deserve an ETA: snapshots, key scans, a first modifiedon read."""
    return step.kind in ("snapshot", "keys") or (
        step.kind == "changes" and request.watermark_before is None)


async def _count_for_progress(session: SourceSession, request: FetchRequest,
                              step: FetchStep) -> int | None:
    """The step's record count (`$count`), or None: progress never fails a fetch."""
    if step.count_asked:  # asked once per read, answered or not
        return step.counted
    step.count_asked = True
    try:
        step.counted = await session.count(request.entity, step.query.filter,
                                           request.primary_key)
    except DataverseError:
        return None
    return step.counted


# parallel_ranges 0 (auto): one key range per this many records of a splittable read, at most
# AUTO_MAX_RANGES. Two full pages per range at least: a range of fewer pages costs a bounds
# request and a page more than it saves. Every range's requests share the user's budget.
AUTO_RANGE_RECORDS = 10_000
AUTO_MAX_RANGES = 8


async def _size_auto_ranges(session: SourceSession, request: FetchRequest) -> None:
    """Split each large read whose ranges are `auto` by the records it counts (a read that
    cannot be counted stays one stream)."""
    for step in request.steps:
        if step.auto_ranges:
            count = await _count_for_progress(session, request, step)
            step.ranges = max(1, min(AUTO_MAX_RANGES, (count or 0) // AUTO_RANGE_RECORDS))


# The version of each mirrored record among some ids (ids the mirror lacks are left out).
MirroredVersions = Callable[[list[str]], dict[str, str | None]]


class Divergence:
    """What a key-and-version scan finds against the mirror, page by page: keys the mirror
    lacks (unfiltered entities: a filtered one mirrors only linked records) and keys it holds
    at another version (`@odata.etag`, which Dataverse returns even with `$select=<key>`).
    A record a later step of the change set serves anyway (a change since the last change set)
    is no divergence and needs no refetch; what is left is fetched by id. Holds only the
    divergent ids."""

    def __init__(self, versions: MirroredVersions, primary_key: str, *,
                 missing_too: bool) -> None:
        self.versions = versions
        self.primary_key = primary_key
        self.missing_too = missing_too
        self.scanned = 0
        self.ids: dict[str, tuple[str, str]] = {}  # lowercase id -> (id as served, kind)

    def scan(self, records: list[dict]) -> None:
        keyed = [(str(r[self.primary_key]), r.get("@odata.etag")) for r in records
                 if r.get(self.primary_key) is not None]
        self.scanned += len(keyed)
        known = self.versions([key for key, _ in keyed]) if keyed else {}
        for key, etag in keyed:
            if key not in known:
                if self.missing_too:
                    self.ids[key.lower()] = (key, "missing")
            elif known[key] != etag:
                self.ids[key.lower()] = (key, "stale")

    def served(self, records: list[dict]) -> None:
        if not self.ids:
            return
        for record in records:
            key = record.get(self.primary_key, record.get("id"))  # "id": a delete marker
            if key is not None:
                self.ids.pop(str(key).lower(), None)

    def found(self) -> dict[str, int]:
        kinds = [kind for _, kind in self.ids.values()]
        return {"scanned": self.scanned, "missing": kinds.count("missing"),
                "stale": kinds.count("stale")}


async def _refetch(session: SourceSession, archive: ChangeSetArchive, request: FetchRequest,
                   progress: _Progress, divergence: Divergence) -> list[str]:
    """The divergent records by id, in batches of 50, archived as `refetch` pages (staged and
    published like any record, never moving the watermark). Returns the ids that did not come
    back (gone since the scan), for the one-by-one check that records them as defunct."""
    ids = sorted(key for key, _ in divergence.ids.values())
    step = FetchStep("refetch", PageQuery(page_size=request.steps[0].query.page_size,
                                          select=tuple(request.select or ()),
                                          include_annotations=True))
    served: set[str] = set()
    for _, expression in id_filter_batches(request.primary_key, ids):
        query = replace(step.query, filter=within_filter(request.row_filter, expression)
                        if request.row_filter else expression)
        async with aclosing(session.iter_pages(request.entity, query)) as pages:
            async for page in pages:
                _record_page(archive, progress, len(request.steps), step, page.url, page.body,
                             page.records, track_watermark=False,
                             primary_key=request.primary_key, next_link=page.next_link)
                served.update(str(r.get(request.primary_key)).lower() for r in page.records)
                fault_point("fetch.after_page")
    return [key for key in ids if key.lower() not in served]


async def _run_steps(session: SourceSession, archive: ChangeSetArchive, request: FetchRequest,
                     progress: _Progress, on_progress: ProgressCallback | None = None,
                     count_total: bool = False, divergence: Divergence | None = None,
                     start: int = 0) -> None:
    # A filtered entity's watermark comes from its changes step only: a record fetched by id
    # later may be newer than a change the changes step has not seen yet.
    for index, step in enumerate(request.steps):
        if index < start:
            continue
        track = step.kind in ("changes", "delta", "snapshot") or (
            request.mode == Mode.FILTERED and request.watermark_before is None
            and step.kind == "ids"
        )
        if step.ranges > 1:
            pages = session.iter_pages_in_ranges(request.entity, step.query,
                                                 request.primary_key, step.ranges)
        else:
            pages = session.iter_pages(request.entity, step.query, start_url=step.start_url)
        range_maxima: dict[int | None, str | None] = {}
        total = count = None
        if on_progress is not None and count_total and _reads_whole_table(request, step):
            count = await _count_for_progress(session, request, step)
            total = None if count is None else progress.records + count
        guard = PagingGuard(request, step, count)
        # Closed at once when a page is refused, so no request stays in flight.
        async with aclosing(pages):
            async for page in pages:
                guard.check(page.records, progress.page_number + 1)
                if divergence is not None:
                    (divergence.scan if step.kind == "keys" else divergence.served)(page.records)
                # Pages of parallel ranges interleave; archive numbers follow arrival order.
                _record_page(archive, progress, index, step, page.url, page.body, page.records,
                             track_watermark=track, primary_key=request.primary_key,
                             next_link=page.next_link, delta_link=page.delta_link)
                if step.ranges > 1 and track and request.mode == Mode.MODIFIEDON:
                    stamps = [r["modifiedon"] for r in page.records
                              if isinstance(r.get("modifiedon"), str)]
                    range_maxima[page.range_index] = max(
                        [*stamps, range_maxima.get(page.range_index) or ""]) or None
                if on_progress is not None:
                    on_progress(FetchProgress(progress.page_number, progress.records, total))
                fault_point("fetch.after_page")
        if step.ranges > 1 and track and request.mode == Mode.MODIFIEDON:
            progress.max_modifiedon = ranged_watermark(range_maxima.values())


def _tracking_read_ended(request: FetchRequest, progress: _Progress) -> bool:
    """Whether the change-tracking read came to its last page (one without a nextLink): only
    then is a missing deltaLink missing. A read cut short on purpose (a recording's page cap)
    has a nextLink on its last page and no delta link to expect."""
    tracking = [i for i, step in enumerate(request.steps) if step.query.track_changes]
    pages = [p for p in progress.pages if tracking and p["step"] == tracking[-1]]
    return bool(pages) and pages[-1]["next_link"] is None


async def _unknown_entity(session: SourceSession, entity: str) -> UnknownEntityError:
    """The org has no metadata for the entity and its URL is 404: a wrong name in the config."""
    names = await session.entity_set_names()
    close = difflib.get_close_matches(entity, names, n=3, cutoff=0.6) if names else []
    hint = f" (did you mean {', '.join(repr(n) for n in close)}?)" if close else ""
    return UnknownEntityError(
        f"{entity}: Dataverse has no entity set {entity!r} (404, and EntityDefinitions has no "
        f"table with that EntitySetName){hint}; fix 'name' in the entities config: it is the "
        "plural used in API URLs, e.g. 'accounts'", status=404)


async def _resolve_missing(session: SourceSession, archive: ChangeSetArchive,
                           request: FetchRequest, progress: _Progress,
                           gone: list[str] = ()) -> list[dict]:
    """Ids that had to come back but did not (the request's expected ids, and refetched ids
    `gone` since the scan): ask for each one (200 / 404 / other). With a row filter, one that
    exists but did not come back is outside the filter: recorded so, not archived."""
    missing: list[dict] = []
    step = FetchStep("record", PageQuery())
    expected = [i for i in request.expected_ids if i.lower() not in progress.seen_ids]
    for record_id in [*expected, *gone]:
        try:
            url, body, record = await session.get_record(request.entity, record_id,
                                                         tuple(request.select or ()))
        except DataverseRequestError as exc:
            missing.append({"id": record_id, "status": exc.status, "code": exc.code,
                            "message": str(exc)[:300]})
            continue
        if request.row_filter:
            missing.append({"id": record_id, "status": OUTSIDE_FILTER,
                            "message": f"outside the entity's filter {request.row_filter!r}"})
            continue
        _record_page(archive, progress, len(request.steps), step, url, body, [record],
                     track_watermark=False, primary_key=request.primary_key, shape="record")
    return missing


async def fetch_change_set(
    session: SourceSession, archive: ChangeSetArchive, request: FetchRequest,
    definition: dict | None, *, attribute_metadata: dict | None = None,
    on_progress: ProgressCallback | None = None,
    count_total: bool = False, mirrored_versions: MirroredVersions | None = None,
    page_sink: PageSink | None = None,
) -> FetchSummary:
    """Run the request's steps, archiving each page as it arrives; write the manifest last.

    `on_progress` is called after every page (see progress.ProgressReporter); with
    `count_total`, whole-table reads first ask the source for their `$count`, so progress
    can show an ETA. With `mirrored_versions`, a key scan is compared with the mirror by key
    and version, and what diverges is fetched again by id in the same change set (see
    Divergence). `page_sink` is handed every archived page with its parsed records.
    """
    started = time.perf_counter()
    started_at = utc_now_iso()
    stats = session.stats
    requests_before, retries_before, log_before = stats.requests, stats.retries, len(stats.log)
    wait_before = stats.throttle_wait
    while True:
        await _size_auto_ranges(session, request)
        archive.start()
        archive.write_json(REQUEST, request.as_dict())
        if definition is not None:
            archive.write_json(ENTITY_DEFINITION, definition)
        if attribute_metadata is not None:
            archive.write_json(ATTRIBUTE_METADATA, attribute_metadata)
        progress = _Progress(request, page_sink)
        divergence = (Divergence(mirrored_versions, request.primary_key,
                                 missing_too=request.mode != Mode.FILTERED)
                      if mirrored_versions is not None
                      and any(step.kind == "keys" for step in request.steps) else None)
        try:
            await _run_steps(session, archive, request, progress, on_progress, count_total,
                             divergence)
            if progress.delta_link is None and request.mode in TRACKING_READ_MODES \
                    and _tracking_read_ended(request, progress):
                again = without_annotations_for_delta_link(request)
                if again is not None:
                    request.steps.append(again)
                    request.reason = ((request.reason + "; ") if request.reason else "") + (
                        "no deltaLink with annotations: read again without them")
                    await _run_steps(session, archive, request, progress, on_progress,
                                     count_total, divergence, start=len(request.steps) - 1)
            gone = (await _refetch(session, archive, request, progress, divergence)
                    if divergence is not None and divergence.ids else [])
        except DataverseRequestError as exc:
            progress.flush(quiet=True)
            if exc.code == EXPIRED_DELTA_TOKEN and request.mode == Mode.CHANGE_TRACKING:
                request = resync_request(request, request.steps[0].query.page_size)
                if page_sink is not None:  # the archive starts again from page 1
                    page_sink.abandon("the change-tracking read started again")
                    page_sink = None
                continue
            if exc.status == 404 and definition is None and progress.page_number == 0:
                raise await _unknown_entity(session, request.entity) from None
            raise
        except BaseException:
            progress.flush(quiet=True)
            raise
        break
    try:
        missing = await _resolve_missing(session, archive, request, progress, gone)
    finally:
        progress.flush()
    fault_point("fetch.before_manifest")
    seconds = time.perf_counter() - started
    summary = FetchSummary(
        entity=request.entity, change_set=request.change_set, mode=request.mode,
        pages=progress.page_number, records=progress.records,
        bytes_archived=progress.archived_bytes, requests=stats.requests - requests_before,
        retries=stats.retries - retries_before, throttle_wait=stats.throttle_wait - wait_before,
        seconds=seconds, watermark_before=request.watermark_before,
        # A full snapshot has no watermark, and a targeted refresh must not move it.
        watermark_after=(progress.max_modifiedon
                         if request.mode not in (Mode.FULL, Mode.TARGETED) else None),
        delta_link_after=progress.delta_link, missing=len(missing), reason=request.reason,
    )
    archive.finish({
        "entity": request.entity,
        "change_set": request.change_set,
        "mode": request.mode,
        "reason": request.reason,
        "primary_key": request.primary_key,
        "started_at": started_at,
        "finished_at": utc_now_iso(),
        "reconciled": any(step.kind == "keys" for step in request.steps),
        # What the key-and-version scan found diverging (refetched by id): missing, stale.
        "reconcile": divergence.found() if divergence is not None else None,
        "summary": summary.__dict__,
        "missing": missing,
        "pages": progress.pages,
        "requests": [r.as_dict() for r in stats.log[log_before:]],
    })
    return summary
