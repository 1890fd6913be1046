"""Large change sets are parsed by worker processes: the staged rows, counts and issues are
exactly those of staging in one process; failures are clear; the caller's script never runs
twice."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from dataverse_assets.archive.change_sets import REQUEST, ChangeSetArchive
from dataverse_assets.archive.compacted import compact_change_set
from dataverse_assets.config import EntityConfig
from dataverse_assets.errors import CorruptArchiveError
from dataverse_assets.store.db import connect
from dataverse_assets.store.schema_registry import load_locked_schema
from dataverse_assets.store.tables import staging_keys_table, staging_table
from dataverse_assets.sync import stage as staging
from dataverse_assets.sync.stage import staging_workers, write_staged
from dataverse_assets.sync.stage_workers import WorkerPool
from dataverse_assets.sync.steps import staged_records

ENTITY = EntityConfig(name="things", group="daily", incremental="full")


def page_of(page: int) -> list[dict]:
    records = [{"thingid": f"id-{page}-{n}", "name": f"n{page}", "size": n, "tags": [page]}
               for n in range(500)]
    records.append({"thingid": "id-twice", "name": f"version {page}", "size": page})
    records.append({"name": "no key"})
    records.append({"@odata.context": "$metadata#things/$deletedEntity", "id": f"gone-{page}",
                    "reason": "deleted"})
    return records


def make_archive(root, change_set="20260101T000000Z", pages=6, corrupt_page=None):
    """Pages of 503 records (the schema is sampled from the first 1000: pages 1 and 2)."""
    archive = ChangeSetArchive(root, "things", change_set)
    archive.start()
    archive.write_json(REQUEST, {"primary_key": "thingid"})
    kinds = []
    for number in range(1, pages + 1):
        if number == 3:  # a key-only scan's page
            body = {"value": [{"thingid": f"key-{n}"} for n in range(30)]}
            kinds.append({"kind": "keys", "shape": "collection"})
        else:
            body = {"value": page_of(number)}
            kinds.append({"kind": "snapshot", "shape": "collection"})
        archive.write_page(number, orjson.dumps(body))
    archive.finish({"mode": "full", "started_at": "2026-01-01T00:00:00Z",
                    "summary": {"watermark_before": None, "watermark_after": None},
                    "pages": kinds, "missing": [{"id": "linked-404", "status": 404}]})
    if corrupt_page:
        (archive.path / f"page-{corrupt_page:05d}.json.gz").write_bytes(b"not gzip at all")
    return archive


def stage(tmp_path, name, workers, monkeypatch, **archive_options):
    monkeypatch.setenv("DATAVERSE_STAGING_WORKERS", str(workers))
    monkeypatch.setattr(staging, "PARALLEL_STAGING_MIN_PAGES", 2)
    root = tmp_path / name
    archive = make_archive(root / "archive", **archive_options)
    connection = connect(root / "m.db")
    staged = staged_records(connection, archive, ENTITY)
    write_staged(connection, staged)
    rows = connection.execute(
        f'SELECT * FROM "{staging_table("things")}" ORDER BY _pk').fetchall()
    keys = connection.execute(
        f'SELECT _pk FROM "{staging_keys_table("things")}" ORDER BY 1').fetchall()
    issues = connection.execute(
        "SELECT record_id, field, problem, context FROM _issues ORDER BY 1, 4").fetchall()
    connection.close()
    return rows, keys, issues, staged.counts


def test_worker_processes_stage_exactly_what_one_process_stages(tmp_path, monkeypatch):
    pools = []

    class CountedPool(WorkerPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(len(self.processes))

    monkeypatch.setattr(staging, "WorkerPool", CountedPool)
    serial = stage(tmp_path, "serial", 0, monkeypatch)
    assert pools == []
    parallel = stage(tmp_path, "parallel", 2, monkeypatch)
    assert pools == [2]
    assert parallel == serial
    rows, keys, issues, counts = parallel
    assert counts == {"records": 2515, "staged": 2505, "deleted": 6, "out_of_scope": 0,
                      "without_key": 5, "keys": 30}
    # The key seen on every page keeps its last page's version.
    twice = [r for r in rows if r[1] == "id-twice"]
    assert len(twice) == 1 and orjson.loads(twice[0][-1])["name"] == "version 6"
    assert len(keys) == 30 and len(issues) == 5
    assert [i[3] for i in issues] == [f"page {n}" for n in (1, 2, 4, 5, 6)]


def test_a_page_a_worker_cannot_read_fails_the_staging_and_stages_nothing(tmp_path,
                                                                            monkeypatch):
    with pytest.raises(CorruptArchiveError, match="page-00004.json.gz cannot be read "
                       r"\(BadGzipFile"):
        stage(tmp_path, "bad", 2, monkeypatch, corrupt_page=4)
    connection = connect(tmp_path / "bad" / "m.db")
    assert connection.execute("SELECT count(*) FROM _staged").fetchone()[0] == 0
    connection.close()


def test_the_worker_count_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("DATAVERSE_STAGING_WORKERS", raising=False)
    assert staging_workers() == 0  # opt-in: workers cost memory
    monkeypatch.setenv("DATAVERSE_STAGING_WORKERS", "3")
    assert staging_workers() == 3
    monkeypatch.setenv("DATAVERSE_STAGING_WORKERS", "many")
    with pytest.raises(ValueError, match="DATAVERSE_STAGING_WORKERS='many': expected a whole"):
        staging_workers()


def test_a_script_without_a_main_guard_does_not_run_again_in_the_workers(tmp_path):
    # multiprocessing's spawn would re-run this script's top level in every worker.
    marker = tmp_path / "ran.txt"
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from pathlib import Path
        from dataverse_assets.sync import stage as staging
        from dataverse_assets.config import EntityConfig
        from dataverse_assets.sync.stage import write_staged
        from dataverse_assets.sync.steps import staged_records
        from dataverse_assets.store.db import connect
        from dataverse_assets_tests.sync.test_stage_workers import make_archive

        with open({str(marker)!r}, "a") as f:
            f.write("ran\\n")
        os.environ["DATAVERSE_STAGING_WORKERS"] = "2"
        staging.PARALLEL_STAGING_MIN_PAGES = 2
        archive = make_archive(Path({str(tmp_path)!r}) / "archive")
        connection = connect(Path({str(tmp_path)!r}) / "m.db")
        write_staged(connection, staged_records(
            connection, archive, EntityConfig(name="things", group="daily", incremental="full")))
        print(connection.execute("SELECT rows FROM _staged").fetchone()[0])
    """))
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2511"]
    assert marker.read_text() == "ran\n"


def test_a_compaction_while_workers_read_goes_on_from_the_parquet_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "PARALLEL_STAGING_MIN_PAGES", 2)
    resumed_at = []
    staged_bodies = staging._staged_bodies

    def recording(context, pages, bodies, first_page, counts, issues):
        resumed_at.append(first_page)
        return staged_bodies(context, pages, bodies, first_page, counts, issues)

    monkeypatch.setattr(staging, "_staged_bodies", recording)

    def staged_keys(workers, root, compact_after_first_batch):
        monkeypatch.setenv("DATAVERSE_STAGING_WORKERS", str(workers))
        archive = make_archive(root / "archive", pages=12)
        connection = connect(root / "m.db")
        staged_records(connection, archive, ENTITY)  # locks the schema
        schema = load_locked_schema(connection, "things")
        counts, issues, keys = {}, [], []
        for number, (rows, _) in enumerate(staging.iter_staged_batches(
                archive, schema, counts, issues), start=1):
            keys.extend((r[1], r[-1]) for r in rows)
            if number == 1 and compact_after_first_batch:
                compact_change_set(archive)  # deletes the page files still to be read
                assert not archive.page_paths() and archive.is_compacted()
        connection.close()
        return keys, counts

    with_workers = staged_keys(2, tmp_path / "w", True)
    # The workers stopped at a page whose file was gone; the rest came from the Parquet parts.
    assert len(resumed_at) == 1 and 5 <= resumed_at[0] <= 12
    assert with_workers == staged_keys(0, tmp_path / "s", False)
