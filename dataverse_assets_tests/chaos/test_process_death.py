"""Process death: a sync SIGKILLed at a fault point (during the fetch, between staging and
publish, inside the publish transaction, after a chunk or the whole publish committed) leaves
a mirror that the next run completes, equal to one that was never killed; its lock is taken
over, not waited for."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dataverse_assets.simulator import DataverseSimulator, LatencyModel, serve_on_loopback
from dataverse_assets.store.backend import is_postgres_address
from dataverse_assets.store.db import connect
from dataverse_assets_tests.chaos.conftest import SOAK, seeds
from dataverse_assets_tests.chaos.harness import (
    ALL_ENTITIES,
    canonical_problems,
    duplicate_keys,
    make_chaos_mirror,
    mutate_source,
    new_simulator,
    rows_lost,
)
from dataverse_assets_tests.conftest import (
    ENTITY_NAMES,
    SMALL_ROW_COUNTS,
    write_entities_config,
)
from dataverse_assets_tests.helpers import key_range_of, most_at_once
from dataverse_assets_tests.truth import assert_mirror_equals_simulator, mirror_contents

REPO = Path(__file__).resolve().parents[2]
# Where the issue asks for a kill: in the fetch, between staging and publish, inside the
# publish transaction, right after a commit and before the watermark (a chunk committed; the
# watermark moves with the last one), right after the whole publish committed.
KILL_POINTS = [
    "fetch.after_page", "fetch.before_manifest", "staging.after_write", "publish.before_plan",
    "publish.mid_plan", "publish.mid_execute", "publish.after_chunk_commit",
    "publish.before_watermark", "publish.after_commit",
]
CI_POINTS = ["fetch.after_page", "staging.after_write", "publish.mid_execute",
             "publish.after_chunk_commit", "publish.after_commit"]


def store_environment(address: str, folder: Path) -> dict[str, str]:
    """The variables that point `dataverse-assets` at a store address: a SQLite file, or a
    PostgreSQL URL (the SQLite path then a file in the folder that must stay unused)."""
    if is_postgres_address(address):
        return {"DATAVERSE_STORE_URL": address, "DATAVERSE_DB_PATH": str(folder / "unused.db")}
    return {"DATAVERSE_DB_PATH": address}


def killed_sync(mirror, group: str, spec: str, *, cli: bool = False) -> subprocess.CompletedProcess:
    """Run one sync in its own process with DATAVERSE_FAULT_POINTS=spec."""
    env = {**os.environ, "DATAVERSE_FAULT_POINTS": spec, "PYTHONPATH": str(REPO)}
    if cli:
        home = mirror.config_path.parent / "dagster_home"
        home.mkdir(exist_ok=True)
        env.update({
            **store_environment(mirror.store.db_path, mirror.config_path.parent),
            "DATAVERSE_ARCHIVE_DIR": mirror.store.archive_dir,
            "DATAVERSE_ENTITIES_CONFIG": str(mirror.config_path),
            "DATAVERSE_URL": mirror.url, "DATAVERSE_SOURCE": "simulator",
            "DAGSTER_HOME": str(home),
        })
        command = [str(Path(sys.executable).parent / "dataverse-assets"), "sync", "--group", group]
    else:
        command = [sys.executable, "-m", "dataverse_assets_tests.chaos.driver",
                   "--db", mirror.store.db_path, "--archive", mirror.store.archive_dir,
                   "--config", str(mirror.config_path), "--url", mirror.url, "--group", group,
                   "--change-set", mirror.next_key()]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def mutate_for_kill(simulator, rng: random.Random) -> None:
    """The seeded changes, plus enough candidate updates that publishing them takes several
    chunks (chunks of 3), so a kill after a chunk's commit has somewhere to land."""
    mutate_source(simulator, rng)
    for record in rng.sample(simulator.records("vin_candidates"), 5):
        simulator.update("vin_candidates", record["vin_candidateid"],
                         {"vin_name": f"kill {rng.randrange(10**6)}"})


def kill_and_recover(tmp_path, points: list[str], seed: int, *, cli_points=(),
                     report=None, store_for=None) -> list[dict]:
    """One mirror killed at each point in turn (the first kill hits its first, full sync;
    each later one an incremental change set after the source changed), completed by the next
    run, and compared after each recovery with a mirror that was never killed."""
    rng = random.Random(seed)
    lines = []
    simulator = new_simulator()
    with serve_on_loopback(simulator) as url:
        # Bigger pages than the fault scenarios: here the faults are the kills.
        killed = make_chaos_mirror(tmp_path, simulator, url, "killed", page_size=50,
                                   store_for=store_for)
        reference = make_chaos_mirror(tmp_path, simulator, url, "reference", page_size=50,
                                      store_for=store_for)
        for index, point in enumerate(points):
            started = time.perf_counter()
            if index:
                mutate_for_kill(simulator, rng)
            cli = point in cli_points
            # Fetch points are hit once per page: kill at a seeded page.
            skip = rng.randrange(3) if point.startswith("fetch.") else 0
            process = killed_sync(killed, "hourly", f"{point}=kill@{skip}", cli=cli)
            assert process.returncode == -signal.SIGKILL, (
                f"not killed at {point}: {process.returncode}\n{process.stdout}\n"
                f"{process.stderr}")
            with killed.connection() as connection:
                left = connection.execute("SELECT count(*) FROM _locks").fetchone()[0]
            # The next run completes (a dead process's lock is taken over at once).
            outcome = killed.sync_all()
            assert not any(outcome.values()), outcome
            assert not any(reference.sync_all().values())
            problems = canonical_problems(killed) + duplicate_keys(killed)
            equal = (mirror_contents(killed, ALL_ENTITIES)
                     == mirror_contents(reference, ALL_ENTITIES))
            with killed.connection() as connection:
                locks_after = connection.execute("SELECT count(*) FROM _locks").fetchone()[0]
            line = {
                "scenario": "kill", "point": point, "seed": seed, "cli": cli,
                "change_set": "first" if index == 0 else "incremental", "killed": True,
                "stale_locks_taken_over": left,
                "invariants": {
                    "canonical_equals_source": "; ".join(problems[:5]) or "ok",
                    "whole_database_equals_never_killed": "ok" if equal else "differs",
                    "no_locks_left": "ok" if locks_after == 0 else f"{locks_after} left",
                },
                "rows_lost": rows_lost(killed),
                "seconds": round(time.perf_counter() - started, 2),
            }
            line["passed"] = all(v == "ok" for v in line["invariants"].values())
            report(line)
            lines.append(line)
    return lines


@pytest.mark.parametrize("seed", seeds([11], 4, offset=10))
def test_a_sync_killed_at_any_point_is_completed_by_the_next_run(tmp_path, seed, chaos_store,
                                                                 chaos_report):
    """CI: the five points the issue names, one through `dataverse-assets sync` itself (the
    production entry point, Dagster in-process); soak: every point, in a seeded order.
    PostgreSQL: the killed process's advisory locks are freed by the server as its sessions
    end, and a transaction it had open is rolled back by the server."""
    points = KILL_POINTS if SOAK else CI_POINTS
    points = random.Random(seed).sample(points, len(points))
    lines = kill_and_recover(tmp_path, points, seed, cli_points={"publish.mid_execute"},
                             report=chaos_report, store_for=chaos_store)
    failed = [line for line in lines if not line["passed"]]
    assert not failed, failed


PARALLEL_HOURLY = ["vin_candidates", "vin_clinicaltrials", "vin_vin_candidate_accountset",
                   "vin_vin_clinicaltrial_contactset", "vin_vin_candidate_clinicaltrialset",
                   "accounts", "contacts"]


def cli_sync(tmp_path: Path, url: str, config: Path,
             store: str) -> tuple[dict[str, str], list[str]]:
    """The environment and command of `dataverse-assets sync --group hourly` (Dagster
    in-process, entities fetched on threads) for the store, and an archive and home in
    tmp_path."""
    (tmp_path / "home").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), **store_environment(store, tmp_path),
           "DATAVERSE_ARCHIVE_DIR": str(tmp_path / "archive"),
           "DATAVERSE_ENTITIES_CONFIG": str(config), "DATAVERSE_URL": url,
           "DATAVERSE_SOURCE": "simulator", "DAGSTER_HOME": str(tmp_path / "home"),
           "DATAVERSE_BUDGET_DIR": str(tmp_path / "budget"), "DATAVERSE_PARALLEL_ENTITIES": "4"}
    return env, [str(Path(sys.executable).parent / "dataverse-assets"), "sync",
                 "--group", "hourly"]


def assert_exact_and_unlocked(store: str, simulator, entities: list[str]) -> None:
    """The mirror in the store holds exactly the simulator's records, and no lock is left."""
    mirror = SimpleNamespace(simulator=simulator, connection=lambda: connect(store))
    for entity in entities:
        assert_mirror_equals_simulator(mirror, entity)
    with connect(store) as connection:
        assert connection.execute("SELECT count(*) FROM _locks").fetchone()[0] == 0


def test_a_parallel_first_sync_killed_with_entities_and_key_ranges_in_flight_is_completed(
        tmp_path, chaos_store) -> None:
    """`dataverse-assets sync` (Dagster in-process, the group's entities fetched at once, one
    of them in four key ranges) SIGKILLed mid-fetch; the next sync leaves the mirror equal to
    the source, with no duplicate and no lock left."""
    simulator = DataverseSimulator(ENTITY_NAMES, seed=3,
                                   row_counts={**SMALL_ROW_COUNTS, "vin_clinicaltrials": 200},
                                   latency=LatencyModel(per_request_seconds=0.02))
    config = write_entities_config(tmp_path / "entities.json", page_size=15,
                          overrides={"vin_clinicaltrials": {"parallel_ranges": 4}})
    store = chaos_store(tmp_path)
    with serve_on_loopback(simulator) as url:
        env, command = cli_sync(tmp_path, url, config, store)
        # The 25th page archived by any of the run's fetches.
        killed = subprocess.run(command, env={**env, "DATAVERSE_FAULT_POINTS":
                                              "fetch.after_page=kill@24"},
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        log = list(simulator.stats.request_log)  # up to the kill
        entities = most_at_once(log, lambda r: r.entity if r.entity in PARALLEL_HOURLY
                                else None)
        ranges = most_at_once(log, lambda r: key_range_of(r)
                              if r.entity == "vin_clinicaltrials" else None)
        assert entities >= 3 and ranges >= 2, (entities, ranges)
        recovered = subprocess.run(command, env=env, capture_output=True, text=True,
                                   timeout=300)
        assert recovered.returncode == 0, recovered.stderr[-2000:]
    assert_exact_and_unlocked(store, simulator, PARALLEL_HOURLY)


# SQLite only (the CI budget, docs/store-backends.md): what it tests is the fetch threads
# stopping; a PostgreSQL run cut off (by a kill) is the tests above.
@pytest.mark.parametrize("chaos_store", ["sqlite"], indirect=True)
def test_an_interrupted_run_stops_the_fetches_it_started(tmp_path, chaos_store) -> None:
    """Ctrl-C (or Terminate in the UI) during a run whose entities are fetched on threads:
    the fetches stop at their next page instead of holding the process until they are done,
    and the next sync completes the mirror."""
    slow = "vin_candidates"  # 1,000 rows in pages of 10, 0.1 s each: ~10 s in one stream
    simulator = DataverseSimulator(ENTITY_NAMES, seed=3,
                                   row_counts={**SMALL_ROW_COUNTS, slow: 1000},
                                   latency=LatencyModel(per_request_seconds=0.1))
    config = write_entities_config(tmp_path / "entities.json", page_size=10)
    store = chaos_store(tmp_path)
    with serve_on_loopback(simulator) as url:
        env, command = cli_sync(tmp_path, url, config, store)

        def pages_of_slow() -> int:
            with simulator.lock:
                return sum(1 for r in simulator.stats.request_log
                           if r.entity == slow and r.rows is not None)

        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while pages_of_slow() < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            interrupted_at = pages_of_slow()
            process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        assert process.returncode != 0
        # Stopped within a page or two of the interrupt, not after the ~100 pages.
        assert pages_of_slow() <= interrupted_at + 3, (interrupted_at, pages_of_slow())
        recovered = subprocess.run(command, env=env, capture_output=True, text=True,
                                   timeout=300)
        assert recovered.returncode == 0, recovered.stderr[-2000:]
    assert_exact_and_unlocked(store, simulator, [slow])
