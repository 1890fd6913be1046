"""Nothing grows without bound, measured (not part of the test suite).

    .venv/bin/python benchmarks/retention.py                   # 30 days x 24 change sets
    .venv/bin/python benchmarks/retention.py --days 3 --rows 10000   # a quick run

A 100,000-row change-tracked table (`vin_candidates` of the built-in simulator, on loopback)
gets 1% of its rows edited before each of 720 hourly change sets (30 days), each synced by the
same step functions the assets use (fetch, stage, publish), with the reconcile scan on its
default daily cadence (the first change set of each simulated day); after each simulated day
the maintenance steps run (compaction and retention, bookkeeping retention, incremental
vacuum), as the `maintenance` job would.

Time is simulated: each change set is an hour. A simulated day passes in 10-30 s, depending on
the machine and its load, and what the settings in days compare with is real time (the rows'
and the archive's timestamps). So before each maintenance run every window in days (the
bookkeeping retention, the history horizon, `compact_after_days`) is turned into the real
time its simulated days took, from when each change set started: a 7-day window keeps the
last 168 change sets' rows, however fast the machine ran them.

The staged rows live in their own file beside the mirror (`<mirror>-staging`); both files are
measured. After every simulated day it records each file's size on disk and what its content
takes in its pages (SQLite's `dbstat`: page bytes less unused bytes), split into the mirror,
its history, the bookkeeping tables and the staging file, with the bookkeeping's row counts:
with retention the bookkeeping levels off once its windows are full (`--bookkeeping-days`
sets every bookkeeping window at once, in simulated days; `--history-days` a history horizon,
none by default). At the end it compares the files with what they must hold: the same content
written compactly (`VACUUM INTO` a copy, of each file). The target: the files are at most 1.2
times that. Results go to benchmarks/results/retention.json.

    .venv/bin/python benchmarks/retention.py --bookkeeping-days 7
    .venv/bin/python benchmarks/retention.py --bookkeeping-days 7 --without-maintenance \
        --out benchmarks/results/retention-without-maintenance.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENTITY = "vin_candidates"
TARGET_RATIO = 1.2


# The bookkeeping windows' defaults (config.MaintenanceConfig), in days.
BOOKKEEPING_DAYS = {"publish_plan_days": 30, "change_history_days": 90, "sync_log_days": 30,
                    "resolved_issues_days": 30, "closed_dead_letters_days": 90}
BOOKKEEPING_TABLES = ("_publish_plan", "_change_history", "_sync_log")


def write_config(path: Path, bookkeeping_days: float | None = None,
                 history_days: float | None = None) -> Path:
    """One hourly group with the table; settings in simulated days (see SimulatedClock). The
    reconcile scan is asked for by the benchmark itself, on the first change set of a day."""
    days = {name: bookkeeping_days if bookkeeping_days is not None else value
            for name, value in BOOKKEEPING_DAYS.items()}
    if history_days is not None:
        days["history_days"] = history_days
    path.write_text(json.dumps({
        "groups": {"hourly": {"cron": "0 * * * *"}},
        "entities": [{"name": ENTITY, "group": "hourly", "reconcile_every_hours": 0}],
        "archive": {"compact_after_days": 7, "staging_keep_change_sets": 24},
        "maintenance": days,
    }))
    return path


class SimulatedClock:
    """Each change set is a simulated hour; the real time each one started turns a window of
    simulated days into the real time those days took."""

    def __init__(self) -> None:
        self.hours: list[datetime] = []  # the real start of each change set

    def tick(self) -> None:
        self.hours.append(datetime.now(UTC))

    def real_days(self, days: float | None, now: datetime) -> float | None:
        """`days` simulated days back from now, in real days: back to the start of the oldest
        change set within them (everything so far when the run is younger)."""
        if days is None:
            return None
        first_kept = len(self.hours) - round(days * 24)
        since = (self.hours[first_kept] if first_kept > 0
                 else self.hours[0] - timedelta(seconds=1))
        return (now - since).total_seconds() / 86_400

    def in_real_time(self, config, now: datetime):
        """`config` with every window in days as the real time its simulated days took."""
        maintenance = config.maintenance
        windows = {name: self.real_days(getattr(maintenance, name), now)
                   for name in (*BOOKKEEPING_DAYS, "history_days")}
        return config.model_copy(update={
            "maintenance": maintenance.model_copy(update=windows),
            "archive": config.archive.model_copy(update={"compact_after_days": self.real_days(
                config.archive.compact_after_days, now)})})


def mb(size: float) -> float:
    return round(size / 2**20, 1)


def held_mb(connection) -> dict[str, float]:
    """What the content of each part takes in its pages (dbstat: page bytes less unused bytes,
    tables with their indexes), MB: the mirror, its history, the bookkeeping (every other table
    of the mirror file) and the staging file."""
    from dataverse_assets.store.staging_store import STAGING_SCHEMA

    held = dict.fromkeys(("mirror", "history", "bookkeeping", "staging"), 0)
    for schema in ("main", STAGING_SCHEMA):
        owner = dict(connection.execute(f"SELECT name, tbl_name FROM {schema}.sqlite_master"))
        for name, used in connection.execute(
                "SELECT name, pgsize - unused FROM dbstat(?, 1)", (schema,)):
            table = owner.get(name, name)
            part = ("staging" if schema != "main" else "history" if table == f"{ENTITY}__history"
                    else "mirror" if table == ENTITY else "bookkeeping")
            held[part] += used
    return {part: mb(size) for part, size in held.items()}


def on_disk(db: Path) -> dict[str, float]:
    """The mirror file and its staging file, each with its WAL, MB."""
    from dataverse_assets.store.staging_store import staging_path

    def size(path: Path) -> int:
        return path.stat().st_size if path.exists() else 0

    staging = staging_path(db)
    return {"file_mb": mb(size(db)), "wal_mb": mb(size(db.with_name(db.name + "-wal"))),
            "staging_file_mb": mb(size(staging)),
            "staging_wal_mb": mb(size(staging.with_name(staging.name + "-wal")))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--changed", type=float, default=0.01, help="share edited per hour")
    parser.add_argument("--without-maintenance", action="store_true",
                        help="the same month with no maintenance run (for comparison)")
    parser.add_argument("--bookkeeping-days", type=float, default=None,
                        help="every bookkeeping retention window (_publish_plan, "
                        "_change_history, _sync_log, resolved issues, closed dead letters), in "
                        "simulated days (default: the settings' defaults, 30 and 90)")
    parser.add_argument("--history-days", type=float, default=None,
                        help="history retention, in simulated days (default: keep everything)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the database and archive (deleted at the end otherwise)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/retention.json")
    args = parser.parse_args()

    from dataverse_assets.config import load_entities_config
    from dataverse_assets.defs.resources import MirrorStore
    from dataverse_assets.simulator import DataverseSimulator, serve_on_loopback
    from dataverse_assets.source.simulator import SimulatorSource

    work = Path(tempfile.mkdtemp(prefix="dataverse-retention-"))
    config = load_entities_config(write_config(work / "entities.json", args.bookkeeping_days,
                                               args.history_days))
    entity = config.entity(ENTITY)
    store = MirrorStore(db_path=str(work / "mirror.db"), archive_dir=str(work / "archive"))
    simulator = DataverseSimulator([ENTITY], seed=11, row_counts={ENTITY: args.rows})
    try:
        with serve_on_loopback(simulator) as url:
            result = simulate(args, config, entity, store,
                              SimulatorSource(entity_names=[ENTITY], base_url=url), simulator)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)  # a month is a few GB
    args.out.write_text(json.dumps(result, indent=2))
    print(f"files {result['files_mb']} MB (mirror {result['file_mb']}, staging "
          f"{result['staging_file_mb']}), must hold {result['must_hold_mb']} MB (mirror "
          f"{result['mirror_must_hold_mb']}, staging {result['staging_must_hold_mb']}): ratio "
          f"{result['ratio']} (target <= {TARGET_RATIO}): {'met' if result['met'] else 'MISSED'}")
    return 0 if result["met"] else 1


def simulate(args, config, entity, store, source, simulator) -> dict:
    """The month of change sets, each day ended by the maintenance steps."""
    from dataverse_assets.names import change_set_key
    from dataverse_assets.store.archive_retention import compact_archive
    from dataverse_assets.store.db import connect, wait_for_checkpoint
    from dataverse_assets.store.maintenance import retain_bookkeeping, shrink_database
    from dataverse_assets.store.staging_store import STAGING_SCHEMA, staging_path
    from dataverse_assets.sync import steps
    from dataverse_assets.sync.stage import write_staged

    rng = random.Random(5)
    db = Path(store.db_path)
    clock = SimulatedClock()
    moment = datetime.now(UTC).replace(microsecond=0)
    daily: list[dict] = []
    started = time.perf_counter()
    for day in range(args.days):
        day_started = time.perf_counter()
        for hour in range(24):
            clock.tick()
            moment = max(moment + timedelta(seconds=1), datetime.now(UTC).replace(microsecond=0))
            key = change_set_key(moment)
            steps.fetch(store, source, entity, key, reconcile=hour == 0)
            with store.connection() as connection:
                write_staged(connection, steps.staged_records(
                    connection, store.archive(ENTITY, key), entity))
            steps.publish(store, entity, key)
            pks = [r["vin_candidateid"] for r in simulator.records(ENTITY)]
            for pk in rng.sample(pks, int(len(pks) * args.changed)):
                simulator.update(ENTITY, pk, {"vin_name": f"edit {rng.randrange(10**9)}"})
        record: dict = {"day": day + 1}
        if not args.without_maintenance:
            # The end of a simulated day: what the maintenance job does.
            now = datetime.now(UTC)
            today = clock.in_real_time(config, now)
            compact_archive(store.archive_dir, today, db_path=store.db_path, now=now)
            with closing(connect(db)) as connection:
                deleted = retain_bookkeeping(connection, today, now)
            shrink = shrink_database(db)
            record.update(freed_mb=mb(shrink.bytes_freed), rows_deleted=sum(deleted.values()))
        record["seconds"] = round(time.perf_counter() - day_started, 1)
        measuring = time.perf_counter()
        wait_for_checkpoint(db)
        wait_for_checkpoint(staging_path(db))
        with closing(connect(db)) as connection:
            record.update(on_disk(db), held_mb=held_mb(connection), rows={
                table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in BOOKKEEPING_TABLES})
        record["measure_seconds"] = round(time.perf_counter() - measuring, 1)
        daily.append(record)
        print(json.dumps(record), flush=True)
    wait_for_checkpoint(db)
    wait_for_checkpoint(staging_path(db))
    compact_copy, compact_staging = db.with_name("compact.db"), db.with_name("compact-staging.db")
    with closing(connect(db)) as connection:
        connection.execute("VACUUM main INTO ?", (str(compact_copy),))
        connection.execute(f"VACUUM {STAGING_SCHEMA} INTO ?", (str(compact_staging),))
        counts = {table: connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
                  for table in (ENTITY, f"{ENTITY}__history", f"_staging__{ENTITY}",
                                *BOOKKEEPING_TABLES, "_publish_state")}
    file_bytes, must_hold = db.stat().st_size, compact_copy.stat().st_size
    staging_bytes, staging_must_hold = (staging_path(db).stat().st_size,
                                        compact_staging.stat().st_size)
    files, held = file_bytes + staging_bytes, must_hold + staging_must_hold
    return {
        "days": args.days, "rows": args.rows, "changed_per_hour": args.changed,
        "maintenance": not args.without_maintenance,
        "bookkeeping_days": args.bookkeeping_days, "history_days": args.history_days,
        "change_sets": args.days * 24,
        "files_mb": mb(files), "must_hold_mb": mb(held),
        "ratio": round(files / held, 3), "target_ratio": TARGET_RATIO,
        "met": files <= TARGET_RATIO * held,
        "file_mb": mb(file_bytes), "mirror_must_hold_mb": mb(must_hold),
        "mirror_ratio": round(file_bytes / must_hold, 3),
        "staging_file_mb": mb(staging_bytes), "staging_must_hold_mb": mb(staging_must_hold),
        "staging_ratio": round(staging_bytes / staging_must_hold, 3),
        "on_disk_at_end": on_disk(db), "rows_held": counts,
        "seconds": round(time.perf_counter() - started, 1), "daily": daily,
    }


if __name__ == "__main__":
    raise SystemExit(main())
