"""Shared fixtures: a simulator served on loopback, and a mirror wired to it through Dagster."""

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import DagsterInstance, Definitions

from dataverse_assets.archive.storage import ArchiveStorage, LocalStorage, S3Storage
from dataverse_assets.config import DEFAULT_ENTITIES_CONFIG, Settings
from dataverse_assets.defs.definitions import build_definitions, sync_job_name
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.ops.cli import new_change_set_key
from dataverse_assets.redaction import REDACTOR
from dataverse_assets.simulator import DataverseSimulator, serve_on_loopback
from dataverse_assets.source.auth import SHARED_TOKENS
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.store.db import connect
from dataverse_assets_tests.postgres_server import PostgresServer, throwaway_postgres
from dataverse_assets_tests.s3_server import S3Server, moto_s3_server, use_server

SMALL_ROW_COUNTS = {
    "accounts": 90, "contacts": 120, "systemusers": 12, "businessunits": 4, "teams": 6,
    "vin_candidates": 130, "vin_clinicaltrials": 25, "vin_vin_candidate_accountset": 70,
    "vin_vin_clinicaltrial_contactset": 80, "vin_vin_candidate_clinicaltrialset": 60,
}


@dataclass
class Mirror:
    """A mirror database synced through Dagster from a loopback simulator."""

    simulator: DataverseSimulator
    settings: Settings
    defs: Definitions
    instance: DagsterInstance
    url: str = ""

    def cli_environment(self, dagster_home: Path) -> dict[str, str]:
        """Environment for running `dataverse-assets` against this mirror (its store: the
        SQLite file, or the PostgreSQL URL)."""
        return {
            **({"DATAVERSE_STORE_URL": self.settings.store_url} if self.settings.store_url
               else {}),
            "DATAVERSE_DB_PATH": str(self.settings.db_path),
            "DATAVERSE_ARCHIVE_DIR": str(self.settings.archive_dir),
            "DATAVERSE_ENTITIES_CONFIG": str(self.settings.entities_config_path),
            "DATAVERSE_URL": self.url, "DATAVERSE_SOURCE": "simulator",
            "DAGSTER_HOME": str(dagster_home),
        }

    def run(self, group: str, key: str | None = None):
        """Run the group's job for a new (or the given) change set; returns (key, result)."""
        key = key or new_change_set_key(self.instance, group)
        result = self.defs.resolve_job_def(sync_job_name(group)).execute_in_process(
            instance=self.instance, partition_key=key, raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        return key, result

    def sync(self, group: str) -> str:
        key, result = self.run(group)
        assert result.success, failure_messages(result)
        return key

    def sync_all(self) -> list[str]:
        return [self.sync(group) for group in ("hourly", "daily")]

    def connection(self):
        """A connection to the mirror's store (a SQLite file or a PostgreSQL database)."""
        return connect(self.settings.store.address)


def failure_messages(result) -> str:
    messages = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            messages.append(f"{event.step_key}: {event.step_failure_data.error.to_string()}")
    return "\n".join(messages)


def write_entities_config(path: Path, page_size: int,
                          overrides: dict[str, dict] | None = None) -> Path:
    raw = json.loads(DEFAULT_ENTITIES_CONFIG.read_text())
    for entity in raw["entities"]:
        entity["page_size"] = page_size  # small pages: every sync follows nextLinks
        entity.update((overrides or {}).get(entity["name"], {}))
    path.write_text(json.dumps(raw))
    return path


ENTITY_NAMES = [e["name"] for e in json.loads(DEFAULT_ENTITIES_CONFIG.read_text())["entities"]]


@pytest.fixture(autouse=True)
def _no_tokens_from_earlier_tests() -> None:
    """Sessions share tokens per process (auth.SHARED_TOKENS); each test starts without, as a
    new process would (a simulator of an earlier test may have had the same port), and so
    does the redactor (an earlier test's one-letter secret would mask that letter)."""
    SHARED_TOKENS.clear()
    REDACTOR.clear()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One S3-compatible server (moto) for the session; each test takes a bucket of its own."""
    with moto_s3_server() as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path) -> S3Server:
    """The server, with its credentials in this process's environment (AWS_*)."""
    use_server(monkeypatch, s3_server, tmp_path)
    return s3_server


@pytest.fixture(params=["folder", "s3"])
def archive_root(request, tmp_path) -> ArchiveStorage:
    """An empty archive, in a folder and (a second run of the test) under a prefix of a bucket
    of its own on the S3 server."""
    if request.param == "folder":
        return LocalStorage(tmp_path / "archive")
    server = request.getfixturevalue("s3")
    return S3Storage(server.new_bucket(), "some/prefix", endpoint_url=server.endpoint)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the whole test run (skipped where PostgreSQL is not
    installed, failed in CI)."""
    with throwaway_postgres() as server:
        yield server


_DATABASES = itertools.count(1)


@pytest.fixture
def postgres_store_url(postgres_cluster) -> str:
    """A new, empty database of the session's cluster, as a store URL."""
    return postgres_cluster.create_database(f"mirror_{next(_DATABASES)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_address(request, tmp_path) -> str:
    """The address of an empty mirror store of each kind: a SQLite file, a PostgreSQL
    database (tests that take it run against both stores)."""
    if request.param == "sqlite":
        return str(tmp_path / "mirror.db")
    return request.getfixturevalue("postgres_store_url")


@pytest.fixture
def each_store(store_address, tmp_path) -> MirrorStore:
    """An empty mirror store of each kind (store_address) and an archive: a module runs its
    store-level tests against both with `store = each_store` as its `store` fixture."""
    return MirrorStore(db_path=store_address, archive_dir=str(tmp_path / "archive"))


@pytest.fixture(params=["sqlite", "postgresql"])
def each_mirror(request, make_mirror) -> Mirror:
    """A mirror (make_mirror) in each kind of store: the same syncs, the same data."""
    if request.param == "sqlite":
        return make_mirror()
    return make_mirror(store_url=request.getfixturevalue("postgres_store_url"))


@pytest.fixture(params=["sqlite", "postgresql"])
def make_each_mirror(request, make_mirror):
    """make_mirror, with each kind of store in turn."""
    if request.param == "sqlite":
        return make_mirror
    urls = iter([request.getfixturevalue("postgres_store_url")])
    cluster = request.getfixturevalue("postgres_cluster")

    def make(name: str = "mirror", overrides: dict[str, dict] | None = None) -> Mirror:
        # Each mirror its own database, as each SQLite mirror has its own folder.
        url = next(urls, None) or cluster.create_database(f"mirror_{next(_DATABASES)}")
        return make_mirror(name, overrides, store_url=url)

    return make


@pytest.fixture
def store(tmp_path) -> MirrorStore:
    """An empty mirror database and archive of the test's own (publish-level tests)."""
    return MirrorStore(db_path=str(tmp_path / "m.db"), archive_dir=str(tmp_path / "archive"))


@pytest.fixture
def simulator_url() -> Iterator[tuple[DataverseSimulator, str]]:
    simulator = DataverseSimulator(ENTITY_NAMES, seed=7, row_counts=SMALL_ROW_COUNTS)
    with serve_on_loopback(simulator) as url:
        yield simulator, url


@pytest.fixture
def make_mirror(tmp_path, simulator_url):
    """Mirrors (each its own database, archive and Dagster instance) of one loopback
    simulator, with optional per-entity config overrides."""
    simulator, url = simulator_url
    instances = []

    def make(name: str = "mirror", overrides: dict[str, dict] | None = None,
             store_url: str | None = None) -> Mirror:
        """`store_url`: a PostgreSQL store (postgres_store_url); SQLite in the folder without."""
        folder = tmp_path / name
        folder.mkdir()
        config_path = write_entities_config(folder / "entities_config.json", page_size=40,
                                            overrides=overrides)
        settings = Settings(
            db_path=folder / "mirror.db", archive_dir=folder / "archive",
            entities_config_path=config_path, source="simulator", store_url=store_url,
        )
        source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=url)
        # A real (temporary) instance: schedules and sensors need an instance reference.
        (folder / "dagster_home").mkdir()
        instance = DagsterInstance.local_temp(tempdir=str(folder / "dagster_home"))
        instances.append(instance)
        return Mirror(simulator, settings, build_definitions(settings, source=source), instance,
                      url)

    yield make
    for instance in instances:
        instance.dispose()


@pytest.fixture
def mirror(make_mirror) -> Mirror:
    return make_mirror()
