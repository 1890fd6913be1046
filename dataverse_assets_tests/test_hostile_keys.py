"""Change-set keys, names and ids typed by a user (the UI's "Add a partition", run config, the
command line) never become a path outside the archive or a term of a query: a bad one fails with
one line naming it and the format, and touches nothing; keys order by the time they encode."""

import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    SensorResult,
    build_run_status_sensor_context,
    build_schedule_context,
    build_sensor_context,
)

from dataverse_assets.archive.change_sets import MANIFEST, ChangeSetArchive, list_change_sets
from dataverse_assets.defs import partitions, schedules, sensors
from dataverse_assets.defs.asset_keys import entity_asset_keys
from dataverse_assets.defs.partitions import register_change_set
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.errors import InvalidNameError
from dataverse_assets.names import (
    KEY_EXAMPLE,
    change_set_key,
    change_set_order,
    check_change_set_key,
)
from dataverse_assets.ops import cli, rebuild
from dataverse_assets.ops.cli import main as cli_main
from dataverse_assets.store import dead_letters
from dataverse_assets_tests.helpers import (
    mirror_of,
    mirror_rows,
    root_error,
    source_of,
    store_of,
    tree,
)

FORMAT_WORDS = "YYYYMMDDTHHMMSSZ"


def test_a_partition_key_that_is_not_a_change_set_key_fails_and_touches_nothing(
        tmp_path, simulator_url):
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams"}])
    mirror.sync("hourly")
    # A folder outside the archive that an absolute "key" names, with a file in it.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    archive = Path(mirror.settings.archive_dir)
    before_archive, before_rows = tree(archive), mirror_rows(mirror, "teams")
    before_state = mirror_rows(mirror, "_publish_state")
    bad_keys = [
        "../..", "..", str(victim), f"{KEY_EXAMPLE}/../../..", "my-first-run",
        "20261399T250000Z",  # the shape, but no time
        f" {KEY_EXAMPLE}", f"{KEY_EXAMPLE}\n", "2026-11-22T10:15:00Z",
    ]
    partitions = "change_sets_hourly"
    for key in bad_keys:
        # As the UI's "Add a partition" or add_dynamic_partitions would.
        mirror.instance.add_dynamic_partitions(partitions, [key])
        _, result = mirror.run("hourly", key)
        assert not result.success, key
        message = root_error(result)
        # The key as the message shows it (a long one, such as a temporary folder's path,
        # is cut to 77 characters and "...").
        assert repr(key)[:77] in message and FORMAT_WORDS in message and "\n" not in message, (
            key, message)
        # Staging or canonical alone (as a backfill of one asset would run them): refused too.
        for layer in ("staging", "canonical"):
            alone = mirror.defs.resolve_job_def("sync_hourly").execute_in_process(
                instance=mirror.instance, partition_key=key, raise_on_error=False,
                asset_selection=[AssetKey([layer, "teams"])])
            assert not alone.success and FORMAT_WORDS in root_error(alone), (layer, key)
    assert tree(archive) == before_archive
    assert (victim / "keep.txt").read_text() == "precious" and len(list(victim.iterdir())) == 1
    assert not (tmp_path / "teams").exists() and not (archive.parent / "teams").exists()
    assert mirror_rows(mirror, "teams") == before_rows
    assert mirror_rows(mirror, "_publish_state") == before_state
    # The mirror goes on as before.
    mirror.sync("hourly")


def _cli_create(mirror, monkeypatch, capsys) -> str:
    """`change-set create`: its key from the clock."""
    monkeypatch.setattr(partitions, "change_set_key", lambda moment: "20261399T250000Z")
    assert cli_main(["change-set", "create", "--group", "hourly"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def _cli_register_archived(mirror, monkeypatch, capsys) -> str:
    """`change-set register-archived`: keys from the archive's folders, listed without the
    folder check (as a version before it did); a good key with the bad one."""
    monkeypatch.setattr(rebuild, "list_change_sets", lambda root, entity: [KEY_EXAMPLE, "../.."])
    assert cli_main(["change-set", "register-archived", "--group", "hourly"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def _refusal(evaluate) -> str:
    """The one-line refusal an evaluation raised (under the errors Dagster wraps it in)."""
    with pytest.raises(Exception) as refused:
        evaluate()
    error = refused.value
    while error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, InvalidNameError), repr(error)
    assert "\n" not in str(error), str(error)
    return str(error)


def _schedule(mirror, monkeypatch, capsys) -> str:
    """The group's schedule: its key from the scheduled time."""
    monkeypatch.setattr(schedules, "change_set_key", lambda moment: "my-first-run")
    schedule = mirror.defs.resolve_schedule_def("hourly_schedule")
    # Exited when done: the context opens an instance of its own from the reference, which
    # would otherwise stay Dagster's current definitions-state storage for every later test.
    with build_schedule_context(
            instance=mirror.instance, scheduled_execution_time=datetime(2026, 11, 22, 10, 0,
                                                                        tzinfo=UTC),
            repository_def=mirror.defs.get_repository_def()) as context:
        return _refusal(lambda: schedule.evaluate_tick(context))


def _tick(mirror, sensor_name: str) -> None:
    """Evaluate a sensor as the daemon would: then register the partitions it requests."""
    sensor = mirror.defs.resolve_sensor_def(sensor_name)
    context = build_sensor_context(
        instance=mirror.instance, definitions=mirror.defs,
        resources={"store": store_of(mirror), "source": source_of(mirror)})
    result = sensor(context)
    for request in (result.dynamic_partitions_requests or []
                    if isinstance(result, SensorResult) else []):
        mirror.instance.add_dynamic_partitions(request.partitions_def_name,
                                               list(request.partition_keys))


def _changes_sensor(mirror, monkeypatch, capsys) -> str:
    """The changes sensor: its key from the clock."""
    monkeypatch.setattr(sensors, "change_set_key", lambda moment: f"{KEY_EXAMPLE}/..")
    return _refusal(lambda: _tick(mirror, "hourly_changes_sensor"))


def _archive_sensor(mirror, monkeypatch, capsys) -> str:
    """The archive sensor: keys from the archive's folders (a good one with the bad one)."""
    monkeypatch.setattr(sensors, "list_change_sets", lambda root, entity: [KEY_EXAMPLE, "../.."])
    return _refusal(lambda: _tick(mirror, "archive_change_sets_sensor"))


REGISTRATIONS = {
    "change-set create": (_cli_create, "20261399T250000Z"),
    "change-set register-archived": (_cli_register_archived, "../.."),
    "schedule": (_schedule, "my-first-run"),
    "changes sensor": (_changes_sensor, f"{KEY_EXAMPLE}/.."),
    "archive sensor": (_archive_sensor, "../.."),
}


@pytest.mark.parametrize("path", REGISTRATIONS)
def test_every_registration_path_refuses_a_bad_key_and_registers_nothing(
        tmp_path, simulator_url, monkeypatch, capsys, path):
    """The CLI, the sensors and the schedule register keys they derive (the clock, the
    archive's folders, the scheduled time). Whatever key one of them came to hold, it is
    refused in one line naming it and the format, and nothing of its request is registered
    (a good key asked for with it neither)."""
    register, key = REGISTRATIONS[path]
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams"}])
    (tmp_path / "home").mkdir()
    # A real (temporary) instance: schedules and sensors need an instance reference.
    with DagsterInstance.local_temp(tempdir=str(tmp_path / "home")) as instance:
        mirror = replace(mirror, instance=instance)
        for name, value in mirror.cli_environment(tmp_path / "home").items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(cli, "_instance", lambda: instance)
        with monkeypatch.context() as patch:
            message = register(mirror, patch, capsys)
        assert f"change set key {key!r} is not a change-set key" in message, message
        assert FORMAT_WORDS in message, message
        assert instance.get_dynamic_partitions("change_sets_hourly") == []
        # Keys that are keys are registered as before.
        assert cli_main(["change-set", "create", "--group", "hourly"]) == 0
        assert instance.get_dynamic_partitions("change_sets_hourly") == [
            capsys.readouterr().out.strip()]


def test_an_archive_folder_that_links_outside_the_archive_is_never_written(
        tmp_path, simulator_url):
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams"}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("precious")
    archive = Path(mirror.settings.archive_dir)
    archive.mkdir()
    os.symlink(elsewhere, archive / "teams")
    _, result = mirror.run("hourly")
    assert not result.success
    message = root_error(result)
    assert "outside the archive root" in message and "\n" not in message
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"]


def test_change_sets_order_by_the_time_their_keys_encode(tmp_path):
    keys = ["20261122T101500Z", "20250101T000000Z", "20261122T101459Z", "20991231T235959Z"]
    assert sorted(keys, key=change_set_order) == sorted(keys)
    # A key stored by an older version that took any partition key sorts before every real
    # one: never "newer" than a real change set.
    assert sorted(["my-first-run", *keys], key=change_set_order)[0] == "my-first-run"
    with pytest.raises(InvalidNameError):
        check_change_set_key("20261122T1015Z")
    # Folders that are not change sets are not listed, whatever they hold.
    for key in ("20261122T101500Z", "20250101T000000Z", "my-first-run"):
        folder = tmp_path / "teams" / key
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text("{}")
    assert list_change_sets(tmp_path, "teams") == ["20250101T000000Z", "20261122T101500Z"]
    with pytest.raises(InvalidNameError):
        ChangeSetArchive(tmp_path, "teams", "my-first-run")
    with pytest.raises(InvalidNameError):
        ChangeSetArchive(tmp_path, "../teams", KEY_EXAMPLE)


def _as_if_published_under(mirror, entity: str, key: str, old_key: str) -> None:
    """Rewrite a synced mirror as the version that took any partition key left it after
    publishing change set `old_key` (what a key typed into the UI did)."""
    with mirror.connection() as connection:
        for table, column in ((entity, "_change_set"), (f"_staging__{entity}", "_change_set"),
                              ("_publish_state", "change_set"), ("_staged", "change_set"),
                              ("_sync_state", "last_change_set"), ("_sync_log", "change_set")):
            where = "" if table.startswith(("_staging", entity)) else " AND entity = ?"
            connection.execute(
                f"UPDATE {table} SET {column} = ? WHERE {column} = ?{where}",
                (old_key, key, entity) if where else (old_key, key))
    archive = Path(mirror.settings.archive_dir) / entity
    (archive / key).rename(archive / old_key)


def test_rows_a_hand_typed_key_left_behind_never_make_later_updates_stale(
        tmp_path, simulator_url, monkeypatch, capsys):
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams"}])
    sim = mirror.simulator
    key = mirror.sync("hourly")
    _as_if_published_under(mirror, "teams", key, "my-first-run")
    edited = [record["teamid"] for record in sim.records("teams")]
    for number, team in enumerate(edited):
        sim.update("teams", team, {"name": f"edited {number}"})

    later = mirror.sync("hourly")
    with mirror.connection() as connection:
        names = dict(connection.execute("SELECT teamid, name FROM teams"))
        stale, updated = connection.execute(
            "SELECT stale, updated FROM _publish_state WHERE entity = 'teams'"
            " AND change_set = ?", (later,)).fetchone()
    assert {names[team] for team in edited} == {f"edited {n}" for n in range(len(edited))}
    assert (stale, updated) == (0, len(edited))
    # status names the real last change set, not the hand-typed one.
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    assert cli_main(["status", "--json"]) == 0
    status = orjson.loads(capsys.readouterr().out)
    assert [(row["entity"], row["last_change_set"]) for row in status] == [("teams", later)]


def test_the_sync_summary_counts_stale_records_and_warns(tmp_path, simulator_url, monkeypatch,
                                                        capsys):
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams"}])
    sim = mirror.simulator
    mirror.sync("hourly")
    teams = [record["teamid"] for record in sim.records("teams")][:2]
    # The mirror holds versions stamped later than anything the source will now serve
    # (e.g. a clock that ran ahead): the source's next edits of them are older, so stale.
    with mirror.connection() as connection:
        connection.executemany("UPDATE teams SET valid_from = '2999-01-01T00:00:00Z'"
                               " WHERE teamid = ?", [(t,) for t in teams])
    for team in teams:
        sim.update("teams", team, {"name": "edited"})
    (tmp_path / "home").mkdir()
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    assert cli_main(["sync", "--group", "hourly"]) == 0
    out, err = capsys.readouterr()
    header, row = [line.split() for line in out.splitlines() if line.startswith(("entity",
                                                                                   "teams"))]
    assert dict(zip(header, row, strict=True))["stale"] == "2", out
    assert "warning: teams: 2 record(s) of change set" in err and "stale" in err


def test_commands_refuse_names_keys_and_ids_outside_their_format(tmp_path, simulator_url,
                                                                monkeypatch, capsys):
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "accounts"}, {"name": "contacts"}])
    (tmp_path / "home").mkdir()
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    account = mirror.simulator.records("accounts")[0]["accountid"]
    cases = {
        ("plan", "show", "accounts", "../.."): "change set key '../..'",
        ("plan", "show", "../x", KEY_EXAMPLE): "entity '../x' is not an entity set name",
        ("refresh", "accounts", "--id", "not-a-guid"): "record id 'not-a-guid' is not a GUID",
        ("refresh", "accounts", "--id", account, "--with",
         "contacts:statecode eq 0 or _parentcustomerid_value"): "is not a Dataverse column",
        ("refresh", "acounts", "--id", account): "did you mean 'accounts'",
        ("refresh", "accounts", "--id", account, "--with", "../x:_parentcustomerid_value"):
            "entity '../x'",
        ("issues", "--entity", "accounts; drop"): "is not an entity set name",
        ("change-set", "create", "--group", "../x"): "unknown group",
    }
    for argv, expected in cases.items():
        assert cli_main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, (argv, err)
    assert not mirror.simulator.stats.request_log, "a command sent a request"


def test_a_lookup_column_in_run_config_cannot_rewrite_the_filter(tmp_path, simulator_url):
    """The UI launchpad's `lookup_column` goes into contacts' $filter: only a column of the
    table is taken, and nothing is fetched otherwise."""
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "accounts"}, {"name": "contacts"}])
    sim = mirror.simulator
    mirror.sync("hourly")
    account = sim.records("accounts")[0]["accountid"]
    for column, expected in (
            ("statecode eq 0 or _parentcustomerid_value", "is not a Dataverse column name"),
            ("_parentcustomerid_valu", "did you mean '_parentcustomerid_value'")):
        before = mirror_rows(mirror, "contacts")
        sent = len(sim.stats.request_log)
        result = mirror.defs.resolve_job_def("sync_hourly").execute_in_process(
            instance=mirror.instance, raise_on_error=False,
            partition_key=register_change_set(mirror.instance, "hourly"),
            asset_selection=entity_asset_keys("contacts"),
            run_config={"ops": {"raw__contacts": {"config": {
                "ids": [account], "lookup_column": column}}}})
        assert not result.success
        message = root_error(result)
        assert expected in message and "\n" not in message, message
        assert not [r.target for r in list(sim.stats.request_log)[sent:]
                    if "filter" in r.target and r.entity == "contacts"]
        assert mirror_rows(mirror, "contacts") == before


def test_record_ids_in_run_config_must_be_guids(tmp_path, simulator_url):
    """The UI launchpad's `ids` of a targeted refresh go into the `$filter` as literals: an id
    that is not a GUID fails the step in one line naming it, before any record is asked
    for."""
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "accounts"}])
    sim = mirror.simulator
    mirror.sync("hourly")
    account = sim.records("accounts")[0]["accountid"]
    before = mirror_rows(mirror, "accounts")
    archive = tree(Path(mirror.settings.archive_dir))
    for ids, named in (([account, "not-a-guid"], "'not-a-guid'"),
                       (["' or accountid ne null or name eq '"],
                        "\"' or accountid ne null or name eq '\"")):
        sent = len(sim.stats.request_log)
        result = mirror.defs.resolve_job_def("sync_hourly").execute_in_process(
            instance=mirror.instance, raise_on_error=False,
            partition_key=register_change_set(mirror.instance, "hourly"),
            asset_selection=entity_asset_keys("accounts"),
            run_config={"ops": {"raw__accounts": {"config": {"ids": ids}}}})
        assert not result.success
        message = root_error(result)
        assert named in message and "GUID" in message and "\n" not in message, message
        # Only metadata was read: no request for a record.
        assert [r.target for r in list(sim.stats.request_log)[sent:]
                if r.entity == "accounts"] == []
    assert mirror_rows(mirror, "accounts") == before
    assert tree(Path(mirror.settings.archive_dir)) == archive


def test_a_run_that_failed_for_its_key_is_not_queued_for_retry(tmp_path, simulator_url):
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams"}])
    mirror.instance.add_dynamic_partitions("change_sets_hourly", ["my-first-run"])
    _, result = mirror.run("hourly", "my-first-run")
    assert not result.success
    failure = next(e for e in result.all_events
                   if e.event_type == DagsterEventType.STEP_FAILURE)
    sensor = mirror.defs.resolve_sensor_def("record_failed_change_sets")
    context = build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_event=failure, dagster_instance=mirror.instance,
        dagster_run=result.dagster_run,
        resources={"store": MirrorStore(db_path=str(mirror.settings.db_path),
                                        archive_dir=str(mirror.settings.archive_dir))})
    sensor(context.for_run_failure())
    with mirror.connection() as connection:
        dead_letters.ensure_tables(connection)
        assert connection.execute("SELECT count(*) FROM _retry_queue").fetchone() == (0,)


def test_a_new_dagster_instance_never_reuses_a_change_set_the_mirror_has(
        tmp_path, simulator_url, monkeypatch, capsys):
    """The command line registers keys in its own Dagster instance (DAGSTER_HOME), which may
    be new to a mirror synced before: a key the archive or the database already has would
    replay that change set instead of syncing, so it is skipped."""
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams"}])
    synced = mirror.sync("hourly")
    now = datetime.now(UTC)
    archived = {change_set_key(now + timedelta(seconds=n)) for n in range(3)}
    for key in archived:
        (Path(mirror.settings.archive_dir) / "teams" / key).mkdir(parents=True, exist_ok=True)
    (tmp_path / "fresh-home").mkdir()
    for name, value in mirror.cli_environment(tmp_path / "fresh-home").items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert cli_main(["change-set", "create", "--group", "hourly"]) == 0
    key = capsys.readouterr().out.strip()
    assert key not in archived | {synced} and change_set_order(key) > change_set_order(synced)
