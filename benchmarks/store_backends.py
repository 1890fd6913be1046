"""The mirror in SQLite or in PostgreSQL, measured: the same first sync, then the same 1%
incremental, into each store (issue #25 section 1). Not part of the test suite.

    .venv/bin/python benchmarks/store_backends.py                  # 1,000,000 rows
    .venv/bin/python benchmarks/store_backends.py --rows 50000 --out /tmp/store-backends.json

One archive, replayed into both stores, so the source's speed is measured once and takes no
part in the comparison:
1. record: the suite's simulator (`dataverse-assets simulator --control`, its own process, as
   run_all.py serves it) holds `--rows` rows of `vin_benchmarkrows` (30 columns, ~1.1 KB a
   row); change set 1 is fetched from it by change tracking (the real fetch: client, pages of
   `--page-size`, archive) into the archive, without staging while fetching; then 1% of the
   rows are edited (`/_simulator/mutate`) and change set 2 is fetched by the delta link. The
   recorder's SQLite database only carries the delta link from one fetch to the next (nothing
   is staged or published there).
2. replay, each store in turn, each change set in a process of its own (`--worker`, so each
   peak RSS is its own): fetch (the archive source: the change set is archived already, so it
   is taken as it is, as `DATAVERSE_SOURCE=archive` does), stage (`staging/E`: the archive's
   pages parsed and written to staging), publish (`canonical/E`: plan, then canonical and
   E__history), each under the entity's lock, as the assets run them (no Dagster: its
   overhead is the same for both stores). Then, timed apart and not in rows/s (as in
   run_all.py, where it ends with the process), a checkpoint: what was committed is written
   to the store's files (SQLite's checkpoint thread folds the WALs in; PostgreSQL's
   CHECKPOINT). Wall time and CPU per phase, rows/s (rows / (stage + publish)), the worker's
   peak RSS, and the store's size on disk after it: SQLite's mirror file and staging file,
   and their WALs apart; PostgreSQL's `pg_database_size` (staging is a schema of the same
   database), and the cluster's WAL folder apart. For PostgreSQL the server's CPU
   (the postmaster's and its children's, the exited backends included) and its peak memory
   (PSS summed over its processes, sampled every 0.2 s) too: the client's numbers alone
   would hide the work the server does on the same cores.
3. the two mirrors are compared: the same canonical tables (every table that is not
   bookkeeping: `E`, `E__history`, ...), the same columns, row counts and a content digest of
   every row, and the same sync state (watermark, delta link). Any difference ends the run
   with exit code 1: the benchmark also proves that both stores hold the same mirror.

PostgreSQL is a throwaway cluster the script starts itself (dataverse_assets_tests/
postgres_server.py, as the tests do, but `durable`: the server's default settings, fsync on;
SQLite runs as the store configures it: WAL, synchronous=NORMAL for the mirror, OFF for the
staging file). `--pg-setting name=value` passes more server settings. Results go to
benchmarks/results/store-backends.json; a summary table is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_all import (  # noqa: E402
    ENTITY,
    Simulator,
    proc_status_mb,
    run_as_worker,
    run_worker,
    write_config,
)

FIRST, INCREMENTAL = "20260101T000000Z", "20260101T010000Z"
STORES = ("sqlite", "postgresql")
DIGEST_MODULUS = 2 ** 128
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- workers (each run in its own process) ----------------------------------------------------

def _entity(config: str):
    from dataverse_assets.config import load_entities_config

    entities = load_entities_config(Path(config)).entities
    return next(e for e in entities if e.name == ENTITY)


def worker_record(args: dict) -> dict:
    """Fetch one change set from the simulator into the archive (no staging while fetching),
    then carry its delta link to the next fetch in the recorder's database."""
    from dataverse_assets.modes import SyncStatus
    from dataverse_assets.source.simulator import SimulatorSource
    from dataverse_assets.store.bookkeeping import write_sync_state
    from dataverse_assets.store.mirror import Mirror
    from dataverse_assets.sync import steps
    from dataverse_assets.sync.prestage import STAGE_WHILE_FETCHING_ENV

    os.environ[STAGE_WHILE_FETCHING_ENV] = "0"
    # No key scan: change set 2 is the delta alone, as an hourly sync between scans is.
    entity = _entity(args["config"]).model_copy(update={"reconcile_every_hours": 0})
    store = Mirror(db_path=args["recorder"], archive_dir=args["archive"])
    source = SimulatorSource(entity_names=[ENTITY], base_url=args["url"],
                             max_concurrency=args["concurrency"])
    started = time.perf_counter()
    summary, reused = steps.fetch(store, source, entity, args["change_set"])
    seconds = time.perf_counter() - started
    assert not reused, "the recording's archive must start empty"
    with store.connection() as connection:
        write_sync_state(connection, ENTITY, mode=summary.mode,
                         watermark=summary.watermark_after,
                         delta_token=summary.delta_link_after, status=SyncStatus.COMPLETED,
                         change_set=args["change_set"])
        connection.commit()
    return {"seconds": round(seconds, 3), "records": summary.records, "pages": summary.pages,
            "requests": summary.requests, "bytes_archived": summary.bytes_archived,
            "mode": summary.mode, "rows_per_second": round(summary.records / seconds),
            "peak_rss_mb": proc_status_mb("VmHWM")}


def worker_replay(args: dict) -> dict:
    """One change set from the archive into a store: fetch (archived: taken as it is), stage,
    publish, each timed, as the assets run them."""
    from dataverse_assets.source.replay import ArchiveSource
    from dataverse_assets.store.mirror import Mirror
    from dataverse_assets.sync import steps
    from dataverse_assets.sync.stage import write_staged

    entity = _entity(args["config"])
    store = Mirror(db_path=args["store"], archive_dir=args["archive"])
    source = ArchiveSource(archive_dir=args["archive"])
    change_set = args["change_set"]
    server = args.get("postmaster")
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    server_cpu: dict[str, float] = {}

    @contextmanager
    def phase(name: str):
        started, cpu_before = time.perf_counter(), time.process_time()
        ticks = server_cpu_ticks(server) if server else 0
        yield
        seconds[name] = round(time.perf_counter() - started, 3)
        cpu[name] = round(time.process_time() - cpu_before, 2)
        if server:
            server_cpu[name] = round((server_cpu_ticks(server) - ticks) / CLOCK_TICKS, 2)

    with phase("fetch"):
        summary, reused = steps.fetch(store, source, entity, change_set)
    if not reused:
        raise SystemExit(f"change set {change_set} was not taken from the archive")
    with phase("stage"), store.entity_lock(ENTITY, owner="store-benchmark",
                                           purpose="staging"), \
            store.connection() as connection:
        staged_rows = write_staged(connection, steps.stage(store, entity, change_set))
    with phase("publish"), store.entity_lock(ENTITY, owner="store-benchmark",
                                             purpose="publishing"):
        results = steps.publish(store, entity, change_set)
    # Apart from the sync's time (as in run_all.py, where it ends with the process): what is
    # committed is written to the store's files. SQLite: its checkpoint thread folds the WALs
    # into the files; PostgreSQL: CHECKPOINT writes the dirty shared buffers.
    with phase("checkpoint"):
        checkpoint(args["store"])
    published = results[-1]
    with store.connection() as connection:
        canonical_rows = connection.execute(f'SELECT count(*) FROM "{ENTITY}"').fetchone()[0]
    total = seconds["stage"] + seconds["publish"]
    return {
        "change_set": change_set, "records": summary.records, "staged_rows": staged_rows,
        "created": published.created, "updated": published.updated,
        "unchanged": published.unchanged, "deleted": published.deleted,
        "canonical_rows": canonical_rows,
        "phase_seconds": seconds,
        "seconds": round(sum(v for k, v in seconds.items() if k != "checkpoint"), 3),
        "rows_per_second": round(summary.records / total) if total else None,
        # This process's CPU per phase (its threads included); PostgreSQL's server apart.
        "phase_cpu_seconds": cpu,
        **({"phase_server_cpu_seconds": server_cpu} if server else {}),
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "store_bytes": store_bytes(args["store"]),
    }


def worker_content(args: dict) -> dict:
    return mirror_content(args["store"])


WORKERS = {"record": worker_record, "replay": worker_replay, "content": worker_content}


# -- what a store holds -----------------------------------------------------------------------

def checkpoint(address: str) -> None:
    from dataverse_assets.store.backend import is_postgres_address
    from dataverse_assets.store.db import connect, wait_for_checkpoint
    from dataverse_assets.store.staging_store import staging_path

    if is_postgres_address(address):
        connection = connect(address)
        try:
            connection.execute("CHECKPOINT")
        finally:
            connection.close()
        return
    for path in (Path(address), staging_path(Path(address))):
        wait_for_checkpoint(str(path))


def store_bytes(address: str) -> dict[str, int]:
    """The store's size on disk, after `checkpoint`. SQLite: the mirror file and the staging
    file (`data`) and their WALs (`wal`: as large as they grew; a checkpoint does not shrink
    them, the maintenance job does). PostgreSQL: `pg_database_size` (`data`: its staging
    schema included); the cluster's WAL folder (`wal`) is measured by the orchestrator."""
    from dataverse_assets.store.backend import is_postgres_address
    from dataverse_assets.store.db import connect
    from dataverse_assets.store.staging_store import staging_path

    if is_postgres_address(address):
        connection = connect(address)
        try:
            size = connection.execute(
                "SELECT pg_database_size(current_database())").fetchone()[0]
        finally:
            connection.close()
        return {"data": size}

    def size(path: Path) -> int:
        return path.stat().st_size if path.exists() else 0

    mirror = Path(address)
    staging = staging_path(mirror)
    sizes = {"mirror_file": size(mirror), "staging_file": size(staging),
             "mirror_wal": size(Path(f"{mirror}-wal")),
             "staging_wal": size(Path(f"{staging}-wal"))}
    return {"data": sizes["mirror_file"] + sizes["staging_file"],
            "wal": sizes["mirror_wal"] + sizes["staging_wal"], **sizes}


def _canonical_tables(connection, postgres: bool) -> list[str]:
    """Every table of the mirror that is not bookkeeping (`_...`) or staging."""
    sql = ("SELECT tablename FROM pg_tables WHERE schemaname = 'public'" if postgres else
           "SELECT name FROM sqlite_master WHERE type = 'table'")
    return sorted(name for (name,) in connection.execute(sql).fetchall()
                  if not name.startswith(("_", "sqlite_")))


def mirror_content(address: str) -> dict:
    """Each canonical table's columns, row count and a digest of its rows (a sum of each
    row's hash, so row order does not matter), and the sync state, read without holding a
    table's rows in memory."""
    from dataverse_assets.store.backend import is_postgres_address
    from dataverse_assets.store.db import quote_identifier, table_columns

    postgres = is_postgres_address(address)
    if postgres:
        import psycopg

        connection = psycopg.connect(address)  # a transaction: a server-side cursor streams
    else:
        import sqlite3

        connection = sqlite3.connect(f"file:{address}?mode=ro", uri=True)
    try:
        from dataverse_assets.store.db import connect

        catalog = connect(address)  # the store's own view of the columns
        try:
            tables = {name: table_columns(catalog, name)
                      for name in _canonical_tables(catalog, postgres)}
        finally:
            catalog.close()
        content: dict = {"tables": {}}
        for name, columns in tables.items():
            sql = (f"SELECT {', '.join(quote_identifier(c) for c in sorted(columns))} "
                   f"FROM {quote_identifier(name)}")
            cursor = (connection.cursor(name=f"digest_{len(content['tables'])}")
                      if postgres else connection.cursor())
            cursor.execute(sql)
            rows = total = 0
            while batch := cursor.fetchmany(5000):
                for row in batch:
                    value = repr(tuple(bytes(v) if isinstance(v, memoryview) else v
                                       for v in row)).encode()
                    total += int.from_bytes(hashlib.blake2b(value, digest_size=16).digest(),
                                            "big")
                rows += len(batch)
            cursor.close()
            content["tables"][name] = {"columns": sorted(columns), "rows": rows,
                                       "digest": f"{total % DIGEST_MODULUS:032x}"}
        content["sync_state"] = [list(r) for r in connection.execute(
            "SELECT entity, mode, watermark, delta_token, status, last_change_set"
            " FROM _sync_state ORDER BY entity").fetchall()]
    finally:
        connection.close()
    return content


def assert_same_mirror(contents: dict[str, dict]) -> list[str]:
    """What differs between the stores' mirrors (nothing: an empty list)."""
    sqlite, postgres = contents["sqlite"], contents["postgresql"]
    problems = []
    if set(sqlite["tables"]) != set(postgres["tables"]):
        problems.append(f"tables: SQLite {sorted(sqlite['tables'])}, PostgreSQL "
                        f"{sorted(postgres['tables'])}")
    for name in sorted(set(sqlite["tables"]) & set(postgres["tables"])):
        a, b = sqlite["tables"][name], postgres["tables"][name]
        for key in ("columns", "rows", "digest"):
            if a[key] != b[key]:
                problems.append(f"{name}: {key} SQLite {a[key]}, PostgreSQL {b[key]}")
    if sqlite["sync_state"] != postgres["sync_state"]:
        problems.append(f"sync state: SQLite {sqlite['sync_state']}, PostgreSQL "
                        f"{postgres['sync_state']}")
    return problems


def expected_counts(suite: dict) -> list[str]:
    """Both stores hold every recorded row once, and the incremental updated the edited ones
    (both stores wrong alike would pass the comparison)."""
    recorded = suite["record"]["first"]["records"]
    edited = suite["record"]["incremental"]["records"]
    problems = []
    for store, runs in suite["stores"].items():
        first, incremental = runs["first_sync"], runs["incremental_1pct"]
        if (first["created"], first["canonical_rows"]) != (recorded, recorded):
            problems.append(f"{store}: the first sync created {first['created']:,} rows and "
                            f"holds {first['canonical_rows']:,}; {recorded:,} were recorded")
        if (incremental["updated"], incremental["canonical_rows"]) != (edited, recorded):
            problems.append(f"{store}: the incremental updated {incremental['updated']:,} "
                            f"rows and holds {incremental['canonical_rows']:,}; {edited:,} "
                            f"were edited, {recorded:,} recorded")
    return problems


# -- the PostgreSQL server's share ------------------------------------------------------------

def _server_processes(postmaster: int) -> list[int]:
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children")
    try:
        return [postmaster, *(int(p) for p in children.read_text().split())]
    except OSError:
        return [postmaster]


def _stat_ticks(pid: int, with_children: bool) -> int:
    """utime + stime (+ cutime + cstime: the children it has waited for, i.e. exited
    backends) of a process, in clock ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # After the command's closing parenthesis: state is field 3, utime field 14.
    ticks = [int(v) for v in fields[11:15]]
    return sum(ticks) if with_children else ticks[0] + ticks[1]


def server_cpu_ticks(postmaster: int) -> int:
    """The server's CPU so far: its running processes' and the exited ones' (a phase's
    backend still running when the phase ends is counted when it is: a few ms)."""
    return sum(_stat_ticks(pid, with_children=pid == postmaster)
               for pid in _server_processes(postmaster))


def _pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class ServerMeter:
    """The server's CPU seconds over a block and its peak memory (PSS of the postmaster and
    its children, summed: shared buffers counted once), sampled while the block runs."""

    def __init__(self, data: Path) -> None:
        self.postmaster = int((data / "postmaster.pid").read_text().split()[0])
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, sum(
                _pss_mb(pid) for pid in _server_processes(self.postmaster)))
            self._stop.wait(0.2)

    def __enter__(self) -> ServerMeter:
        self._ticks = server_cpu_ticks(self.postmaster)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        time.sleep(0.3)  # the worker's backends exit and are waited for by the postmaster
        self.cpu_seconds = round(
            (server_cpu_ticks(self.postmaster) - self._ticks) / CLOCK_TICKS, 2)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- the orchestrator -------------------------------------------------------------------------

def record(args: argparse.Namespace, work: Path, config: Path, env: dict[str, str]) -> dict:
    """Both change sets into one archive (see the module's docstring, step 1)."""
    simulator = Simulator(config, args.rows, small_rows=1)
    common = {"url": simulator.url, "archive": str(work / "archive"), "config": str(config),
              "recorder": str(work / "recorder" / "mirror.db"),
              "concurrency": args.concurrency}
    (work / "recorder").mkdir()
    try:
        print(f"[record] fetch of {args.rows:,} rows from the simulator ...", flush=True)
        first = run_worker("record", {**common, "change_set": FIRST}, env, script=__file__)
        print(f"    {first['seconds']} s, {first['rows_per_second']:,} rows/s, "
              f"{first['pages']} pages", flush=True)
        changed = max(1, args.rows // 100)
        updated = simulator.mutate(changed)
        print(f"[record] {updated:,} rows edited; fetch of the delta ...", flush=True)
        second = run_worker("record", {**common, "change_set": INCREMENTAL}, env,
                            script=__file__)
        print(f"    {second['seconds']} s, {second['records']:,} records", flush=True)
    finally:
        simulator_peak = simulator.peak_rss_mb()
        simulator.stop()
    shutil.rmtree(work / "recorder")
    return {"first": first, "incremental": {**second, "rows_edited": updated},
            "archive_bytes": folder_bytes(work / "archive"),
            "simulator_peak_rss_mb": simulator_peak}


def replay(store: str, address: str, args: argparse.Namespace, work: Path, config: Path,
           env: dict[str, str], server) -> dict:
    out: dict = {}
    for label, change_set in (("first_sync", FIRST), ("incremental_1pct", INCREMENTAL)):
        print(f"[{store}] {label.replace('_', ' ')} ({change_set}) ...", flush=True)
        worker_args = {"store": address, "archive": str(work / "archive"),
                       "config": str(config), "change_set": change_set}
        if server is None:
            result = run_worker("replay", worker_args, env, script=__file__)
        else:
            meter = ServerMeter(server.data)
            worker_args["postmaster"] = meter.postmaster
            with meter:
                result = run_worker("replay", worker_args, env, script=__file__)
            result["server_cpu_seconds"] = meter.cpu_seconds
            result["server_peak_pss_mb"] = round(meter.peak_mb, 1)
            # The cluster's WAL (recycled segments, up to max_wal_size): its only database is
            # the mirror, so it is the store's.
            result["store_bytes"]["wal"] = folder_bytes(server.data / "pg_wal")
        out[label] = result
        phases = result["phase_seconds"]
        print(f"    {result['seconds']} s (fetch {phases['fetch']}, stage {phases['stage']}, "
              f"publish {phases['publish']}; then checkpoint {phases['checkpoint']}), "
              f"{result['rows_per_second'] or 0:,} rows/s, "
              f"peak RSS {result['peak_rss_mb']} MB"
              + (f", server CPU {result['server_cpu_seconds']} s, server PSS "
                 f"{result['server_peak_pss_mb']} MB" if server else "")
              + f", store {result['store_bytes']['data'] / 1e6:,.1f} MB + WAL "
              f"{result['store_bytes']['wal'] / 1e6:,.1f} MB", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a PostgreSQL server setting for the throwaway cluster "
                        "(repeatable), e.g. shared_buffers=1GB")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: temporary)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/store-backends.json")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if run_as_worker(args, WORKERS):
        return 0

    bad = [setting for setting in args.pg_setting
           if not re.fullmatch(r"[a-z_.]+=[^\s'\"]+", setting)]
    if bad:
        parser.error(f"--pg-setting {bad[0]!r}: expected name=value, the value without spaces "
                     "or quotes (e.g. shared_buffers=1GB)")
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: the folder is not empty; name a new one")
    if args.rows < 100:
        parser.error("--rows: at least 100 (1% of them are edited for the incremental)")
    from dataverse_assets_tests.postgres_server import server_binaries, throwaway_postgres

    binaries = server_binaries()
    if binaries is None:
        raise SystemExit("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: "
                         "apt-get install postgresql")
    settings = dict(setting.split("=", 1) for setting in args.pg_setting)
    started = time.perf_counter()
    suite: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "processor": platform.machine()},
        "commit": git_commit(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "entity": ENTITY, "rows": args.rows, "page_size": args.page_size,
        "change_sets": {"first_sync": FIRST, "incremental_1pct": INCREMENTAL},
    }
    print(f"load average at start: {suite['load_average_at_start']}", flush=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-stores-"))
    work.mkdir(parents=True, exist_ok=True)
    config = write_config(work / "entities_config.json", args.page_size)
    env = dict(os.environ, DATAVERSE_ENTITIES_CONFIG=str(config))
    try:
        suite["record"] = record(args, work, config, env)
        with throwaway_postgres(binaries=binaries, durable=True, settings=settings) as server:
            with server_connection(server.url()) as connection:
                suite["postgresql_server"] = {
                    "version": connection.execute("SHOW server_version").fetchone()[0],
                    **{name: connection.execute(f"SHOW {name}").fetchone()[0] for name in (
                        "shared_buffers", "fsync", "synchronous_commit", "max_wal_size",
                        "work_mem", *settings)}}
            addresses = {"sqlite": str(work / "sqlite" / "mirror.db"),
                         "postgresql": server.create_database("mirror")}
            (work / "sqlite").mkdir()
            suite["stores"] = {store: replay(store, addresses[store], args, work, config, env,
                                             server if store == "postgresql" else None)
                               for store in STORES}
            print("comparing the two mirrors ...", flush=True)
            compared = time.perf_counter()
            # Both read at once, each in a process of its own (two cores: half the wait).
            with ThreadPoolExecutor(len(STORES)) as pool:
                contents = dict(zip(STORES, pool.map(
                    lambda store: run_worker("content", {"store": addresses[store]}, env,
                                             script=__file__), STORES), strict=True))
            suite["mirror"] = contents["sqlite"]
            suite["compare_seconds"] = round(time.perf_counter() - compared, 1)
            problems = assert_same_mirror(contents) + expected_counts(suite)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    suite["same_mirror"] = not problems
    suite["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    suite["suite_seconds"] = round(time.perf_counter() - started, 1)
    if problems:
        suite["differences"] = problems
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(suite, indent=2) + "\n")
    print_summary(suite)
    print(f"written to {args.out}")
    if problems:
        print("\nTHE TWO MIRRORS DIFFER (or miss rows):\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    return 0


def git_commit() -> str | None:
    """The code measured: HEAD, "+" when the work tree differs from it."""
    import subprocess

    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return head + ("+" if git("status", "--porcelain", "--untracked-files=no") else "") or None


def server_connection(url: str):
    import psycopg

    return psycopg.connect(url, autocommit=True)


def print_summary(suite: dict) -> None:
    record = suite["record"]
    print(f"\n{suite['machine']['cpus']} CPUs, Python {suite['machine']['python']}, "
          f"PostgreSQL {suite['postgresql_server']['version']}; load average at start "
          f"{suite['load_average_at_start']}, at end {suite['load_average_at_end']}; "
          f"{suite['suite_seconds']} s in all")
    print(f"recorded once: {record['first']['records']:,} rows fetched in "
          f"{record['first']['seconds']} s ({record['first']['rows_per_second']:,} rows/s), "
          f"the 1% delta ({record['incremental']['records']:,} records) in "
          f"{record['incremental']['seconds']} s; archive "
          f"{record['archive_bytes'] / 1e6:,.1f} MB")
    print("CPU: this process's seconds, + the PostgreSQL server's")
    print(f"{'run':<30}{'fetch':>7}{'stage':>8}{'publish':>9}{'ckpt':>7}{'rows/s':>8}"
          f"{'stage CPU':>12}{'publish CPU':>13}{'RSS MB':>8}{'srv MB':>8}{'data MB':>9}"
          f"{'WAL MB':>8}")
    for store in STORES:
        for label, r in suite["stores"][store].items():
            p, c = r["phase_seconds"], r["phase_cpu_seconds"]
            server = r.get("phase_server_cpu_seconds")
            cpus = [f"{c[k]}" + (f"+{server[k]}" if server else "") for k in ("stage", "publish")]
            print(f"{store + ' ' + label:<30}{p['fetch']:>7}{p['stage']:>8}{p['publish']:>9}"
                  f"{p['checkpoint']:>7}"
                  f"{r['rows_per_second'] or 0:>8,}{cpus[0]:>12}{cpus[1]:>13}"
                  f"{r['peak_rss_mb']:>8}{r.get('server_peak_pss_mb', '')!s:>8}"
                  f"{r['store_bytes']['data'] / 1e6:>9,.1f}"
                  f"{r['store_bytes']['wal'] / 1e6:>8,.1f}")
    tables = ", ".join(f"{name} {t['rows']:,} rows"
                       for name, t in suite["mirror"]["tables"].items())
    print(f"same mirror in both stores: {'yes' if suite['same_mirror'] else 'NO'} ({tables})")


if __name__ == "__main__":
    raise SystemExit(main())
