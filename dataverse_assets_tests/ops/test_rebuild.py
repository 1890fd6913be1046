"""Rebuild from archive: replaying every archived change set into a new database reproduces the
live-synced one table by table, row by row (history included), from page files, from the
compacted archive, through Dagster with the archive source, and after retention."""

import gzip
import hashlib
import json
import shutil
import sqlite3
from contextlib import closing

import pytest
from dagster import AssetKey, DagsterInstance

from dataverse_assets.archive.change_sets import ChangeSetArchive, list_change_sets
from dataverse_assets.archive.storage import S3Storage, storage_of
from dataverse_assets.config import Settings, load_entities_config
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.defs.schedules import sync_job_name
from dataverse_assets.errors import RebuildError, StagingPrunedError
from dataverse_assets.ops.cli import main, new_change_set_key
from dataverse_assets.ops.rebuild import archived_change_sets, rebuild, register_archived
from dataverse_assets.simulator import DataverseSimulator, serve_on_loopback
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.store.archive_retention import compact_archive
from dataverse_assets.store.db import (
    connect,
    quote_identifier,
    table_columns,
    wait_for_checkpoint,
)
from dataverse_assets.store.maintenance import retain_bookkeeping
from dataverse_assets.sync import steps
from dataverse_assets.sync.progress import ProgressReporter, ProgressSink, ProgressUpdate
from dataverse_assets_tests.conftest import (
    ENTITY_NAMES,
    SMALL_ROW_COUNTS,
    Mirror,
    failure_messages,
    write_entities_config,
)
from dataverse_assets_tests.helpers import mutate
from dataverse_assets_tests.postgres_server import connect as postgres_connect
from dataverse_assets_tests.truth import (
    assert_mirror_equals_simulator,
    canonical_rows,
    without_annotations,
)

RECONCILE_EVERY_TIME = {"reconcile_every_hours": 1e-9}
# After a rebase, rows unchanged since the snapshot carry its fetch time and key.
REBASED_COLUMNS = {"sync_time", "updated_at", "valid_from", "_change_set"}
# Bookkeeping columns that say when this database did something, not what the source said.
RUN_TIMES = {
    "_publish_state": {"staged_at", "plan_started_at", "plan_finished_at", "started_at",
                       "finished_at", "seconds"},
    "_sync_state": {"updated_at"},
    "_schema": {"locked_at"},
    "_staged": {"staged_at"},
    "_issues": {"recorded_at", "id"},
    "_change_history": {"id"},
}
BOOKKEEPING = ["_publish_state", "_sync_state", "_schema", "_staged", "_issues",
               "_change_history", "_defunct", "_publish_plan"]


def table_rows(connection, table: str, skip=frozenset()) -> list[tuple]:
    columns = [name for name in table_columns(connection, table) if name not in skip]
    assert columns, f"no table {table}"
    return sorted(connection.execute(
        f"SELECT {', '.join(quote_identifier(c) for c in columns)}"
        f" FROM {quote_identifier(table)}").fetchall(), key=repr)


def records_without_annotations(connection, entity: str) -> list[dict]:
    return sorted((without_annotations(body) for (body,) in connection.execute(
        f"SELECT json_response FROM {quote_identifier(entity)}")), key=repr)


def data_tables(db_path) -> dict[str, list[tuple]]:
    """Canonical, history and staging tables of every entity, every column (the staging
    file attached, as every connection of the mirror has it)."""
    with closing(connect(db_path)) as connection:
        return {table: table_rows(connection, table)
                for name in ENTITY_NAMES
                for table in (name, f"{name}__history", f"_staging__{name}")}


def assert_same_canonical_and_history(rebuilt, live) -> None:
    """Every canonical and history table, every row and column (staging may differ)."""
    expected, actual = data_tables(live), data_tables(rebuilt)
    for table in expected:
        if not table.startswith("_staging__"):
            assert actual[table] == expected[table], f"{table} differs"


def bookkeeping_tables(db_path) -> dict[str, list[tuple]]:
    with closing(connect(db_path)) as connection:
        return {table: table_rows(connection, table, RUN_TIMES.get(table, set()))
                for table in BOOKKEEPING}


def assert_same_database(rebuilt, live) -> None:
    expected, actual = data_tables(live), data_tables(rebuilt)
    for table in expected:
        assert actual[table] == expected[table], f"{table} differs"
    expected, actual = bookkeeping_tables(live), bookkeeping_tables(rebuilt)
    for table in expected:
        assert actual[table] == expected[table], f"{table} differs"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One mirror synced through Dagster over several change sets: every mode sees creates,
    updates and deletes; some change sets change nothing; one is a resync after the delta
    token expired. Tests that change the archive work on a copy."""
    folder = tmp_path_factory.mktemp("live")
    simulator = DataverseSimulator(ENTITY_NAMES, seed=7, row_counts=SMALL_ROW_COUNTS)
    overrides = {"vin_clinicaltrials": RECONCILE_EVERY_TIME, "accounts": RECONCILE_EVERY_TIME,
                 "systemusers": RECONCILE_EVERY_TIME}
    config_path = write_entities_config(folder / "entities_config.json", page_size=40,
                                        overrides=overrides)
    settings = Settings(db_path=folder / "mirror.db", archive_dir=folder / "archive",
                        entities_config_path=config_path, source="simulator")
    instance = DagsterInstance.ephemeral()
    with serve_on_loopback(simulator) as url:
        source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=url)
        mirror = Mirror(simulator, settings, build_definitions(settings, source=source),
                        instance)
        mirror.sync_all()
        mutate(simulator)
        trials = [r["vin_clinicaltrialid"] for r in simulator.records("vin_clinicaltrials")]
        simulator.delete("vin_clinicaltrials", trials[0])  # found by the key scan
        linked = sorted(canonical_rows(mirror.connection(), "accounts"))
        simulator.update("accounts", linked[1], {"name": "Renamed account"})
        simulator.delete("accounts", linked[2])
        users = [r["systemuserid"] for r in simulator.records("systemusers")]
        simulator.update("systemusers", users[1], {"fullname": "Renamed user"})
        simulator.delete("systemusers", users[2])
        mirror.sync_all()
        mirror.sync_all()  # nothing changed: change sets that publish nothing
        candidates = [r["vin_candidateid"] for r in simulator.records("vin_candidates")]
        simulator.update("vin_candidates", candidates[0], {"vin_name": "After expiry"})
        simulator.delete("vin_candidates", candidates[1])
        simulator.expire_delta_tokens()
        mirror.sync("hourly")  # change-tracking resync
        mirror.sync("hourly")
    yield mirror
    instance.dispose()


def copy_archive(live, tmp_path):
    archive = tmp_path / "archive"
    shutil.copytree(live.settings.archive_dir, archive)
    return archive


BUCKET_PREFIX = "org/archive"


def copy_archive_to_bucket(live, s3) -> S3Storage:
    """The live archive, object by object, under a prefix of a new bucket of the S3 server."""
    storage = S3Storage(s3.new_bucket(), BUCKET_PREFIX, endpoint_url=s3.endpoint)
    root = live.settings.archive_dir
    for path in sorted(root.rglob("*")):
        if path.is_file():
            storage.put_file(path, path.relative_to(root).as_posix())
    return storage


def archive_copy(where: str, live, tmp_path, request):
    """A copy of the live archive in a folder, or in a bucket (`where`)."""
    if where == "folder":
        return copy_archive(live, tmp_path)
    return copy_archive_to_bucket(live, request.getfixturevalue("s3"))


def config_with_archive(live, tmp_path, **archive):
    raw = json.loads(live.settings.entities_config_path.read_text())
    raw["archive"] = archive
    path = tmp_path / "entities_config.json"
    path.write_text(json.dumps(raw))
    return load_entities_config(path)


def page_digests(archive_dir) -> dict:
    return {(entity, key): [hashlib.sha256(body).hexdigest() for body in
                            ChangeSetArchive(archive_dir, entity, key).iter_page_bodies()]
            for entity in ENTITY_NAMES for key in list_change_sets(archive_dir, entity)}


def test_the_scenario_covers_every_mode_and_kind_of_change(live):
    modes = {}
    for entity in ENTITY_NAMES:
        for key in list_change_sets(live.settings.archive_dir, entity):
            manifest = json.loads(
                (live.settings.archive_dir / entity / key / "manifest.json").read_bytes())
            modes.setdefault(entity, set()).add(manifest["mode"])
    assert modes["vin_candidates"] == {"initial", "change_tracking_resync", "change_tracking"}
    assert modes["vin_clinicaltrials"] == {"modifiedon"}
    assert modes["vin_vin_candidate_accountset"] == {"full"}
    assert modes["accounts"] == {"filtered"}
    with live.connection() as connection:
        kinds = dict(connection.execute(
            "SELECT entity, group_concat(DISTINCT kind) FROM _change_history GROUP BY entity"))
    for entity in ("vin_candidates", "vin_clinicaltrials", "accounts", "systemusers"):
        assert set(kinds[entity].split(",")) >= {"create", "update", "delete"}, entity


def test_rebuild_reproduces_the_live_database_row_by_row(live, tmp_path):
    into = tmp_path / "rebuilt.db"

    report = rebuild(live.settings.entities, live.settings.archive_dir, into)

    assert_same_database(into, live.settings.db_path)
    by_entity = {e.entity: e for e in report.entities}
    assert by_entity["vin_candidates"].change_sets == 5
    assert by_entity["vin_candidates"].rows > SMALL_ROW_COUNTS["vin_candidates"]
    assert by_entity["vin_candidates"].rows_per_second > 0
    assert report.rows == sum(e.rows for e in report.entities)


def test_rebuild_reports_progress_per_entity_against_the_archived_total(live, tmp_path):
    updates: list[ProgressUpdate] = []

    def reporter(entity: str) -> ProgressReporter:  # every update, unthrottled
        return ProgressReporter(entity, "rebuild", [ProgressSink(updates.append, 0.0)])

    rebuild(live.settings.entities, live.settings.archive_dir, tmp_path / "rebuilt.db",
            progress_for=reporter)

    finals = {u.entity: u for u in updates if u.done}
    assert set(finals) == {e.name for e in live.settings.entities.entities}
    archived = {}
    for entity in finals:
        for key in list_change_sets(live.settings.archive_dir, entity):
            summary = ChangeSetArchive(live.settings.archive_dir, entity, key).manifest()["summary"]
            archived[entity] = archived.get(entity, 0) + summary["records"]
    assert {e: u.records for e, u in finals.items()} == archived
    assert all(u.total == archived[e] for e, u in finals.items())
    running = [u for u in updates if u.entity == "vin_candidates" and not u.done]
    assert running and [u.records for u in running] == sorted(u.records for u in running)
    assert "vin_candidates: " in finals["vin_candidates"].line()
    assert "done in" in finals["vin_candidates"].line()


def test_rebuild_refuses_an_existing_database_unless_forced(live, tmp_path, monkeypatch,
                                                            capsys):
    into = tmp_path / "rebuilt.db"
    into.write_bytes(b"something")
    with pytest.raises(RebuildError, match="already exists and is not empty"):
        rebuild(live.settings.entities, live.settings.archive_dir, into)
    with pytest.raises(RebuildError, match="live mirror"):
        rebuild(live.settings.entities, live.settings.archive_dir, live.settings.db_path,
                force=True, live_db_path=live.settings.db_path)

    monkeypatch.setenv("DATAVERSE_ARCHIVE_DIR", str(live.settings.archive_dir))
    monkeypatch.setenv("DATAVERSE_DB_PATH", str(live.settings.db_path))
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(live.settings.entities_config_path))
    assert main(["rebuild", "--into", str(into)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["rebuild", "--into", str(into), "--force"]) == 0
    out = capsys.readouterr().out
    assert "vin_candidates" in out and "rows/s" in out
    assert_same_database(into, live.settings.db_path)


def test_rebuild_into_a_postgresql_store_reproduces_the_live_mirror(
        live, tmp_path, monkeypatch, capsys, postgres_store_url):
    """`rebuild --into postgresql://...` writes the mirror into that (empty) database: the
    same tables, rows and bookkeeping as the live (SQLite) mirror; a database that holds a
    mirror is refused without --force, the live one always (however its URL is spelt), and
    a rebuild that stops leaves the database empty."""
    url = postgres_store_url
    monkeypatch.setenv("DATAVERSE_ARCHIVE_DIR", str(live.settings.archive_dir))
    monkeypatch.setenv("DATAVERSE_DB_PATH", str(live.settings.db_path))
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(live.settings.entities_config_path))

    assert main(["rebuild", "--into", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rebuilding {url} from ") and "vin_candidates" in out
    assert_same_database(url, live.settings.db_path)

    assert main(["rebuild", "--into", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rebuild: {url} already exists and is not empty (") and \
        "--force" in err and err.count("\n") == 1, err
    # The live mirror is never the target: another spelling of its URL is the same store.
    monkeypatch.setenv("DATAVERSE_STORE_URL", url)
    assert main(["rebuild", "--into", url.replace("127.0.0.1", "localhost"), "--force"]) == 1
    assert "is the live mirror" in capsys.readouterr().err
    monkeypatch.delenv("DATAVERSE_STORE_URL")
    assert main(["rebuild", "--into", url.replace("@", ":secret@")]) == 2
    err = capsys.readouterr().err
    assert "--into: the URL embeds a password" in err and "secret" not in err

    # --force replaces it; a damaged archive stops the rebuild, and nothing is left.
    archive = copy_archive(live, tmp_path)
    key = list_change_sets(archive, "vin_candidates")[1]
    _flip_crc(archive / "vin_candidates" / key / "page-00001.json.gz")
    monkeypatch.setenv("DATAVERSE_ARCHIVE_DIR", str(archive))
    assert main(["rebuild", "--into", url, "--force"]) == 1
    err = capsys.readouterr().err
    assert "CRC check failed" in err and f"Nothing was written to {url}: " in err, err
    with closing(postgres_connect(url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid ="
                       " c.relnamespace WHERE n.nspname IN ('public', 'staging')")
        assert cursor.fetchone() == (0,)


def _flip_crc(path):
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC-32
    path.write_bytes(bytes(data))


def _spoil_deflate(path):
    """Bytes inside the compressed stream overwritten: the header and trailer are intact, the
    deflate data is not (a disk error mid-file)."""
    data = bytearray(path.read_bytes())
    data[20:60] = b"\xff" * 40
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# What can happen to an archived file, where it lands, and the words that describe it.
DAMAGE = {
    "bad CRC": ("page-00001.json.gz", _flip_crc, "CRC check failed"),
    "truncated gzip": ("page-00001.json.gz", _truncate, "cannot be read (EOFError"),
    "damaged deflate data": ("page-00001.json.gz", _spoil_deflate, "cannot be read"),
    "gzip of invalid JSON": ("page-00001.json.gz",
                             lambda path: path.write_bytes(gzip.compress(b'{"value": [{')),
                             "is not valid JSON"),
    "gzip of JSON that is not a page": ("page-00001.json.gz",
                                        lambda path: path.write_bytes(gzip.compress(b"[1, 2]")),
                                        "is not an OData page"),
    "broken manifest": ("manifest.json", lambda path: path.write_text('{"mode": "full", '),
                        "is not valid JSON"),
    "manifest without its summary": ("manifest.json",
                                     lambda path: path.write_text('{"mode": "full"}'),
                                     "is not a change-set manifest"),
    "truncated Parquet part": ("pages-0001-of-0001.parquet", _truncate, "cannot be read"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_archive_file_stops_the_rebuild_in_one_line_or_is_skipped(
        live, tmp_path, damage, monkeypatch, capsys):
    archive = copy_archive(live, tmp_path)
    entity = "vin_candidates"
    name, spoil, words = DAMAGE[damage]
    # The first change set (the initial read) is the one large enough to compact.
    key = list_change_sets(archive, entity)[0 if name.endswith(".parquet") else 1]
    if name.endswith(".parquet"):
        compact_archive(archive, live.settings.entities, older_than_days=0)
    spoil(archive / entity / key / name)
    monkeypatch.setenv("DATAVERSE_ARCHIVE_DIR", str(archive))
    monkeypatch.setenv("DATAVERSE_DB_PATH", str(live.settings.db_path))
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(live.settings.entities_config_path))
    into = tmp_path / "rebuilt.db"

    assert main(["rebuild", "--into", str(into)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rebuild: {entity}: change set {key}: ")
    assert name in err and words in err and "--skip-corrupt" in err, err
    assert f"Nothing was written to {into}" in err
    assert not list(tmp_path.glob("rebuilt.db*")), "a half-written database was left"

    assert main(["rebuild", "--into", str(into), "--skip-corrupt"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {entity} {key} (damaged, --skip-corrupt)" in err and words in err
    assert "1 change set(s) left out" in err
    # Everything else is as the live mirror has it.
    expected, actual = data_tables(live.settings.db_path), data_tables(into)
    for table in expected:
        if entity not in table:
            assert actual[table] == expected[table], table
    with sqlite3.connect(into) as connection:
        states = dict(connection.execute(
            "SELECT change_set, status FROM _publish_state WHERE entity = ?", (entity,)))
    assert key not in states
    assert set(states.values()) == {"COMPLETE"}
    assert len(states) == len(list_change_sets(archive, entity)) - 1


def test_compaction_keeps_every_page_byte_for_byte_and_rebuild_equal(live, tmp_path,
                                                                     monkeypatch, capsys):
    archive = copy_archive(live, tmp_path)
    before = page_digests(archive)

    report = compact_archive(archive, live.settings.entities, older_than_days=0)

    assert report.bytes_after < report.bytes_before
    compacted = {(c.entity, c.change_set) for c in report.compacted}
    assert ("vin_candidates", list_change_sets(archive, "vin_candidates")[0]) in compacted
    for entity, key in before:
        parquet = list((archive / entity / key).glob("pages-*-of-*.parquet"))
        pages = list((archive / entity / key).glob("page-*.json.gz"))
        assert bool(parquet) == ((entity, key) in compacted) and not (parquet and pages)
    assert page_digests(archive) == before
    rebuild(live.settings.entities, archive, tmp_path / "rebuilt.db")
    assert_same_database(tmp_path / "rebuilt.db", live.settings.db_path)
    # Compacting again finds nothing to do.
    assert compact_archive(archive, live.settings.entities, older_than_days=0).compacted == []

    monkeypatch.setenv("DATAVERSE_ARCHIVE_DIR", str(copy_archive(live, tmp_path / "cli")))
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(live.settings.entities_config_path))
    monkeypatch.setenv("DATAVERSE_DB_PATH", str(tmp_path / "no-mirror.db"))  # not the default
    assert main(["compact", "--older-than-days", "0"]) == 0
    assert "bytes ->" in capsys.readouterr().out


def test_the_compact_and_rebuild_commands_work_on_an_archive_in_a_bucket(
        live, s3, tmp_path, monkeypatch, capsys):
    """`compact` (compaction, retention, shrink) and `rebuild --into` as a user runs them with
    DATAVERSE_ARCHIVE_URL=s3://...: the bucket's page objects become Parquet parts, and the
    mirror rebuilt from the bucket alone equals the live one."""
    storage = copy_archive_to_bucket(live, s3)
    wait_for_checkpoint(live.settings.db_path)
    db = tmp_path / "mirror.db"
    shutil.copyfile(live.settings.db_path, db)
    monkeypatch.delenv("DATAVERSE_ARCHIVE_DIR", raising=False)
    monkeypatch.setenv("DATAVERSE_ARCHIVE_URL", f"s3://{storage.bucket}/{BUCKET_PREFIX}")
    monkeypatch.setenv("DATAVERSE_S3_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(live.settings.entities_config_path))
    monkeypatch.setenv("DATAVERSE_DB_PATH", str(db))
    first = list_change_sets(storage, "vin_candidates")[0]
    assert "page-00001.json.gz" in storage.names(f"vin_candidates/{first}")

    assert main(["compact", "--older-than-days", "0"]) == 0
    out = capsys.readouterr().out
    assert "bytes ->" in out
    names = storage.names(f"vin_candidates/{first}")
    assert "pages-0001-of-0001.parquet" in names and not any(
        n.startswith("page-") for n in names)

    assert main(["rebuild", "--into", str(tmp_path / "rebuilt.db")]) == 0
    assert_same_canonical_and_history(tmp_path / "rebuilt.db", live.settings.db_path)
    assert not (tmp_path / "archive").exists()  # nothing was read from or written to a folder


def test_change_sets_newer_than_the_threshold_are_not_compacted(live, tmp_path):
    archive = copy_archive(live, tmp_path)
    config = config_with_archive(live, tmp_path, compact_after_days=7)
    report = compact_archive(archive, config)
    assert report.compacted == []
    assert report.bytes_after == report.bytes_before


def test_lossless_retention_deletes_only_no_op_change_sets_and_rebuild_stays_equal(live,
                                                                                  tmp_path):
    archive = copy_archive(live, tmp_path)
    config = config_with_archive(live, tmp_path, retention_days=0)

    report = compact_archive(archive, config, db_path=live.settings.db_path,
                             older_than_days=0)

    deleted = {(d.entity, d.change_set) for d in report.deleted}
    assert ("vin_vin_candidate_accountset",
            list_change_sets(live.settings.archive_dir, "vin_vin_candidate_accountset")[2]
            ) in deleted  # a snapshot in which nothing changed
    for entity in ENTITY_NAMES:
        kept = list_change_sets(archive, entity)
        original = list_change_sets(live.settings.archive_dir, entity)
        assert kept[0] == original[0] and kept[-1] == original[-1], entity
    rebuilt = tmp_path / "rebuilt.db"
    rebuild(config, archive, rebuilt)
    # The deleted change sets are gone only from staging and the per-change-set bookkeeping.
    assert_same_canonical_and_history(rebuilt, live.settings.db_path)
    for table in ("_defunct", "_change_history", "_schema"):
        assert bookkeeping_tables(rebuilt)[table] == bookkeeping_tables(
            live.settings.db_path)[table], table
    assert _sync_state(rebuilt) == _sync_state(live.settings.db_path)


def test_lossless_retention_stays_lossless_after_maintenance_pruned_the_plans(live, tmp_path):
    """The plan rows of old change sets go after `publish_plan_days`; archive retention then
    tells a change set that wrote something from its publish counts, not from plan rows."""

    archive = copy_archive(live, tmp_path)
    wait_for_checkpoint(live.settings.db_path)
    db = tmp_path / "mirror.db"
    shutil.copyfile(live.settings.db_path, db)
    raw = json.loads(live.settings.entities_config_path.read_text())
    raw["archive"] = {"retention_days": 0}
    raw["maintenance"] = {"publish_plan_days": 0}
    path = tmp_path / "entities_config.json"
    path.write_text(json.dumps(raw))
    config = load_entities_config(path)
    with sqlite3.connect(db) as connection:
        pruned = retain_bookkeeping(connection, config)["_publish_plan"]
        assert pruned > 0 and connection.execute(
            "SELECT count(*) FROM _publish_plan").fetchone() == (0,)

    compact_archive(archive, config, db_path=db, older_than_days=0)

    rebuilt = tmp_path / "rebuilt.db"
    rebuild(config, archive, rebuilt)
    assert_same_canonical_and_history(rebuilt, live.settings.db_path)


def _sync_state(db_path):
    with sqlite3.connect(db_path) as connection:
        return sorted(connection.execute(
            "SELECT entity, mode, watermark, delta_token, status, last_change_set"
            " FROM _sync_state").fetchall())


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_rebase_retention_keeps_the_current_records(live, tmp_path, where, request):
    archive = archive_copy(where, live, tmp_path, request)
    config = config_with_archive(live, tmp_path, retention_days=0, retention_mode="rebase")

    compact_archive(archive, config, db_path=live.settings.db_path, older_than_days=None)

    # Full snapshots keep only the newest; change tracking starts at the resync.
    assert len(list_change_sets(archive, "vin_vin_candidate_accountset")) == 1
    resync = list_change_sets(live.settings.archive_dir, "vin_candidates")[-2]
    assert list_change_sets(archive, "vin_candidates")[0] == resync
    # modifiedon and filtered entities have no later snapshot: nothing rebased.
    assert list_change_sets(archive, "vin_clinicaltrials")[0] == list_change_sets(
        live.settings.archive_dir, "vin_clinicaltrials")[0]
    rebuilt = tmp_path / "rebuilt.db"
    rebuild(config, archive, rebuilt)
    for entity in ENTITY_NAMES:
        # A rebased row is the snapshot's read of it: its annotations (a lookup's name, a
        # label) are as the org showed them then, so records compare without them.
        with sqlite3.connect(rebuilt) as connection:
            actual = table_rows(connection, entity, REBASED_COLUMNS | {"json_response"})
            actual_records = records_without_annotations(connection, entity)
        with sqlite3.connect(live.settings.db_path) as connection:
            expected = table_rows(connection, entity, REBASED_COLUMNS | {"json_response"})
            expected_records = records_without_annotations(connection, entity)
        assert actual == expected, entity
        assert actual_records == expected_records, entity


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_rebuild_through_dagster_with_the_archive_source(live, tmp_path, where, request):
    if where == "folder":
        location = {"archive_dir": live.settings.archive_dir}
    else:  # DATAVERSE_ARCHIVE_URL=s3://...: the steps read the change sets from the bucket
        s3 = request.getfixturevalue("s3")
        bucket = copy_archive_to_bucket(live, s3).bucket
        location = {"archive_url": f"s3://{bucket}/{BUCKET_PREFIX}",
                    "s3_endpoint_url": s3.endpoint}
    settings = Settings(db_path=tmp_path / "rebuilt.db", **location,
                        entities_config_path=live.settings.entities_config_path,
                        source="archive")
    storage = storage_of(settings)
    defs = build_definitions(settings)
    instance = DagsterInstance.ephemeral()
    try:
        for group in ("hourly", "daily"):
            keys = archived_change_sets(settings.entities, storage, group)
            assert register_archived(instance, group, list(keys)) == list(keys)
            for key in keys:
                result = defs.resolve_job_def(sync_job_name(group)).execute_in_process(
                    instance=instance, partition_key=key, raise_on_error=False,
                    run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
                assert result.success, failure_messages(result)
        expected, actual = data_tables(live.settings.db_path), data_tables(settings.db_path)
        for table in expected:
            assert actual[table] == expected[table], f"{table} differs"

        # A change set that is not archived: refused, by entity and key, nothing written.
        unarchived = "20990101T000000Z"
        register_archived(instance, "daily", [unarchived])
        result = defs.resolve_job_def(sync_job_name("daily")).execute_in_process(
            instance=instance, partition_key=unarchived, raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}})
        assert not result.success
        messages = failure_messages(result)
        assert f"systemusers: change set {unarchived} is not archived" in messages
        assert not storage.holds_anything(f"systemusers/{unarchived}")
    finally:
        instance.dispose()


def test_register_archived_prints_the_keys_oldest_first(live, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("DATAVERSE_ARCHIVE_DIR", str(live.settings.archive_dir))
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(live.settings.entities_config_path))
    assert main(["change-set", "register-archived", "--group", "daily"]) == 0
    keys = capsys.readouterr().out.split()
    assert keys == list_change_sets(live.settings.archive_dir, "systemusers")
    assert keys == sorted(keys) and len(keys) == 3



def staged_change_sets(connection, entity) -> dict[str, int]:
    """Staged rows per change set of an entity, as the staging table holds them."""
    return dict(connection.execute(
        f"SELECT _change_set, count(*) FROM {quote_identifier('_staging__' + entity)}"
        " GROUP BY _change_set"))


def test_staging_retention_deletes_old_staged_rows_and_nothing_else(make_mirror, tmp_path,
                                                                   monkeypatch, capsys):

    mirror = make_mirror()
    simulator = mirror.simulator
    keys = [mirror.sync("hourly")]
    mutate(simulator)
    simulator.deny_read("accounts")  # accounts fails the second change set; the rest publish
    key, result = mirror.run("hourly")
    assert not result.success and "accounts" in failure_messages(result)
    keys.append(key)
    simulator.allow_read("accounts")
    keys.append(mirror.sync("hourly"))
    junction = "vin_vin_candidate_accountset"  # a full snapshot staged every change set
    with mirror.connection() as connection:
        staged_before = staged_change_sets(connection, junction)
        assert set(staged_before) == set(keys)
        before = {e: canonical_rows(connection, e) for e in ENTITY_NAMES
                  if e not in ("systemusers", "teams", "businessunits")}
        # accounts links from the junction table; a retry of its failed second change set is
        # queued (as the run-failure sensor does), so that change set's linking rows must stay
        # for its fetch.
        connection.execute(
            "INSERT INTO _retry_queue (entity, change_set, attempts, next_attempt_at, history)"
            " VALUES ('accounts', ?, 1, '2999-01-01T00:00:00Z', '[]')", (keys[1],))
        connection.commit()
    raw = json.loads(mirror.settings.entities_config_path.read_text())
    raw["archive"] = {"staging_keep_change_sets": 1}
    config_path = tmp_path / "retention.json"
    config_path.write_text(json.dumps(raw))
    config = load_entities_config(config_path)

    dry = compact_archive(mirror.settings.archive_dir, config, db_path=mirror.settings.db_path,
                          dry_run=True)
    planned = {(p.entity, p.change_set) for p in dry.staging_pruned}
    assert (junction, keys[0]) in planned and (junction, keys[1]) not in planned
    assert ("vin_candidates", keys[1]) not in planned  # accounts links from it too
    assert ("vin_clinicaltrials", keys[0]) in planned
    assert not any(key == keys[2] for _, key in planned)  # the newest stays
    with mirror.connection() as connection:
        assert set(staged_change_sets(connection, junction)) == set(keys)  # dry run

    report = compact_archive(mirror.settings.archive_dir, config,
                             db_path=mirror.settings.db_path)
    assert {(p.entity, p.change_set) for p in report.staging_pruned} == planned
    with mirror.connection() as connection:
        assert set(staged_change_sets(connection, junction)) == {keys[1], keys[2]}
        # accounts links from the trials too (their sponsor), so their second stays as well.
        assert set(staged_change_sets(connection, "vin_clinicaltrials")) <= {keys[1], keys[2]}
        assert keys[0] not in staged_change_sets(connection, "vin_clinicaltrials")
        assert {e: canonical_rows(connection, e) for e in before} == before
        pruned = connection.execute(
            "SELECT count(*) FROM _staged WHERE pruned_at IS NOT NULL").fetchone()[0]
    assert pruned == len(planned)

    # Publishing a pruned change set again would plan against nothing: refused, with the fix.
    store = MirrorStore(db_path=str(mirror.settings.db_path),
                        archive_dir=str(mirror.settings.archive_dir))
    entity = mirror.settings.entities.entity(junction)
    with pytest.raises(StagingPrunedError, match=f"Materialize staging/{junction} for "
                       f"partition {keys[0]}"):
        steps.publish(store, entity, keys[0])
    with mirror.connection() as connection:
        assert canonical_rows(connection, junction) == before[junction]
        assert connection.execute(
            "SELECT status FROM _publish_state WHERE entity = ? AND change_set = ?",
            (junction, keys[0])).fetchone() == ("COMPLETE",)

    # Staging it again (from the archive) brings its rows back.
    result = mirror.defs.resolve_job_def(sync_job_name("hourly")).execute_in_process(
        instance=mirror.instance, partition_key=keys[0], raise_on_error=False,
        asset_selection=[AssetKey(["staging", junction])])
    assert result.success, failure_messages(result)
    with mirror.connection() as connection:
        assert staged_change_sets(connection, junction)[keys[0]] == staged_before[keys[0]]
        assert connection.execute(
            "SELECT pruned_at FROM _staged WHERE entity = ? AND change_set = ?",
            (junction, keys[0])).fetchone() == (None,)

    # Later syncs go on as before, and a rebuild from the archive equals the mirror.
    mutate(simulator)
    mirror.sync("hourly")
    for name in before:
        assert_mirror_equals_simulator(mirror, name)
    rebuild(mirror.settings.entities, mirror.settings.archive_dir, tmp_path / "rebuilt.db")
    with sqlite3.connect(mirror.settings.db_path) as live, \
            sqlite3.connect(tmp_path / "rebuilt.db") as rebuilt:
        for table in [t for name in before for t in (name, f"{name}__history")]:
            assert table_rows(rebuilt, table) == table_rows(live, table), f"{table} differs"

    # The CLI says what it deleted.
    monkeypatch.setenv("DATAVERSE_DB_PATH", str(mirror.settings.db_path))
    monkeypatch.setenv("DATAVERSE_ARCHIVE_DIR", str(mirror.settings.archive_dir))
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(config_path))
    assert main(["compact"]) == 0
    assert f"staged rows of {junction} {keys[2]}" in capsys.readouterr().out


def test_a_filtered_fetch_of_a_change_set_whose_links_were_pruned_says_what_to_do(make_mirror,
                                                                                  tmp_path):
    """A change set the filtered entity never began (its linking tables ran alone), then a
    backfill of it after staging retention: refused, not fetched with no links."""
    mirror = make_mirror()
    mirror.sync("hourly")
    linking = ["vin_candidates", "vin_clinicaltrials", "vin_vin_candidate_accountset"]
    job = mirror.defs.resolve_job_def(sync_job_name("hourly"))
    alone = new_change_set_key(mirror.instance, "hourly")
    result = job.execute_in_process(
        instance=mirror.instance, partition_key=alone, raise_on_error=False,
        asset_selection=[AssetKey([layer, name]) for name in linking
                         for layer in ("raw", "staging", "canonical")])
    assert result.success, failure_messages(result)
    mirror.sync("hourly")
    raw = json.loads(mirror.settings.entities_config_path.read_text())
    raw["archive"] = {"staging_keep_change_sets": 1}
    (tmp_path / "retention.json").write_text(json.dumps(raw))
    config = load_entities_config(tmp_path / "retention.json")
    report = compact_archive(mirror.settings.archive_dir, config, db_path=mirror.settings.db_path)
    assert ("vin_vin_candidate_accountset", alone) in {
        (p.entity, p.change_set) for p in report.staging_pruned}

    result = job.execute_in_process(
        instance=mirror.instance, partition_key=alone, raise_on_error=False,
        asset_selection=[AssetKey(["raw", "accounts"])])
    assert not result.success
    message = failure_messages(result)
    assert "StagingPrunedError" in message and "accounts's fetch" in message
    assert f"Materialize staging/vin_vin_candidate_accountset for partition {alone}" in message
    assert not (mirror.settings.archive_dir / "accounts" / alone).exists()
