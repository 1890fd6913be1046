"""The chaos harness: mirrors of one loopback simulator, seeded source changes, seeded faults,
and the invariants every scenario must end with."""

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from dataverse_assets.config import EntitiesConfig, load_entities_config
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.names import change_set_key
from dataverse_assets.simulator import DataverseSimulator
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.store.backend import is_postgres_address
from dataverse_assets.store.db import connect, quote_identifier
from dataverse_assets_tests.chaos.driver import FAST_RETRIES, sync_group
from dataverse_assets_tests.conftest import ENTITY_NAMES, SMALL_ROW_COUNTS, write_entities_config
from dataverse_assets_tests.truth import (
    FILTERED,
    PRIMARY_KEYS,
    canonical_rows,
    expected_records,
    mirror_contents,
    normalized,
)

ALL_ENTITIES = list(PRIMARY_KEYS)
GROUPS = ("hourly", "daily")
# Deletes must reach every mode within a change set, so key scans run every time; small
# chunks make vin_candidates publish in several transactions (resumable execution).
CHAOS_OVERRIDES = {
    **{name: {"reconcile_every_hours": 1e-9} for name in (
        "vin_clinicaltrials", "systemusers", "businessunits", "accounts", "contacts")},
    "vin_candidates": {"publish_chunk_rows": 3},
}
REQUEST_TIMEOUT_SECONDS = 0.5
PAGE_SIZE = 15  # many pages per sync: many requests to fault, nextLinks to follow


def new_simulator(seed: int = 7) -> DataverseSimulator:
    return DataverseSimulator(ENTITY_NAMES, seed=seed, row_counts=SMALL_ROW_COUNTS)


@dataclass
class ChaosMirror:
    """A mirror (database + archive) synced from a loopback simulator by the step driver."""

    name: str
    simulator: DataverseSimulator
    store: MirrorStore
    config: EntitiesConfig
    config_path: Path
    source: SimulatorSource
    url: str
    last_key: datetime = field(default_factory=lambda: datetime(2000, 1, 1, tzinfo=UTC))

    def connection(self):
        return connect(self.store.db_path)

    def next_key(self) -> str:
        moment = max(datetime.now(UTC).replace(microsecond=0),
                     self.last_key + timedelta(seconds=1))
        self.last_key = moment
        return change_set_key(moment)

    def sync(self, group: str) -> dict[str, str | None]:
        return sync_group(self.store, self.source, self.config, group, self.next_key(),
                          owner=f"{self.name}-run")

    def sync_all(self) -> dict[str, str | None]:
        outcome: dict[str, str | None] = {}
        for group in GROUPS:
            outcome.update(self.sync(group))
        return outcome


def make_chaos_mirror(folder: Path, simulator: DataverseSimulator, url: str,
                      name: str, page_size: int = PAGE_SIZE,
                      store_for: Callable[[Path], str] | None = None) -> ChaosMirror:
    """`store_for`: the store address for the mirror's folder (chaos_store: a SQLite file in it,
    or a PostgreSQL database of its own); a SQLite file in the folder without."""
    folder = folder / name
    folder.mkdir(parents=True)
    config_path = write_entities_config(folder / "entities_config.json", page_size=page_size,
                                        overrides=CHAOS_OVERRIDES)
    address = store_for(folder) if store_for else str(folder / "mirror.db")
    store = MirrorStore(db_path=address, archive_dir=str(folder / "archive"),
                        lock_wait_seconds=30)
    source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=url,
                             timeout_seconds=REQUEST_TIMEOUT_SECONDS,
                             retry_backoff_seconds=FAST_RETRIES)
    return ChaosMirror(name, simulator, store, load_entities_config(config_path), config_path,
                       source, url)


# -- the source changing between change sets ---------------------------------------------------

def mutate_source(simulator: DataverseSimulator, rng: random.Random) -> Counter:
    """A seeded mix of creates, updates and deletes in every mode (and in the links that decide
    which accounts and contacts are mirrored). Returns what was done, by kind."""
    done: Counter = Counter()

    def keys(entity: str) -> list[str]:
        return [r[PRIMARY_KEYS[entity]] for r in simulator.records(entity)]

    for entity, name_column in (("vin_candidates", "vin_name"),
                                ("vin_clinicaltrials", "vin_name"),
                                ("systemusers", "fullname"), ("teams", "name"),
                                ("accounts", "name"), ("contacts", "fullname")):
        present = keys(entity)
        for pk in rng.sample(present, min(len(present), rng.randint(1, 3))):
            simulator.update(entity, pk, {name_column: f"edit {rng.randrange(10**6)}"})
            done["update"] += 1
        if rng.random() < 0.7:
            simulator.create(entity, {})
            done["create"] += 1
        if rng.random() < 0.5 and len(present) > 5:
            simulator.delete(entity, rng.choice(keys(entity)))
            done["delete"] += 1
    for junction, (left, right) in (
            ("vin_vin_candidate_accountset", ("vin_candidates", "accounts")),
            ("vin_vin_clinicaltrial_contactset", ("vin_clinicaltrials", "contacts"))):
        try:
            simulator.create(junction, {PRIMARY_KEYS[left]: rng.choice(keys(left)),
                                        PRIMARY_KEYS[right]: rng.choice(keys(right))})
            done["create"] += 1
        except ValueError:  # the pair is linked already
            pass
        if rng.random() < 0.5:
            simulator.delete(junction, rng.choice(keys(junction)))
            done["delete"] += 1
    return done


class VersionLog:
    """Every version each record of the simulator has had (seed rows, then each change), so a
    history row can be checked to be a real past version."""

    def __init__(self, simulator: DataverseSimulator) -> None:
        self.versions: dict[str, dict[str, list[bytes]]] = {}
        for entity in ALL_ENTITIES:
            for record in simulator.records(entity):
                self._add(entity, record)
        create, update = simulator.create, simulator.update

        def logged_create(entity_set, values=None):
            row = create(entity_set, values)
            self._add(entity_set, simulator.record(entity_set, row[PRIMARY_KEYS[entity_set]]))
            return row

        def logged_update(entity_set, pk, changes):
            row = update(entity_set, pk, changes)
            self._add(entity_set, simulator.record(entity_set, pk))
            return row

        # Instance attributes: the simulator's own fault mutations call these too.
        simulator.create, simulator.update = logged_create, logged_update

    def _add(self, entity: str, record: dict | None) -> None:
        if record is not None:
            key = record[PRIMARY_KEYS[entity]]
            self.versions.setdefault(entity, {}).setdefault(key, []).append(normalized(record))


# -- invariants --------------------------------------------------------------------------------

def _rows(connection, sql: str) -> list[tuple]:
    return connection.execute(sql).fetchall()


def canonical_problems(mirror) -> list[str]:
    """Whole tables against the source: every record the source has (for filtered entities:
    every record linked now) is mirrored, with its current version in `json_response` and in
    every typed column; nothing else is, except that a filtered entity keeps records it
    mirrored while they were linked, as long as the source has them (and keeps them current).
    """
    problems = []
    with mirror.connection() as connection:
        for entity in ALL_ENTITIES:
            source = {r[PRIMARY_KEYS[entity]]: r for r in mirror.simulator.records(entity)}
            expected = expected_records(mirror.simulator, entity)
            rows = canonical_rows(connection, entity)
            allowed = source if entity in FILTERED else expected
            if expected.keys() - rows.keys():
                problems.append(f"{entity}: {len(expected.keys() - rows.keys())} records missing")
            if rows.keys() - allowed.keys():
                problems.append(f"{entity}: {len(rows.keys() - allowed.keys())} records the "
                                "source does not have")
            for key, row in rows.items():
                record = source.get(key)
                if record is None:
                    continue
                if normalized(orjson.loads(row["json_response"])) != normalized(record):
                    problems.append(f"{entity} {key}: json_response is not the current version")
                    continue
                for column, value in record.items():
                    want = int(value) if isinstance(value, bool) else value
                    if "@" not in column and row[column] != want:
                        problems.append(f"{entity} {key} {column}: {row[column]!r} != {want!r}")
    return problems


def duplicate_keys(mirror) -> list[str]:
    problems = []
    with mirror.connection() as connection:
        for entity in ALL_ENTITIES:
            pk = quote_identifier(PRIMARY_KEYS[entity])
            doubled = _rows(connection, f"SELECT {pk} FROM {quote_identifier(entity)}"
                                        f" GROUP BY {pk} HAVING count(*) > 1")
            if doubled:
                problems.append(f"{entity}: {len(doubled)} duplicate keys")
            doubled = _rows(connection, f"SELECT {pk}, json_response FROM"
                                        f" {quote_identifier(entity + '__history')}"
                                        f" GROUP BY 1, 2 HAVING count(*) > 1")
            if doubled:
                problems.append(f"{entity}__history: {len(doubled)} versions recorded twice")
    return problems


def _written_order(mirror) -> str:
    """The order history rows were written in: SQLite's rowid; PostgreSQL has no such column,
    and a history row is written by the change set that superseded the version (keys sort by
    time; one row per record and change set)."""
    return "superseded_in, valid_to" if is_postgres_address(mirror.store.db_path) else "rowid"


def history_problems(mirror, log: VersionLog) -> list[str]:
    """Every history row is a version the source really had, no live row's current version is
    also in its history (applied twice), and each record's history moves forward in time."""
    problems = []
    with mirror.connection() as connection:
        for entity in ALL_ENTITIES:
            pk = quote_identifier(PRIMARY_KEYS[entity])
            current = {key: normalized(orjson.loads(body)) for key, body in _rows(
                connection, f"SELECT {pk}, json_response FROM {quote_identifier(entity)}")}
            last_valid_from: dict[str, str] = {}
            for key, body, kind, valid_from in _rows(
                    connection, f"SELECT {pk}, json_response, change_kind, valid_from FROM"
                                f" {quote_identifier(entity + '__history')}"
                                f" ORDER BY {_written_order(mirror)}"):
                version = normalized(orjson.loads(body))
                if version not in log.versions.get(entity, {}).get(key, []):
                    problems.append(f"{entity} {key}: history holds a version the source "
                                    "never had")
                if kind == "update" and current.get(key) == version:
                    problems.append(f"{entity} {key}: current version also in history")
                if valid_from and last_valid_from.get(key, "") > valid_from:
                    problems.append(f"{entity} {key}: history goes back in time")
                last_valid_from[key] = valid_from or ""
    return problems


def defunct_problems(mirror, reference) -> list[str]:
    """`_defunct` against the truth: nothing the source still has, everything a mirror held
    and lost, and every id the reference knows gone."""
    problems = []
    with mirror.connection() as connection:
        defunct = set(_rows(connection, "SELECT entity, id FROM _defunct"))
        held = set()
        for entity in ALL_ENTITIES:
            pk = quote_identifier(PRIMARY_KEYS[entity])
            held |= {(entity, key) for (key,) in _rows(
                connection, f"SELECT {pk} FROM {quote_identifier(entity + '__history')}"
                            f" WHERE change_kind = 'delete'")}
    with reference.connection() as connection:
        known_gone = set(_rows(connection, "SELECT entity, id FROM _defunct"))
    alive = {(entity, key) for entity in ALL_ENTITIES
             for key in expected_records(mirror.simulator, entity)}
    if defunct & alive:
        problems.append(f"_defunct lists {len(defunct & alive)} ids the source still has")
    if held - defunct:
        problems.append(f"{len(held - defunct)} deleted records missing from _defunct")
    if known_gone - defunct:
        problems.append(f"{len(known_gone - defunct)} ids the reference knows gone missing")
    return problems


def check_invariants(faulty: ChaosMirror, reference: ChaosMirror, log: VersionLog, *,
                     same_observations: bool) -> dict[str, str]:
    """Each invariant's result ('ok' or what is wrong). With `same_observations` (no source
    change while a faulty run paged, every step eventually synced) the whole faulty database
    must equal the never-faulted reference: canonical, history, _defunct, watermarks."""
    results: dict[str, str] = {}
    results["canonical_equals_source"] = "; ".join(canonical_problems(faulty)[:5]) or "ok"
    duplicates = duplicate_keys(faulty)
    results["no_duplicates"] = "; ".join(duplicates) or "ok"
    try:
        ours, theirs = mirror_contents(faulty, ALL_ENTITIES), mirror_contents(reference,
                                                                             ALL_ENTITIES)
    except AssertionError as exc:
        results["equals_reference"] = str(exc)
        return results
    canonical_diff = [e for e in ALL_ENTITIES if ours[e] != theirs[e]]
    results["canonical_equals_reference"] = (
        f"differs in {canonical_diff}" if canonical_diff else "ok")
    history = "; ".join(history_problems(faulty, log)[:5])
    results["history_real_versions"] = history or "ok"
    defunct = "; ".join(defunct_problems(faulty, reference))
    results["defunct_equals_truth"] = defunct or "ok"
    if same_observations:
        differing = [name for name in ours if ours[name] != theirs[name]]
        results["whole_database_equals_reference"] = (
            f"differs in {differing}" if differing else "ok")
    return results


@dataclass
class ScenarioResult:
    """One scenario's line in the chaos report."""

    scenario: str
    seed: int
    change_sets: int = 0
    failed_runs: int = 0
    faults: Counter = field(default_factory=Counter)
    retries: int = 0
    requests: int = 0
    source_changes: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    rows_lost: int = 0
    invariants: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @property
    def passed(self) -> bool:
        return bool(self.invariants) and all(v == "ok" for v in self.invariants.values())

    def as_json(self) -> dict:
        return {
            "scenario": self.scenario, "seed": self.seed, "change_sets": self.change_sets,
            "failed_runs": self.failed_runs, "faults": dict(sorted(self.faults.items())),
            "faults_total": sum(self.faults.values()), "retries": self.retries,
            "requests": self.requests, "source_changes": dict(self.source_changes),
            "seconds": round(self.seconds, 2), "rows_lost": self.rows_lost,
            "invariants": self.invariants,
            "passed": self.passed, "notes": self.notes,
        }


def fetch_retries(mirror) -> int:
    """Retries the client made in the mirror's completed fetches (from the sync log)."""
    with mirror.connection() as connection:
        return sum(orjson.loads(details).get("retries", 0) for (details,) in _rows(
            connection, "SELECT details FROM _sync_log WHERE layer = 'raw'"))


def rows_lost(mirror) -> int:
    """Records the source has that the mirror does not."""
    lost = 0
    with mirror.connection() as connection:
        for entity in ALL_ENTITIES:
            pk = quote_identifier(PRIMARY_KEYS[entity])
            have = {key for (key,) in _rows(connection,
                                           f"SELECT {pk} FROM {quote_identifier(entity)}")}
            lost += len(set(expected_records(mirror.simulator, entity)) - have)
    return lost
