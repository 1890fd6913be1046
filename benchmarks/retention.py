"""Nothing grows without bound, measured (not part of the test suite).

    .venv/bin/python benchmarks/retention.py                   # 30 days x 24 change sets
    .venv/bin/python benchmarks/retention.py --days 3 --rows 10000   # a quick run

A 100,000-row change-tracked table (`vin_candidates` of the built-in simulator, on loopback)
gets 1% of its rows edited before each of 720 hourly change sets (30 days), each synced by the
same step functions the assets use (fetch, stage, publish), with the reconcile scan on its
default daily cadence; after each simulated day the maintenance steps run (compaction and
retention, bookkeeping retention, incremental vacuum), as the `maintenance` job would.

Time is compressed: a simulated day passes in 10-18 s on the 2-core machine, so every setting
in days or hours (retention, compaction, the reconcile cadence) is scaled by the same factor
(`--day-seconds`, default 13: the real seconds a simulated day stands for); the retained
bookkeeping is then about what it would be after a real month with these settings.

It reports the file's size after every simulated day, and at the end compares it with what the
database must hold: the same content written compactly (`VACUUM INTO` a copy: the mirror, its
history, the retained bookkeeping and staging). The target: the file is at most 1.2 times that.
Results go to benchmarks/results/retention.json.
"""

from __future__ import annotations

import argparse
import json
import random
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


def write_config(path: Path, scale: float) -> Path:
    """One hourly group with the table; retention settings in days, scaled to real time."""
    days = {"publish_plan_days": 30, "change_history_days": 90, "sync_log_days": 30,
            "resolved_issues_days": 30, "closed_dead_letters_days": 90}
    path.write_text(json.dumps({
        "groups": {"hourly": {"cron": "0 * * * *"}},
        "entities": [{"name": ENTITY, "group": "hourly", "reconcile_every_hours": 24 * scale}],
        "archive": {"compact_after_days": 7 * scale, "staging_keep_change_sets": 24},
        "maintenance": {name: value * scale for name, value in days.items()},
    }))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--changed", type=float, default=0.01, help="share edited per hour")
    parser.add_argument("--day-seconds", type=float, default=13.0,
                        help="real seconds one simulated day stands for (retention scale)")
    parser.add_argument("--without-maintenance", action="store_true",
                        help="the same month with no maintenance run (for comparison)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/retention.json")
    args = parser.parse_args()

    from dataverse_assets.config import load_entities_config
    from dataverse_assets.defs.resources import MirrorStore
    from dataverse_assets.simulator import DataverseSimulator, serve_on_loopback
    from dataverse_assets.source.simulator import SimulatorSource

    scale = args.day_seconds / 86_400
    work = Path(tempfile.mkdtemp(prefix="dataverse-retention-"))
    config = load_entities_config(write_config(work / "entities.json", scale))
    entity = config.entity(ENTITY)
    store = MirrorStore(db_path=str(work / "mirror.db"), archive_dir=str(work / "archive"))
    simulator = DataverseSimulator([ENTITY], seed=11, row_counts={ENTITY: args.rows})
    with serve_on_loopback(simulator) as url:
        result = simulate(args, config, entity, store,
                          SimulatorSource(entity_names=[ENTITY], base_url=url), simulator)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"file {result['file_mb']} MB, must hold {result['must_hold_mb']} MB: ratio "
          f"{result['ratio']} (target <= {TARGET_RATIO}): {'met' if result['met'] else 'MISSED'}")
    return 0 if result["met"] else 1


def simulate(args, config, entity, store, source, simulator) -> dict:
    """The month of change sets, each day ended by the maintenance steps."""
    from dataverse_assets.names import change_set_key
    from dataverse_assets.store.archive_retention import compact_archive
    from dataverse_assets.store.db import connect, wait_for_checkpoint
    from dataverse_assets.store.maintenance import retain_bookkeeping, shrink_database
    from dataverse_assets.sync import steps
    from dataverse_assets.sync.stage import write_staged

    rng = random.Random(5)
    db = Path(store.db_path)
    moment = datetime.now(UTC).replace(microsecond=0)
    daily: list[dict] = []
    started = time.perf_counter()
    for day in range(args.days):
        day_started = time.perf_counter()
        for _ in range(24):
            moment = max(moment + timedelta(seconds=1), datetime.now(UTC).replace(microsecond=0))
            key = change_set_key(moment)
            steps.fetch(store, source, entity, key)
            with store.connection() as connection:
                write_staged(connection, steps.staged_records(
                    connection, store.archive(ENTITY, key), entity))
            steps.publish(store, entity, key)
            pks = [r["vin_candidateid"] for r in simulator.records(ENTITY)]
            for pk in rng.sample(pks, int(len(pks) * args.changed)):
                simulator.update(ENTITY, pk, {"vin_name": f"edit {rng.randrange(10**9)}"})
        if args.without_maintenance:
            wait_for_checkpoint(db)
            daily.append({"day": day + 1, "file_mb": round(db.stat().st_size / 2**20, 1),
                          "seconds": round(time.perf_counter() - day_started, 1)})
            print(json.dumps(daily[-1]), flush=True)
            continue
        # The end of a simulated day: what the maintenance job does.
        compact_archive(store.archive_dir, config, db_path=store.db_path)
        with closing(connect(db)) as connection:
            deleted = retain_bookkeeping(connection, config)
        shrink = shrink_database(db)
        daily.append({"day": day + 1, "file_mb": round(shrink.bytes_after / 2**20, 1),
                      "freed_mb": round(shrink.bytes_freed / 2**20, 1),
                      "rows_deleted": sum(deleted.values()),
                      "seconds": round(time.perf_counter() - day_started, 1)})
        print(json.dumps(daily[-1]), flush=True)
    wait_for_checkpoint(db)
    compact_copy = db.with_name("compact.db")
    with closing(connect(db)) as connection:
        connection.execute("VACUUM INTO ?", (str(compact_copy),))
        counts = {table: connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
                  for table in (ENTITY, f"{ENTITY}__history", f"_staging__{ENTITY}",
                                "_publish_plan", "_change_history", "_sync_log",
                                "_publish_state")}
    file_bytes, must_hold = db.stat().st_size, compact_copy.stat().st_size
    return {
        "days": args.days, "rows": args.rows, "changed_per_hour": args.changed,
        "maintenance": not args.without_maintenance,
        "change_sets": args.days * 24, "day_seconds": args.day_seconds,
        "file_mb": round(file_bytes / 2**20, 1), "must_hold_mb": round(must_hold / 2**20, 1),
        "ratio": round(file_bytes / must_hold, 3), "target_ratio": TARGET_RATIO,
        "met": file_bytes <= TARGET_RATIO * must_hold, "rows_held": counts,
        "seconds": round(time.perf_counter() - started, 1), "daily": daily,
    }


if __name__ == "__main__":
    raise SystemExit(main())
