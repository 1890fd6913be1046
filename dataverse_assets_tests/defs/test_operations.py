"""Operating the mirror: schedules, sensors, retry tiers and dead letters, targeted refresh,
status; in each kind of store but where said."""

import asyncio
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from dagster import (
    AssetKey,
    DagsterEventType,
    SensorResult,
    SkipReason,
    build_run_status_sensor_context,
    build_schedule_context,
    build_sensor_context,
)

from dataverse_assets.defs.partitions import register_change_set
from dataverse_assets.ops import cli
from dataverse_assets.store import dead_letters
from dataverse_assets.sync import steps
from dataverse_assets.sync.faults import armed
from dataverse_assets_tests.conftest import failure_messages
from dataverse_assets_tests.helpers import source_of, store_of
from dataverse_assets_tests.truth import assert_mirror_equals_simulator, canonical_rows


@pytest.fixture
def mirror(each_mirror):
    """The tests run in each kind of store (docs/store-backends.md)."""
    return each_mirror


def run_request(mirror, request):
    """Execute a sensor's run request the way the daemon would."""
    group = "daily" if any(k.path[-1] in ("systemusers", "teams", "businessunits")
                           for k in request.asset_selection or []) else "hourly"
    job = mirror.defs.resolve_job_def(f"sync_{group}")
    result = job.execute_in_process(
        instance=mirror.instance, partition_key=request.partition_key, raise_on_error=False,
        asset_selection=list(request.asset_selection),
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
    assert result.success, failure_messages(result)
    return result


class Tick:
    """What a sensor returned, normalised: run requests, cursor, skip message."""

    def __init__(self, result) -> None:
        self.run_requests = []
        self.cursor = None
        self.skip_message = None
        self.partition_requests = []
        if isinstance(result, SensorResult):
            self.run_requests = list(result.run_requests or [])
            self.cursor = result.cursor
            self.skip_message = result.skip_reason.skip_message if result.skip_reason else None
            self.partition_requests = list(result.dynamic_partitions_requests or [])
        elif isinstance(result, SkipReason):
            self.skip_message = result.skip_message
        else:
            self.run_requests = list(result or [])


def evaluate(mirror, sensor_name, cursor=None) -> Tick:
    """Evaluate a sensor as the daemon would, and apply its partition requests."""
    sensor = mirror.defs.resolve_sensor_def(sensor_name)
    context = build_sensor_context(
        instance=mirror.instance, cursor=cursor, definitions=mirror.defs,
        resources={"store": store_of(mirror), "source": source_of(mirror)})
    tick = Tick(sensor(context))
    for request in tick.partition_requests:
        mirror.instance.add_dynamic_partitions(request.partitions_def_name,
                                               list(request.partition_keys))
    return tick


# One store: a schedule's tick touches none.
def test_schedule_tick_registers_its_change_set_and_requests_the_group(make_mirror):
    mirror = make_mirror()
    schedule = mirror.defs.resolve_schedule_def("hourly_schedule")
    assert schedule.cron_schedule == "0 * * * *"
    moment = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    context = build_schedule_context(instance=mirror.instance, scheduled_execution_time=moment,
                                     repository_def=mirror.defs.get_repository_def())
    data = schedule.evaluate_tick(context)
    (request,) = data.run_requests
    assert request.partition_key == "20261122T100000Z"
    assert request.run_key == "hourly:20261122T100000Z"
    assert mirror.instance.has_dynamic_partition("change_sets_hourly", "20261122T100000Z")
    # The same tick evaluated again asks for the same change set (the run key dedupes it).
    assert schedule.evaluate_tick(context).run_requests[0].run_key == request.run_key


def test_change_sensor_runs_only_the_changed_entities(mirror):
    first = evaluate(mirror, "hourly_changes_sensor")
    (request,) = first.run_requests
    assert {k.path[-1] for k in request.asset_selection} == {
        "vin_candidates", "vin_clinicaltrials", "vin_vin_candidate_accountset",
        "vin_vin_clinicaltrial_contactset", "vin_vin_candidate_clinicaltrialset", "accounts",
        "contacts"}
    # Until that run publishes, a new tick does not launch the same entities again.
    again = evaluate(mirror, "hourly_changes_sensor", cursor=first.cursor)
    assert not again.run_requests
    run_request(mirror, request)

    quiet = evaluate(mirror, "hourly_changes_sensor", cursor=first.cursor)
    assert not quiet.run_requests and "no changes" in quiet.skip_message

    mirror.simulator.update("vin_clinicaltrials",
                            mirror.simulator.records("vin_clinicaltrials")[0]
                            ["vin_clinicaltrialid"], {"vin_name": "Probe me"})
    mirror.simulator.reset_stats()
    tick = evaluate(mirror, "hourly_changes_sensor", cursor=quiet.cursor or first.cursor)
    (request,) = tick.run_requests
    # The trial changed, and accounts follow the trials' sponsor lookup.
    assert {k.path[-1] for k in request.asset_selection} == {"vin_clinicaltrials", "accounts"}
    assert mirror.simulator.stats.rows_served["vin_candidates"] == 0  # probes are one row
    assert mirror.instance.has_dynamic_partition("change_sets_hourly", request.partition_key)
    run_request(mirror, request)
    assert_mirror_equals_simulator(mirror, "vin_clinicaltrials")


def test_change_sensor_sees_a_write_in_the_watermarks_own_second(mirror):
    """The probe compares the etags of the records stamped in the watermark's second: a
    write after the last read carries that same stamp, and `modifiedon gt` cannot see it."""
    simulator = mirror.simulator
    keys = sorted(r["vin_clinicaltrialid"] for r in simulator.records("vin_clinicaltrials"))
    simulator.advance_clock(3600)  # every write below gets one stamp, however slow the test
    simulator.update("vin_clinicaltrials", keys[0], {"vin_name": "Read by the sync"})
    mirror.sync("hourly")
    quiet = evaluate(mirror, "hourly_changes_sensor")
    assert not quiet.run_requests and "no changes" in quiet.skip_message

    simulator.update("vin_clinicaltrials", keys[1], {"vin_name": "Same second, later"})
    (request,) = evaluate(mirror, "hourly_changes_sensor").run_requests
    assert {k.path[-1] for k in request.asset_selection} == {"vin_clinicaltrials", "accounts"}
    run_request(mirror, request)
    assert_mirror_equals_simulator(mirror, "vin_clinicaltrials")
    assert not evaluate(mirror, "hourly_changes_sensor").run_requests

    # A record the mirror holds at the watermark's stamp, written again in that second.
    simulator.update("vin_clinicaltrials", keys[0], {"vin_name": "Changed again"})
    (request,) = evaluate(mirror, "hourly_changes_sensor").run_requests
    assert "vin_clinicaltrials" in {k.path[-1] for k in request.asset_selection}


def test_archive_sensor_publishes_change_sets_fetched_elsewhere(mirror):
    mirror.sync("hourly")
    mirror.simulator.create("vin_candidates", {"vin_name": "Fetched by another process"})
    entity = mirror.settings.entities.entity("vin_candidates")
    key = "29990101T000000Z"
    steps.fetch(store_of(mirror), source_of(mirror), entity, key)  # another process's fetch

    tick = evaluate(mirror, "archive_change_sets_sensor")
    (request,) = tick.run_requests
    assert request.partition_key == key and request.run_key == f"archive:vin_candidates:{key}"
    assert {tuple(k.path) for k in request.asset_selection} == {
        ("staging", "vin_candidates"), ("canonical", "vin_candidates")}
    assert mirror.instance.has_dynamic_partition("change_sets_hourly", key)
    run_request(mirror, request)
    assert_mirror_equals_simulator(mirror, "vin_candidates")
    assert not evaluate(mirror, "archive_change_sets_sensor").run_requests


def test_failed_change_sets_are_retried_later_then_dead_lettered(mirror):
    mirror.sync("daily")
    mirror.simulator.create("teams", {"name": "Ops"})
    with armed("publish.mid_plan"):
        key, result = mirror.run("daily")
    assert not result.success
    failure = next(e for e in result.all_events
                   if e.event_type == DagsterEventType.STEP_FAILURE
                   and e.step_key == "canonical__teams")
    sensor = mirror.defs.resolve_sensor_def("record_failed_change_sets")
    context = build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_event=failure, dagster_instance=mirror.instance,
        dagster_run=result.dagster_run, resources={"store": store_of(mirror)})
    sensor(context.for_run_failure())
    with mirror.connection() as connection:
        queued = connection.execute(
            "SELECT entity, change_set, attempts FROM _retry_queue ORDER BY entity").fetchall()
        assert ("teams", key, 1) in queued
        # Not due yet: the scheduled tier waits.
        assert not [r for r in dead_letters.due_retries(connection) if r.entity == "teams"]
        later = datetime.now(UTC) + timedelta(minutes=6)
        assert ("teams", key) in {(r.entity, r.change_set)
                                  for r in dead_letters.due_retries(connection, later)}
        # Every scheduled attempt fails too: the change set becomes a dead letter.
        for attempt in range(3):
            outcome = dead_letters.record_failure(connection, "teams", key, "still failing",
                                                  now=later + timedelta(hours=attempt * 3))
        assert outcome == "dead_letter"
        (letter,) = [d for d in dead_letters.list_dead_letters(connection)
                     if d["entity"] == "teams"]
    details = dead_letters.get_dead_letter(mirror.connection(), letter["id"])
    assert details["diagnostics"]["publish_state"]["status"] == "FAILED"
    assert len(details["retry_history"]) == 4
    assert "injected fault at publish.mid_plan" in details["retry_history"][0]["error"]


def test_requeue_publishes_a_dead_letter_once_the_fault_is_gone(mirror, tmp_path,
                                                               monkeypatch, capsys):
    mirror.sync("daily")
    created = mirror.simulator.create("teams", {"name": "Requeued"})
    with armed("publish.mid_execute"):
        key, result = mirror.run("daily")
    assert not result.success
    with mirror.connection() as connection:
        for _ in range(4):
            dead_letters.record_failure(connection, "teams", key, "publish failed",
                                        delays=(timedelta(0),) * 3)
        (letter,) = [d for d in dead_letters.list_dead_letters(connection)
                     if d["entity"] == "teams"]
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)

    assert cli.main(["dlq", "list", "--json"]) == 0
    listed = orjson.loads(capsys.readouterr().out)
    assert [(d["entity"], d["change_set"], d["status"]) for d in listed] == [
        ("teams", key, "open")]
    assert cli.main(["dlq", "requeue", str(letter["id"])]) == 0
    assert created["teamid"] in canonical_rows(mirror.connection(), "teams")
    assert_mirror_equals_simulator(mirror, "teams")
    with mirror.connection() as connection:
        assert dead_letters.get_dead_letter(connection, letter["id"])["status"] == "resolved"
    assert cli.main(["dlq", "show", "999"]) == 1


def test_targeted_refresh_touches_only_the_given_records(mirror, tmp_path, monkeypatch,
                                                         capsys):
    simulator = mirror.simulator
    mirror.sync("hourly")
    with mirror.connection() as connection:
        accounts_before = canonical_rows(connection, "accounts")
        contacts_before = canonical_rows(connection, "contacts")
        watermark = connection.execute(
            "SELECT watermark FROM _sync_state WHERE entity = 'accounts'").fetchone()[0]
    target, other = sorted(accounts_before)[:2]
    simulator.update("accounts", target, {"name": "Refreshed account"})
    simulator.update("accounts", other, {"name": "Not asked for"})
    pointing = [c["contactid"] for c in simulator.records("contacts")
                if c.get("_parentcustomerid_value") == target and c["contactid"] in
                contacts_before]
    for contact in pointing:
        simulator.update("contacts", contact, {"jobtitle": "Refreshed via its account"})
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)

    assert cli.main(["refresh", "accounts", "--id", target,
                     "--with", "contacts:_parentcustomerid_value"]) == 0

    with mirror.connection() as connection:
        accounts_after = canonical_rows(connection, "accounts")
        contacts_after = canonical_rows(connection, "contacts")
        assert connection.execute(
            "SELECT watermark, mode FROM _sync_state WHERE entity = 'accounts'"
        ).fetchone() == (watermark, "filtered")
    assert accounts_after[target]["name"] == "Refreshed account"
    assert accounts_after[other] == accounts_before[other]  # not part of the refresh
    for key, row in accounts_before.items():
        if key != target:
            assert accounts_after[key]["sync_time"] == row["sync_time"]
    for contact in pointing:
        assert contacts_after[contact]["jobtitle"] == "Refreshed via its account"
    unchanged = set(contacts_before) - set(pointing)
    assert all(contacts_after[c] == contacts_before[c] for c in unchanged)
    # The regular next change set still picks up the account nobody refreshed.
    mirror.sync("hourly")
    assert canonical_rows(mirror.connection(), "accounts")[other]["name"] == "Not asked for"


def test_status_reports_every_entity_as_json(mirror, tmp_path, monkeypatch, capsys):
    mirror.sync("daily")
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    assert cli.main(["status", "--json"]) == 0
    rows = {r["entity"]: r for r in orjson.loads(capsys.readouterr().out)}
    assert rows["teams"]["publish_status"] == "COMPLETE"
    assert rows["teams"]["rows"] == len(mirror.simulator.records("teams"))
    assert rows["teams"]["mode"] == "change_tracking"
    assert rows["vin_candidates"]["sync_status"] == "never synced"
    assert rows["teams"]["dead_letters"] == 0


@pytest.mark.parametrize("entity", ["accounts"])
def test_one_entity_can_be_materialized_alone(mirror, entity):
    """`raw/E+` works for a filtered entity too: its links come from canonical."""
    mirror.sync("hourly")
    mirror.simulator.update(entity, sorted(canonical_rows(mirror.connection(), entity))[0],
                            {"name": "Alone"})
    key, result = mirror.run("hourly")  # establishes the partition key
    assert result.success
    mirror.simulator.update(entity, sorted(canonical_rows(mirror.connection(), entity))[1],
                            {"name": "Alone again"})

    key = register_change_set(mirror.instance, "hourly")
    job = mirror.defs.resolve_job_def("sync_hourly")
    result = job.execute_in_process(
        instance=mirror.instance, partition_key=key,
        asset_selection=[AssetKey([layer, entity]) for layer in ("raw", "staging", "canonical")],
        raise_on_error=False)
    assert result.success, failure_messages(result)
    assert_mirror_equals_simulator(mirror, entity)
    asyncio.get_event_loop_policy()  # no event loop left running
