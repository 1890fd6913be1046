"""The latency-true simulator (simulator/latency.py) and the floor the limits imply
(simulator/floor.py). No timed tests: the latency's sleep is a fake that records each delay."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from dataverse_assets.ops import cli
from dataverse_assets.simulator import (
    DataverseSimulator,
    LatencyModel,
    ServiceProtectionLimits,
    create_app,
)
from dataverse_assets.simulator.floor import floor_report, floor_seconds, lower_bound_seconds

API = "/api/data/v9.2"
DATAVERSE = ServiceProtectionLimits.dataverse()


class RecordedSleep:
    """Stands in for asyncio.sleep: records each delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def _get_all(sim: DataverseSimulator, paths: list[str], page_size: int) -> list[httpx.Response]:
    """GET the paths concurrently through the ASGI app (no sockets), as one user."""

    async def run() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {sim.issue_access_token('app-user')}",
                   "Prefer": f"odata.maxpagesize={page_size}"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(sim)),
                                     base_url="http://sim.test", headers=headers) as c:
            return list(await asyncio.gather(*(c.get(p) for p in paths)))

    return asyncio.run(run())


# -- the latency model -------------------------------------------------------------------------

def test_a_page_costs_the_request_plus_its_rows() -> None:
    model = LatencyModel(per_request_seconds=0.2, per_row_seconds=0.001)
    assert model.delay(0) == pytest.approx(0.2)
    assert model.delay(300) == pytest.approx(0.5)


def test_dataverse_latency_serves_a_full_page_in_about_a_second() -> None:
    model = LatencyModel.dataverse()
    assert model.delay(5000) == pytest.approx(1.0)
    assert 0.2 <= model.delay(1) < 0.21


def test_jitter_is_seeded_and_bounded() -> None:
    model = LatencyModel(per_request_seconds=1.0, jitter=0.25, seed=7)
    rng, rng_again = model.rng(), model.rng()
    first = [model.delay(0, rng) for _ in range(50)]
    again = [model.delay(0, rng_again) for _ in range(50)]
    assert first == again
    assert all(0.75 <= d <= 1.25 for d in first) and len(set(first)) > 1


def test_the_simulator_waits_each_data_page_and_counts_it_as_execution_time() -> None:
    sim = DataverseSimulator(["teams"], row_counts={"teams": 20},
                             latency=LatencyModel(per_request_seconds=0.5, per_row_seconds=0.01))
    sim.limits = DATAVERSE
    sleep = sim.latency_sleep = RecordedSleep()
    [response] = _get_all(sim, [f"{API}/teams"], page_size=7)
    assert response.status_code == 200 and len(response.json()["value"]) == 7
    assert sleep.delays == [pytest.approx(0.57)]
    [logged] = [r for r in sim.stats.request_log if r.entity == "teams"]
    assert logged.rows == 7 and logged.latency_seconds == pytest.approx(0.57)
    # The modelled wait counts in full although the fake sleep took no time.
    assert 0.57 <= logged.execution_seconds < 0.57 + 1.0
    window = sim.protection.remaining_headers("app-user")
    assert (b"x-ms-ratelimit-time-remaining-xrm-requests",
            f"{1200 - logged.execution_seconds:,.2f}".encode()) in window


def test_a_rendered_page_is_served_again_from_the_cache_until_the_org_changes() -> None:
    """The realistic benchmark's pre-rendering: the same GET answered from memory, with its
    latency and execution time counted as before; a change in the org renders afresh."""
    sim = DataverseSimulator(["teams"], row_counts={"teams": 20},
                             latency=LatencyModel(per_request_seconds=0.5, per_row_seconds=0.01))
    sim.limits = DATAVERSE
    sim.response_cache = {}
    sleep = sim.latency_sleep = RecordedSleep()
    [first] = _get_all(sim, [f"{API}/teams"], page_size=7)
    [(key, (start, body, rows))] = sim.response_cache.items()
    assert body == first.content and rows == 7
    # Served from the cache, not rendered again: a marked copy of the body comes back.
    marked = body.replace(b'"value"', b'"value" ', 1)
    sim.response_cache[key] = (start, marked, rows)
    [again] = _get_all(sim, [f"{API}/teams"], page_size=7)
    assert again.content == marked
    assert sim.stats.rows_served["teams"] == 14
    assert sleep.delays == [pytest.approx(0.57)] * 2
    logged = [r for r in sim.stats.request_log if r.entity == "teams"]
    assert [r.rows for r in logged] == [7, 7]
    assert all(r.execution_seconds >= 0.57 for r in logged)
    # Another page size is another request; an edited row is another org.
    [other] = _get_all(sim, [f"{API}/teams"], page_size=5)
    assert len(other.json()["value"]) == 5
    pk = first.json()["value"][0]["teamid"]
    sim.update("teams", pk, {"name": "Renamed by the test"})
    [changed] = _get_all(sim, [f"{API}/teams"], page_size=7)
    assert changed.json()["value"][0]["name"] == "Renamed by the test"


def test_latency_is_off_by_default() -> None:
    sim = DataverseSimulator(["teams"], row_counts={"teams": 5})
    sleep = sim.latency_sleep = RecordedSleep()
    assert sim.latency is None
    _get_all(sim, [f"{API}/teams"], page_size=5)
    assert sleep.delays == []
    assert [r.latency_seconds for r in sim.stats.request_log] == [0.0]


def test_52_requests_in_flight_overlap_under_dataverse_limits() -> None:
    """Each page's wait returns only once all 52 are waiting: served one after another, the
    first wait would never end (the barrier's timeout fails the test instead of hanging)."""
    sim = DataverseSimulator(["teams"], row_counts={"teams": 100}, latency=LatencyModel.dataverse())
    sim.limits = DATAVERSE
    waiting: list[float] = []
    all_waiting = asyncio.Event()

    async def barrier(seconds: float) -> None:
        waiting.append(seconds)
        if len(waiting) == 52:
            all_waiting.set()
        await asyncio.wait_for(all_waiting.wait(), timeout=10)

    sim.latency_sleep = barrier
    responses = _get_all(sim, [f"{API}/teams"] * 52, page_size=50)
    assert [r.status_code for r in responses] == [200] * 52
    assert sim.stats.max_concurrency == 52 and sim.stats.throttled == 0
    assert waiting == [pytest.approx(0.2 + 50 * 0.8 / 5000)] * 52


# -- dataverse-assets simulator --realistic --------------------------------------------------------

def test_realistic_turns_on_the_latency_model_and_dataverse_limits() -> None:
    args = cli.build_parser().parse_args(["simulator", "--realistic", "--port", "0"])
    sim = cli.build_simulator(args)
    assert sim.latency == LatencyModel.dataverse(seed=42)
    assert sim.limits == ServiceProtectionLimits.dataverse()


def test_the_default_simulator_stays_instant_and_unlimited() -> None:
    sim = cli.build_simulator(cli.build_parser().parse_args(["simulator"]))
    assert sim.latency is None and not sim.limits.enabled
    limited = cli.build_simulator(
        cli.build_parser().parse_args(["simulator", "--limits", "dataverse"]))
    assert limited.latency is None and limited.limits == ServiceProtectionLimits.dataverse()


# -- the floor ---------------------------------------------------------------------------------

def test_52_one_second_pages_fit_in_one_second() -> None:
    assert floor_seconds([1.0] * 52, DATAVERSE) == pytest.approx(1.0)


def test_104_one_second_pages_take_two_rounds_of_52() -> None:
    assert floor_seconds([1.0] * 104, DATAVERSE) == pytest.approx(2.0)


def test_the_6001st_request_waits_for_the_window_to_slide() -> None:
    # 7,000 pages of 1 ms: 6,000 start at once (in rounds of 52), the rest at t = 300 s.
    floor = floor_seconds([0.001] * 7000, DATAVERSE)
    assert 300.0 < floor < 300.1
    assert floor == pytest.approx(300 + -(-1000 // 52) * 0.001)
    assert lower_bound_seconds([0.001] * 7000, DATAVERSE) == pytest.approx(300.001)


def test_the_execution_time_budget_holds_back_2000_one_second_pages() -> None:
    # 2,000 s of work at 52 in flight would take 38.5 s; but after 24 rounds (1,248 s
    # finished) the 1,200 s budget is spent and round 25 waits until round 1 leaves the window
    # at t = 301; rounds 25..39 then start a second apart: the last ends at t = 316.
    assert floor_seconds([1.0] * 2000, DATAVERSE) == pytest.approx(316.0)
    assert lower_bound_seconds([1.0] * 2000, DATAVERSE) == pytest.approx(2000 / 52)


def test_a_mix_starts_the_longest_pages_first() -> None:
    two_slots = ServiceProtectionLimits(max_concurrent=2)
    # Longest first: 2 s and 1 s at t=0, the other 1 s at t=1: done at 2 s (in the order
    # given, both 1 s pages first and the 2 s page at t=1, it would take 3 s).
    assert floor_seconds([1.0, 1.0, 2.0], two_slots) == pytest.approx(2.0)
    # 52 full pages and 52 half pages: the full ones, then the half ones.
    mixed = [1.0] * 52 + [0.5] * 52
    assert floor_seconds(mixed, DATAVERSE) == pytest.approx(1.5)
    # Unlimited: the longest page.
    assert floor_seconds([0.3, 2.5, 1.0], ServiceProtectionLimits()) == pytest.approx(2.5)
    assert floor_seconds([], DATAVERSE) == 0.0


def test_the_report_puts_a_measured_run_beside_the_floor() -> None:
    report = floor_report([5000] * 104, [1.0] * 104, DATAVERSE, measured_seconds=5.0)
    assert report.floor_seconds == pytest.approx(2.0) and report.ratio == pytest.approx(2.5)
    assert report.rows == 520_000
    assert "2.50 x the floor" in report.lines()[-1]
