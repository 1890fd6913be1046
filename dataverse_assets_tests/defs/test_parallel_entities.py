"""A group's entities fetched at the same time within one Dagster run (defs.parallel_fetch),
under the application user's one request budget, key ranges included: observed from the
simulator's side (what was in flight when) and in the mirror (every entity exact), in each kind
of store (`store_url`) but where said."""

from __future__ import annotations

import time

import orjson
import pytest
from dagster import DagsterInstance

from dataverse_assets.config import Settings
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.defs.parallel_fetch import unclaimed_fetches
from dataverse_assets.simulator import DataverseSimulator, LatencyModel, serve_on_loopback
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.sync import fetch
from dataverse_assets_tests.conftest import (
    ENTITY_NAMES,
    SMALL_ROW_COUNTS,
    Mirror,
    failure_messages,
    write_entities_config,
)
from dataverse_assets_tests.helpers import key_range_of, most_at_once
from dataverse_assets_tests.truth import assert_mirror_equals_simulator

HOURLY_UNFILTERED = ["vin_candidates", "vin_clinicaltrials", "vin_vin_candidate_accountset",
                     "vin_vin_clinicaltrial_contactset", "vin_vin_candidate_clinicaltrialset"]
HOURLY = [*HOURLY_UNFILTERED, "accounts", "contacts"]
RANGED = "vin_clinicaltrials"  # modifiedon: its first sync splits into key ranges
LIMIT = 3


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request) -> str | None:
    """Each kind of store: None for SQLite in the test's folder, or a PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_store_url")


@pytest.fixture
def slow_org():
    """An org that takes 30 ms per request, so fetches last long enough to overlap or not."""
    sim = DataverseSimulator(ENTITY_NAMES, seed=11,
                             row_counts={**SMALL_ROW_COUNTS, RANGED: 200},
                             latency=LatencyModel(per_request_seconds=0.03))
    with serve_on_loopback(sim) as url:
        yield sim, url


def mirror(tmp_path, sim, url, parallel_entities: int, ranges: int = 4,
           store_url: str | None = None) -> Mirror:
    config = write_entities_config(tmp_path / "entities.json", page_size=20,
                                   overrides={RANGED: {"parallel_ranges": ranges}})
    settings = Settings(db_path=tmp_path / "mirror.db", archive_dir=tmp_path / "archive",
                        entities_config_path=config, source="simulator",
                        parallel_entities=parallel_entities, store_url=store_url)
    source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=url, max_concurrency=LIMIT,
                             budget_dir=str(tmp_path / "budget"),
                             retry_backoff_seconds=[0.01, 0.01, 0.01, 0.01, 0.01])
    return Mirror(sim, settings, build_definitions(settings, source=source),
                  DagsterInstance.ephemeral(), url)


def in_flight_entities(sim) -> int:
    """The most distinct entities that had a data request in flight at the same moment."""
    return most_at_once(sim.stats.request_log, lambda r: r.entity if (
        r.entity in HOURLY_UNFILTERED and "EntityDefinitions" not in r.target) else None)


def test_a_group_run_fetches_its_entities_at_once_within_the_budget(tmp_path, slow_org,
                                                                   store_url) -> None:
    sim, url = slow_org
    m = mirror(tmp_path, sim, url, parallel_entities=4, store_url=store_url)
    key, result = m.run("hourly")
    assert result.success, failure_messages(result)
    for entity in HOURLY:
        assert_mirror_equals_simulator(m, entity)
    # Several entities were read at once, never more requests than the budget together.
    assert in_flight_entities(sim) >= 2
    assert 2 <= sim.stats.max_concurrency <= LIMIT
    # The ranged entity's first sync went out as key ranges, in the same run.
    assert len(range_filters(sim)) == 4
    assert unclaimed_fetches() == 0


def range_filters(sim) -> set[str]:
    """The key-range conditions the ranged entity's requests carried."""
    return {key_range_of(r) for r in sim.stats.request_log if r.entity == RANGED} - {None}


def test_a_large_first_sync_is_split_by_the_records_it_counts(tmp_path, slow_org, monkeypatch,
                                                              store_url) -> None:
    """parallel_ranges 0 (the default): a first sync of 200 records at 50 per range (10,000
    outside this test) goes out as 4 key ranges; the next change set is one stream."""
    monkeypatch.setattr(fetch, "AUTO_RANGE_RECORDS", 50)
    sim, url = slow_org
    m = mirror(tmp_path, sim, url, parallel_entities=4, ranges=0, store_url=store_url)
    key = m.sync("hourly")
    assert_mirror_equals_simulator(m, RANGED)
    assert len(range_filters(sim)) == 4
    request = orjson.loads((m.settings.archive_dir / RANGED / key / "request.json").read_bytes())
    assert [step.get("ranges") for step in request["steps"]][0] == 4
    sim.stats.request_log.clear()
    with sim.lock:
        first = sim.records(RANGED)[0]
    sim.update(RANGED, first["vin_clinicaltrialid"], {"vin_name": "changed"})
    m.sync("hourly")
    assert_mirror_equals_simulator(m, RANGED)
    assert not range_filters(sim)


def test_an_entity_is_published_while_the_others_are_still_fetched(tmp_path,
                                                                   store_url) -> None:
    """Depth first: once an entity's fetch is done its staging and publish run, while a
    slower entity's pages are still arriving."""
    slow = "vin_vin_candidate_clinicaltrialset"  # 600 rows, 30 pages one after another
    sim = DataverseSimulator(ENTITY_NAMES, seed=11, row_counts={**SMALL_ROW_COUNTS, slow: 600},
                             latency=LatencyModel(per_request_seconds=0.03))
    with serve_on_loopback(sim) as url:
        m = mirror(tmp_path, sim, url, parallel_entities=4, store_url=store_url)
        _, result = m.run("hourly")
    assert result.success, failure_messages(result)
    clock = time.time() - time.monotonic()
    last_page = clock + max(r.finished for r in sim.stats.request_log if r.entity == slow)
    published = {e.step_key: e.timestamp for e in m.instance.all_logs(result.run_id)
                 if e.dagster_event and e.dagster_event.event_type_value == "STEP_SUCCESS"}
    assert published["canonical__vin_candidates"] < last_page
    assert_mirror_equals_simulator(m, slow)


# One store: what it counts is the fetches in flight, which no store changes.
def test_one_entity_at_a_time_when_asked(tmp_path, slow_org) -> None:
    sim, url = slow_org
    m = mirror(tmp_path, sim, url, parallel_entities=1)
    m.sync("hourly")
    for entity in HOURLY:
        assert_mirror_equals_simulator(m, entity)
    assert in_flight_entities(sim) == 1


def test_a_failing_entity_fails_alone_and_the_others_publish(tmp_path, slow_org,
                                                             store_url) -> None:
    sim, url = slow_org
    m = mirror(tmp_path, sim, url, parallel_entities=4, store_url=store_url)
    sim.inject("server_error", count=50, entity="vin_candidates", status=500, body="json")
    _, result = m.run("hourly")
    assert not result.success
    failed = {e.step_key for e in result.all_events if e.is_step_failure}
    assert failed == {"raw__vin_candidates"}
    for entity in HOURLY_UNFILTERED:
        if entity != "vin_candidates":
            assert_mirror_equals_simulator(m, entity)
    assert unclaimed_fetches() == 0
