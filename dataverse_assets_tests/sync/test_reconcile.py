"""A self-healing mirror: when the source's paging is not a snapshot (page-number paging over a
table that changes between pages; a delta token from the last page's moment), a plain sync
diverges from the source for good, and a reconcile by key and version makes it equal again:
missing records are fetched by id, stale ones refetched, extra ones deleted, all through the
normal publish (history, _change_history), and the `mirror_matches_source` check says so."""

import json
from collections import Counter
from urllib.parse import parse_qs, urlsplit

import pytest
from dagster import DagsterInstance

from dataverse_assets.config import Settings
from dataverse_assets.defs.checks import MIRROR_MATCHES_SOURCE
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.defs.partitions import register_change_set
from dataverse_assets.ops.cli import main as cli_main
from dataverse_assets.simulator import DataverseSimulator, serve_on_loopback
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets_tests.conftest import ENTITY_NAMES, SMALL_ROW_COUNTS, Mirror
from dataverse_assets_tests.truth import (
    PRIMARY_KEYS,
    canonical_rows,
    expected_records,
    without_annotations,
)

CHANGE_TRACKED, BY_MODIFIEDON = "vin_candidates", "vin_clinicaltrials"
EQUAL = {"missing": set(), "extra": set(), "stale": set()}


# The store of the mirror the test running makes (one mirror a test): set by `_each_store`.
_STORE: dict[str, str | None] = {"url": None}


@pytest.fixture(autouse=True, params=["sqlite", "postgresql"])
def _each_store(request):
    """Every test here runs in each kind of store (docs/store-backends.md)."""
    _STORE["url"] = (None if request.param == "sqlite"
                     else request.getfixturevalue("postgres_store_url"))
    yield
    _STORE["url"] = None


@pytest.fixture
def unsafe_source():
    """A simulator whose paging can lose rows, served on loopback."""
    simulator = DataverseSimulator(ENTITY_NAMES, seed=7, row_counts=SMALL_ROW_COUNTS,
                                   paging="page_number", delta_token_moment="last_page")
    with serve_on_loopback(simulator) as url:
        yield simulator, url


def unsafe_mirror(tmp_path, unsafe_source, entities: dict[str, int] | None = None,
                  **entity_options) -> Mirror:
    """A mirror of these entities (name: page size; by default both, in pages of 40 and 5)."""
    simulator, url = unsafe_source
    config = tmp_path / "entities.json"
    entities = entities or {CHANGE_TRACKED: 40, BY_MODIFIEDON: 5}
    config.write_text(json.dumps({"groups": {"hourly": {"cron": "0 * * * *"}}, "entities": [
        {"name": name, "group": "hourly", "page_size": page_size, **entity_options}
        for name, page_size in entities.items()]}))
    settings = Settings(db_path=tmp_path / "mirror.db", archive_dir=tmp_path / "archive",
                        entities_config_path=config, source="simulator",
                        store_url=_STORE["url"])
    source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=url)
    return Mirror(simulator, settings, build_definitions(settings, source=source),
                  DagsterInstance.ephemeral(), url)


def lose_rows_while_paging(simulator) -> dict[str, str]:
    """Between a first sync's pages: edit a record already served (a modifiedon read moves it
    to the end, so page-number paging skips the row after page 1), and in the change-tracked
    table edit one and delete another already served (the delta token, from the last page's
    moment, reports neither; the delete also shifts the pages: a row is skipped)."""
    trials = sorted(simulator.records(BY_MODIFIEDON),
                    key=lambda r: (r["modifiedon"], r["vin_clinicaltrialid"]))
    table = simulator.table(CHANGE_TRACKED)  # in key order, as Dataverse pages (GUID order)
    candidates = [table.key_to_pk[key] for key in table.order_keys]
    edited, deleted = candidates[3], candidates[7]
    simulator.inject("modify_records", entity=BY_MODIFIEDON,
                     pks=[trials[1]["vin_clinicaltrialid"]])
    # A request gets one fault: the edit comes before page 2, the delete before page 3, which
    # then starts a row late (pages of 40).
    simulator.inject("modify_records", entity=CHANGE_TRACKED, pks=[edited])
    simulator.inject("delete_records", entity=CHANGE_TRACKED, pks=[deleted])
    return {"skipped trial": trials[5]["vin_clinicaltrialid"], "edited": edited,
            "deleted": deleted, "skipped candidate": candidates[80]}


def divergence_of(mirror, entity: str) -> dict[str, set[str]]:
    truth = expected_records(mirror.simulator, entity)
    with mirror.connection() as connection:
        rows = canonical_rows(connection, entity)
    return {
        "missing": set(truth) - set(rows),
        "extra": set(rows) - set(truth),
        "stale": {key for key in set(rows) & set(truth)
                  if without_annotations(rows[key]["json_response"]) != truth[key]},
    }


def ids_asked_for(request) -> int:
    """How many records a request to the simulator asked for by id (its $filter's terms)."""
    query = parse_qs(urlsplit(request.target).query)
    return sum(term.count(f"{key} eq '") for key in PRIMARY_KEYS.values()
               for term in query.get("$filter", []))


def check_result(result, entity: str):
    (evaluation,) = [e for e in result.get_asset_check_evaluations()
                     if e.check_name == MIRROR_MATCHES_SOURCE
                     and e.asset_key.path[-1] == entity]
    return evaluation


def test_paging_that_is_not_a_snapshot_diverges_and_a_reconcile_repairs_it(
        tmp_path, unsafe_source, monkeypatch, capsys):
    mirror = unsafe_mirror(tmp_path, unsafe_source)
    lost = lose_rows_while_paging(mirror.simulator)
    mirror.sync("hourly")
    mirror.sync("hourly")  # a plain sync later: nothing brings the lost rows back
    assert divergence_of(mirror, BY_MODIFIEDON) == {
        "missing": {lost["skipped trial"]}, "extra": set(), "stale": set()}
    assert divergence_of(mirror, CHANGE_TRACKED) == {
        "missing": {lost["skipped candidate"]}, "extra": {lost["deleted"]},
        "stale": {lost["edited"]}}

    (tmp_path / "home").mkdir()
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert cli_main(["reconcile"]) == 0
    table = capsys.readouterr().out
    for entity in (BY_MODIFIEDON, CHANGE_TRACKED):
        assert divergence_of(mirror, entity) == EQUAL, entity
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    header = table.splitlines()[1].split()
    found = {entity: dict(zip(header, row, strict=True)) for entity, row in rows.items()
             if entity in (BY_MODIFIEDON, CHANGE_TRACKED)}
    assert (found[BY_MODIFIEDON]["missing"], found[BY_MODIFIEDON]["stale"]) == ("1", "0")
    assert [found[CHANGE_TRACKED][k] for k in ("missing", "stale", "extra")] == ["1", "1", "1"]
    with mirror.connection() as connection:
        # Through the normal publish: the stale version and the extra row are in history, the
        # repairs in _change_history.
        history = dict(connection.execute(
            f"SELECT {PRIMARY_KEYS[CHANGE_TRACKED]}, change_kind FROM {CHANGE_TRACKED}__history"
            " WHERE superseded_in = (SELECT max(change_set) FROM _staged WHERE entity = ?)",
            (CHANGE_TRACKED,)))
        kinds = dict(connection.execute(
            "SELECT record_id, kind FROM _change_history WHERE entity = ? AND change_set ="
            " (SELECT max(change_set) FROM _staged WHERE entity = ?)",
            (CHANGE_TRACKED, CHANGE_TRACKED)))
    assert history == {lost["edited"]: "update", lost["deleted"]: "delete"}
    assert kinds == {lost["edited"]: "update", lost["deleted"]: "delete",
                     lost["skipped candidate"]: "create"}


def test_the_check_reports_what_the_scan_found_then_passes(tmp_path, unsafe_source):
    mirror = unsafe_mirror(tmp_path, unsafe_source)
    lose_rows_while_paging(mirror.simulator)
    mirror.sync("hourly")
    job = mirror.defs.resolve_job_def("sync_hourly")
    run_config = {"ops": {f"raw__{e}": {"config": {"reconcile": True}}
                          for e in (CHANGE_TRACKED, BY_MODIFIEDON)},
                  "loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    outcomes = []
    for _ in range(2):
        partition = register_change_set(mirror.instance, "hourly")
        result = job.execute_in_process(instance=mirror.instance, partition_key=partition,
                                        run_config=run_config, raise_on_error=False)
        assert result.success
        outcomes.append({e: check_result(result, e) for e in (CHANGE_TRACKED, BY_MODIFIEDON)})
    first, second = outcomes
    assert not first[CHANGE_TRACKED].passed
    metadata = {k: v.value for k, v in first[CHANGE_TRACKED].metadata.items()}
    assert (metadata["missing"], metadata["stale"], metadata["extra"]) == (1, 1, 1)
    assert "repaired in this change set" in first[CHANGE_TRACKED].description
    assert not first[BY_MODIFIEDON].passed
    assert all(evaluation.passed for evaluation in second.values())


def test_a_change_tracked_table_is_reconciled_on_its_own_cadence(tmp_path, unsafe_source):
    """With the cadence due every change set, the next plain sync repairs the table."""
    mirror = unsafe_mirror(tmp_path, unsafe_source, reconcile_every_hours=1e-6)
    lost = lose_rows_while_paging(mirror.simulator)
    mirror.sync("hourly")
    assert divergence_of(mirror, CHANGE_TRACKED)["stale"] == {lost["edited"]}
    mirror.sync("hourly")
    for entity in (BY_MODIFIEDON, CHANGE_TRACKED):
        assert divergence_of(mirror, entity) == EQUAL, entity


def test_a_safe_source_with_nothing_diverging_refetches_nothing(tmp_path, simulator_url):
    simulator, url = simulator_url
    mirror = unsafe_mirror(tmp_path, (simulator, url), reconcile_every_hours=1e-6)
    mirror.sync("hourly")
    candidate = simulator.records(CHANGE_TRACKED)[0]["vin_candidateid"]
    simulator.update(CHANGE_TRACKED, candidate, {"vin_name": "changed normally"})
    sent = len(simulator.stats.request_log)
    _, result = mirror.run("hourly")
    assert result.success
    # The edit arrives through the delta; the scan finds nothing else: no request by id.
    assert not [r for r in list(simulator.stats.request_log)[sent:] if ids_asked_for(r)]
    assert all(check_result(result, e).passed for e in (CHANGE_TRACKED, BY_MODIFIEDON))
    assert divergence_of(mirror, CHANGE_TRACKED) == EQUAL


def test_more_than_fifty_divergent_records_are_refetched_in_batches_of_fifty(tmp_path):
    """120 records to refetch (80 stale, 40 missing) and 40 extra: a sync on the reconcile
    cadence repairs them all, asking for the 120 by id in three requests of at most 50."""
    simulator = DataverseSimulator(ENTITY_NAMES, seed=7,
                                   row_counts={**SMALL_ROW_COUNTS, CHANGE_TRACKED: 300},
                                   paging="page_number", delta_token_moment="last_page")
    with serve_on_loopback(simulator) as url:
        mirror = unsafe_mirror(tmp_path, (simulator, url), entities={CHANGE_TRACKED: 100},
                               reconcile_every_hours=1e-6)
        table = simulator.table(CHANGE_TRACKED)
        candidates = [table.key_to_pk[key] for key in table.order_keys]
        # Before page 2, 80 records page 1 served are edited; before page 3, 40 page 2 served
        # are deleted, so page 3 (page-number paging) starts 40 rows late.
        simulator.inject("modify_records", entity=CHANGE_TRACKED, pks=candidates[:80])
        simulator.inject("delete_records", entity=CHANGE_TRACKED, pks=candidates[100:140])
        mirror.sync("hourly")
        assert divergence_of(mirror, CHANGE_TRACKED) == {
            "missing": set(candidates[200:240]), "extra": set(candidates[100:140]),
            "stale": set(candidates[:80])}

        sent = len(simulator.stats.request_log)
        repair = mirror.sync("hourly")
        by_id = [ids_asked_for(request) for request in list(simulator.stats.request_log)[sent:]]
        assert divergence_of(mirror, CHANGE_TRACKED) == EQUAL
    assert [count for count in by_id if count] == [50, 50, 20]
    with mirror.connection() as connection:
        kinds = Counter(kind for (kind,) in connection.execute(
            "SELECT kind FROM _change_history WHERE entity = ? AND change_set = ?",
            (CHANGE_TRACKED, repair)))
    assert kinds == {"update": 80, "create": 40, "delete": 40}
