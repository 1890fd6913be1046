"""deploy/dagster.yaml: Dagster's instance storage on PostgreSQL, tested against a real server
the test starts itself (dataverse_assets_tests/postgres_server.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from dataverse_assets.config import PROJECT_ROOT, load_entities_config, parse_store_url
from dataverse_assets.defs.asset_keys import canonical_key
from dataverse_assets.defs.partitions import change_sets_partitions
from dataverse_assets.store.db import connect as connect_mirror
from dataverse_assets_tests.conftest import Mirror, write_entities_config
from dataverse_assets_tests.postgres_server import connect, throwaway_postgres
from dataverse_assets_tests.servers import free_port, missing
from dataverse_assets_tests.truth import assert_mirror_equals_simulator

DEPLOY = PROJECT_ROOT / "deploy" / "dagster.yaml"
PASSWORD = "not-checked-by-trust-auth"
BIN = Path(sys.executable).parent


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
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 4
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


# -- the run queue's limits: one run per entity, a pool of runs for the API budget -----------

def test_the_run_queue_starts_one_run_per_entity_and_two_api_runs_at_a_time(
        postgres, make_mirror, tmp_path, monkeypatch):
    """The shipped queue settings with Dagster's own queue daemon (one pass at a time; a
    launcher that only records what it was asked to start), the API pool's limit set as the
    docs say: a second run of an entity waits while the first is in progress, a third run that
    calls Dataverse waits while two are, a run that calls nothing (maintenance) starts beside
    them, and the waiting runs start, in order, as the others finish."""
    from dagster._core.remote_origin import (
        RegisteredCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import EmptyWorkspaceTarget
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
        QueuedRunCoordinatorDaemon,
    )

    from dataverse_assets.defs.asset_keys import API_POOL, entity_asset_keys
    from dataverse_assets.defs.maintenance import MAINTENANCE_JOB
    from dataverse_assets.defs.schedules import sync_job_name

    home = _instance_home(tmp_path, postgres, monkeypatch, "dagster_queue")
    subprocess.run([str(BIN / "dagster"), "instance", "concurrency", "set", API_POOL, "2"],
                   env={**os.environ, "DAGSTER_HOME": str(home)}, check=True,
                   capture_output=True)
    with open(home / "dagster.yaml", "a") as handle:
        handle.write("run_launcher:\n  module: dagster._core.test_utils\n"
                     "  class: MockedRunLauncher\n")
    mirror = make_mirror()

    def queue(instance, job_name: str, entity: str | None) -> str:
        job = mirror.defs.resolve_job_def(job_name)
        if entity is not None:
            job = job.get_subset(asset_selection=set(entity_asset_keys(entity)))
        origin = RemoteJobOrigin(RemoteRepositoryOrigin(
            RegisteredCodeLocationOrigin("dataverse_assets"), "__repository__"), job_name)
        return instance.create_run_for_job(job_def=job, status=DagsterRunStatus.QUEUED,
                                           remote_job_origin=origin).run_id

    with DagsterInstance.from_config(str(home)) as instance, \
            create_test_daemon_workspace_context(EmptyWorkspaceTarget(), instance) as workspace:
        daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)

        def in_progress() -> set[str]:
            list(daemon.run_iteration(workspace))
            return {r.run_id for r in instance.get_runs(
                RunsFilter(statuses=[DagsterRunStatus.STARTING]))}

        # Dagster sets an entity pool's limit the first time its queue sees the pool, and
        # applies it from the next pass: here the first run of accounts started alone.
        accounts_1 = queue(instance, sync_job_name("hourly"), "accounts")
        assert in_progress() == {accounts_1}
        accounts_2 = queue(instance, sync_job_name("hourly"), "accounts")
        contacts = queue(instance, sync_job_name("hourly"), "contacts")
        teams = queue(instance, sync_job_name("daily"), "teams")
        maintenance = queue(instance, MAINTENANCE_JOB, None)
        # accounts_2 waits for accounts' pool; teams for the API pool (2 in progress).
        assert in_progress() == {accounts_1, contacts, maintenance}
        assert in_progress() == {accounts_1, contacts, maintenance}  # nothing changed
        instance.report_run_failed(instance.get_run_by_id(accounts_1))
        # accounts is free and one API slot: the older of the two queued runs goes first.
        assert in_progress() == {contacts, maintenance, accounts_2}
        instance.report_run_failed(instance.get_run_by_id(contacts))
        assert in_progress() == {maintenance, accounts_2, teams}


# -- the celery executor: steps as tasks on a Redis broker, run by worker processes ------------

@pytest.fixture(scope="module")
def redis_url():
    server = shutil.which("redis-server")
    if server is None:
        missing("redis-server is not installed: apt-get install redis-server",
                "CI must run the celery tests (.ci/run installs it)")
    port = free_port()
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def _start_worker(name: str, env: dict[str, str], config_dir: Path,
                  log: Path) -> subprocess.Popen:
    """A dagster-celery worker, as `dagster-celery worker start` runs one (celery with the
    broker settings in a dagster_celery_config module), one step at a time; its log to a file
    (a pipe nobody reads fills up and stops it)."""
    with log.open("w") as out:
        return subprocess.Popen(
            [str(BIN / "celery"), "-A", "dagster_celery.app", "worker",
             "--prefetch-multiplier=1", "--concurrency", "1", "-n", f"{name}@%h",
             "--loglevel", "INFO"],
            cwd=PROJECT_ROOT, env={**env, "PYTHONPATH": str(config_dir)},
            start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def _celery_env(postgres, redis_url, s3, url: str, tmp_path: Path, monkeypatch,
                database: str, store: str) -> tuple[dict[str, str], Path, str, str]:
    """What every process of a celery deployment reads: Dagster's instance in PostgreSQL
    (deploy/dagster.yaml), the broker and backend, the mirror's settings (a database of the
    same server, or a SQLite file on a disk the workers share: `store`), and the archive in a
    bucket of the S3 server (its credentials from AWS's standard variables). Also returns the
    mirror's address."""
    home = _instance_home(tmp_path, postgres, monkeypatch, database)
    config = write_entities_config(tmp_path / "entities_config.json", page_size=40)
    bucket = s3.new_bucket()
    monkeypatch.delenv("DATAVERSE_ARCHIVE_DIR", raising=False)
    env = {**os.environ, "DAGSTER_HOME": str(home), "DATAVERSE_SOURCE": "simulator",
           "DATAVERSE_URL": url, "DATAVERSE_DB_PATH": str(tmp_path / "mirror.db"),
           "DATAVERSE_ARCHIVE_URL": f"s3://{bucket}/archive",
           "DATAVERSE_S3_ENDPOINT_URL": s3.endpoint,
           "DATAVERSE_ENTITIES_CONFIG": str(config), "DATAVERSE_EXECUTOR": "celery",
           "DAGSTER_CELERY_BROKER_URL": f"{redis_url}/0",
           "DAGSTER_CELERY_BACKEND_URL": f"{redis_url}/1"}
    address = str(tmp_path / "mirror.db")
    if store == "postgresql":
        address = postgres.create_database(f"{database}_mirror")
        env["DATAVERSE_STORE_URL"] = address
    return env, config, bucket, address


def _archived_manifests(s3, bucket: str, key: str) -> set[str]:
    """The entities whose change set `key` is complete (its manifest stored) in the bucket."""
    return {name.split("/")[1] for name in s3.objects(bucket)
            if name.startswith("archive/") and name.endswith(f"/{key}/manifest.json")}


def _new_change_set(env: dict[str, str]) -> str:
    return subprocess.run([str(BIN / "dataverse-assets"), "change-set", "create", "--group",
                           "hourly"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def _materialize_command(key: str) -> list[str]:
    return [str(BIN / "dagster"), "asset", "materialize", "-m", "dataverse_assets",
            "--select", "group:hourly", "--partition", key]


def _assert_hourly_mirror_exact(simulator, config: Path, address: str) -> None:
    mirror = SimpleNamespace(simulator=simulator, connection=lambda: connect_mirror(address))
    for entity in load_entities_config(config).entities_in_group("hourly"):
        assert_mirror_equals_simulator(mirror, entity.name)


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
def test_a_group_materialized_through_the_celery_executor_runs_its_steps_on_the_workers(
        postgres, redis_url, s3, simulator_url, tmp_path, monkeypatch, store):
    """`dagster asset materialize` with DATAVERSE_EXECUTOR=celery, Dagster's instance in
    PostgreSQL (deploy/dagster.yaml), the archive on the S3 server and two workers started
    here: every step is executed by a worker, every entity's change set is archived in the
    bucket, and the mirror (in PostgreSQL, or a SQLite file the workers share) equals the
    simulator's data."""
    simulator, url = simulator_url
    env, config, bucket, address = _celery_env(postgres, redis_url, s3, url, tmp_path,
                                               monkeypatch, f"dagster_celery_{store}", store)
    # The workers take their broker from deploy/dagster_celery_config.py, as shipped.
    config_dir = PROJECT_ROOT / "deploy"
    logs = [tmp_path / f"worker{n}.log" for n in (1, 2)]
    workers = [_start_worker(f"worker{n}", env, config_dir, log)
               for n, log in enumerate(logs, start=1)]
    try:
        key = _new_change_set(env)
        completed = subprocess.run(_materialize_command(key), cwd=PROJECT_ROOT, env=env,
                                   capture_output=True, text=True, timeout=300)
        output = completed.stdout + completed.stderr
        assert completed.returncode == 0 and "RUN_SUCCESS" in output, output[-4000:]
    finally:
        for worker in workers:
            _stop(worker)
    # Each step was a task a worker received and ran.
    hourly = load_entities_config(config).entities_in_group("hourly")
    received = "".join(log.read_text() for log in logs)
    for entity in hourly:
        for layer in ("raw", "staging", "canonical"):
            assert f"{layer}__{entity.name}" in received, (layer, entity.name, received[-3000:])
    assert _archived_manifests(s3, bucket, key) == {e.name for e in hourly}
    assert not (tmp_path / "archive").exists()
    assert (tmp_path / "mirror.db").exists() == (store == "sqlite")
    _assert_hourly_mirror_exact(simulator, config, address)


def _lock_held_by(worker: subprocess.Popen, address: str) -> str | None:
    """The entity a process of `worker` (its session) holds the mirror's lock on, if any (the
    `_locks` row names the holder's pid in both stores)."""
    connection = connect_mirror(address)
    try:
        rows = connection.execute("SELECT entity, pid FROM _locks").fetchall()
    finally:
        connection.close()
    for entity, pid in rows:
        try:
            if os.getpgid(pid) == worker.pid:
                return entity
        except ProcessLookupError:
            continue
    return None


def test_a_worker_killed_mid_run_loses_nothing_and_a_rerun_completes_the_mirror(
        postgres, redis_url, s3, simulator_url, tmp_path, monkeypatch):
    """A celery worker is killed (SIGKILL to all its processes, as when its machine goes)
    while one of its steps holds an entity and fetches from a slow Dataverse. Its step never
    reports back, so the run cannot finish; the operator stops the run and runs the change set
    again on the worker that is left: the rerun takes over the dead worker's lock, starts its
    unfinished fetch over, and the mirror equals the simulator's data, every row once (the
    mirror in PostgreSQL, whose server frees the dead worker's advisory lock; the archive on
    the S3 server; Dagster's instance in PostgreSQL). (A dead process's lock in a SQLite
    mirror is taken over by its pid: chaos/test_process_death.py.)"""
    from dataverse_assets.simulator.latency import LatencyModel

    simulator, url = simulator_url
    env, config, bucket, address = _celery_env(postgres, redis_url, s3, url, tmp_path,
                                               monkeypatch, "dagster_celery_kill", "postgresql")
    env["DATAVERSE_LOCK_WAIT_SECONDS"] = "30"  # a lock never taken over fails in 30 s
    config_dir = PROJECT_ROOT / "deploy"
    logs = [tmp_path / f"worker{n}.log" for n in (1, 2)]
    workers = [_start_worker(f"worker{n}", env, config_dir, log)
               for n, log in enumerate(logs, start=1)]
    simulator.latency = LatencyModel(per_request_seconds=0.5)
    first = None
    try:
        key = _new_change_set(env)
        with (tmp_path / "first_run.log").open("w") as out:
            first = subprocess.Popen(_materialize_command(key), cwd=PROJECT_ROOT, env=env,
                                     stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 180
        killed = None
        while killed is None:
            assert time.monotonic() < deadline, "no worker ever held an entity"
            assert first.poll() is None, (tmp_path / "first_run.log").read_text()[-3000:]
            for worker in workers:
                entity = _lock_held_by(worker, address)
                if entity is not None:
                    _stop(worker)
                    killed = (worker, entity)
                    break
            time.sleep(0.05)
        dead, entity = killed
        survivor = workers[1 - workers.index(dead)]
        # The dead worker's step never reports back: the run is still waiting on it.
        time.sleep(10)
        assert first.poll() is None
        assert _lock_held_by(dead, address) is None  # its pid is gone
        os.killpg(first.pid, signal.SIGINT)  # the operator stops the run
        first.wait(120)
        simulator.latency = None
        rerun = subprocess.run(_materialize_command(key), cwd=PROJECT_ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
        output = rerun.stdout + rerun.stderr
        assert rerun.returncode == 0 and "RUN_SUCCESS" in output, output[-4000:]
        assert survivor.poll() is None
    finally:
        simulator.latency = None
        if first is not None and first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        for worker in workers:
            _stop(worker)
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        rerun_record, first_record = instance.get_runs(  # newest first
            RunsFilter(tags={"dagster/partition": key}))
        assert rerun_record.status == DagsterRunStatus.SUCCESS
        assert first_record.status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
    _assert_hourly_mirror_exact(simulator, config, address)
    # The dead worker's entity was fetched again from the start: its change set is complete.
    hourly = load_entities_config(config).entities_in_group("hourly")
    archived = _archived_manifests(s3, bucket, key)
    assert entity in archived and archived == {e.name for e in hourly}


def test_the_compose_file_wires_the_tested_pieces_together():
    """deploy/docker-compose.yaml cannot run here (no Docker daemon): this checks that it sets
    exactly the variables the tested pieces read, points the webserver and daemon at the code
    location it starts, and runs the workers with the shipped celery settings."""
    import re

    import yaml

    from dataverse_assets.defs.definitions import CELERY_BACKEND_ENV, CELERY_BROKER_ENV

    compose = yaml.safe_load((PROJECT_ROOT / "deploy" / "docker-compose.yaml").read_text())
    services = compose["services"]
    dagster_services = {"codelocation", "webserver", "daemon", "worker"}
    assert dagster_services | {"postgres", "redis"} == set(services)
    instance_variables = set(re.findall(r"env: (\w+)", DEPLOY.read_text()))
    assert instance_variables == {"DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER",
                                  "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"}
    for name in dagster_services:
        service = services[name]
        assert service["image"] == "dataverse-assets" and service["env_file"] == ".env"
        environment = service["environment"]
        # The password comes from .env, never from this file.
        assert instance_variables - set(environment) == {"DAGSTER_PG_PASSWORD"}, name
        assert {CELERY_BROKER_ENV, CELERY_BACKEND_ENV} <= set(environment), name
        assert environment["DATAVERSE_EXECUTOR"] == "celery"
        assert environment["DAGSTER_PG_HOST"] == "postgres"
        assert environment[CELERY_BROKER_ENV].startswith("redis://redis:")
        assert service["volumes"] == ["data:/data"]
        # The mirror in the server's own `dataverse` database (made by the init script), its
        # password from .env through libpq's PGPASSWORD, never in the URL.
        assert environment["DATAVERSE_STORE_URL"] == (
            "postgresql://dagster@postgres:5432/dataverse")
        assert environment["PGPASSWORD"].startswith("${DAGSTER_PG_PASSWORD:?")
        assert parse_store_url(environment["DATAVERSE_STORE_URL"]).kind == "postgresql"
    init = (PROJECT_ROOT / "deploy" / "postgres-init" / "01-mirror-database.sql").read_text()
    assert "CREATE DATABASE dataverse;" in init
    assert "./postgres-init:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]
    workspace = yaml.safe_load((PROJECT_ROOT / "deploy" / "workspace.yaml").read_text())
    [server] = [entry["grpc_server"] for entry in workspace["load_from"]]
    code_server = services["codelocation"]["command"]
    assert server["host"] == "codelocation" and f"-p {server['port']}" in code_server
    assert "-m dataverse_assets.definitions" in code_server
    for name in ("webserver", "daemon"):
        assert "-w deploy/workspace.yaml" in services[name]["command"]
    from dataverse_assets.defs.asset_keys import API_POOL
    assert f"dagster instance concurrency set {API_POOL} 2" in services["daemon"]["command"]
    assert services["worker"]["command"].startswith("celery -A dagster_celery.app worker")
    dockerfile = (PROJECT_ROOT / "deploy" / "Dockerfile").read_text()
    # The workers find deploy/dagster_celery_config.py; every process the instance file.
    assert "PYTHONPATH=/opt/dataverse-assets/deploy" in dockerfile
    assert 'cp deploy/dagster.yaml "$DAGSTER_HOME/dagster.yaml"' in dockerfile
    assert services["postgres"]["environment"]["POSTGRES_DB"] == (
        services["codelocation"]["environment"]["DAGSTER_PG_DB"])


def test_the_helm_values_agree_with_the_tested_instance_file():
    """deploy/helm/values.yaml cannot run here (no Kubernetes): this checks that the chart's
    instance gets the queue limits of deploy/dagster.yaml as tested above, serves the same code
    location, sets the API pool as documented, and holds no secret."""
    import yaml

    from dataverse_assets.defs.asset_keys import API_POOL

    text = (PROJECT_ROOT / "deploy" / "helm" / "values.yaml").read_text()
    values = yaml.safe_load(text)
    instance = yaml.safe_load(DEPLOY.read_text())
    assert values["additionalInstanceConfig"]["concurrency"] == instance["concurrency"]
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == (
        instance["run_coordinator"]["class"])
    assert values["postgresql"]["postgresqlScheme"] == (
        instance["storage"]["postgres"]["postgres_db"]["scheme"])
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "dataverse_assets.definitions"]
    assert f"dagster instance concurrency set {API_POOL} 2" in text
    # Secrets come from Kubernetes Secrets, never from this file.
    secret_names = {s["name"] for s in deployment["envSecrets"]}
    assert secret_names == {s["name"] for s in
                            values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]}
    for variable in deployment["env"]:
        assert not any(word in variable for word in ("SECRET", "PASSWORD", "KEY")), variable
    # The archive setting is one the settings accept, and names a bucket.
    from dataverse_assets.config import load_settings
    archive = deployment["env"]["DATAVERSE_ARCHIVE_URL"]
    assert archive.startswith("s3://")
    assert load_settings({"DATAVERSE_ARCHIVE_URL": archive}).archive_location == archive
    # The mirror is a PostgreSQL database the settings accept (no password in the URL).
    store = deployment["env"]["DATAVERSE_STORE_URL"]
    assert load_settings({"DATAVERSE_STORE_URL": store}).store.kind == "postgresql"
    assert "postgresqlPassword" not in values["postgresql"]
    assert values["generatePostgresqlPasswordSecret"] is False
