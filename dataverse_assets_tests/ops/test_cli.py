"""The command line explains itself, names a typo's closest match, reads the mirror without
credentials, and tells what a sync did and how long it took."""

import argparse
import json
import re
from contextlib import closing

import orjson
import pytest

from dataverse_assets.config import _ENV_FIELDS
from dataverse_assets.ops import cli
from dataverse_assets.ops.terminal import ago
from dataverse_assets_tests.helpers import mirror_of
from dataverse_assets_tests.postgres_server import connect as postgres_connect

ENTITIES = [{"name": "vin_candidates"}, {"name": "teams"}, {"name": "accounts"},
            {"name": "vin_vin_candidate_accountset"}]
GUID = "5b3f2c1e-0000-4000-8000-000000000001"


def subparsers(parser: argparse.ArgumentParser, path=()):
    """Every (command path, parser) under `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name)
                yield from subparsers(sub, (*path, name))


def test_every_command_and_option_says_what_it_does_its_default_and_an_example():
    commands = list(subparsers(cli.build_parser()))
    assert len(commands) > 20
    for path, parser, summary in commands:
        assert summary and parser.description, path
        text = parser.format_help()
        assert "examples:\n  dataverse-assets " + " ".join(path).split(" ")[0] in text, path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            assert action.help, (path, action.dest)
            if action.option_strings and action.default not in (None, False):
                # The default is stated (by the formatter when the help does not say it).
                assert "default" in parser._get_formatter()._get_help_string(action), (
                    path, action.dest)


def test_the_help_lists_every_environment_variable(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for variable in [*_ENV_FIELDS, "DAGSTER_HOME"]:
        assert f"\n  {variable}\n" in text, variable
    assert "(default: data/dataverse.db)" in text


@pytest.fixture
def configured(tmp_path, monkeypatch):
    """The CLI against an empty mirror of ENTITIES; no source is ever asked."""
    config = tmp_path / "entities.json"
    config.write_text(json.dumps({
        "groups": {"hourly": {"cron": "0 * * * *"}, "daily": {"cron": "0 3 * * *"}},
        "entities": [{"group": "hourly", **e} for e in ENTITIES]}))
    for name, value in {"DATAVERSE_DB_PATH": tmp_path / "m.db",
                        "DATAVERSE_ARCHIVE_DIR": tmp_path / "archive",
                        "DATAVERSE_ENTITIES_CONFIG": config,
                        "DAGSTER_HOME": tmp_path / "home"}.items():
        monkeypatch.setenv(name, str(value))
    for name in ("DATAVERSE_URL", "DATAVERSE_SOURCE", "DATAVERSE_CLIENT_ID",
                 "DATAVERSE_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.mark.parametrize("argv", [
    ["refresh", "acounts", "--id", GUID],
    ["refresh", "teams", "--id", GUID, "--with", "acounts:_parentcustomerid_value"],
    ["reconcile", "acounts"],
    ["purge", "--entity", "acounts", "--column", "name"],
    ["plan", "show", "acounts", "20260101T000000Z"],
    ["status", "acounts"],
    ["issues", "--entity", "acounts"],
    ["change-set", "list", "acounts"],
    ["fixtures", "record", "--out", "unused", "--entity", "acounts"],
])
def test_an_unknown_entity_gets_the_closest_name_in_one_line(configured, capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown entity 'acounts'; did you mean 'accounts'?" in err, err
    assert err.count("\n") == 1, err
    assert not (configured / "home").exists(), "a run was started"


def test_the_doctor_names_the_closest_entity_too(configured, capsys):
    assert cli.main(["doctor", "--entity", "acounts", "--json"]) == 1
    checks = orjson.loads(capsys.readouterr().out)["checks"]
    assert checks[-1]["detail"] == "unknown entity 'acounts'; did you mean 'accounts'?"


def test_compact_of_a_mirror_not_made_yet_makes_none(configured, capsys, monkeypatch,
                                                      store_url):
    """No mirror yet (no SQLite file; a PostgreSQL database without the mirror's tables):
    compact says retention was skipped and creates nothing."""
    raw = json.loads((configured / "entities.json").read_text())
    raw["archive"] = {"retention_days": 30, "staging_keep_change_sets": 2}
    (configured / "entities.json").write_text(json.dumps(raw))
    if store_url:
        monkeypatch.setenv("DATAVERSE_STORE_URL", store_url)
    address = store_url or str(configured / "m.db")
    assert cli.main(["compact"]) == 0
    captured = capsys.readouterr()
    assert f"retention skipped: no mirror database at {address} " in captured.err
    assert f"staging retention skipped: no mirror database at {address}\n" in captured.err
    assert "database " not in captured.out  # nothing to shrink
    assert not (configured / "m.db").exists()
    if store_url:
        with closing(postgres_connect(store_url)) as connection, \
                connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            assert cursor.fetchone() == (0,)


@pytest.mark.parametrize("argv", [
    ["sync", "--group", "hourli"],
    ["change-set", "create", "--group", "hourli"],
    ["change-set", "register-archived", "--group", "hourli"],
])
def test_an_unknown_group_gets_the_closest_name_in_one_line(configured, capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown group 'hourli'; did you mean 'hourly'?\n"


def test_a_record_id_that_is_not_a_guid_is_refused_before_any_run(configured, capsys):
    assert cli.main(["refresh", "accounts", "--id", "not-a-guid"]) == 2
    err = capsys.readouterr().err
    assert "record id 'not-a-guid' is not a GUID" in err and err.count("\n") == 1
    assert not (configured / "home").exists()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request) -> str | None:
    """None (a SQLite mirror), or the URL of a PostgreSQL store: the commands run on each."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_store_url")


def test_sync_says_what_each_entity_did_and_where_the_time_went_and_read_only_commands_need_no_credentials(  # noqa: E501
        tmp_path, simulator_url, monkeypatch, capsys, store_url):
    mirror = mirror_of(tmp_path, simulator_url, ENTITIES, store_url=store_url)
    address = mirror.settings.store.address
    (tmp_path / "home").mkdir()
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    assert cli.main(["sync"]) == 0
    out, err = capsys.readouterr()
    table = out.splitlines()
    header = next(line.split() for line in table if line.startswith("entity"))
    assert header[:3] == ["entity", "status", "mode"] and "stale" in header
    rows = {line.split()[0]: dict(zip(header, line.split(), strict=True)) for line in table
            if line.split() and line.split()[0] in {e["name"] for e in ENTITIES}}
    # The first read of a change-tracked table is called what it is.
    assert rows["vin_candidates"]["mode"] == "initial"
    assert f"database: {address}\n" in out  # the file, or the URL (never with a password)
    assert "hourly: 4 entities in " in out and "Dagster overhead" in out
    # One line per entity when it is done, with its counts.
    for entity in rows:
        done = next(line for line in err.splitlines() if line.startswith(f"  done {entity}: "))
        assert "created" in done and "stale" in done and "(staging " in done, done

    # The readable views are where the sync says they are.
    assert "readable views: 4 (<entity>__readable" in out

    # The read-only commands, for a live org, with no credentials at all.
    monkeypatch.setenv("DATAVERSE_URL", "https://contoso.crm.dynamics.com")
    monkeypatch.delenv("DATAVERSE_SOURCE")
    for name in ("DATAVERSE_CLIENT_ID", "DATAVERSE_CLIENT_SECRET", "DATAVERSE_TENANT_ID"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["sync"]) == 2  # the credentials really are missing
    assert "DATAVERSE_CLIENT_ID" in capsys.readouterr().err
    with mirror.connection() as connection:
        (key,) = connection.execute(
            "SELECT change_set FROM _publish_state WHERE entity = 'teams'").fetchone()
    for argv in (["status"], ["status", "teams", "--json"], ["plan", "show", "teams", key],
                 ["issues"], ["dlq", "list"], ["report", "--out", str(tmp_path / "s.html")],
                 ["change-set", "list"], ["change-set", "list", "teams", "--json"]):
        assert cli.main(argv) == 0, (argv, capsys.readouterr().err)
        assert "configuration error" not in capsys.readouterr().err

    # What the read-only commands said, from this store.
    assert cli.main(["issues"]) == 0
    assert capsys.readouterr().out == "no open issues\n"
    assert cli.main(["plan", "show", "teams", key]) == 0
    assert f"Plan for teams, change set {key} (COMPLETE)" in capsys.readouterr().out
    page = (tmp_path / "s.html").read_text()
    assert f"from {address}</div>" in page and 'data-entity="teams"' in page

    # status is for people: ages, the group, the next scheduled run.
    assert cli.main(["status"]) == 0
    status = capsys.readouterr().out
    assert status.splitlines()[0].split()[:6] == [
        "entity", "group", "mode", "last_change_set", "publish_status", "published"]
    teams = next(line for line in status.splitlines() if line.startswith("teams"))
    assert "hourly" in teams and ":00 UTC (in " in teams
    assert re.search(r" (just now|\d+ s ago) ", teams), teams  # (seconds on a busy machine)
    # --json is for machines: one entity, its numbers.
    assert cli.main(["status", "teams", "--json"]) == 0
    (row,) = orjson.loads(capsys.readouterr().out)
    assert row["entity"] == "teams" and row["publish_status"] == "COMPLETE"

    # change-set list: each change set with its publish state.
    assert cli.main(["change-set", "list", "vin_candidates", "--json"]) == 0
    (listed,) = orjson.loads(capsys.readouterr().out)
    assert (listed["change_set"], listed["status"], listed["mode"]) == (key, "COMPLETE",
                                                                        "initial")
    assert cli.main(["change-set", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["entity", "change_set", "status", "mode"]
    assert len(lines) == 1 + len(ENTITIES)

    # A targeted refresh fetches that record again, as its own change set.
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    simulator = mirror.simulator
    team = simulator.records("teams")[0]["teamid"]
    simulator.update("teams", team, {"name": "Renamed team"})
    assert cli.main(["refresh", "teams", "--id", team]) == 0
    out = capsys.readouterr().out
    assert "targeted refresh as change set" in out and "teams" in out
    with mirror.connection() as connection:
        assert connection.execute("SELECT name FROM teams WHERE teamid = ?",
                                  (team,)).fetchone() == ("Renamed team",)

    # compact: retention, then the database given back its free space.
    assert cli.main(["compact"]) == 0
    out = capsys.readouterr().out
    assert f"database {address}: " in out and " bytes -> " in out, out


def test_ages_read_like_a_person_says_them():
    assert [ago(s) for s in (None, 2, 42, 300, 7200, 3 * 86400)] == [
        "-", "just now", "42 s ago", "5 min ago", "2 h ago", "3 d ago"]


def test_a_failed_step_is_one_line_without_the_class_said_twice():
    message = ("UnreachableError: dataverse_assets.errors.UnreachableError: tenant discovery: "
               "GET https://x.invalid/api/data/v9.2/ failed: DNS failure: x.invalid could not "
               "be resolved")
    assert cli._REPEATED_CLASS.sub(r"\1: ", message) == (
        "UnreachableError: tenant discovery: GET https://x.invalid/api/data/v9.2/ failed: DNS "
        "failure: x.invalid could not be resolved")
