"""Helpers shared by tests in several folders: small archived change sets, mirrors of
a few entities, what a failed run said, a folder's digest, the same source changes
for every mirror of a test, what the simulator had in flight at once."""

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from urllib.parse import unquote_plus

import orjson
from dagster import DagsterInstance

from dataverse_assets.archive.change_sets import REQUEST, ChangeSetArchive
from dataverse_assets.config import EntityConfig, Settings
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.sync.stage import write_staged
from dataverse_assets.sync.steps import publish, staged_records
from dataverse_assets_tests.conftest import ENTITY_NAMES, Mirror

ENTITY = EntityConfig(name="things", group="daily", incremental="full")


def archive_change_set(root, change_set, records, entity: str = "things",
                       request: dict | None = None, files: dict | None = None):
    """A finished full-snapshot change set of `records` in one page, with `request.json`
    (by default things' primary key) and any other JSON `files` (entity definition, ...)."""
    archive = ChangeSetArchive(root, entity, change_set)
    archive.start()
    archive.write_json(REQUEST, request or {"primary_key": "thingid"})
    for name, content in (files or {}).items():
        archive.write_json(name, content)
    archive.write_page(1, orjson.dumps({"value": records}))
    archive.finish({"mode": "full", "started_at": "2026-01-01T00:00:00Z",
                    "summary": {"watermark_before": None, "watermark_after": None},
                    "pages": [{"kind": "snapshot", "shape": "collection"}]})
    return archive


def thing(n, name, size=1):
    return {"thingid": f"id-{n}", "name": name, "size": size}


def stage_and_publish(store, change_set, records, entity: EntityConfig = ENTITY, **archived):
    """Archive `records` as a change set of `entity` (see archive_change_set), stage and
    publish it; returns the publish's last result."""
    archive = archive_change_set(store.archive_dir, change_set, records, entity.name, **archived)
    with store.connection() as connection:
        write_staged(connection, staged_records(connection, archive, entity))
    return publish(store, entity, change_set)[-1]


def store_environment(address: str) -> dict[str, str]:
    """The variable that points `dataverse-assets` at a store address: DATAVERSE_STORE_URL
    for a PostgreSQL store, DATAVERSE_DB_PATH for a SQLite file."""
    if address.startswith(("postgresql://", "postgres://")):
        return {"DATAVERSE_STORE_URL": address}
    return {"DATAVERSE_DB_PATH": address}


def mirror_of(tmp_path, simulator_url, entities: list[dict], name: str = "m",
              store_url: str | None = None, **source_options) -> Mirror:
    """A mirror of just `entities` (all in one hourly group) from the loopback simulator
    (`store_url`: a PostgreSQL store, postgres_store_url; SQLite in its folder without)."""
    simulator, url = simulator_url
    folder = tmp_path / name
    folder.mkdir()
    config = folder / "entities.json"
    config.write_text(json.dumps({"groups": {"hourly": {"cron": "0 * * * *"}},
                                  "entities": [{"group": "hourly", **e} for e in entities]}))
    settings = Settings(db_path=folder / "mirror.db", archive_dir=folder / "archive",
                        entities_config_path=config, source="simulator", store_url=store_url)
    source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=url, **source_options)
    return Mirror(simulator, settings, build_definitions(settings, source=source),
                  DagsterInstance.ephemeral(), url)


def reconfigured(mirror: Mirror, entities: list[dict]) -> Mirror:
    """The same mirror (database, archive, Dagster instance) after its entities file was
    edited to `entities` (all in one hourly group), as a restarted code location sees it."""
    config = mirror.settings.entities_config_path
    config.write_text(json.dumps({"groups": {"hourly": {"cron": "0 * * * *"}},
                                  "entities": [{"group": "hourly", **e} for e in entities]}))
    settings = Settings(db_path=mirror.settings.db_path, archive_dir=mirror.settings.archive_dir,
                        entities_config_path=config, source="simulator",
                        store_url=mirror.settings.store_url)
    source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=mirror.url)
    return Mirror(mirror.simulator, settings, build_definitions(settings, source=source),
                  mirror.instance, mirror.url)


def duplicate_a_team_key(connection) -> str:
    """Break the teams table's primary key: a second row whose key differs only in case (the
    blocking primary-key check then fails the next run). Returns the key copied."""
    key, json_response = connection.execute(
        "SELECT teamid, json_response FROM teams ORDER BY teamid LIMIT 1").fetchone()
    connection.execute(
        "INSERT INTO teams (teamid, json_response, _content_hash, sync_time, updated_at,"
        " _change_set) VALUES (?, ?, 'x', 'now', 'now', 'manual')",
        (key.upper(), json_response))
    return key


def root_error(result) -> str:
    """The message of the exception that failed the run (the innermost cause)."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None:
                error = error.cause
            return error.message.strip()
    raise AssertionError("the run did not fail")


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` with a digest of its bytes."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def mirror_rows(mirror, table: str) -> list[tuple]:
    with mirror.connection() as connection:
        return connection.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()


def mutate(simulator):
    """The same changes for every mirror of a test: each mode sees creates, updates, deletes."""
    candidates = [r["vin_candidateid"] for r in simulator.records("vin_candidates")]
    simulator.update("vin_candidates", candidates[4], {"vin_name": "Changed"})
    simulator.delete("vin_candidates", candidates[5])
    simulator.create("vin_candidates", {"vin_name": "Fresh"})
    trials = [r["vin_clinicaltrialid"] for r in simulator.records("vin_clinicaltrials")]
    simulator.update("vin_clinicaltrials", trials[2], {"vin_name": "Renamed trial"})
    junction = simulator.records("vin_vin_candidate_clinicaltrialset")[0]
    simulator.delete("vin_vin_candidate_clinicaltrialset",
                     junction["vin_vin_candidate_clinicaltrialid"])
    account = simulator.records("accounts")[0]["accountid"]
    simulator.create("vin_vin_candidate_accountset",
                     {"vin_candidateid": candidates[6], "accountid": account})


def store_of(mirror) -> MirrorStore:
    """The mirror's `store` resource, on whichever store it lives (a SQLite file or a
    PostgreSQL database)."""
    return MirrorStore(db_path=mirror.settings.store.address,
                       archive_dir=str(mirror.settings.archive_dir))


def source_of(mirror) -> SimulatorSource:
    return SimulatorSource(entity_names=ENTITY_NAMES, base_url=mirror.url)


# A primary-key range's condition, as the client writes it into $filter.
_KEY_RANGE = re.compile(r"\w+ (?:lt|ge) [0-9a-f-]{36}")


def key_range_of(request) -> str | None:
    """The key-range condition a simulator request carried (its first), or None."""
    match = _KEY_RANGE.search(unquote_plus(request.target))
    return match.group(0) if match else None


def most_at_once(requests: Iterable, key: Callable[[object], Hashable | None]) -> int:
    """The most distinct `key(request)` values (None: not counted) that had a request in
    flight at the same moment, from the simulator's request log."""
    events = []
    for request in requests:
        value = key(request)
        if value is not None:
            events += [(request.arrived, 1, value), (request.finished, -1, value)]
    open_by_value: Counter = Counter()
    most = 0
    for _, delta, value in sorted(events, key=lambda e: (e[0], e[1])):
        open_by_value[value] += delta
        most = max(most, sum(1 for n in open_by_value.values() if n > 0))
    return most
