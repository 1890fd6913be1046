"""The benchmark suite of the performance issue, in one command (not part of the test suite).

    .venv/bin/python benchmarks/run_all.py                 # 1,000,000 rows (+ a 100,000-row run)
    .venv/bin/python benchmarks/run_all.py --rows 100000 --flat-rows 0   # a quick run

Scenarios, against the simulator serving a 30-column table (`vin_benchmarkrows`, ~1.1 KB a row)
in its own process over loopback HTTP:
1. full sync, end to end through Dagster (raw -> staging -> canonical): rows/s, peak RSS,
   requests, bytes archived, time per layer;
2. incremental: 1% of the rows changed, then nothing changed;
3. a sync of 20 small entities (1,000 rows each): wall time, Dagster overhead per asset; and
   the same first sync as `dagster asset materialize` runs it (the UI's and CI's way), with
   steps in-process (the default) and with a process per step;
4. rebuild from the archive;
5. the same full sync by dlt's `rest_api` source into SQLite (needs `pip install -e '.[bench]'`),
   reported as a ratio;
6. the floor: fetch, parse and write each record once into one SQLite table, with nothing of
   ours in between (what this machine allows at all).

Every sync, rebuild and dlt run is its own process (`--worker`), so its peak RSS is its own;
the simulator's CPU and memory are apart from the client's. The simulator's request counters
come from its control endpoint (`dataverse-assets simulator --control`). Results go to
benchmarks/results/suite.json; a summary table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENTITY = "vin_benchmarkrows"
SMALL_ENTITIES = [f"vin_small{n:02d}s" for n in range(1, 21)]
# The loopback targets of the performance issue (#24): one durable write per row puts the
# floor of a full sync at about 30-35,000 rows/s on a 2-core machine.
TARGETS = {
    "full_sync_rows_per_second": 25_000,
    "ratio_to_dlt": 5.0,
    "peak_rss_mb": 400,
    "rss_flatness": 1.2,
    "incremental_1pct_share_of_full": 0.05,
    "incremental_0pct_seconds": 3.0,
    "small_entities_seconds": 30.0,
    "rebuild_rows_per_second": 40_000,
}


# -- helpers shared by the orchestrator and the workers ---------------------------------------

def proc_status_mb(field: str, pid: int | str = "self") -> float:
    """VmRSS / VmHWM (peak) of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def stage_worker_memory() -> dict:
    """Staging's worker processes (dataverse_assets.stage_workers) are children of the run's
    process, so their memory is apart from its VmHWM: the pool reads each worker's VmHWM
    before it exits (a child's rusage would count the parent's memory copied at fork)."""
    from dataverse_assets.sync import stage_workers
    from dataverse_assets.sync.stage import staging_workers

    return {"stage_workers": staging_workers(),
            "stage_worker_peak_rss_mb": round(stage_workers.peak_worker_rss_mb, 1)}


def with_workers_mb(result: dict) -> float:
    """The run's peak RSS plus, when staging used worker processes, each worker's peak."""
    workers = result.get("stage_workers", 0) if result.get("stage_worker_peak_rss_mb") else 0
    return round(result["peak_rss_mb"] + workers * result.get("stage_worker_peak_rss_mb", 0), 1)


def simulator_token(base: str) -> str:
    import httpx

    from dataverse_assets.simulator import (
        SIMULATOR_CLIENT_ID,
        SIMULATOR_CLIENT_SECRET,
        SIMULATOR_TENANT_ID,
    )

    response = httpx.post(f"{base}/{SIMULATOR_TENANT_ID}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": SIMULATOR_CLIENT_ID,
        "client_secret": SIMULATOR_CLIENT_SECRET, "scope": f"{base}/.default"})
    response.raise_for_status()
    return response.json()["access_token"]


def write_config(path: Path, page_size: int) -> Path:
    """The benchmark's entities file: the wide table alone in group `bench` (change tracking:
    a first sync, then delta links), 20 small tables in group `small`."""
    entities = [{"name": ENTITY, "group": "bench", "incremental": "change_tracking",
                 "page_size": page_size, "description": "30-column benchmark table"}]
    entities += [{"name": name, "group": "small", "page_size": page_size}
                 for name in SMALL_ENTITIES]
    path.write_text(json.dumps({
        "groups": {"bench": {"cron": "0 * * * *"}, "small": {"cron": "0 * * * *"}},
        "entities": entities,
    }, indent=1))
    return path


# -- workers (each run in its own process) ----------------------------------------------------

class _Timers:
    """Seconds spent inside our own functions, to tell them apart from Dagster's work."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, module, name: str) -> None:
        original = getattr(module, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

        setattr(module, name, timed)


def worker_sync(args: dict) -> dict:
    """One run of a group's job, in-process, for a new change set."""
    from dagster import DagsterEventType, DagsterInstance

    from dataverse_assets.config import Settings
    from dataverse_assets.defs import assets, io_managers
    from dataverse_assets.defs.definitions import build_definitions
    from dataverse_assets.defs.partitions import register_change_set
    from dataverse_assets.defs.schedules import sync_job_name
    from dataverse_assets.store import locks
    from dataverse_assets.sync import steps

    timers = _Timers()
    # Wrapped where they are called from (the IO manager imports them by name).
    for module, name in ((steps, "fetch"), (io_managers, "write_staged"), (steps, "publish"),
                         (assets, "evaluate_canonical_checks"), (steps, "stage"),
                         (io_managers, "canonical_row_count"),
                         (io_managers, "read_publish_state"),
                         (locks, "_try_acquire")):
        timers.wrap(module, name)
    settings = Settings(
        url=args["url"], db_path=Path(args["db"]), archive_dir=Path(args["archive"]),
        entities_config_path=Path(args["config"]), source="simulator",
        max_concurrency=args["concurrency"],
        parallel_entities=args.get("parallel_entities", 4),
        budget_dir=Path(args["budget_dir"]) if args.get("budget_dir") else None,
    )
    defs = build_definitions(settings)
    job = defs.resolve_job_def(sync_job_name(args["group"]))
    instance = DagsterInstance.get()
    rss_before = proc_status_mb("VmRSS")
    cpu_before = time.process_time()
    started = time.perf_counter()
    key = register_change_set(instance, args["group"])
    result = job.execute_in_process(
        instance=instance, partition_key=key, raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
    )
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    steps_started: dict[str, float] = {}
    layers: dict[str, float] = {}
    materialized: dict[str, dict] = {}
    failures = []
    for entry in instance.all_logs(result.run_id):
        event = entry.dagster_event
        if event is None:
            continue
        step = event.step_key or ""
        layer = step.split("__", 1)[0]
        if event.event_type == DagsterEventType.STEP_START:
            steps_started[step] = entry.timestamp
        elif event.event_type == DagsterEventType.STEP_SUCCESS and step in steps_started:
            layers[layer] = layers.get(layer, 0.0) + entry.timestamp - steps_started[step]
        elif event.event_type == DagsterEventType.STEP_FAILURE:
            failures.append(f"{step}: {event.step_failure_data.error.message.strip()[:300]}")
        elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.event_specific_data.materialization
            metadata = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
            materialized["/".join(materialization.asset_key.path)] = {
                k: v for k, v in metadata.items() if isinstance(v, int | float | str)}
    raws = [m for k, m in materialized.items() if k.startswith("raw/")]
    canonicals = [m for k, m in materialized.items() if k.startswith("canonical/")]
    ours = sum(timers.seconds.values())
    assets_run = len(materialized)
    return {
        "change_set": key, "success": result.success, "failures": failures,
        "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 2),
        "records_fetched": sum(m.get("records", 0) for m in raws),
        "pages": sum(m.get("pages", 0) for m in raws),
        "client_requests": sum(m.get("requests", 0) for m in raws),
        "bytes_archived": sum(m.get("bytes_archived", 0) for m in raws),
        "created": sum(m.get("created", 0) for m in canonicals),
        "updated": sum(m.get("updated", 0) for m in canonicals),
        "deleted": sum(m.get("deleted", 0) for m in canonicals),
        "unchanged": sum(m.get("unchanged", 0) for m in canonicals),
        "rows_in_table": sum(m.get("rows_in_table", 0) for m in canonicals),
        "layer_seconds": {k: round(v, 3) for k, v in sorted(layers.items())},
        "our_code_seconds": {k: round(v, 3) for k, v in timers.seconds.items()},
        "assets": assets_run,
        "dagster_overhead_seconds": round(seconds - ours, 3),
        "dagster_overhead_per_asset": round((seconds - ours) / max(assets_run, 1), 4),
        "rss_before_run_mb": rss_before,
        "peak_rss_mb": proc_status_mb("VmHWM"),
        **stage_worker_memory(),
    }


def worker_rebuild(args: dict) -> dict:
    from dataverse_assets.config import load_entities_config
    from dataverse_assets.ops.rebuild import rebuild

    config = load_entities_config(Path(args["config"]))
    config = config.model_copy(update={
        "entities": [e for e in config.entities if e.name == ENTITY]})
    cpu_before = time.process_time()
    report = rebuild(config, args["archive"], args["into"], force=True)
    entity = report.entities[0]
    return {"seconds": round(report.seconds, 3), "rows": report.rows,
            "change_sets": report.change_sets, "canonical_rows": entity.canonical_rows,
            "rows_per_second": round(report.rows / report.seconds),
            "cpu_seconds": round(time.process_time() - cpu_before, 2),
            "peak_rss_mb": proc_status_mb("VmHWM"), **stage_worker_memory()}


def worker_dlt(args: dict) -> dict:
    """The same full read by dlt: rest_api source (bearer token fetched first from the
    simulator's token endpoint, `@odata.nextLink` followed by a JSON-link paginator, pages of
    `page_size`) into SQLite through dlt's sqlalchemy destination."""
    import dlt
    from dlt.sources.rest_api import rest_api_source

    base = args["url"]
    token = simulator_token(base)
    source = rest_api_source({
        "client": {
            "base_url": f"{base}/api/data/v9.2/",
            "auth": {"type": "bearer", "token": token},
            "headers": {"Prefer": f"odata.maxpagesize={args['page_size']}",
                        "Accept": "application/json", "OData-Version": "4.0"},
            "paginator": {"type": "json_link", "next_url_path": "['@odata.nextLink']"},
        },
        "resource_defaults": {"write_disposition": "replace"},
        "resources": [{"name": ENTITY, "endpoint": {"path": ENTITY, "data_selector": "value"},
                       "primary_key": "vin_benchmarkrowid"}],
    })
    pipeline = dlt.pipeline(
        pipeline_name="bench_dlt", pipelines_dir=args["pipelines_dir"],
        destination=dlt.destinations.sqlalchemy(credentials=f"sqlite:///{args['db']}"),
        dataset_name="main", progress=None,
    )
    cpu_before = time.process_time()
    started = time.perf_counter()
    pipeline.run(source)
    seconds = time.perf_counter() - started
    import sqlite3

    connection = sqlite3.connect(args["db"])
    tables = [r[0] for r in connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE ?", (f"%{ENTITY}%",))]
    rows = connection.execute(f'SELECT count(*) FROM "{tables[0]}"').fetchone()[0]
    connection.close()
    return {"dlt_version": dlt.__version__, "seconds": round(seconds, 3), "rows": rows,
            "rows_per_second": round(rows / seconds),
            "cpu_seconds": round(time.process_time() - cpu_before, 2),
            "peak_rss_mb": proc_status_mb("VmHWM")}


def worker_floor(args: dict) -> dict:
    """What this machine allows at all, for the same table: one pass that reads every page
    from the simulator (httpx, bodies as bytes), parses it (orjson) and writes each record
    once into one SQLite table (typed columns + json_response, TEXT primary key, WAL, one
    transaction, the store's pragmas), timing each part. No archive, no staging, no plan, no
    Dagster: the least work any mirror of this table must do."""
    import sqlite3

    import httpx
    import orjson

    base = args["url"]
    headers = {"Authorization": f"Bearer {simulator_token(base)}",
               "Prefer": f"odata.maxpagesize={args['page_size']}", "Accept": "application/json"}
    db = Path(args["db"])
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    connection = sqlite3.connect(db, isolation_level=None)
    for pragma in ("page_size=16384", "journal_mode=WAL", "synchronous=NORMAL",
                   "cache_size=-65536"):
        connection.execute(f"PRAGMA {pragma}")
    seconds = {"fetch": 0.0, "parse": 0.0, "write": 0.0}
    rows = 0
    statement = None
    url = f"{base}/api/data/v9.2/{ENTITY}"
    started = time.perf_counter()
    connection.execute("BEGIN")
    with httpx.Client(timeout=120) as client:
        while url:
            t0 = time.perf_counter()
            body = client.get(url, headers=headers).raise_for_status().content
            t1 = time.perf_counter()
            page = orjson.loads(body)
            records = page["value"]
            t2 = time.perf_counter()
            if statement is None:
                names = [k for k in records[0] if "@" not in k]
                columns = ", ".join(f'"{n}"' + (" PRIMARY KEY" if n == "vin_benchmarkrowid"
                                                else "") for n in names)
                connection.execute(f"CREATE TABLE t ({columns}, json_response TEXT)")
                statement = f"INSERT INTO t VALUES ({', '.join('?' * (len(names) + 1))})"
            connection.executemany(statement, [
                (*map(r.get, names), orjson.dumps(r).decode()) for r in records])
            t3 = time.perf_counter()
            seconds["fetch"] += t1 - t0
            seconds["parse"] += t2 - t1
            seconds["write"] += t3 - t2
            rows += len(records)
            url = page.get("@odata.nextLink")
    t0 = time.perf_counter()
    connection.execute("COMMIT")
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    seconds["write"] += time.perf_counter() - t0
    total = time.perf_counter() - started
    connection.close()
    per_row = {k: round(v / rows * 1e6, 2) for k, v in seconds.items()}
    return {"rows": rows, "seconds": round(total, 3), "rows_per_second": round(rows / total),
            "part_seconds": {k: round(v, 3) for k, v in seconds.items()},
            "microseconds_per_row": per_row,
            # Each part alone, as a rate: the simulator serving (fetch), our parse, our write.
            "rows_per_second_by_part": {k: round(1e6 / v) for k, v in per_row.items() if v},
            "peak_rss_mb": proc_status_mb("VmHWM")}


WORKERS = {"sync": worker_sync, "rebuild": worker_rebuild, "dlt": worker_dlt,
           "floor": worker_floor}


# -- the orchestrator -------------------------------------------------------------------------

class Simulator:
    """`dataverse-assets simulator --control` in its own process."""

    def __init__(self, config: Path, rows: int, small_rows: int) -> None:
        command = [sys.executable, "-m", "dataverse_assets.ops.cli", "simulator", "--port", "0",
                   "--control", "--rows", f"{ENTITY}={rows}"]
        for name in SMALL_ENTITIES:
            command += ["--rows", f"{name}={small_rows}"]
        env = dict(os.environ, DATAVERSE_ENTITIES_CONFIG=str(config))
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                        env=env)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if not match:
            self.process.kill()
            raise SystemExit(f"the simulator did not start: {line!r}")
        self.url = match.group(1)

    def stats(self, reset: bool = False) -> dict:
        import httpx

        method = httpx.post if reset else httpx.get
        return method(f"{self.url}/_simulator/stats", timeout=60).json()

    def mutate(self, rows: int) -> int:
        import httpx

        return httpx.post(f"{self.url}/_simulator/mutate", json={"entity": ENTITY,
                          "update": rows}, timeout=600).json()["updated"]

    def peak_rss_mb(self) -> float:
        return proc_status_mb("VmHWM", self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def run_as_worker(args: argparse.Namespace, workers: dict) -> bool:
    """`--worker KIND ARGS` (how run_worker starts a script): run that worker, print its JSON
    result; False when the script was not started as a worker."""
    if not args.worker:
        return False
    kind, worker_args = args.worker
    print(json.dumps(workers[kind](json.loads(worker_args))), flush=True)
    return True


def run_worker(kind: str, args: dict, env: dict[str, str], script: str = __file__) -> dict:
    """`script --worker kind args` in a process of its own (this suite's workers by default;
    another benchmark's that takes the same `--worker`); the JSON line it prints last."""
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, script, "--worker", kind, json.dumps(args)], cwd=ROOT, env=env,
        capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise SystemExit(f"worker {kind} failed ({completed.returncode}):\n"
                         f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["process_seconds"] = round(time.perf_counter() - started, 2)
    return result


def materialize_command(group: str, entities: list[str], url: str, work: Path,
                        env: dict[str, str], executor: str) -> dict:
    """A first sync of a group the way the UI and CI launch it: `dagster asset materialize`
    in a process of its own (its start-up included), steps run by DATAVERSE_EXECUTOR."""
    import sqlite3

    bin_dir = Path(sys.executable).parent
    db = work / f"materialize-{executor}.db"
    run_env = dict(env, DATAVERSE_SOURCE="simulator", DATAVERSE_URL=url,
                   DATAVERSE_DB_PATH=str(db),
                   DATAVERSE_ARCHIVE_DIR=str(work / f"archive-materialize-{executor}"),
                   DATAVERSE_EXECUTOR=executor)
    key = subprocess.run([str(bin_dir / "dataverse-assets"), "change-set", "create", "--group",
                          group], cwd=ROOT, env=run_env, capture_output=True, text=True,
                         check=True).stdout.strip()
    started = time.perf_counter()
    completed = subprocess.run(
        [str(bin_dir / "dagster"), "asset", "materialize", "-m", "dataverse_assets",
         "--select", f"group:{group}", "--partition", key],
        cwd=ROOT, env=run_env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    output = completed.stdout + completed.stderr
    if completed.returncode != 0 or "RUN_SUCCESS" not in output:
        raise SystemExit(f"dagster asset materialize ({executor}) failed:\n{output[-3000:]}")
    connection = sqlite3.connect(db)
    rows = sum(connection.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
               for name in entities)
    connection.close()
    return {"executor": executor, "seconds": round(seconds, 3), "records_fetched": rows,
            "step_processes": output.count("Launching subprocess")}


def sync_scale(rows: int, args: argparse.Namespace, work: Path, *, everything: bool) -> dict:
    """Scenarios 1, 2 and 4 (and 3 and 5 when `everything`) at one table size."""
    work.mkdir(parents=True)
    home = work / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    config = write_config(work / "entities_config.json", args.page_size)
    env = dict(os.environ, DAGSTER_HOME=str(home), DATAVERSE_ENTITIES_CONFIG=str(config))
    simulator = Simulator(config, rows, args.small_rows)
    out: dict = {"rows": rows}
    try:
        common = {"url": simulator.url, "db": str(work / "mirror.db"),
                  "archive": str(work / "archive"), "config": str(config),
                  "concurrency": args.concurrency}

        def sync(label: str, group: str = "bench") -> dict:
            simulator.stats(reset=True)
            print(f"[{rows:,}] {label} ...", flush=True)
            result = run_worker("sync", {**common, "group": group}, env)
            served = simulator.stats()
            result["simulator"] = {
                "data_requests": sum(served["requests_by_entity"].values()),
                "all_api_requests": served["requests"],
                "metadata_requests": served["metadata_requests"],
                "token_requests": served["token_requests"],
                "max_in_flight": served["max_concurrency"],
                "rows_served": sum(served["rows_served"].values()),
            }
            if not result["success"]:
                raise SystemExit(f"{label} failed: {result['failures']}")
            print(f"    {result['seconds']} s, peak RSS {result['peak_rss_mb']} MB, "
                  f"layers {result['layer_seconds']}", flush=True)
            return result

        out["full_sync"] = full = sync("full sync")
        full["rows_per_second"] = round(full["records_fetched"] / full["seconds"])
        full["expected_data_requests"] = math.ceil(rows / args.page_size)
        changed = max(1, rows // 100)
        updated = simulator.mutate(changed)
        out["incremental_1pct"] = sync(f"incremental, {updated:,} rows changed")
        out["incremental_0pct"] = sync("incremental, nothing changed")
        if everything:
            out["small_entities"] = sync(f"{len(SMALL_ENTITIES)} small entities", "small")
            # The same first sync as `dagster asset materialize` runs it (the UI's and CI's
            # way): in one process (the default), and with a process per step (Dagster's own
            # default executor).
            for executor in ("in_process", "multiprocess"):
                print(f"[{rows:,}] {len(SMALL_ENTITIES)} small entities, dagster asset "
                      f"materialize, {executor} ...", flush=True)
                m = materialize_command("small", SMALL_ENTITIES, simulator.url, work, env,
                                        executor)
                out[f"small_entities_materialize_{executor}"] = m
                print(f"    {m['seconds']} s, {m['step_processes']} step processes",
                      flush=True)
        print(f"[{rows:,}] rebuild from archive ...", flush=True)
        out["rebuild"] = run_worker("rebuild", {"config": str(config),
                                                "archive": common["archive"],
                                                "into": str(work / "rebuilt.db")}, env)
        print(f"    {out['rebuild']['rows_per_second']:,} rows/s", flush=True)
        if everything and args.staging_workers > 1:
            # The same first sync and rebuild with staging's worker processes (opt-in:
            # DATAVERSE_STAGING_WORKERS), into a database and archive of their own.
            workers_env = dict(env, DATAVERSE_STAGING_WORKERS=str(args.staging_workers))
            print(f"[{rows:,}] full sync with {args.staging_workers} staging workers ...",
                  flush=True)
            simulator.stats(reset=True)
            w = run_worker("sync", {**common, "group": "bench", "db": str(work / "w.db"),
                                    "archive": str(work / "archive-w")}, workers_env)
            if not w["success"]:
                raise SystemExit(f"full sync with workers failed: {w['failures']}")
            w["rows_per_second"] = round(w["records_fetched"] / w["seconds"])
            out["full_sync_staging_workers"] = w
            print(f"    {w['seconds']} s, layers {w['layer_seconds']}", flush=True)
            out["rebuild_staging_workers"] = r = run_worker(
                "rebuild", {"config": str(config), "archive": str(work / "archive-w"),
                            "into": str(work / "rebuilt-w.db")}, workers_env)
            print(f"    rebuild {r['rows_per_second']:,} rows/s", flush=True)
        if everything and not args.skip_dlt:
            out["dlt"] = run_dlt(simulator, work, args, env)
        if everything:
            print(f"[{rows:,}] floor: fetch, parse, write once ...", flush=True)
            out["floor"] = run_worker("floor", {"url": simulator.url, "db": str(work / "floor.db"),
                                                "page_size": args.page_size}, env)
            print(f"    {out['floor']['rows_per_second']:,} rows/s; per row "
                  f"{out['floor']['microseconds_per_row']} us", flush=True)
    finally:
        out["simulator_peak_rss_mb"] = simulator.peak_rss_mb()
        simulator.stop()
    return out


def run_dlt(simulator: Simulator, work: Path, args: argparse.Namespace,
            env: dict[str, str]) -> dict:
    try:
        import dlt  # noqa: F401
    except ImportError:
        message = "dlt is not installed (pip install -e '.[bench]'): scenario 5 skipped"
        print(message, flush=True)
        return {"skipped": message}
    simulator.stats(reset=True)
    print("dlt rest_api full sync ...", flush=True)
    result = run_worker("dlt", {"url": simulator.url, "db": str(work / "dlt.db"),
                                "pipelines_dir": str(work / "dlt_pipelines"),
                                "page_size": args.page_size}, env)
    served = simulator.stats()
    result["simulator"] = {"data_requests": sum(served["requests_by_entity"].values()),
                           "max_in_flight": served["max_concurrency"]}
    print(f"    {result['rows_per_second']:,} rows/s, peak RSS {result['peak_rss_mb']} MB",
          flush=True)
    return result


def evaluate(main: dict, flat: dict | None) -> dict:
    full = main["full_sync"]
    checks: dict[str, dict] = {}

    def check(name: str, value, target, met: bool) -> None:
        checks[name] = {"value": value, "target": target, "met": met}

    t = TARGETS
    check("full sync rows/s", full["rows_per_second"], f">= {t['full_sync_rows_per_second']:,}",
          full["rows_per_second"] >= t["full_sync_rows_per_second"])
    dlt = main.get("dlt") or {}
    if "rows_per_second" in dlt:
        ratio = round(full["rows_per_second"] / dlt["rows_per_second"], 2)
        check("ours / dlt rows/s", ratio, f">= {t['ratio_to_dlt']}", ratio >= t["ratio_to_dlt"])
    peak = max(with_workers_mb(main[s]) for s in ("full_sync", "incremental_1pct",
                                                   "incremental_0pct", "rebuild"))
    check("peak RSS MB (run + stage workers)", peak, f"< {t['peak_rss_mb']}",
          peak < t["peak_rss_mb"])
    if flat is not None:
        ratio = round(with_workers_mb(full) / with_workers_mb(flat["full_sync"]), 2)
        check(f"peak RSS {main['rows']:,} / {flat['rows']:,} rows", ratio,
              f"<= {t['rss_flatness']}", ratio <= t["rss_flatness"])
    share = round(main["incremental_1pct"]["seconds"] / full["seconds"], 4)
    check("incremental 1% / full time", share, f"< {t['incremental_1pct_share_of_full']}",
          share < t["incremental_1pct_share_of_full"])
    zero = main["incremental_0pct"]["seconds"]
    check("incremental 0% seconds", zero, f"< {t['incremental_0pct_seconds']}",
          zero < t["incremental_0pct_seconds"])
    if "small_entities" in main:
        small = main["small_entities"]["seconds"]
        check("20 small entities seconds", small, f"< {t['small_entities_seconds']}",
              small < t["small_entities_seconds"])
    rebuild = main["rebuild"]["rows_per_second"]
    check("rebuild rows/s", rebuild, f">= {t['rebuild_rows_per_second']:,}",
          rebuild >= t["rebuild_rows_per_second"])
    simulator = full["simulator"]
    allowed = full["expected_data_requests"] + 5
    check("full sync data requests", simulator["data_requests"],
          f"<= ceil(rows / page) + 5 = {allowed}", simulator["data_requests"] <= allowed)
    in_flight = simulator["max_in_flight"]
    check("requests in flight", in_flight, f"<= {main['concurrency']}",
          in_flight <= main["concurrency"])
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--flat-rows", type=int, default=100_000,
                        help="a second, smaller run for the RSS-flatness target (0: none)")
    parser.add_argument("--small-rows", type=int, default=1000)
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--skip-dlt", action="store_true")
    parser.add_argument("--staging-workers", type=int, default=2,
                        help="also run the full sync and rebuild with this many staging "
                        "worker processes (0: skip)")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: temporary)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/suite.json")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if run_as_worker(args, WORKERS):
        return 0

    started = time.perf_counter()
    suite: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "processor": platform.machine()},
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "entity": ENTITY, "page_size": args.page_size, "max_concurrency": args.concurrency,
    }
    print(f"load average at start: {suite['load_average_at_start']}", flush=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-suite-"))
    try:
        flat = None
        if args.flat_rows and args.flat_rows != args.rows:
            flat = sync_scale(args.flat_rows, args, work / f"rows-{args.flat_rows}",
                              everything=False)
            flat["concurrency"] = args.concurrency
        main_run = sync_scale(args.rows, args, work / f"rows-{args.rows}", everything=True)
        main_run["concurrency"] = args.concurrency
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    suite["runs"] = [r for r in (flat, main_run) if r is not None]
    suite["targets"] = evaluate(main_run, flat)
    suite["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    suite["suite_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(suite, indent=2) + "\n")
    print_summary(suite)
    print(f"written to {args.out}")
    return 0 if all(c["met"] for c in suite["targets"].values()) else 1


def print_summary(suite: dict) -> None:
    print(f"\n{suite['machine']['cpus']} CPUs, Python {suite['machine']['python']}, "
          f"{suite['machine']['platform']}; load average at start "
          f"{suite['load_average_at_start']}, at end {suite['load_average_at_end']}")
    print(f"{'run':<34}{'rows':>10}{'seconds':>10}{'rows/s':>10}{'peak RSS MB':>13}"
          f"{'+ workers':>11}{'requests':>10}")
    for run in suite["runs"]:
        for name in ("full_sync", "incremental_1pct", "incremental_0pct", "small_entities",
                     "small_entities_materialize_in_process",
                     "small_entities_materialize_multiprocess", "rebuild",
                     "full_sync_staging_workers", "rebuild_staging_workers", "dlt", "floor"):
            r = run.get(name)
            if not r or "seconds" not in r:
                continue
            rows = r.get("records_fetched", r.get("rows", 0))
            requests = (r.get("simulator") or {}).get("data_requests", "")
            print(f"{name + ' @' + format(run['rows'], ','):<34}{rows:>10,}{r['seconds']:>10}"
                  f"{round(rows / r['seconds']) if r['seconds'] else 0:>10,}"
                  f"{r.get('peak_rss_mb', '')!s:>13}"
                  f"{with_workers_mb(r) if 'peak_rss_mb' in r else ''!s:>11}{requests!s:>10}")
    print(f"\n{'target':<40}{'value':>12}  {'target':<30}met")
    for name, c in suite["targets"].items():
        print(f"{name:<40}{c['value']!s:>12}  {c['target']:<30}{'yes' if c['met'] else 'NO'}")


if __name__ == "__main__":
    raise SystemExit(main())
