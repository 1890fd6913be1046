"""Nothing grows without bound: the maintenance job (compaction, archive, staging and
bookkeeping retention, shrinking the file) on its schedule, with its numbers in the run; each
retention keeps what it must; issues count once per record and problem and resolve themselves."""

import json
import sqlite3
import threading
import time
from contextlib import closing
from datetime import UTC, datetime

import pytest
from dagster import DefaultScheduleStatus

from dataverse_assets.config import load_entities_config
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.defs.maintenance import MAINTENANCE_JOB
from dataverse_assets.defs.schedules import build_schedules
from dataverse_assets.errors import ConfigError
from dataverse_assets.ops.cli import main as cli_main
from dataverse_assets.simulator import SimAttribute
from dataverse_assets.store import dead_letters, maintenance
from dataverse_assets.store.db import MirrorConnection, connect, transaction, wait_for_checkpoint
from dataverse_assets.store.issues import record_issue
from dataverse_assets.store.maintenance import retain_bookkeeping, shrink_database
from dataverse_assets.store.staging_store import STAGING_SCHEMA, staging_path
from dataverse_assets_tests.conftest import write_entities_config
from dataverse_assets_tests.helpers import mutate
from dataverse_assets_tests.truth import canonical_rows

ENTITIES = ["vin_candidates", "vin_clinicaltrials", "vin_vin_candidate_accountset", "accounts"]
EVERYTHING_OLD = {"publish_plan_days": 0, "change_history_days": 0, "sync_log_days": 0,
                  "resolved_issues_days": 0, "closed_dead_letters_days": 0}


@pytest.fixture
def store(each_store):
    """The tests that take `store` run in each kind of store (docs/store-backends.md)."""
    return each_store


def with_maintenance(mirror, tmp_path, **settings) -> None:
    """Rewrite the mirror's entities file with these maintenance (and archive) settings."""
    raw = json.loads(mirror.settings.entities_config_path.read_text())
    raw["maintenance"] = {k: v for k, v in settings.items() if k != "archive"}
    raw["archive"] = settings.get("archive", {})
    mirror.settings.entities_config_path.write_text(json.dumps(raw))
    mirror.settings.__dict__.pop("entities", None)  # the cached parse


def synced_four_times(make_mirror):
    """A mirror of four change sets of the hourly group, with edits between them: old change
    sets, staged rows and bookkeeping for the maintenance job to work on."""
    mirror = make_mirror()
    for _ in range(3):
        mirror.sync("hourly")
        mutate(mirror.simulator)
    mirror.sync("hourly")
    return mirror


def run_maintenance_job(mirror) -> dict[str, dict]:
    """The maintenance job run as its schedule runs it; its ops' output metadata."""
    defs = build_definitions(mirror.settings, source=mirror.defs.resources["source"])
    result = defs.resolve_job_def(MAINTENANCE_JOB).execute_in_process(
        instance=mirror.instance, raise_on_error=False)
    assert result.success
    return output_metadata(result)


def output_metadata(result) -> dict[str, dict]:
    return {e.step_key: {k: v.value for k, v in e.event_specific_data.metadata.items()}
            for e in result.all_events if e.event_type_value == "STEP_OUTPUT"}


def test_the_schedule_runs_daily_by_default_or_as_configured_or_not_at_all(tmp_path):
    def schedule(maintenance):
        path = write_entities_config(tmp_path / "e.json", page_size=40)
        raw = json.loads(path.read_text())
        if maintenance is not None:
            raw["maintenance"] = maintenance
        path.write_text(json.dumps(raw))
        found = [s for s in build_schedules(load_entities_config(path))
                 if s.name == "maintenance_schedule"]
        return found[0] if found else None

    default = schedule(None)
    assert (default.cron_schedule, default.job_name) == ("0 3 * * *", MAINTENANCE_JOB)
    assert default.default_status == DefaultScheduleStatus.RUNNING
    assert schedule({"cron": "15 1 * * 0"}).cron_schedule == "15 1 * * 0"
    assert schedule({"cron": None}) is None
    with pytest.raises(ConfigError, match="field 'maintenance.cron'"):
        schedule({"cron": "every night"})


def test_the_maintenance_job_compacts_retains_and_shrinks_with_its_numbers_in_the_run(
        make_each_mirror, tmp_path):
    mirror = synced_four_times(make_each_mirror)
    sqlite = mirror.settings.store.kind == "sqlite"
    with mirror.connection() as connection:
        before = {e: canonical_rows(connection, e) for e in ENTITIES}
        plan_rows = connection.execute("SELECT count(*) FROM _publish_plan").fetchone()[0]
        if not sqlite:
            plan_bytes = connection.execute(
                "SELECT pg_relation_size('_publish_plan')").fetchone()[0]
    if sqlite:
        db = mirror.settings.db_path
        wait_for_checkpoint(db)
        size_before = db.stat().st_size
    with_maintenance(mirror, tmp_path, **EVERYTHING_OLD,
                     archive={"compact_after_days": 0, "staging_keep_change_sets": 1})

    numbers = run_maintenance_job(mirror)
    compacted = numbers["compact_archive_and_staging"]
    assert compacted["change_sets_compacted"] > 0 and compacted["staged_rows_pruned"] > 0
    assert compacted["bytes_freed"] > 0
    retained = numbers["retain_bookkeeping_rows"]
    assert retained["rows_deleted"] >= plan_rows > 0
    shrunk = numbers["shrink_mirror_file"]
    if sqlite:
        assert shrunk["bytes_freed"] > 0 and shrunk["file_bytes_after"] < size_before
        # The staged rows retention deleted were given back by the staging file too.
        assert shrunk["staging_file_bytes_after"] < shrunk["staging_file_bytes_before"]
        with mirror.connection() as connection:
            assert connection.execute("PRAGMA freelist_count").fetchone() == (0,)
    else:
        # No file, no staging file, no page counted: the database's sizes, as measured. (The
        # vacuum gives back the tables' emptied tails but adds their free-space and visibility
        # maps: the database may come out larger.)
        assert sorted(shrunk) == ["bytes_freed", "database_bytes_after",
                                  "database_bytes_before", "vacuum"]
        assert shrunk == {"vacuum": "VACUUM (ANALYZE)",
                          "database_bytes_before": shrunk["database_bytes_before"],
                          "database_bytes_after": shrunk["database_bytes_after"],
                          "bytes_freed": max(0, shrunk["database_bytes_before"]
                                             - shrunk["database_bytes_after"])}
        assert min(shrunk["database_bytes_before"], shrunk["database_bytes_after"]) > 0
        with mirror.connection() as connection:  # the plan rows' pages went back
            assert connection.execute(
                "SELECT pg_relation_size('_publish_plan')").fetchone() == (0,) != (plan_bytes,)
    with mirror.connection() as connection:
        assert {e: canonical_rows(connection, e) for e in ENTITIES} == before
    # The mirror goes on: the next changes are published as before.
    mutate(mirror.simulator)
    mirror.sync("hourly")


# SQLite only: what it checks is that the files keep their size and free pages (the skip
# touches no store; the job on PostgreSQL is the test above).
def test_with_shrink_file_false_retention_runs_and_the_files_keep_their_size(
        make_mirror, tmp_path):
    mirror = synced_four_times(make_mirror)
    db = mirror.settings.db_path
    staging = staging_path(db)

    def sizes() -> tuple[int, int]:
        wait_for_checkpoint(db)
        wait_for_checkpoint(staging)
        return db.stat().st_size, staging.stat().st_size

    before = sizes()
    with_maintenance(mirror, tmp_path, **EVERYTHING_OLD, shrink_file=False,
                     archive={"staging_keep_change_sets": 1})
    numbers = run_maintenance_job(mirror)
    assert numbers["compact_archive_and_staging"]["staged_rows_pruned"] > 0
    assert numbers["retain_bookkeeping_rows"]["rows_deleted"] > 0
    assert numbers["shrink_mirror_file"] == {"skipped": "maintenance.shrink_file is false"}
    # The space retention freed stays in the files, free for later writes.
    assert sizes() == before
    with mirror.connection() as connection:
        assert connection.execute("SELECT count(*) FROM _publish_plan").fetchone() == (0,)
        assert connection.execute("PRAGMA main.freelist_count").fetchone()[0] > 0
        assert connection.execute(f"PRAGMA {STAGING_SCHEMA}.freelist_count").fetchone()[0] > 0


def test_the_shrink_gives_the_write_lock_back_between_its_steps(tmp_path, monkeypatch):
    """A publish (the mirror file) or a fetch staging rows (the staging file) while the
    maintenance shrinks the files gets its write lock between two steps, without waiting:
    the writer below does not wait at all (busy timeout 0), after every step."""
    path = tmp_path / "m.db"
    with closing(connect(path)) as connection:
        connection.execute(f"CREATE TABLE {STAGING_SCHEMA}.filler (x TEXT)")
        connection.execute("CREATE TABLE filler (x TEXT)")
        connection.execute("CREATE TABLE written (file TEXT, free_pages_left INTEGER)")
        with transaction(connection, staging=True):
            for schema in ("main", STAGING_SCHEMA):  # ~200 pages of 16 KB in each file
                connection.executemany(f"INSERT INTO {schema}.filler VALUES (?)",
                                       [("x" * 4000,)] * 800)
        with transaction(connection, staging=True):
            for schema in ("main", STAGING_SCHEMA):
                connection.execute(f"DELETE FROM {schema}.filler")
    monkeypatch.setattr(maintenance, "VACUUM_PAGES_PER_STEP", 16)
    writer = connect(path)
    writer.execute("PRAGMA busy_timeout = 0")  # "database is locked" at once if it is held
    steps: list[str] = []
    vacuum_step = MirrorConnection.executescript

    def step_then_write(connection, script):
        result = vacuum_step(connection, script)
        if "incremental_vacuum" in script:
            schema = script.split("PRAGMA ")[1].split(".")[0]
            steps.append(schema)
            with transaction(writer, staging=True):  # as a publish, or staging, takes it
                left = writer.execute(f"PRAGMA {schema}.freelist_count").fetchone()[0]
                writer.execute("INSERT INTO written VALUES (?, ?)", (schema, left))
        return result

    monkeypatch.setattr(MirrorConnection, "executescript", step_then_write)
    files = (path, staging_path(path))
    for file in files:
        wait_for_checkpoint(file)
    sizes_before = [file.stat().st_size for file in files]
    shrink_database(path)
    writer.close()

    with closing(connect(path)) as connection:
        written = connection.execute("SELECT file, free_pages_left FROM written").fetchall()
        assert connection.execute("PRAGMA main.freelist_count").fetchone() == (0,)
        assert connection.execute(f"PRAGMA {STAGING_SCHEMA}.freelist_count").fetchone() == (0,)
    # A write after every step, all but the last while pages were still to be given back.
    assert [file for file, _ in written] == steps
    for schema in ("main", STAGING_SCHEMA):
        left = [free for file, free in written if file == schema]
        assert len(left) >= 10 and all(free > 0 for free in left[:-1])
    # And both files gave their free pages back (their WAL may still hold the writes).
    for file, before in zip(files, sizes_before, strict=True):
        assert file.stat().st_size < before / 2



def test_the_shrink_waits_for_a_checkpoint_that_another_connection_is_running(tmp_path,
                                                                                monkeypatch):
    """SQLite answers "busy" at once, without waiting, to a checkpoint while another connection
    checkpoints (a sync's commits start one in the checkpoint thread). The shrink's last
    checkpoint, which is what makes the file smaller, waits for it instead of giving up
    quietly: here another connection's checkpoint holds the lock for a second (it waits for an
    old reader) just as the shrink's last checkpoint starts."""
    path = tmp_path / "m.db"
    with closing(connect(path)) as connection:
        connection.execute("CREATE TABLE filler (x TEXT)")
        with transaction(connection):
            connection.executemany("INSERT INTO filler VALUES (?)", [("x" * 4000,)] * 800)
        with transaction(connection):
            connection.execute("DELETE FROM filler")
    wait_for_checkpoint(path)
    size_before = path.stat().st_size
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    checkpointing: list[threading.Thread] = []
    real_execute = MirrorConnection.execute

    def other_checkpoint_first(connection, sql, *args):
        if "wal_checkpoint(TRUNCATE)" in sql and not checkpointing:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM filler").fetchall()  # an old snapshot...
            with closing(sqlite3.connect(path, isolation_level=None)) as other:
                other.execute("INSERT INTO filler VALUES ('newer')")  # ...once this commits
            # A FULL checkpoint takes the checkpoint lock, then waits for the reader. (A
            # probe's checkpoint that takes the lock first makes it give up: start it again.)
            with closing(sqlite3.connect(path, isolation_level=None)) as probe:
                for _ in range(50):
                    checkpointing[:] = [threading.Thread(target=closing_checkpoint, args=(path,))]
                    checkpointing[0].start()
                    time.sleep(0.2)
                    if probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 1:
                        break
                    checkpointing[0].join()
                else:
                    raise AssertionError("the other checkpoint never held the lock")
            threading.Timer(1.0, lambda: reader.execute("COMMIT")).start()
        return real_execute(connection, sql, *args)

    monkeypatch.setattr(MirrorConnection, "execute", other_checkpoint_first)
    shrink = shrink_database(path)
    assert checkpointing, "the shrink never ran its last checkpoint"
    # Measured as the shrink returns, before anyone else checkpoints again.
    assert shrink.bytes_after < size_before / 2
    assert shrink.not_truncated == ()
    checkpointing[0].join(30)
    reader.close()


def closing_checkpoint(path) -> None:
    with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as connection:
        connection.execute("PRAGMA wal_checkpoint(FULL)").fetchall()

def test_bookkeeping_retention_keeps_what_it_must(store, tmp_path):
    now = datetime(2026, 12, 6, tzinfo=UTC)
    old, recent = "2026-01-01T00:00:00.000000Z", "2026-12-05T00:00:00.000000Z"
    with store.connection() as connection:

        dead_letters.ensure_tables(connection)
        connection.executescript("CREATE TABLE IF NOT EXISTS _publish_plan (entity TEXT,"
                                 " change_set TEXT, pk TEXT, kind TEXT, changes TEXT,"
                                 " applied INTEGER DEFAULT 0);"
                                 "CREATE TABLE things__history (thingid TEXT, valid_to TEXT);")
        for cs, finished, delete_unknown in (("a", old, 0), ("b", recent, 0), ("c", old, None)):
            connection.execute(
                "INSERT INTO _publish_state (entity, change_set, status, finished_at,"
                " delete_unknown) VALUES ('things', ?, 'COMPLETE', ?, ?)",
                (cs, finished, delete_unknown))
            connection.execute("INSERT INTO _publish_plan (entity, change_set, pk, kind)"
                               " VALUES ('things', ?, 'id', 'update')", (cs,))
        connection.execute("INSERT INTO _key_check VALUES ('things', 1, 2, 0, 'all', ?)",
                           (recent,))
        for applied in (old, old, old, recent):
            connection.execute(
                "INSERT INTO _change_history (entity, change_set, record_id, kind, applied_at)"
                " VALUES ('things', 'a', 'id', 'update', ?)", (applied,))
        connection.executemany(
            "INSERT INTO _issues (entity, change_set, record_id, problem, recorded_at,"
            " resolved_at) VALUES ('things', 'a', ?, 'bad', ?, ?)",
            [("open", old, None), ("resolved-old", old, old), ("resolved-new", old, recent)])
        connection.executemany(
            "INSERT INTO _dead_letter (entity, change_set, reason, diagnostics, retry_history,"
            " status, created_at, updated_at) VALUES ('things', 'a', 'r', '{}', '[]', ?, ?, ?)",
            [("open", old, old), ("dropped", old, old), ("resolved", recent, recent)])
        connection.executemany("INSERT INTO things__history VALUES (?, ?)",
                               [("a", old), ("b", recent)])
        connection.executemany(  # a finished step, and one that started and never finished
            "INSERT INTO _sync_log (entity, change_set, layer, status, started_at, finished_at)"
            " VALUES ('things', ?, 'canonical', 'ok', ?, ?)",
            [("old", old, old), ("old-unfinished", old, None), ("recent", old, recent),
             ("recent-unfinished", recent, None)])
        config = load_entities_config(write_entities_config(
            tmp_path / "e.json", page_size=40))
        raw = json.loads((tmp_path / "e.json").read_text())
        raw["entities"].append({"name": "things", "group": "hourly", "incremental": "full"})
        raw["maintenance"] = {"publish_plan_days": 7, "change_history_days": 7,
                              "sync_log_days": 7, "resolved_issues_days": 7,
                              "closed_dead_letters_days": 7}
        (tmp_path / "e.json").write_text(json.dumps(raw))
        config = load_entities_config(tmp_path / "e.json")

        assert retain_bookkeeping(connection, config, now, dry_run=True)["_issues"] == 1
        deleted = retain_bookkeeping(connection, config, now)

        def rows(sql):
            return connection.execute(sql).fetchall()

        # Only the old plan whose counts are complete; the old change-history rows the last
        # key check has read (ids 1 and 2, not 3); resolved issues and closed dead letters
        # past the horizon; sync log lines that ended (or began, if never ended) before it;
        # history is kept without history_days.
        assert rows("SELECT change_set FROM _publish_plan ORDER BY 1") == [("b",), ("c",)]
        assert rows("SELECT id FROM _change_history ORDER BY 1") == [(3,), (4,)]
        assert rows("SELECT record_id FROM _issues ORDER BY 1") == [("open",),
                                                                   ("resolved-new",)]
        assert rows("SELECT status FROM _dead_letter ORDER BY 1") == [("open",), ("resolved",)]
        assert rows("SELECT change_set FROM _sync_log ORDER BY 1") == [
            ("recent",), ("recent-unfinished",)]
        assert rows("SELECT count(*) FROM things__history") == [(2,)]
        assert deleted["_publish_plan"] == 1 and deleted["_change_history"] == 2
        assert deleted["_sync_log"] == 2
        raw["maintenance"]["history_days"] = 7
        (tmp_path / "e.json").write_text(json.dumps(raw))
        retain_bookkeeping(connection, load_entities_config(tmp_path / "e.json"), now)
        assert rows("SELECT thingid FROM things__history") == [("b",)]


def test_an_older_database_is_converted_once_and_then_shrinks(tmp_path):
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path, isolation_level=None)  # as versions before auto_vacuum made it
    raw.executescript("PRAGMA page_size=16384; PRAGMA journal_mode=WAL;"
                      "CREATE TABLE filler (x TEXT);")
    raw.executemany("INSERT INTO filler VALUES (?)", [("x" * 4000,)] * 2000)
    raw.execute("DELETE FROM filler")
    raw.close()
    with closing(connect(path)) as connection:
        assert connection.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    locked = []
    shrink = shrink_database(path, exclusive=lambda: _Recording(locked))
    assert shrink.converted and locked == ["held"] and shrink.bytes_after < shrink.bytes_before
    with closing(connect(path)) as connection:
        assert connection.execute("PRAGMA auto_vacuum").fetchone() == (2,)
        connection.executemany("INSERT INTO filler VALUES (?)", [("x" * 4000,)] * 2000)
        connection.execute("DELETE FROM filler")
    again = shrink_database(path)
    assert not again.converted and again.pages_freed > 0
    assert again.bytes_after < again.bytes_before / 10 and path.stat().st_size == again.bytes_after


class _Recording:
    """An `exclusive()` stand-in that records that the conversion asked for it."""

    def __init__(self, log: list) -> None:
        self.log = log

    def __enter__(self):
        self.log.append("held")

    def __exit__(self, *exc) -> None:
        return None


def test_an_issue_counts_once_per_record_and_resolves_when_the_record_stages_cleanly(
        make_each_mirror, tmp_path, monkeypatch, capsys):
    trials = "vin_clinicaltrials"
    mirror = make_each_mirror(overrides={trials: {"schema_evolution": "evolve"}})  # typed column
    sim = mirror.simulator
    mirror.sync("hourly")
    sim.add_column(trials, SimAttribute("vin_counter", "BigInt"), default=None)
    trial = sim.records(trials)[0]["vin_clinicaltrialid"]
    sim.update(trials, trial, {"vin_counter": 2**63})  # fits neither store's 64-bit integer
    first = mirror.sync("hourly")
    sim.update(trials, trial, {"vin_name": "touched again"})  # the same value, staged again
    second = mirror.sync("hourly")

    def issues():
        with mirror.connection() as connection:
            return connection.execute(
                "SELECT record_id, change_set, last_change_set, occurrences, resolved_at"
                " FROM _issues WHERE entity = ?", (trials,)).fetchall()

    assert issues() == [(trial, first, second, 2, None)]  # one issue, seen twice
    sim.update(trials, trial, {"vin_counter": 5})
    mirror.sync("hourly")
    (issue,) = issues()
    assert issue[4] is not None  # staged cleanly: resolved

    (tmp_path / "home").mkdir()
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert cli_main(["issues", "--entity", trials]) == 0
    assert capsys.readouterr().out.strip() == "no open issues"
    assert cli_main(["issues", "--entity", trials, "--all"]) == 0
    assert capsys.readouterr().out.count("[resolved ") == 1


def test_the_same_problem_seen_again_is_one_issue_with_a_count(store, monkeypatch):
    clock = iter(f"2026-12-0{day}T00:00:00.000000Z" for day in range(1, 10))
    monkeypatch.setattr("dataverse_assets.store.issues.utc_now_iso", lambda: next(clock))
    with store.connection() as connection:
        for change_set in ("a", "a", "b", "c"):  # seen on the 1st, 2nd, 3rd and 4th
            record_issue(connection, entity="things", change_set=change_set, record_id="id-1",
                         field="x", problem="bad value", context=f"seen in {change_set}")
        record_issue(connection, entity="things", change_set="c", record_id=None,
                     field="thingid", problem="record without primary key", context="page 1")
        record_issue(connection, entity="things", change_set="c", record_id=None,
                     field="thingid", problem="record without primary key", context="page 2")
        rows = connection.execute(
            "SELECT record_id, change_set, last_change_set, occurrences, context, recorded_at,"
            " last_seen_at FROM _issues ORDER BY id").fetchall()
    # First seen on the 1st, last seen on the 4th.
    assert rows == [
        ("id-1", "a", "c", 3, "seen in c", "2026-12-01T00:00:00.000000Z",
         "2026-12-04T00:00:00.000000Z"),
        (None, "c", "c", 1, "page 1", "2026-12-05T00:00:00.000000Z",
         "2026-12-05T00:00:00.000000Z"),
        (None, "c", "c", 1, "page 2", "2026-12-06T00:00:00.000000Z",
         "2026-12-06T00:00:00.000000Z")]


def test_issues_an_older_version_recorded_once_per_sighting_are_folded(tmp_path):
    path = tmp_path / "m.db"
    with closing(connect(path)) as connection:
        connection.execute("DROP INDEX _issues__open")
        connection.executemany(
            "INSERT INTO _issues (entity, change_set, record_id, field, problem, recorded_at)"
            " VALUES ('things', ?, 'id-1', 'x', 'bad', ?)",
            [("a", "2026-01-01"), ("b", "2026-01-02"), ("c", "2026-01-03")])
    with closing(connect(path)) as connection:  # the next connection folds them
        assert connection.execute(
            "SELECT change_set, last_change_set, occurrences, last_seen_at FROM _issues"
        ).fetchall() == [("a", "c", 3, "2026-01-03")]


def test_a_postgresql_store_is_vacuumed_not_shrunk(postgres_store_url):
    with closing(connect(postgres_store_url)) as connection:
        connection.execute("CREATE TABLE things (thingid TEXT)")
        connection.execute("INSERT INTO things SELECT 'id-' || n FROM generate_series(1, 500) n")
        connection.execute("DELETE FROM things")
    shrink = shrink_database(postgres_store_url)
    assert shrink.bytes_before > 0 and shrink.bytes_after > 0
    assert (shrink.pages_freed, shrink.converted) == (0, False)
