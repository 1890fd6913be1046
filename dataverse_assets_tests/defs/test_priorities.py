"""Entity priorities become Dagster run priorities, so a run queue starts high-priority
entities first."""

from datetime import UTC, datetime, timedelta

import pytest
from dagster import DagsterInstance, build_schedule_context

from dataverse_assets.config import PROJECT_ROOT, parse_entities_config
from dataverse_assets.defs.priorities import PRIORITY_TAG, run_priority
from dataverse_assets.errors import ConfigError
from dataverse_assets.store import dead_letters
from dataverse_assets.sync import steps
from dataverse_assets_tests.defs.test_operations import evaluate
from dataverse_assets_tests.helpers import source_of, store_of

PRIORITIES = {"teams": {"priority": "high"}, "systemusers": {"priority": "low"},
              "businessunits": {"priority": "low"}, "vin_clinicaltrials": {"priority": "low"}}


def schedule_request(mirror, group: str):
    schedule = mirror.defs.resolve_schedule_def(f"{group}_schedule")
    context = build_schedule_context(
        instance=mirror.instance, scheduled_execution_time=datetime(2026, 11, 22, 10, 0,
                                                                    tzinfo=UTC),
        repository_def=mirror.defs.get_repository_def())
    (request,) = schedule.evaluate_tick(context).run_requests
    return request


def test_schedule_runs_carry_the_highest_priority_of_their_group(make_mirror):
    mirror = make_mirror(overrides=PRIORITIES)
    assert schedule_request(mirror, "daily").tags[PRIORITY_TAG] == "10"  # teams is high
    assert schedule_request(mirror, "hourly").tags[PRIORITY_TAG] == "0"  # normal beats low


def test_sensor_runs_carry_the_priority_of_the_entities_they_run(make_mirror):
    mirror = make_mirror(overrides=PRIORITIES)
    first = evaluate(mirror, "daily_changes_sensor")
    (request,) = first.run_requests
    assert request.tags[PRIORITY_TAG] == "10"
    mirror.sync("daily")

    # Only a low-priority table changed: its run waits behind everything else.
    user = mirror.simulator.records("systemusers")[0]["systemuserid"]
    mirror.simulator.update("systemusers", user, {"fullname": "Changed"})
    (request,) = evaluate(mirror, "daily_changes_sensor").run_requests
    assert request.tags["dataverse/entities"] == "systemusers"
    assert request.tags[PRIORITY_TAG] == "-10"

    # Retries keep their entity's priority.
    with mirror.connection() as connection:
        dead_letters.record_failure(connection, "teams", "20261122T100000Z", "boom",
                                    now=datetime.now(UTC) - timedelta(hours=1))
    (retry,) = evaluate(mirror, "retry_failed_change_sets").run_requests
    assert retry.tags[PRIORITY_TAG] == "10"

    # So do change sets another process dropped into the archive.
    entity = mirror.settings.entities.entity("businessunits")
    steps.fetch(store_of(mirror), source_of(mirror), entity, "29990101T000000Z")
    (archived,) = evaluate(mirror, "archive_change_sets_sensor").run_requests
    assert archived.tags[PRIORITY_TAG] == "-10"


def test_priority_defaults_to_normal_and_rejects_anything_else():
    config = parse_entities_config({"groups": {"daily": {"cron": "0 3 * * *"}},
                                    "entities": [{"name": "teams", "group": "daily"}]})
    assert config.entity("teams").priority == "normal"
    assert run_priority(config.entities) == 0
    with pytest.raises(ConfigError, match=r"entity 'teams' \(entities\[0\]\), field 'priority'"):
        parse_entities_config({"groups": {"daily": {"cron": "0 3 * * *"}},
                               "entities": [{"name": "teams", "group": "daily",
                                             "priority": "urgent"}]})


def test_the_documented_run_queue_settings_load(tmp_path):
    """examples/dagster.yaml: a queued run coordinator starting two runs at a time."""
    (tmp_path / "dagster.yaml").write_text(
        (PROJECT_ROOT / "examples" / "dagster.yaml").read_text())
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        coordinator = instance.run_coordinator
        assert type(coordinator).__name__ == "QueuedRunCoordinator"
        assert coordinator.get_run_queue_config().max_concurrent_runs == 2
