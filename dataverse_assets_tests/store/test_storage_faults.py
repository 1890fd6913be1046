"""A mirror database that cannot be used (read-only, corrupt, locked by another program) fails
the step that meets it with one line naming the file and what to do; a publish cut off that
way never stays marked as under way, and the next run completes it."""

import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from dagster._core.errors import DagsterExecutionInterruptedError

from dataverse_assets.defs.partitions import register_change_set
from dataverse_assets.errors import InjectedFault
from dataverse_assets.ops.cli import main as cli_main
from dataverse_assets.store import db as store
from dataverse_assets.store import locks
from dataverse_assets.store import mirror as resources
from dataverse_assets.sync import publish_execute as publish
from dataverse_assets.sync import steps
from dataverse_assets.sync.faults import armed, fault_point
from dataverse_assets_tests.conftest import failure_messages
from dataverse_assets_tests.helpers import mirror_of, mirror_rows, root_error, tree


def read_only(connect):
    """`connect`, with every connection refusing writes the way SQLite refuses them on a
    read-only file ("attempt to write a readonly database"; running as root, chmod would not
    stop us)."""

    def connect_read_only(path):
        connection = connect(path)
        connection.execute("PRAGMA query_only = ON")
        return connection

    return connect_read_only


def use_cli(mirror, tmp_path, monkeypatch) -> None:
    (tmp_path / "home").mkdir(exist_ok=True)
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)


def test_a_read_only_database_fails_the_first_step_with_one_line(tmp_path, simulator_url,
                                                                  monkeypatch):
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams"}])
    mirror.sync("hourly")
    before = mirror_rows(mirror, "teams")
    monkeypatch.setattr(locks, "connect", read_only(store.connect))
    monkeypatch.setattr(resources, "connect", read_only(store.connect))
    _, result = mirror.run("hourly")
    assert not result.success
    message = root_error(result)
    assert message.startswith(f"dataverse_assets.errors.StorageError: "
                              f"{mirror.settings.db_path}: the database is read-only")
    assert "taking the lock of teams" in message and "To fix: make the database file" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert mirror_rows(mirror, "teams") == before
    mirror.sync("hourly")


def test_a_corrupt_database_file_is_named_with_what_to_do(tmp_path, simulator_url,
                                                         monkeypatch, capsys):
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams"}])
    mirror.sync("hourly")
    store.wait_for_checkpoint(mirror.settings.db_path)
    archive = tree(mirror.settings.archive_dir)
    for suffix in ("-wal", "-shm"):
        mirror.settings.db_path.with_name(mirror.settings.db_path.name + suffix).unlink(
            missing_ok=True)
    mirror.settings.db_path.write_bytes(b"this is not a SQLite database, whatever it was" * 100)
    _, result = mirror.run("hourly")
    assert not result.success
    message = root_error(result)
    assert f"{mirror.settings.db_path}: the file is not a SQLite database" in message
    assert "dataverse-assets rebuild --into" in message and "\n" not in message
    assert tree(mirror.settings.archive_dir) == archive  # the archive: nothing touched
    # The command line says the same in one line.
    use_cli(mirror, tmp_path, monkeypatch)
    capsys.readouterr()
    assert cli_main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "is not a SQLite database" in err


def test_a_database_locked_by_another_program_says_so(tmp_path, simulator_url, monkeypatch):
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams"}])
    mirror.sync("hourly")
    monkeypatch.setattr(store, "BUSY_TIMEOUT_SECONDS", 0.3)
    other = sqlite3.connect(mirror.settings.db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another program holds the write lock, and keeps it
    try:
        _, result = mirror.run("hourly")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not result.success
    message = root_error(result)
    assert "another process held the database's write lock for more than 0.3 s" in message
    assert str(mirror.settings.db_path) in message and "\n" not in message


def test_a_publish_cut_off_by_the_database_never_stays_executing(tmp_path, simulator_url,
                                                                 monkeypatch, capsys):
    """The database turns read-only after the first chunk of a publish committed: the next
    chunk and the FAILED record are both refused. status must not say EXECUTING, and the
    next run completes the change set."""
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams", "publish_chunk_rows": 2}])
    sim = mirror.simulator
    mirror.sync("hourly")
    for number, record in enumerate(sim.records("teams")):
        sim.update("teams", record["teamid"], {"name": f"renamed {number}"})
    refusing = {"on": False}
    real_transaction, real_fault_point = publish.transaction, publish.fault_point

    @contextmanager
    def transaction(connection):
        if refusing["on"]:
            connection.execute("PRAGMA query_only = ON")
        with real_transaction(connection):
            yield connection

    def fault_point(name):
        if name == "publish.after_chunk_commit":
            refusing["on"] = True
        real_fault_point(name)

    monkeypatch.setattr(publish, "transaction", transaction)
    monkeypatch.setattr(publish, "fault_point", fault_point)
    cut, result = mirror.run("hourly")
    monkeypatch.undo()
    assert not result.success
    assert "the database is read-only" in root_error(result)
    with mirror.connection() as connection:
        status, applied = connection.execute(
            "SELECT status, rows_applied FROM _publish_state WHERE entity = 'teams'"
            " AND change_set = ?", (cut,)).fetchone()
    assert (status, applied) == ("EXECUTING", 2)  # what the database could keep
    use_cli(mirror, tmp_path, monkeypatch)
    assert cli_main(["status", "--json"]) == 0
    (row,) = orjson.loads(capsys.readouterr().out)
    assert row["publish_status"] == "FAILED" and "interrupted" in row["last_error"]
    assert cli_main(["plan", "show", "teams", cut]) == 0
    shown = capsys.readouterr().out
    assert f"change set {cut} (FAILED): interrupted:" in shown and "EXECUTING" not in shown

    later = mirror.sync("hourly")
    with mirror.connection() as connection:
        states = dict(connection.execute(
            "SELECT change_set, status FROM _publish_state WHERE entity = 'teams'"))
        names = sorted(name for (name,) in connection.execute("SELECT name FROM teams"))
    assert states[cut] == "COMPLETE" and states[later] == "COMPLETE"
    assert names == sorted(f"renamed {n}" for n in range(len(sim.records("teams"))))
    assert failure_messages(result)


def _stopped(name: str) -> None:
    """An armed fault point stops the run there, as Dagster stops a run terminated from the
    UI (an exception that is not an Exception)."""
    try:
        fault_point(name)
    except InjectedFault:
        raise DagsterExecutionInterruptedError() from None


def mirror_rows_of(mirror, query: str) -> list[tuple]:
    with mirror.connection() as connection:
        return connection.execute(query).fetchall()


def plan_header(mirror, tmp_path, monkeypatch, capsys, change_set: str) -> str:
    use_cli(mirror, tmp_path, monkeypatch)
    capsys.readouterr()
    assert cli_main(["plan", "show", "teams", change_set]) == 0
    return capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize(("how", "point"), [
    ("injected fault", "publish.mid_execute"), ("run stopped", "publish.mid_execute"),
    ("run stopped", "publish.before_plan")])
def test_a_publish_that_fails_is_recorded_failed_at_once(
        tmp_path, simulator_url, monkeypatch, capsys, how, point):
    """While the database can be written, a publish that fails (or whose run is stopped)
    records FAILED with the error right there: never left EXECUTING (or PENDING) for the next
    run to find, whatever `status` would make of it."""
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams", "publish_chunk_rows": 2}])
    sim = mirror.simulator
    mirror.sync("hourly")
    for number, record in enumerate(sim.records("teams")):
        sim.update("teams", record["teamid"], {"name": f"renamed {number}"})
    with monkeypatch.context() as patch:
        if how == "run stopped":
            patch.setattr(publish, "fault_point", _stopped)
            patch.setattr(steps, "fault_point", _stopped)
        # Mid-execute: in the second chunk, the first one committed.
        with armed(point, after=1 if point == "publish.mid_execute" else 0):
            cut, result = mirror.run("hourly")
    assert not result.success
    with mirror.connection() as connection:
        status, operation, error, applied = connection.execute(
            "SELECT status, failed_operation, error, rows_applied FROM _publish_state"
            " WHERE entity = 'teams' AND change_set = ?", (cut,)).fetchone()
    expected = {"injected fault": f"InjectedFault: injected fault at {point}",
                "run stopped": "DagsterExecutionInterruptedError: the run was stopped"}[how]
    assert (status, error) == ("FAILED", expected)
    if point == "publish.mid_execute":
        assert (operation, applied) == ("execute", 2)
        header = plan_header(mirror, tmp_path, monkeypatch, capsys, cut)
        assert header == f"Plan for teams, change set {cut} (FAILED): {expected}"
    else:
        assert operation == "prepare"
    mirror.sync("hourly")
    assert sorted(name for (name,) in mirror_rows_of(mirror, "SELECT name FROM teams")) == sorted(
        f"renamed {n}" for n in range(len(sim.records("teams"))))


def test_a_publish_left_executing_by_a_killed_process_is_shown_and_recorded_interrupted(
        tmp_path, simulator_url, monkeypatch, capsys):
    """A process SIGKILLed inside a publish records nothing: its change set stays EXECUTING
    in the database. `status` and `plan show` report it FAILED (interrupted), never under
    way; the next publish records it so (with a warning, and the attempt counted) and
    completes it."""
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams", "publish_chunk_rows": 2}])
    sim = mirror.simulator
    mirror.sync("hourly")
    for number, record in enumerate(sim.records("teams")):
        sim.update("teams", record["teamid"], {"name": f"renamed {number}"})
    killed = register_change_set(mirror.instance, "hourly")
    settings = mirror.settings
    repo = Path(__file__).resolve().parents[2]
    process = subprocess.run(
        [sys.executable, "-m", "dataverse_assets_tests.chaos.driver",
         "--db", str(settings.db_path), "--archive", str(settings.archive_dir),
         "--config", str(settings.entities_config_path), "--url", mirror.url,
         "--group", "hourly", "--change-set", killed],
        env={**os.environ, "DATAVERSE_FAULT_POINTS": "publish.mid_execute=kill@1",
             "PYTHONPATH": str(repo)},
        capture_output=True, text=True, timeout=120)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert mirror_rows_of(mirror, "SELECT status, retry_count FROM _publish_state"
                                  f" WHERE change_set = '{killed}'") == [("EXECUTING", 0)]

    header = plan_header(mirror, tmp_path, monkeypatch, capsys, killed)
    assert header.startswith(f"Plan for teams, change set {killed} (FAILED): interrupted: ")
    assert cli_main(["status", "--json"]) == 0
    (row,) = orjson.loads(capsys.readouterr().out)
    assert (row["last_change_set"], row["publish_status"]) == (killed, "FAILED")

    later, result = mirror.run("hourly")
    assert result.success, failure_messages(result)
    warnings = [entry.user_message for entry in mirror.instance.all_logs(result.run_id)
                if f"the publish of change set {killed} stopped" in (entry.user_message or "")]
    assert len(warnings) == 1 and "recorded FAILED (interrupted)" in warnings[0], warnings
    states = dict((key, (status, retries)) for key, status, retries in mirror_rows_of(
        mirror, "SELECT change_set, status, retry_count FROM _publish_state"))
    # The killed attempt counts as one that failed; then it was published, before `later`.
    assert states[killed] == ("COMPLETE", 1) and states[later] == ("COMPLETE", 0)
    assert sorted(name for (name,) in mirror_rows_of(mirror, "SELECT name FROM teams")) == sorted(
        f"renamed {n}" for n in range(len(sim.records("teams"))))
