"""One request budget per application user (source/budget.py): sessions in other threads and
other processes share its requests in flight and its Retry-After pauses, and follow the
server's x-ms-dop-hint. Observed from the simulator's side: what arrived, when, how many at
once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dataverse_assets.simulator import (
    DataverseSimulator,
    LatencyModel,
    ServiceProtectionLimits,
    serve_on_loopback,
)
from dataverse_assets.simulator.protection import REQUESTS_CODE
from dataverse_assets.source.budget import FileBudget
from dataverse_assets.source.query import PageQuery
from dataverse_assets.source.simulator import SimulatorSource

ROWS = 400


@contextmanager
def org(latency: float = 0.01) -> Iterator[tuple[DataverseSimulator, str]]:
    sim = DataverseSimulator(["accounts"], seed=5, row_counts={"accounts": ROWS},
                             latency=LatencyModel(per_request_seconds=latency))
    with serve_on_loopback(sim) as base:
        yield sim, base


def read_in_threads(base: str, budget_dir: Path, *, sessions: int = 2, ranges: int = 4,
                    max_concurrency: int = 2) -> list[list[str]]:
    """Each session (its own thread, event loop, HTTP client and budget file handles, as
    another process would have) reads every account in parallel key ranges."""
    results: list[list[str]] = [[] for _ in range(sessions)]
    errors: list[BaseException] = []

    def read(index: int) -> None:
        source = SimulatorSource(entity_names=["accounts"], base_url=base,
                                 max_concurrency=max_concurrency, budget_dir=str(budget_dir),
                                 retry_backoff_seconds=[0.05, 0.1, 0.2, 0.4, 0.8])

        async def main() -> None:
            async with source.open_session() as session:
                async for page in session.iter_pages_in_ranges(
                        "accounts", PageQuery(page_size=10), "accountid", ranges):
                    results[index].extend(r["accountid"] for r in page.records)

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def test_sessions_of_one_application_user_never_exceed_its_limit_together(tmp_path) -> None:
    with org() as (sim, base):
        results = read_in_threads(base, tmp_path / "budget", sessions=3, max_concurrency=2)
        expected = sorted(r["accountid"] for r in sim.records("accounts"))
    for ids in results:
        assert sorted(ids) == expected
    # Three sessions of four ranges each, each allowed 2 at once: alone they would send 6.
    assert sim.stats.max_concurrency == 2


def test_a_retry_after_one_session_gets_pauses_every_session(tmp_path) -> None:
    with org(latency=0.005) as (sim, base):
        sim.limits = ServiceProtectionLimits(
            max_requests=8, window_seconds=0.4, retry_after_granularity=0.25,
            push_penalty_seconds=0.05,
        )
        results = read_in_threads(base, tmp_path / "budget", sessions=2, max_concurrency=2)
        log = list(sim.stats.request_log)
        expected = sorted(r["accountid"] for r in sim.records("accounts"))
    assert all(sorted(ids) == expected for ids in results)
    throttles = [r for r in log if r.status == 429]
    assert throttles and set(sim.stats.throttled_by_code) == {REQUESTS_CODE}
    for throttle in throttles:
        # Requests already on their way when the 429 left may land just after it; after
        # that, no session sends anything until Retry-After has passed.
        quiet_from = throttle.finished + 0.05
        quiet_until = throttle.finished + throttle.retry_after - 0.01
        sent = [r for r in log if quiet_from < r.arrived < quiet_until]
        assert not sent, f"{len(sent)} request(s) sent during a {throttle.retry_after}s pause"


def test_the_servers_dop_hint_lowers_the_requests_in_flight(tmp_path) -> None:
    with org() as (sim, base):
        sim.limits = ServiceProtectionLimits(max_concurrent=52, dop_hint=1)
        # The first answers carry the hint; from then on one request at a time.
        read_in_threads(base, tmp_path / "budget", sessions=1, ranges=1, max_concurrency=4)
        sim.stats.max_concurrency = 0
        results = read_in_threads(base, tmp_path / "budget", sessions=2, max_concurrency=4)
        assert sim.stats.max_concurrency == 1
        assert all(len(set(ids)) == ROWS for ids in results)
    assert (tmp_path / "budget").is_dir()


HOLD_A_SLOT = textwrap.dedent("""
    import asyncio, sys, time
    from pathlib import Path
    from dataverse_assets.source.budget import FileBudget

    async def main():
        async with FileBudget(Path(sys.argv[1]), limit=1).slot():
            print("held", flush=True)
            time.sleep(600)

    asyncio.run(main())
""")


def test_a_killed_process_gives_its_slot_back(tmp_path) -> None:
    child = subprocess.Popen([sys.executable, "-c", HOLD_A_SLOT, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        budget = FileBudget(tmp_path, limit=1)

        async def acquire(timeout: float) -> bool:
            try:
                async with asyncio.timeout(timeout):
                    async with budget.slot():
                        return True
            except TimeoutError:
                return False

        assert not asyncio.run(acquire(0.3))  # the only slot is the child's
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        assert asyncio.run(acquire(10))
        budget.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_a_budget_allows_at_least_one_request() -> None:
    with pytest.raises(ValueError, match="at least one"):
        FileBudget(Path("unused"), limit=0)
