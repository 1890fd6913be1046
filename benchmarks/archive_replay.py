"""Reading the raw archive in bulk: Python vs DuckDB, gzip pages vs compacted Parquet.

    .venv/bin/python benchmarks/archive_replay.py [--workdir /tmp/archive-bench] [--scale 1.0]

Builds a mirror from the in-process simulator (several change sets with creates, updates and
deletes in between; entities of every mode), then measures on its archive:

1. listing the complete change sets and reading their manifests (Python vs DuckDB read_json);
2. reading every page body of every change set (Python gzip vs DuckDB read_blob);
3. compaction (pages -> one zstd Parquet file per change set) and its bytes before/after;
4. reading the compacted page bodies (DuckDB read_parquet);
5. `rebuild` from the page files and from the compacted archive, against the live sync time.

Nothing here is part of the test suite; the numbers are quoted in docs/performance.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import time
from pathlib import Path

import duckdb
import orjson

from dataverse_assets.archive.change_sets import MANIFEST, ChangeSetArchive, list_change_sets
from dataverse_assets.config import DEFAULT_ENTITIES_CONFIG, parse_entities_config
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.sync import steps
from dataverse_assets.sync.stage import write_staged

ROW_COUNTS = {
    "vin_candidates": 60_000, "vin_clinicaltrials": 20_000,
    "vin_vin_candidate_accountset": 40_000, "vin_vin_clinicaltrial_contactset": 30_000,
    "vin_vin_candidate_clinicaltrialset": 30_000, "accounts": 30_000, "contacts": 30_000,
    "systemusers": 2_000, "businessunits": 50, "teams": 200,
}
CHANGE_SETS = 6


def _timed(label: str, function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    seconds = time.perf_counter() - started
    print(f"  {label:<58} {seconds:8.3f} s")
    return value, seconds


def build_mirror(workdir: Path, scale: float):
    """Sync CHANGE_SETS change sets of every entity through the plain steps."""
    from dataverse_assets.simulator import DataverseSimulator

    raw = json.loads(DEFAULT_ENTITIES_CONFIG.read_text())
    for entity in raw["entities"]:
        entity["reconcile_every_hours"] = 1e-9  # key scans every change set
    config = parse_entities_config(raw)
    names = [e.name for e in config.entities]
    counts = {k: max(10, int(v * scale)) for k, v in ROW_COUNTS.items()}
    simulator = DataverseSimulator(names, seed=11, row_counts=counts)
    source = SimulatorSource(entity_names=names, seed=11)
    # The in-process source looks its simulator up by (seed, names): hand it ours.
    from dataverse_assets.source import simulator as sources

    sources._EMBEDDED[(11, tuple(sorted(names)))] = simulator
    store = MirrorStore(db_path=str(workdir / "live.db"), archive_dir=str(workdir / "archive"))
    seconds = 0.0
    for number in range(CHANGE_SETS):
        key = f"2026010{number + 1}T000000Z"
        started = time.perf_counter()
        for entity in config.entities:
            steps.fetch(store, source, entity, key)
            with store.connection() as connection:
                write_staged(connection, steps.staged_records(
                    connection, store.archive(entity.name, key), entity))
            steps.publish(store, entity, key)
        seconds += time.perf_counter() - started
        _mutate(simulator, number)
    return config, store, seconds


def _mutate(simulator, number: int) -> None:
    pk = {"vin_candidates": "vin_candidateid", "vin_clinicaltrials": "vin_clinicaltrialid",
          "systemusers": "systemuserid", "vin_vin_candidate_accountset":
          "vin_vin_candidate_accountid"}
    for entity, key in pk.items():
        records = simulator.records(entity)
        step = max(1, len(records) // 50)
        for index, record in enumerate(records[::step]):
            if index % 5 == 0:
                simulator.delete(entity, record[key])
            elif "modifiedon" in record:
                simulator.update(entity, record[key], {"vin_name": f"v{number}-{index}"}
                                 if entity.startswith("vin_c") else {})
        for _ in range(max(1, len(records) // 100)):
            simulator.create(entity, {})


def all_change_sets(archive_dir: Path) -> list[ChangeSetArchive]:
    return [ChangeSetArchive(archive_dir, entity.name, key)
            for entity in sorted(archive_dir.iterdir()) if entity.is_dir()
            for key in list_change_sets(archive_dir, entity.name)]


def manifests_python(archive_dir: Path) -> int:
    return sum(len(orjson.loads(a.manifest_path.read_bytes())["pages"])
               for a in all_change_sets(archive_dir))


def manifests_duckdb(archive_dir: Path) -> int:
    with duckdb.connect() as connection:
        return connection.execute(
            "SELECT sum(len(pages)) FROM read_json(?, filename = true,"
            " columns = {pages: 'JSON[]'})", [str(archive_dir / "*" / "*" / MANIFEST)],
        ).fetchone()[0]


def pages_python(archive_dir: Path) -> int:
    total = 0
    for archive in all_change_sets(archive_dir):
        for path in archive.page_paths():
            with gzip.open(path, "rb") as handle:
                total += len(handle.read())
    return total


def pages_duckdb_blob(archive_dir: Path) -> int:
    total = 0
    with duckdb.connect() as connection:
        for archive in all_change_sets(archive_dir):
            connection.execute("SELECT content FROM read_blob(?) ORDER BY filename",
                               [str(archive.path / "page-*.json.gz")])
            while rows := connection.fetchmany(16):
                total += sum(len(gzip.decompress(row[0])) for row in rows)
    return total


def pages_archive_api(archive_dir: Path) -> int:
    return sum(len(body) for archive in all_change_sets(archive_dir)
               for body in archive.iter_page_bodies())


def archive_bytes(archive_dir: Path) -> int:
    return sum(p.stat().st_size for p in archive_dir.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/archive-bench"))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--reuse", action="store_true", help="keep an existing workdir")
    parser.add_argument("--no-rebuild", action="store_true", help="skip the two rebuilds")
    args = parser.parse_args()
    workdir: Path = args.workdir
    if workdir.exists() and not args.reuse:
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    archive_dir = workdir / "archive"
    print(f"archive in {archive_dir}")
    if not (workdir / "live.db").exists():
        config, _, live_seconds = _timed("live sync (fetch + stage + publish)", build_mirror,
                                         workdir, args.scale)[0]
        print(f"  (of which {live_seconds:.1f} s in the steps)")
    raw = json.loads(DEFAULT_ENTITIES_CONFIG.read_text())
    config = parse_entities_config(raw)
    change_sets = all_change_sets(archive_dir)
    records = sum(orjson.loads(a.manifest_path.read_bytes())["summary"]["records"]
                  for a in change_sets)
    print(f"  {len(change_sets)} change sets, {records:,} records, "
          f"{archive_bytes(archive_dir):,} bytes")

    print("1. manifests")
    _timed("python: orjson per manifest", manifests_python, archive_dir)
    _timed("duckdb: read_json over the glob", manifests_duckdb, archive_dir)
    print("2. page bodies (gzip files)")
    _timed("python: gzip.open per page", pages_python, archive_dir)
    _timed("duckdb: read_blob, then gzip.decompress", pages_duckdb_blob, archive_dir)
    _timed("ChangeSetArchive.iter_page_bodies (gzip pages)", pages_archive_api, archive_dir)

    from dataverse_assets.ops.rebuild import rebuild
    from dataverse_assets.store.archive_retention import compact_archive

    if not args.no_rebuild:
        report, _ = _timed("3. rebuild from gzip pages", rebuild, config, archive_dir,
                           workdir / "rebuilt-gz.db", force=True)
        for line in report.lines():
            print("     " + line)
    before = archive_bytes(archive_dir)
    compacted, _ = _timed("4. compact every change set (duckdb, zstd)", compact_archive,
                          archive_dir, config, older_than_days=0)
    after = archive_bytes(archive_dir)
    print(f"     {len(compacted.compacted)} change sets; archive {before:,} -> "
          f"{after:,} bytes ({after / before:.0%})")
    _timed("5. ChangeSetArchive.iter_page_bodies (Parquet, duckdb)", pages_archive_api,
           archive_dir)
    if not args.no_rebuild:
        report, _ = _timed("6. rebuild from the compacted archive", rebuild, config,
                           archive_dir, workdir / "rebuilt-parquet.db", force=True)
        for line in report.lines():
            print("     " + line)


if __name__ == "__main__":
    main()
