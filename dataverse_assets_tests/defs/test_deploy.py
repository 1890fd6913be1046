"""deploy/dagster.yaml: Dagster's instance storage on PostgreSQL, tested against a real server
the test starts itself (dataverse_assets_tests/postgres_server.py)."""

from __future__ import annotations

import shutil

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from dataverse_assets.config import PROJECT_ROOT
from dataverse_assets.defs.asset_keys import canonical_key
from dataverse_assets.defs.partitions import change_sets_partitions
from dataverse_assets_tests.conftest import Mirror
from dataverse_assets_tests.postgres_server import connect, throwaway_postgres
from dataverse_assets_tests.truth import assert_mirror_equals_simulator

DEPLOY = PROJECT_ROOT / "deploy" / "dagster.yaml"
PASSWORD = "not-checked-by-trust-auth"


@pytest.fixture(scope="module")
def postgres():
    with throwaway_postgres() as server:
        yield server


def _instance_home(tmp_path, postgres, monkeypatch, database: str):
    postgres.create_database(database)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY, home / "dagster.yaml")
    for name, value in {"DAGSTER_PG_HOST": postgres.host, "DAGSTER_PG_PORT": str(postgres.port),
                        "DAGSTER_PG_USER": postgres.user, "DAGSTER_PG_PASSWORD": PASSWORD,
                        "DAGSTER_PG_DB": database}.items():
        monkeypatch.setenv(name, value)
    return home


def test_a_sync_runs_with_dagster_s_instance_in_postgresql(postgres, make_mirror, tmp_path,
                                                            monkeypatch):
    """The shipped dagster.yaml as it is (only its variables set): runs, their events, the
    change-set partitions and the queue's settings live in PostgreSQL; the mirror is exact;
    a second instance opened from the same file (another process, another machine) sees the
    same runs and materializations; the password is in no file."""
    home = _instance_home(tmp_path, postgres, monkeypatch, "dagster_runs")
    built = make_mirror()
    with DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert instance.run_coordinator.get_run_queue_config().max_concurrent_runs == 2
        mirror = Mirror(built.simulator, built.settings, built.defs, instance, built.url)
        key = mirror.sync("hourly")
        hourly = mirror.settings.entities.entities_in_group("hourly")
        for entity in hourly:
            assert_mirror_equals_simulator(mirror, entity.name)

    with DagsterInstance.from_config(str(home)) as elsewhere:
        [run] = elsewhere.get_runs(RunsFilter(tags={"dagster/partition": key}))
        assert run.status == DagsterRunStatus.SUCCESS
        assert key in elsewhere.get_dynamic_partitions(change_sets_partitions("hourly").name)
        for entity in hourly:
            record = elsewhere.get_latest_materialization_event(canonical_key(entity.name))
            assert record is not None and record.run_id == run.run_id, entity.name
    connection = connect(postgres.url("dagster_runs"))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM runs")
            runs = cursor.fetchone()[0]
            cursor.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type ="
                           " 'ASSET_MATERIALIZATION'")
            events = cursor.fetchone()[0]
    finally:
        connection.close()
    assert runs == 1 and events >= len(hourly)
    assert PASSWORD not in (home / "dagster.yaml").read_text()
