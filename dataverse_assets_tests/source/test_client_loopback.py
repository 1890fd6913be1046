"""The live client against the simulator over real loopback HTTP: every behaviour production
will test it with (discovery, token refresh, throttling, 5xx, resets, malformed bodies, paging
safety, parallel key ranges), observed from both sides: the client's results and the
simulator's own record of what arrived when.

Timings use a fast retry policy and fractional Retry-After values, so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import re
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataverse_assets.archive.change_sets import ChangeSetArchive
from dataverse_assets.config import EntityConfig
from dataverse_assets.errors import AuthenticationError, DataverseRequestError, PagingError
from dataverse_assets.simulator import (
    SIMULATOR_CLIENT_ID,
    SIMULATOR_CLIENT_SECRET,
    SIMULATOR_TENANT_ID,
    DataverseSimulator,
    FaultPlan,
    ServiceProtectionLimits,
    create_app,
    serve_on_loopback,
)
from dataverse_assets.simulator.odata import guid_order_key
from dataverse_assets.simulator.protection import CONCURRENCY_CODE, REQUESTS_CODE
from dataverse_assets.source.auth import ClientCredentials
from dataverse_assets.source.client import DataverseClient, Page, RetryPolicy
from dataverse_assets.source.key_ranges import guid_sql_value
from dataverse_assets.source.live import LiveDataverseSource
from dataverse_assets.source.query import PageQuery
from dataverse_assets.sync.fetch import fetch_change_set
from dataverse_assets.sync.fetch_plan import plan_fetch

# Backoff 50, 100, 200, 400 ms without jitter: the schedule is visible in arrival times.
FAST = RetryPolicy(max_attempts=6, backoff_seconds=(0.05, 0.1, 0.2, 0.4, 0.8), jitter=0.0)


class ManualClock:
    """A clock the test moves, for token lifetimes (time.monotonic stays real elsewhere)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextmanager
def org(rows: int = 120, **options) -> Iterator[tuple[DataverseSimulator, str]]:
    sim = DataverseSimulator(["accounts"], seed=11, row_counts={"accounts": rows}, **options)
    with serve_on_loopback(sim) as base:
        yield sim, base


@asynccontextmanager
async def connect(
    base: str, *, secret: str = SIMULATOR_CLIENT_SECRET, max_concurrency: int = 4,
    policy: RetryPolicy = FAST, refresh_after: float = 3000.0, clock=time.monotonic,
    timeout: float = 10.0, deadline: float = 30.0,
) -> AsyncIterator[tuple[DataverseClient, ClientCredentials]]:
    async with httpx.AsyncClient(timeout=timeout) as http:
        credentials = ClientCredentials(
            http, org_url=base, client_id=SIMULATOR_CLIENT_ID, client_secret=secret,
            authority=base, refresh_after_seconds=refresh_after, clock=clock,
        )
        client = DataverseClient(http, credentials, org_url=base,
                                 max_concurrency=max_concurrency, retry_policy=policy,
                                 response_deadline_seconds=deadline)
        yield client, credentials


def read_accounts(base: str, *, ranges: int = 1, page_size: int = 20,
                  **options) -> tuple[list[Page], DataverseClient]:
    async def main() -> tuple[list[Page], DataverseClient]:
        async with connect(base, **options) as (client, _):
            query = PageQuery(page_size=page_size)
            pages = [p async for p in client.iter_pages_in_ranges(
                "accounts", query, "accountid", ranges)]
            return pages, client

    return asyncio.run(main())


def ids_of(pages: list[Page]) -> list[str]:
    return [record["accountid"] for page in pages for record in page.records]


def truth(sim: DataverseSimulator) -> list[str]:
    return [row["accountid"] for row in sim.records("accounts")]


def data_requests(sim: DataverseSimulator):
    return [r for r in sim.stats.request_log if r.entity == "accounts"]


# ---------------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------------


def test_tenant_is_discovered_from_the_challenge_then_a_token_is_issued() -> None:
    with org() as (sim, base):
        async def main() -> str | None:
            async with connect(base) as (client, credentials):
                assert credentials.tenant_id is None
                await client.get_json("accounts", params={"$top": "1"}, entity="accounts")
                return credentials.tenant_id

        assert asyncio.run(main()) == SIMULATOR_TENANT_ID
        assert sim.stats.token_requests == 1
        discovery = sim.stats.request_log[0]
        assert discovery.target == "/api/data/v9.2/" and discovery.status == 401


def test_a_token_is_refreshed_ahead_of_expiry_once_for_all_concurrent_callers() -> None:
    clock = ManualClock()
    with org(rows=200) as (sim, base):
        async def main() -> list[str]:
            async with connect(base, refresh_after=60, clock=clock) as (client, _):
                await client.get_json("accounts", params={"$top": "1"}, entity="accounts")
                clock.now += 61  # past the refresh point: the next callers need a new token
                await asyncio.gather(*(
                    client.get_json("accounts", params={"$top": "1"}, entity="accounts")
                    for _ in range(20)))
                assert sim.stats.token_requests == 2
                # Mid-paging: the token ages past its refresh point between pages.
                ids = []
                async for page in client.iter_pages("accounts", PageQuery(page_size=40)):
                    ids += [r["accountid"] for r in page.records]
                    if page.number == 2:
                        clock.now += 61
                return ids

        assert asyncio.run(main()) == truth(sim)
        assert sim.stats.token_requests == 3
        assert sim.stats.status_counts[401] == 1  # discovery only: no request was refused


def test_a_token_expiring_mid_paging_is_refreshed_once_and_paging_continues() -> None:
    with org(rows=400) as (sim, base):
        sim.inject("token_expiry", entity="accounts", after=5)
        pages, client = read_accounts(base, ranges=4)
        assert sorted(ids_of(pages)) == sorted(truth(sim))
        assert len(ids_of(pages)) == 400
        assert sim.stats.faults["token_expiry"] == 1
        refused = [r for r in data_requests(sim) if r.status == 401]
        assert refused, "the expiry must have been met mid-paging"
        # Every worker that met the 401 shares one refresh: one token at start, one after.
        assert sim.stats.token_requests == 2


def test_a_wrong_secret_is_a_clear_error_that_does_not_contain_the_secret() -> None:
    secret = "wrong-secret-0f7c1e2d9b"
    with org() as (_, base):
        async def main() -> None:
            async with connect(base, secret=secret) as (client, _):
                await client.get_json("accounts", entity="accounts")

        with pytest.raises(AuthenticationError) as excinfo:
            asyncio.run(main())
    message = str(excinfo.value)
    assert "invalid_client" in message and "DATAVERSE_CLIENT_SECRET" in message
    assert secret not in message and secret not in repr(excinfo.value)


def test_no_secret_or_token_reaches_the_manifest_or_the_archive(tmp_path: Path) -> None:
    secret = "s3cr3t-value-7d1b4c0a"
    with org(rows=90) as (sim, base):
        sim.client_secret = secret
        sim.inject("token_expiry", entity="accounts", after=1)  # a refresh mid-fetch too
        source = LiveDataverseSource(url=base, client_id=SIMULATOR_CLIENT_ID,
                                     client_secret=secret, authority=base)
        entity = EntityConfig(name="accounts", group="hourly", incremental="full",
                              page_size=25)
        archive = ChangeSetArchive(tmp_path, "accounts", "20260101T000000Z")
        summary = _run_fetch(source, entity, archive)
        tokens = sim.issued_access_tokens()
    assert summary.records == 90 and len(tokens) == 2
    manifest = orjson.loads(archive.manifest_path.read_bytes())
    for record in manifest["requests"]:
        assert {"url", "status", "attempt", "seconds", "bytes", "throttle_wait"} <= set(record)
    assert any(r["status"] == 401 for r in manifest["requests"])
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            text = gzip.decompress(data) if path.suffix == ".gz" else data
            for needle in (secret, *tokens, "Bearer", "Authorization"):
                assert needle.encode() not in text, f"{needle[:6]}... leaked into {path.name}"


# ---------------------------------------------------------------------------------------------
# Retry policy and throttling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranges,max_concurrency", [(4, 1), (6, 3)])
def test_retry_after_pauses_every_worker_and_nothing_is_sent_during_the_pause(
    ranges: int, max_concurrency: int
) -> None:
    with org(rows=400) as (sim, base):
        sim.limits = ServiceProtectionLimits(
            max_requests=8, window_seconds=0.4, retry_after_granularity=0.25,
            push_penalty_seconds=0.05,
        )
        # More ranges than slots: workers wait for a slot while a pause begins.
        pages, client = read_accounts(base, ranges=ranges, max_concurrency=max_concurrency)
        assert sorted(ids_of(pages)) == sorted(truth(sim))
        log = list(sim.stats.request_log)
    throttles = [r for r in log if r.status == 429]
    assert throttles and client.stats.throttled == len(throttles)
    assert set(sim.stats.throttled_by_code) == {REQUESTS_CODE}
    # With one slot nothing else is in flight when a 429 leaves the simulator, so nothing may
    # arrive until Retry-After has passed; with more, requests already on their way may land
    # just after it.
    grace = 0.0 if max_concurrency == 1 else 0.05
    for throttle in throttles:
        assert throttle.retry_after is not None and throttle.retry_after >= 0.25
        quiet_from = throttle.finished + grace
        quiet_until = throttle.finished + throttle.retry_after - 0.01
        sent = [r for r in log if quiet_from < r.arrived < quiet_until]
        assert not sent, f"{len(sent)} request(s) sent during a {throttle.retry_after}s pause"
    if max_concurrency == 1:
        assert sim.stats.requests_while_throttled == 0
    assert client.stats.throttle_wait >= 0.25


def test_server_errors_back_off_on_the_policy_schedule_then_succeed() -> None:
    with org(rows=30) as (sim, base):
        sim.inject("server_error", count=4, entity="accounts", status=503)
        pages, client = read_accounts(base, page_size=50)
        arrivals = [r.arrived for r in data_requests(sim)]
    assert ids_of(pages) == truth(sim)
    assert [r.status for r in data_requests(sim)] == [503] * 4 + [200]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    for gap, expected in zip(gaps, (0.05, 0.1, 0.2, 0.4), strict=True):
        assert expected <= gap <= expected + 0.15, gaps
    assert client.stats.retries == 4


def test_server_errors_that_persist_give_up_naming_entity_url_and_status() -> None:
    with org(rows=30) as (sim, base):
        sim.inject("server_error", count=10, entity="accounts", status=502, body="json")
        with pytest.raises(DataverseRequestError) as excinfo:
            read_accounts(base, page_size=50, policy=RetryPolicy(
                max_attempts=3, backoff_seconds=(0.01,), jitter=0.0))
        tokens = sim.issued_access_tokens()
    message = str(excinfo.value)
    assert message.startswith("accounts: GET ") and "/api/data/v9.2/accounts" in message
    assert "last status 502" in message and "3 attempts" in message
    assert not any(token in message for token in tokens)


def test_a_connection_reset_mid_body_is_retried() -> None:
    with org(rows=60) as (sim, base):
        sim.inject("reset", entity="accounts", after=1)
        pages, client = read_accounts(base, page_size=25)
        assert ids_of(pages) == truth(sim)
    assert sim.stats.faults["reset"] == 1
    assert client.stats.retries == 1
    assert [r.error for r in client.stats.log if r.error] == ["RemoteProtocolError"]


def test_a_slow_response_times_out_and_is_retried() -> None:
    with org(rows=30) as (sim, base):
        sim.inject("slow", entity="accounts", seconds=1.0)
        pages, client = read_accounts(base, page_size=50, timeout=0.3)
        assert ids_of(pages) == truth(sim)
    assert [r.error for r in client.stats.log if r.error] == ["timeout"]


def test_a_trickling_response_is_cut_at_the_deadline_and_retried() -> None:
    """A byte every 10 ms never trips httpx's per-read timeout (2 s here); the deadline on the
    whole response does, and the attempt is retried like any timeout."""
    with org(rows=30) as (sim, base):
        sim.inject("trickle", entity="accounts", seconds=0.01, chunk=1)
        started = time.monotonic()
        pages, client = read_accounts(base, page_size=50, timeout=2.0, deadline=0.3)
        assert ids_of(pages) == truth(sim)
    assert time.monotonic() - started < 3.0
    assert [r.error for r in client.stats.log if r.error] == ["deadline"]
    assert sim.stats.faults == {"trickle": 1}


def test_malformed_json_is_retried_then_reported() -> None:
    with org(rows=60) as (sim, base):
        sim.inject("malformed", count=2, entity="accounts", after=1)
        pages, client = read_accounts(base, page_size=25)
        assert ids_of(pages) == truth(sim)
        assert client.stats.retries == 2
        sim.inject("malformed", count=100, entity="accounts", body="html")
        with pytest.raises(DataverseRequestError, match="malformed"):
            read_accounts(base, page_size=25)
    assert sim.stats.faults["malformed"] >= 2 + FAST.max_attempts


def test_a_redirect_is_refused_naming_its_host_and_not_retried() -> None:
    with org(rows=30) as (sim, base):
        sim.inject("redirect", count=10, entity="accounts", host="https://elsewhere.invalid")
        with pytest.raises(DataverseRequestError) as excinfo:
            read_accounts(base)
    message = str(excinfo.value)
    assert message.startswith("accounts: GET ") and "\n" not in message
    assert "answered 302: redirect to https://elsewhere.invalid refused" in message
    assert "check DATAVERSE_URL" in message and excinfo.value.status == 302
    assert len(data_requests(sim)) == 1, "a redirect is not retried"


def test_concurrency_never_exceeds_the_client_limit() -> None:
    with org(rows=480) as (sim, base):
        # Every response takes 20 ms, so requests overlap at the simulator.
        sim.fault_plan = FaultPlan(rates={"slow": 1.0}, slow_seconds=(0.02, 0.02))
        pages, client = read_accounts(base, ranges=6, max_concurrency=3)
        assert sorted(ids_of(pages)) == sorted(truth(sim))
    assert sim.stats.max_concurrency == 3
    assert client.stats.max_in_flight == 3


def test_the_concurrency_limit_429_is_honoured_and_the_read_completes() -> None:
    with org(rows=240) as (sim, base):
        sim.fault_plan = FaultPlan(rates={"slow": 1.0}, slow_seconds=(0.03, 0.03))
        sim.limits = ServiceProtectionLimits(
            max_concurrent=2, concurrency_retry_after=0.05, retry_after_granularity=0.05)
        pages, client = read_accounts(base, ranges=4, max_concurrency=4)
        assert sorted(ids_of(pages)) == sorted(truth(sim))
    assert sim.stats.throttled_by_code[CONCURRENCY_CODE] >= 1
    assert client.stats.throttled == sim.stats.throttled


# ---------------------------------------------------------------------------------------------
# Paging
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [1, 2])
def test_a_repeated_next_link_stops_with_a_paging_error(page: int) -> None:
    with org(rows=100) as (sim, base):
        # The link points back at the page just served (on page 1: the first request's URL).
        sim.inject("repeat_next_link", entity="accounts", after=page - 1, paging_only=False)
        with pytest.raises(PagingError, match="repeated a nextLink"):
            read_accounts(base, page_size=20)
    assert sim.stats.faults["repeat_next_link"] == 1
    assert len(data_requests(sim)) == page


@pytest.mark.parametrize("ranges", [1, 4])
def test_a_new_next_link_to_the_same_page_stops_the_read_and_keeps_its_pages(
    ranges: int, tmp_path: Path,
) -> None:
    """The endless_next_link fault serves a page again and again, each time under a new link
    (the client's repeated-link check never fires). With parallel key ranges the pages of the
    ranges interleave; the repeat is still the range's own page."""
    with org(rows=500) as (sim, base):
        source = LiveDataverseSource(url=base, client_id=SIMULATOR_CLIENT_ID,
                                     client_secret=SIMULATOR_CLIENT_SECRET, authority=base)
        entity = EntityConfig(name="accounts", group="hourly", incremental="full",
                              page_size=40, parallel_ranges=ranges)
        archive = ChangeSetArchive(tmp_path, "accounts", "20260101T000000Z")
        # A few good pages first; then one range's page is served again under new links.
        sim.inject("endless_next_link", count=300, entity="accounts", after=3)
        with pytest.raises(PagingError) as excinfo:
            _run_fetch(source, entity, archive)
        served = len(data_requests(sim))
    message = str(excinfo.value)
    assert message.startswith("accounts: change set 20260101T000000Z, snapshot read: page ")
    assert re.search(r"page (\d+) repeats page (\d+) \(the same 40 keys and versions", message)
    assert "paging without progress" in message
    assert "the next run reads these changes again" in message
    assert "DATAVERSE_URL" in message and "\n" not in message
    assert served < 20, "the read went on after the repeat"
    assert archive.page_paths() and not archive.is_complete()


def test_max_pages_stops_a_read_that_needs_more_pages(tmp_path: Path) -> None:
    with org(rows=100) as (_, base):
        source = LiveDataverseSource(url=base, client_id=SIMULATOR_CLIENT_ID,
                                     client_secret=SIMULATOR_CLIENT_SECRET, authority=base)
        entity = EntityConfig(name="accounts", group="hourly", incremental="full",
                              page_size=20, max_pages=3)
        archive = ChangeSetArchive(tmp_path, "accounts", "20260101T000000Z")
        with pytest.raises(PagingError) as excinfo:
            _run_fetch(source, entity, archive)
    message = str(excinfo.value)
    assert "snapshot read: page 4 is its page 4, over the entity's max_pages of 3" in message
    assert "raise max_pages for this entity" in message
    assert len(archive.page_paths()) == 3 and not archive.is_complete()


@pytest.mark.parametrize("ranges", [1, 3])
def test_records_changed_or_deleted_between_pages_are_never_served_twice(ranges: int) -> None:
    with org(rows=300) as (sim, base):
        before = set(truth(sim))
        sim.inject("modify_records", count=4, entity="accounts", rows=3)
        sim.inject("delete_records", count=4, entity="accounts", rows=2)
        pages, _ = read_accounts(base, ranges=ranges, page_size=25)
        after = set(truth(sim))
    ids = ids_of(pages)
    assert len(ids) == len(set(ids)), "a record was served twice"
    deleted = before - after
    assert len(deleted) == 8 and sim.stats.faults["modify_records"] == 4
    assert before - deleted <= set(ids) <= before


def test_parallel_ranges_are_balanced_in_sql_server_guid_order() -> None:
    with org(rows=2000) as (sim, base):
        pages, _ = read_accounts(base, ranges=4, page_size=250)
        assert sorted(ids_of(pages)) == sorted(truth(sim))
    per_range = Counter()
    for page in pages:
        per_range[page.range_index] += len(page.records)
        keys = [guid_order_key(r["accountid"]) for r in page.records]
        assert keys == sorted(keys), "each range is ordered by the key"
    assert sorted(per_range) == [0, 1, 2, 3]
    assert all(400 <= n <= 600 for n in per_range.values()), per_range
    assert [p.number for p in pages] == list(range(1, len(pages) + 1))


def test_parallel_ranges_stream_into_the_archive_with_sequential_page_numbers(
    tmp_path: Path,
) -> None:
    with org(rows=500) as (sim, base):
        source = LiveDataverseSource(url=base, client_id=SIMULATOR_CLIENT_ID,
                                     client_secret=SIMULATOR_CLIENT_SECRET, authority=base)
        entity = EntityConfig(name="accounts", group="hourly", incremental="full",
                              page_size=40, parallel_ranges=4)
        archive = ChangeSetArchive(tmp_path, "accounts", "20260101T000000Z")
        summary = _run_fetch(source, entity, archive)
        expected = sorted(truth(sim))
    manifest = orjson.loads(archive.manifest_path.read_bytes())
    assert [p["number"] for p in manifest["pages"]] == list(range(1, summary.pages + 1))
    assert [p.name for p in archive.page_paths()] == [
        f"page-{n:05d}.json.gz" for n in range(1, summary.pages + 1)]
    archived = [r["accountid"] for body in archive.iter_page_bodies()
                for r in orjson.loads(body)["value"]]
    assert sorted(archived) == expected and summary.records == 500
    filters = {dict(parse_qsl(urlsplit(p["url"]).query))["$filter"] for p in manifest["pages"]}
    assert len(filters) == 4  # one per key range
    request = orjson.loads((archive.path / "request.json").read_bytes())
    assert request["steps"][0]["ranges"] == 4


def test_key_range_arithmetic_matches_the_simulators_guid_order() -> None:
    sim = DataverseSimulator(["accounts"], seed=3, row_counts={"accounts": 300})
    ids = truth(sim)
    assert sorted(ids, key=guid_sql_value) == sorted(ids, key=guid_order_key) == ids


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(0, 300), page_size=st.integers(1, 60), ranges=st.integers(1, 5),
       seed=st.integers(0, 10_000), lazy=st.booleans())
def test_paging_through_the_client_returns_every_row_exactly_once(
    rows: int, page_size: int, ranges: int, seed: int, lazy: bool
) -> None:
    # In-process (the same client, httpx's ASGI transport): fast enough for many examples.
    sim = DataverseSimulator(["vin_candidates"], seed=seed, row_counts={"vin_candidates": rows},
                             lazy_entities=["vin_candidates"] if lazy else ())
    org_url = "http://simulator.test"

    async def main() -> list[Page]:
        transport = httpx.ASGITransport(app=create_app(sim))
        async with httpx.AsyncClient(transport=transport) as http:
            credentials = ClientCredentials(
                http, org_url=org_url, client_id=SIMULATOR_CLIENT_ID,
                client_secret=SIMULATOR_CLIENT_SECRET, authority=org_url)
            client = DataverseClient(http, credentials, org_url=org_url, max_concurrency=3,
                                     retry_policy=FAST)
            return [p async for p in client.iter_pages_in_ranges(
                "vin_candidates", PageQuery(page_size=page_size), "vin_candidateid", ranges)]

    pages = asyncio.run(main())
    served = [r["vin_candidateid"] for p in pages for r in p.records]
    expected = [r["vin_candidateid"] for r in sim.records("vin_candidates")]
    assert len(served) == len(set(served)) == rows
    assert sorted(served) == sorted(expected)
    assert all(len(p.records) <= page_size for p in pages)
    if ranges == 1:
        assert served == expected


def _run_fetch(source: LiveDataverseSource, entity: EntityConfig, archive: ChangeSetArchive,
               watermark: str | None = None):
    """One change set of the entity fetched into the archive, as raw/E does it."""
    async def main():
        async with source.open_session() as session:
            definition = await session.entity_definition(entity.name)
            request = plan_fetch(entity, archive.change_set, definition, watermark=watermark)
            return await fetch_change_set(session, archive, request, definition)

    return asyncio.run(main())


def _fetch(base: str, entity: EntityConfig, root: Path, change_set: str,
           watermark: str | None):
    source = LiveDataverseSource(url=base, client_id=SIMULATOR_CLIENT_ID,
                                 client_secret=SIMULATOR_CLIENT_SECRET, authority=base)
    archive = ChangeSetArchive(root, entity.name, change_set)
    summary = _run_fetch(source, entity, archive, watermark)
    records: dict[str, list[dict]] = {}
    for page in orjson.loads(archive.manifest_path.read_bytes())["pages"]:
        body = gzip.decompress((archive.path / f"page-{page['number']:05d}.json.gz").read_bytes())
        key = dict(parse_qsl(urlsplit(page["url"]).query)).get("$filter", "")
        records.setdefault(key, []).extend(orjson.loads(body)["value"])
    return summary, records


def test_a_ranged_modifiedon_first_sync_sets_a_watermark_that_misses_no_change(
    tmp_path: Path,
) -> None:
    entity = EntityConfig(name="accounts", group="hourly", incremental="modifiedon",
                          page_size=20, parallel_ranges=3)
    with org(rows=300) as (sim, base):
        # Other users edit records while the first sync pages through the ranges.
        sim.inject("modify_records", count=6, entity="accounts", rows=2)
        first, by_range = _fetch(base, entity, tmp_path, "20260101T000000Z", None)
        assert first.mode == "modifiedon" and len(by_range) == 3
        maxima = [max(r["modifiedon"] for r in rows) for rows in by_range.values()]
        assert first.watermark_after == min(maxima)
        second, changed = _fetch(base, entity, tmp_path, "20260101T010000Z",
                                 first.watermark_after)
        truth_rows = {r["accountid"]: r for r in sim.records("accounts")}
    latest: dict[str, dict] = {}
    for rows in [*by_range.values(), *changed.values()]:
        for row in rows:
            latest[row["accountid"]] = row  # later pages and the next change set win
    edited = {pk for pk, row in truth_rows.items() if row["name"].endswith(" (edited)")}
    assert len(edited) == 12 and sim.stats.faults["modify_records"] == 6
    for pk in edited:
        assert latest[pk]["@odata.etag"] == truth_rows[pk]["@odata.etag"], (
            "an edit made during the first sync was lost")
    assert second.watermark_after >= first.watermark_after


def test_memory_stays_flat_while_paging_a_large_table() -> None:
    # With the collector off, a page body kept alive by a reference cycle would never be
    # freed: memory would grow by a page per page. Streaming means it does not grow at all.
    with org(rows=15_000, lazy_entities=["accounts"]) as (_, base):
        async def main() -> list[int]:
            traced: list[int] = []
            async with connect(base) as (client, _):
                async for page in client.iter_pages("accounts", PageQuery(page_size=500)):
                    if page.number in (5, 30):
                        traced.append(tracemalloc.get_traced_memory()[0])
            return traced

        gc.disable()
        tracemalloc.start()
        try:
            at_page_5, at_page_30 = asyncio.run(main())
        finally:
            tracemalloc.stop()
            gc.enable()
    assert at_page_30 - at_page_5 < 3_000_000, (at_page_5, at_page_30)
