"""Hostile and bad input (issue #8): a broken config, hostile data and a misbehaving API, each
through the real code paths (config loading, a Dagster sync against the loopback simulator),
asserting on what a user sees: rows in SQLite, an issue row, the run's one-line error."""

import json
import sqlite3
import time
from dataclasses import replace

import orjson
import pytest
from dagster import DagsterInstance

from dataverse_assets.config import (
    DEFAULT_ENTITIES_CONFIG,
    Settings,
    load_settings,
    parse_entities_config,
)
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.errors import ConfigError, PagingError
from dataverse_assets.ops.cli import main as cli_main
from dataverse_assets.simulator import SimAttribute
from dataverse_assets.source import client as client_module
from dataverse_assets.source.client import RetryPolicy
from dataverse_assets.source.fixture import FixtureSource
from dataverse_assets.source.query import PageQuery
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.store.backend import POSTGRES, dialect_of
from dataverse_assets.store.db import quote_identifier, table_exists
from dataverse_assets.store.staging_store import STAGING_SCHEMA
from dataverse_assets.sync.fetch import PagingGuard
from dataverse_assets.sync.fetch_plan import FetchRequest, FetchStep
from dataverse_assets_tests.conftest import ENTITY_NAMES, Mirror, failure_messages
from dataverse_assets_tests.helpers import mirror_of, root_error
from dataverse_assets_tests.truth import without_annotations

TRIALS = "vin_clinicaltrials"
FAST = RetryPolicy(max_attempts=3, backoff_seconds=(0.01, 0.02), jitter=0.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def each_store_url(request) -> str | None:
    """A test's mirror in each store (mirror_of's `store_url`): SQLite in its folder (None),
    or a PostgreSQL database."""
    return request.getfixturevalue("postgres_store_url") if request.param == "postgresql" else None


@pytest.fixture
def fast_retries(monkeypatch):
    """The client's default policy backs off 1+2+4+8+16 s; tests exhaust it in milliseconds."""
    monkeypatch.setattr(client_module, "RetryPolicy", lambda: FAST)


def rows_by_key(connection: sqlite3.Connection, table: str, pk: str) -> dict[str, dict]:
    cursor = connection.execute(f"SELECT * FROM {quote_identifier(table)}")
    names = [d[0] for d in cursor.description]
    return {row[names.index(pk)]: dict(zip(names, row, strict=True)) for row in cursor}


# ---------------------------------------------------------------------------------------------
# Config: one line naming the problem, before any request
# ---------------------------------------------------------------------------------------------

def _config(**change) -> str:
    raw = json.loads(DEFAULT_ENTITIES_CONFIG.read_text())
    for path, value in change.items():
        target = raw
        *parents, last = path.split("__")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(last) if last.isdigit() else last] = value
    return json.dumps(raw)


def _twice() -> str:
    raw = json.loads(DEFAULT_ENTITIES_CONFIG.read_text())
    raw["entities"].append(dict(raw["entities"][-1]))
    return json.dumps(raw)


def _case_twin() -> str:
    raw = json.loads(DEFAULT_ENTITIES_CONFIG.read_text())
    raw["entities"].append(dict(raw["entities"][-1], name=raw["entities"][-1]["name"].upper()))
    return json.dumps(raw)


JUNCTION = "entity 'vin_vin_candidate_accountset' (entities[2])"
CONFIG_MISTAKES = {
    "missing file": (None, "entities config not found"),
    "invalid JSON": ('{"groups": {"hourly": ', "not valid JSON"),
    "not UTF-8": (b"\xff\xfe{\x00", "not UTF-8"),
    "not an object": ("[]", "must hold a JSON object"),
    "unknown field": (_config(entities__0__primary_kee="x"), "'primary_kee': unknown field"),
    "unknown top-level field": (_config(schedule={}), "'schedule': unknown field"),
    "duplicate entity": (_twice(), "is listed twice"),
    "case twin": (_case_twin(), "differ only in letter case"),
    "empty entity list": (_config(entities=[]), "field 'entities'"),
    "cron that does not parse": (_config(groups__daily__cron="every day at 2"),
                                 "group 'daily', field 'cron'"),
    "primary key that is not a column name": (
        _config(entities__0__primary_key="id eq null or id"), "field 'primary_key'"),
    "orderby that is not a column list": (
        _config(entities__0__orderby="name; drop"), "field 'orderby'"),
    # Values that passed validation and crashed a run (or its checks) later.
    "NaN": (_config(entities__2__reconcile_every_hours=float("nan")),
            f"{JUNCTION}, field 'reconcile_every_hours': NaN and Infinity are not numbers"),
    "Infinity": (_config(entities__2__reconcile_every_hours=float("inf")),
                 f"{JUNCTION}, field 'reconcile_every_hours': NaN and Infinity are not numbers"),
    "-Infinity": (_config(groups__daily__freshness_grace_minutes=float("-inf")),
                  "group 'daily', field 'freshness_grace_minutes': NaN and Infinity are not"),
    "hours past timedelta": (_config(entities__2__reconcile_every_hours=1e308),
                             f"{JUNCTION}, field 'reconcile_every_hours': Input should be less"
                             " than or equal to 8760"),
    "minutes past timedelta": (_config(groups__daily__freshness_grace_minutes=1e300),
                               "group 'daily', field 'freshness_grace_minutes': Input should be"
                               " less than or equal to 527040"),
    "days past datetime": (_config(archive={"compact_after_days": 1e308}),
                           "field 'archive.compact_after_days': Input should be less than or "
                           "equal to 36500"),
    "rows past SQLite's integers": (_config(entities__2__publish_chunk_rows=10**30),
                                    f"{JUNCTION}, field 'publish_chunk_rows': Input should be"
                                    " less than or equal to 100000000"),
    "rows as a float": (_config(entities__2__publish_chunk_rows=1e30),
                        f"{JUNCTION}, field 'publish_chunk_rows': must be a whole number"),
    "boolean for a number": (_config(entities__2__page_size=True),
                             f"{JUNCTION}, field 'page_size': true and false are not numbers"),
    "fraction for an integer": (_config(entities__2__page_size=2.5),
                                f"{JUNCTION}, field 'page_size': must be a whole number"),
    "key given twice": (
        _config().replace('"incremental": "full"', '"incremental": "full", "page_size": 5000, '
                          '"page_size": 50', 1),
        f"{JUNCTION}: key 'page_size' is given twice"),
    "SQLite's own name": (_config(entities__2__name="sqlite_master"),
                          "entity 'sqlite_master' (entities[2]), field 'name': names starting "
                          "with 'sqlite_' are reserved"),
    "a view's name": (_config(entities__2__name="teams__readable"),
                      "field 'name': names ending in '__readable' are reserved"),
    "an index's name": (_config(entities__2__name="vin_candidates__pk_nocase"),
                        "field 'name': names ending in '__pk_nocase' are reserved"),
    "cron that never fires": (_config(groups__daily__cron="0 0 31 4 *"),
                              "group 'daily', field 'cron': '0 0 31 4 *' never fires"),
    "nested too deeply": ("[" * 100_000, "not valid JSON: nested too deeply"),
    "max_pages below one": (_config(entities__0__max_pages=0), "field 'max_pages'"),
}


@pytest.mark.parametrize("case", CONFIG_MISTAKES)
def test_a_config_mistake_is_one_line_before_any_request(case, tmp_path, simulator_url,
                                                         monkeypatch, capsys):
    simulator, url = simulator_url
    content, expected = CONFIG_MISTAKES[case]
    path = tmp_path / "entities.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    settings = Settings(db_path=tmp_path / "m.db", archive_dir=tmp_path / "a",
                        entities_config_path=path, source="simulator")
    with pytest.raises(ConfigError) as excinfo:
        build_definitions(settings, source=SimulatorSource(entity_names=ENTITY_NAMES,
                                                           base_url=url))
    message = str(excinfo.value)
    assert expected in message and "\n" not in message and str(path) in message
    # The command line says the same in one line and exits 2.
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(path))
    monkeypatch.setenv("DATAVERSE_URL", url)
    monkeypatch.setenv("DATAVERSE_SOURCE", "simulator")
    monkeypatch.setenv("DATAVERSE_DB_PATH", str(tmp_path / "m.db"))
    assert cli_main(["sync"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error:") and err.count("\n") == 1 and expected in err
    assert not simulator.stats.request_log, "a request was sent before the config was checked"


SHORT_SECRET = "Qz7#kp"
ENVIRONMENT_MISTAKES = {
    "concurrency inf": ({"DATAVERSE_MAX_CONCURRENCY": "inf"}, "DATAVERSE_MAX_CONCURRENCY: "),
    "response limit inf": ({"DATAVERSE_MAX_RESPONSE_MB": "inf"},
                           "DATAVERSE_MAX_RESPONSE_MB: Input should be a finite number"),
    "response limit nan": ({"DATAVERSE_MAX_RESPONSE_MB": "nan"},
                           "DATAVERSE_MAX_RESPONSE_MB: Input should be a finite number"),
    "lock wait forever": ({"DATAVERSE_LOCK_WAIT_SECONDS": "Infinity"},
                          "DATAVERSE_LOCK_WAIT_SECONDS: Input should be a finite number"),
    "lock wait past a day": ({"DATAVERSE_LOCK_WAIT_SECONDS": "1e9"},
                             "DATAVERSE_LOCK_WAIT_SECONDS: Input should be less than or equal"),
    "seed out of range": ({"DATAVERSE_SIMULATOR_SEED": str(2**64)},
                          "DATAVERSE_SIMULATOR_SEED: Input should be less than or equal"),
    "short secret": ({"DATAVERSE_SOURCE": "live", "DATAVERSE_CLIENT_ID": "id",
                      "DATAVERSE_CLIENT_SECRET": SHORT_SECRET},
                     "DATAVERSE_CLIENT_SECRET: shorter than 8 characters"),
    "plain http to another host": (
        {"DATAVERSE_SOURCE": "live", "DATAVERSE_URL": "http://contoso.crm.dynamics.com",
         "DATAVERSE_CLIENT_ID": "id", "DATAVERSE_CLIENT_SECRET": "long-enough-secret"},
        "DATAVERSE_URL: plain http:// to a host other than this machine"),
    "authority over plain http": (
        {"DATAVERSE_SOURCE": "live", "DATAVERSE_AUTHORITY": "http://login.example.com",
         "DATAVERSE_CLIENT_ID": "id", "DATAVERSE_CLIENT_SECRET": "long-enough-secret"},
        "DATAVERSE_AUTHORITY: plain http:// to a host other than this machine"),
}


@pytest.mark.parametrize("case", ENVIRONMENT_MISTAKES)
def test_an_environment_mistake_is_one_line_naming_the_variable_before_any_request(
        case, tmp_path, simulator_url, monkeypatch, capsys):
    simulator, url = simulator_url
    environ, expected = ENVIRONMENT_MISTAKES[case]
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(DEFAULT_ENTITIES_CONFIG))
    monkeypatch.setenv("DATAVERSE_URL", url)
    monkeypatch.setenv("DATAVERSE_SOURCE", "simulator")
    monkeypatch.setenv("DATAVERSE_DB_PATH", str(tmp_path / "m.db"))
    for variable, value in environ.items():
        monkeypatch.setenv(variable, value)
    assert cli_main(["sync"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"configuration error: {expected}") and err.count("\n") == 1, err
    assert SHORT_SECRET not in err
    assert not simulator.stats.request_log, "a request was sent before the config was checked"


def test_an_entity_the_org_does_not_have_fails_its_fetch_with_one_clear_line(
        tmp_path, simulator_url, each_store_url):
    mirror = mirror_of(tmp_path, simulator_url,
                       [{"name": "teams"}, {"name": "teamz", "incremental": "full"}],
                       store_url=each_store_url)
    _, result = mirror.run("hourly")
    assert not result.success
    message = root_error(result)
    assert "\n" not in message
    assert "teamz: Dataverse has no entity set 'teamz'" in message
    assert "did you mean 'teams'" in message and "fix 'name'" in message
    with mirror.connection() as connection:  # the other entity is synced regardless
        assert connection.execute("SELECT count(*) FROM teams").fetchone()[0] == len(
            mirror.simulator.records("teams"))
        assert connection.execute("SELECT status FROM _sync_state WHERE entity = 'teamz'"
                                  ).fetchone() == ("failed",)
    teamz = [r.target for r in mirror.simulator.stats.request_log if "teamz" in r.target]
    assert len(teamz) <= 3  # metadata, the count, one page: nothing more


def object_names(connection) -> list[str]:
    """Every table, view, index and sequence in the store: SQLite's file; PostgreSQL's mirror
    and staging schemas (constraints are named as their indexes, row types as their tables)."""
    if dialect_of(connection) is POSTGRES:
        return [row[0] for row in connection.execute(
            "SELECT relname FROM pg_class JOIN pg_namespace ON pg_namespace.oid = relnamespace"
            " WHERE nspname IN ('public', ?)", (STAGING_SCHEMA,))]
    return [row[0] for row in connection.execute("SELECT name FROM sqlite_master")]


def test_no_entity_can_be_named_like_a_table_or_index_the_mirror_makes(tmp_path, simulator_url,
                                                                       each_store_url):
    """Every object a sync makes for an entity (history, indexes; SQLite's own, PostgreSQL's
    primary key indexes) has a name that the config refuses for another entity, so two
    entities can never share one."""
    mirror = mirror_of(tmp_path, simulator_url, [
        {"name": "teams", "incremental": "modifiedon"},
        {"name": "vin_vin_candidate_accountset", "incremental": "full"}],
        store_url=each_store_url)
    mirror.sync("hourly")
    with mirror.connection() as connection:
        names = object_names(connection)
    derived = [n for n in names if not n.startswith(("_", "sqlite_"))
               and n not in ("teams", "vin_vin_candidate_accountset")]
    assert {"teams__history", "teams__modifiedon", "teams__pk_nocase"} <= set(derived)
    for name in [*derived, *(n for n in names if n.startswith("sqlite_"))]:
        raw = {"groups": {"hourly": {"cron": "0 * * * *"}},
               "entities": [{"name": name, "group": "hourly"}]}
        with pytest.raises(ConfigError, match="field 'name': names .* reserved"):
            parse_entities_config(raw)


# ---------------------------------------------------------------------------------------------
# Data: stored correctly or reported; never a crash, never a lost record
# ---------------------------------------------------------------------------------------------

HOSTILE_TEXT = "O'Bryan \"quoted\" '' ünïcödé 名前 🚀 \u202eRTL\u202c tab\there nul\x00end"
BIG_INTEGERS = [2**63, 2**64 - 1, -(2**63), 2**63 - 1]


def nested(depth: int) -> dict:
    value: object = ["leaf", 1, None, True]
    for level in range(depth):
        value = {"level": level, "child": value}
    return value  # type: ignore[return-value]


@pytest.mark.parametrize("store_kind", ["sqlite", "postgresql"])
def test_hostile_values_are_stored_exactly_across_change_sets(tmp_path, simulator_url,
                                                             store_kind, request):
    postgres = store_kind == "postgresql"
    url = request.getfixturevalue("postgres_store_url") if postgres else None
    mirror = mirror_of(tmp_path, simulator_url, store_url=url, entities=[
        {"name": TRIALS, "schema_evolution": "evolve", "page_size": 7},
        {"name": "teams", "page_size": 4},
        # Ids from a text column are not GUIDs, so they cannot be primary keys: they must not
        # break the filtered fetch of the real links, and they become issue rows.
        {"name": "vin_vin_candidate_accountset", "incremental": "full"},
        {"name": "accounts", "filtered": True, "linked_from": [
            {"entity": "vin_vin_candidate_accountset", "column": "accountid"},
            {"entity": TRIALS, "column": "vin_name"}]},
    ])
    sim = mirror.simulator
    first, result = mirror.run("hourly")
    assert result.success, failure_messages(result)

    trials = [r["vin_clinicaltrialid"] for r in sim.records(TRIALS)]
    megabyte = ("ü€𝄞'\"" * 80_000)[: 1_000_000]  # ~1 M characters, 2-4 bytes each
    created = sim.create(TRIALS, {"vin_name": HOSTILE_TEXT})["vin_clinicaltrialid"]
    sim.update(TRIALS, trials[0], {"vin_name": megabyte})
    sim.update(TRIALS, trials[1], {"vin_name": nested(50)})
    sim.update(TRIALS, trials[2], {"vin_name": None, "vin_phase": None, "vin_budget": None,
                                   "vin_startdate": None, "vin_sponsorid": None})
    sim.add_column(TRIALS, SimAttribute("vin_counter", "BigInt"), default=None)
    for trial, number in zip(trials[3:], BIG_INTEGERS, strict=False):
        sim.update(TRIALS, trial, {"vin_counter": number})
    # A type that flips: Picklist -> String now, back to Integer in the next change set.
    sim.change_column_type(TRIALS, "vin_phase", "String", convert=lambda v: f"{v:09d}'")
    sim.update(TRIALS, trials[7], {"vin_phase": "007"})
    team = sim.records("teams")[0]["teamid"]
    sim.update("teams", team, {"name": HOSTILE_TEXT})

    second, result = mirror.run("hourly")
    assert result.success, failure_messages(result)

    def check_trials_equal_the_source(connection, touched):
        """Every record there; the ones changed since are as the source has them now (as in
        Dataverse, a schema change alone does not stamp rows, so the others are not read)."""
        rows = rows_by_key(connection, TRIALS, "vin_clinicaltrialid")
        truth = {r["vin_clinicaltrialid"]: r for r in sim.records(TRIALS)}
        assert set(rows) == set(truth)  # nothing lost, nothing extra
        for key in touched:
            assert without_annotations(rows[key]["json_response"]) == truth[key], key
        return rows

    with mirror.connection() as connection:
        rows = check_trials_equal_the_source(connection, [created, *trials[:8]])
        # PostgreSQL's text cannot hold the NUL in it: NULL there, exact in json_response,
        # and an issue (docs/store-backends.md, "Values that do not fit their column").
        assert rows[created]["vin_name"] == (None if postgres else HOSTILE_TEXT)
        assert rows[trials[0]]["vin_name"] == megabyte
        assert json.loads(rows[trials[1]]["vin_name"]) == nested(50)
        assert all(rows[trials[2]][c] is None for c in (
            "vin_name", "vin_phase", "vin_budget", "vin_startdate", "_vin_sponsorid_value"))
        # Integers SQLite cannot hold: exact in json_response, approximate in the INTEGER
        # column (PostgreSQL: NULL in its bigint column), and an issue row says so; the ones
        # that fit are exact.
        assert [rows[t]["vin_counter"] for t in trials[3:7]] == [
            None if postgres else float(2**63), None if postgres else float(2**64 - 1),
            -(2**63), 2**63 - 1]
        assert [orjson.loads(rows[t]["json_response"])["vin_counter"]
                for t in trials[3:7]] == BIG_INTEGERS
        oversized = connection.execute(
            "SELECT record_id, field, problem FROM _issues WHERE entity = ? AND change_set = ?",
            (TRIALS, second)).fetchall()
        # PostgreSQL: also the NUL in a name, and the flipped column's text that is no
        # integer ("000000001'"), each NULL in its typed column.
        not_integers = [key for key, row in rows.items() if isinstance(
            phase := orjson.loads(row["json_response"]).get("vin_phase"), str)
            and not phase.strip().isdigit()]
        assert sorted((r, f) for r, f, _ in oversized) == sorted(
            [(t, "vin_counter") for t in trials[3:5]] + (
                [(created, "vin_name"), *((key, "vin_phase") for key in not_integers)]
                if postgres else []))
        assert all(("does not fit PostgreSQL's 64-bit bigint" if postgres
                    else "does not fit SQLite's 64-bit INTEGER") in p
                   for _, f, p in oversized if f == "vin_counter")
        # The flipped column keeps its locked type (numeric text becomes a number: INTEGER
        # affinity); json_response has the values as sent; the flip is reported as drift.
        assert orjson.loads(rows[trials[7]]["json_response"])["vin_phase"] == "007"
        drift = connection.execute(
            "SELECT kind, severity FROM _schema_drift WHERE entity = ? AND column_name = ?"
            " AND change_set = ?", (TRIALS, "vin_phase", second)).fetchall()
        assert ("type_changed", "breaking") in drift
        teams = rows_by_key(connection, "teams", "teamid")
        assert teams[team]["name"] == (None if postgres else HOSTILE_TEXT)
        assert orjson.loads(teams[team]["json_response"])["name"] == HOSTILE_TEXT
        # Trial names linked as account ids: each is an issue row, nothing was sent for them,
        # and the real links were fetched (the accounts they name are mirrored).
        issues = connection.execute(
            "SELECT record_id, problem FROM _issues WHERE entity = 'accounts'").fetchall()
        linked = {r["accountid"] for r in sim.records("vin_vin_candidate_accountset")}
        accounts = rows_by_key(connection, "accounts", "accountid")
        assert linked <= set(accounts)
    # (PostgreSQL: the name with a NUL is not in the typed column links are read from.)
    assert (HOSTILE_TEXT in {record_id for record_id, _ in issues}) is not postgres
    assert all("status 400" in problem for _, problem in issues)
    assert not any("vin_name" in r.target or "VIN-20" in r.target
                   for r in sim.stats.request_log if r.entity == "accounts")

    sim.change_column_type(TRIALS, "vin_phase", "Integer",
                           convert=lambda v: int(str(v).strip("'")))
    sim.update(TRIALS, trials[8], {"vin_phase": 3})
    third, result = mirror.run("hourly")
    assert result.success, failure_messages(result)
    with mirror.connection() as connection:
        rows = check_trials_equal_the_source(connection, [trials[8]])
        assert rows[trials[8]]["vin_phase"] == 3
        assert connection.execute(
            "SELECT count(*) FROM _publish_state WHERE entity = ? AND status = 'COMPLETE'",
            (TRIALS,)).fetchone()[0] == 3


def test_records_nested_deeper_than_the_json_writer_goes_are_staged(tmp_path, each_store_url):
    """orjson writes 254 levels but reads 1024: a 600-level record from a fixture is stored,
    not a crash (the simulator, writing with orjson, cannot serve one)."""
    folder = tmp_path / "fixtures" / "things"
    folder.mkdir(parents=True)
    deep = {"thingid": "2d7c1a9e-0b5d-4c1e-9a77-5d1b2c3d4e5f"}
    text = '{"value": [{"thingid": "2d7c1a9e-0b5d-4c1e-9a77-5d1b2c3d4e5f", "payload": ' + \
        '{"a": ' * 600 + "1" + "}" * 600 + "}]}"
    (folder / "page-00001.json").write_text(text)
    config = tmp_path / "entities.json"
    config.write_text(json.dumps({"groups": {"hourly": {"cron": "0 * * * *"}}, "entities": [
        {"name": "things", "group": "hourly", "incremental": "full"}]}))
    settings = Settings(db_path=tmp_path / "m.db", archive_dir=tmp_path / "archive",
                        entities_config_path=config, source="fixture",
                        fixtures_dir=tmp_path / "fixtures", store_url=each_store_url)
    defs = build_definitions(settings, source=FixtureSource(directory=str(tmp_path / "fixtures")))
    mirror = Mirror(None, settings, defs, DagsterInstance.ephemeral())  # type: ignore[arg-type]
    _, result = mirror.run("hourly")
    assert result.success, failure_messages(result)
    with mirror.connection() as connection:
        payload, stored = connection.execute("SELECT payload, json_response FROM things").fetchone()
    assert payload == '{"a":' * 600 + "1" + "}" * 600  # the value as compact JSON text
    assert stored == '{"thingid":"' + deep["thingid"] + '","payload":' + payload + "}"


def fixture_mirror(tmp_path, records: dict[str, list[dict]], store_url: str | None,
                   primary_key: str | None = None) -> Mirror:
    """A mirror of fixture pages (one page per entity, all in one hourly group)."""
    for entity, rows in records.items():
        folder = tmp_path / "fixtures" / entity
        folder.mkdir(parents=True)
        (folder / "page-00001.json").write_text(json.dumps({"value": rows}))
    config = tmp_path / "entities.json"
    config.write_text(json.dumps({"groups": {"hourly": {"cron": "0 * * * *"}}, "entities": [
        {"name": entity, "group": "hourly", "incremental": "full",
         **({"primary_key": primary_key} if primary_key else {})} for entity in records]}))
    settings = Settings(db_path=tmp_path / "m.db", archive_dir=tmp_path / "archive",
                        entities_config_path=config, source="fixture",
                        fixtures_dir=tmp_path / "fixtures", store_url=store_url)
    defs = build_definitions(settings, source=FixtureSource(directory=str(tmp_path / "fixtures")))
    return Mirror(None, settings, defs, DagsterInstance.ephemeral())  # type: ignore[arg-type]


def test_entity_names_as_long_as_the_store_can_name_are_synced_and_longer_ones_refused(
        tmp_path, each_store_url):
    """PostgreSQL cuts names past 63 bytes short, silently (two of an entity's objects, or
    two entities', would share one): an entity whose derived names do not fit is refused at
    load in one line; the longest that fit sync side by side, though they differ only at the
    end. SQLite has no limit."""
    longest = "x" * 46 + "_{}"  # 48 characters
    records = {longest.format(n): [{"thingid": f"2d7c1a9e-0b5d-4c1e-9a77-5d1b2c3d4e5{n}",
                                    "name": f"thing {n}"}] for n in "ab"}
    mirror = fixture_mirror(tmp_path / "fit", records, each_store_url, primary_key="thingid")
    _, result = mirror.run("hourly")
    assert result.success, failure_messages(result)
    with mirror.connection() as connection:
        for entity, rows in records.items():
            assert [row["name"] for row in rows_by_key(
                connection, entity, "thingid").values()] == [rows[0]["name"]]
    too_long = {"y" + longest.format("c"): records[longest.format("a")]}
    if each_store_url is None:
        fixture_mirror(tmp_path / "long", too_long, None, primary_key="thingid")
        return
    with pytest.raises(ConfigError) as refused:
        fixture_mirror(tmp_path / "long", too_long, each_store_url, primary_key="thingid")
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path / "long" / "entities.json") in message
    assert (f"entity {next(iter(too_long))!r} (entities[0]), field 'name': 49 bytes is "
            "too long for a PostgreSQL store") in message
    assert "can have at most 48" in message


# ---------------------------------------------------------------------------------------------
# API: clear errors, nothing published, nothing lost
# ---------------------------------------------------------------------------------------------

API_FAULTS = {
    "502 gateway page until retries run out": (
        dict(kind="server_error", status=502, body="html"),
        ["failed after 3 attempts", "last status 502", "502 Bad Gateway"]),
    "200 with an HTML page": (
        dict(kind="malformed", body="html"),
        ["kept answering malformed bodies", "text/html", "Service Unavailable"]),
    "200 with JSON that is not OData": (
        dict(kind="malformed", body="not_odata"), ["without an OData 'value' list"]),
    "200 with a JSON array": (
        dict(kind="malformed", body="array"), ["JSON that is not an object"]),
    "nextLink to another host": (
        dict(kind="foreign_link", link="next", paging_only=False),
        ["refusing to follow the nextLink to http://foreign.invalid", "DATAVERSE_URL"]),
    "deltaLink to another host": (
        dict(kind="foreign_link", link="delta", paging_only=False, after=1),
        ["refusing to store the deltaLink to http://foreign.invalid"]),
    "302 redirect to another host": (
        dict(kind="redirect"),
        ["answered 302: redirect to http://foreign.invalid refused",
         "Dataverse does not redirect Web API calls", "check DATAVERSE_URL"]),
}


# What the store sees is the same for each (a failed fetch: nothing published, no delta token
# kept): on PostgreSQL, one that fails at the first page and one after pages were archived.
POSTGRES_API_FAULTS = ["200 with an HTML page", "deltaLink to another host"]


@pytest.mark.parametrize(("each_store_url", "case"), [
    *(("sqlite", case) for case in API_FAULTS),
    *(("postgresql", case) for case in POSTGRES_API_FAULTS)], indirect=["each_store_url"])
def test_a_misbehaving_api_is_a_clear_error_and_nothing_is_published(
        case, tmp_path, simulator_url, fast_retries, each_store_url):
    fault, expected = API_FAULTS[case]
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams", "page_size": 4}],
                       store_url=each_store_url)
    sim = mirror.simulator
    sim.inject(count=100, entity="teams", **fault)
    try:
        _, result = mirror.run("hourly")
    finally:
        sim.clear_faults()
    assert not result.success
    message = root_error(result)
    assert "\n" not in message and "Error: teams: " in message  # one line, names the entity
    for text in expected:
        assert text in message, (text, message)
    with mirror.connection() as connection:
        assert connection.execute("SELECT status, delta_token FROM _sync_state"
                                  " WHERE entity = 'teams'").fetchone() == ("failed", None)
        assert not table_exists(connection, "teams")
    assert not any("foreign.invalid" in r.target for r in sim.stats.request_log)
    # Once the API behaves, the next change set syncs everything.
    _, result = mirror.run("hourly")
    assert result.success, failure_messages(result)
    with mirror.connection() as connection:
        assert connection.execute("SELECT count(*) FROM teams").fetchone()[0] == len(
            sim.records("teams"))


def step_errors(result) -> dict[str, str]:
    """The innermost error message of each failed step."""
    errors = {}
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None:
                error = error.cause
            errors[event.step_key] = error.message.strip()
    return errors


def test_a_server_paging_the_same_rows_forever_stops_and_the_mirror_is_unchanged(
        tmp_path, simulator_url, each_store_url):
    """The reported case: 12 rows served again and again, each page under a new nextLink (265
    pages, reported ok). A delta read (teams) and a modifiedon read (systemusers), neither
    counted, stop at the first repeated page."""
    mirror = mirror_of(tmp_path, simulator_url, [
        {"name": "teams", "page_size": 4}, {"name": "systemusers", "page_size": 20}],
        store_url=each_store_url)
    sim = mirror.simulator
    mirror.sync("hourly")
    with mirror.connection() as connection:
        before = {t: rows_by_key(connection, t, pk)
                  for t, pk in (("teams", "teamid"), ("systemusers", "systemuserid"))}
    team = sim.records("teams")[0]["teamid"]
    user = sim.records("systemusers")[0]["systemuserid"]
    sim.update("teams", team, {"name": "renamed team"})
    sim.update("systemusers", user, {"fullname": "Renamed User"})
    sim.reset_stats()
    for entity in ("teams", "systemusers"):
        sim.inject("endless_next_link", count=300, entity=entity)
    key, result = mirror.run("hourly")
    assert not result.success
    errors = step_errors(result)
    for entity, kind in (("teams", "delta"), ("systemusers", "changes")):
        message = errors[f"raw__{entity}"]
        assert "\n" not in message
        assert f"{entity}: change set {key}, {kind} read: page 2 repeats page 1" in message
        assert "paging without progress" in message and "DATAVERSE_URL" in message
        archive = mirror.settings.archive_dir / entity / key
        assert (archive / "page-00001.json.gz").exists()  # what came stays
        assert not (archive / "manifest.json").exists()  # unfinished: read again next time
    assert len(sim.stats.request_log) < 20, "the reads went on past the repeat"
    with mirror.connection() as connection:
        for table, pk in (("teams", "teamid"), ("systemusers", "systemuserid")):
            assert rows_by_key(connection, table, pk) == before[table]
    sim.clear_faults()
    _, result = mirror.run("hourly", key)  # the same change set again, the server behaving
    assert result.success, failure_messages(result)
    with mirror.connection() as connection:
        assert rows_by_key(connection, "teams", "teamid")[team]["name"] == "renamed team"
        assert rows_by_key(connection, "systemusers", "systemuserid")[user][
            "fullname"] == "Renamed User"


def _page(*versions: tuple[str, int]) -> list[dict]:
    return [{"teamid": key, "@odata.etag": f'W/"{version}"'} for key, version in versions]


def test_the_paging_guard_tells_a_repeated_page_from_an_edited_one_and_bounds_a_counted_read():
    request = FetchRequest("teams", "20260101T000000Z", "full", "teamid", None)
    step = FetchStep("snapshot", PageQuery(page_size=2))
    guard = PagingGuard(request, step)
    guard.check(_page(("a", 1), ("b", 1)), 1)
    guard.check([], 2)  # an empty page proves nothing
    guard.check([], 3)
    guard.check(_page(("a", 2), ("b", 1)), 4)  # a served again after an edit: progress
    with pytest.raises(PagingError, match="page 5 repeats page 1 "):
        guard.check(_page(("a", 1), ("b", 1)), 5)
    deletes = PagingGuard(request, FetchStep("delta", PageQuery(page_size=2)))
    deletes.check([{"id": "a", "reason": "deleted"}], 1)
    deletes.check([{"id": "b", "reason": "deleted"}], 2)
    with pytest.raises(PagingError, match="delta read: page 3 repeats page 1"):
        deletes.check([{"id": "a", "reason": "deleted"}], 3)
    # 6 records counted, pages of 2: 3 pages (+1 for the range's end); new keys on every page
    # pass up to ten times that (+10), then the read stops.
    counted = PagingGuard(request, step, counted_records=6)
    for number in range(1, 51):
        counted.check(_page((f"k{number}", 1)), number)
    with pytest.raises(PagingError) as excinfo:
        counted.check(_page(("k51", 1)), 51)
    assert "page 51 is its page 51, far more than the 6 records Dataverse counted for it " \
        "need (4 pages of 2)" in str(excinfo.value)
    small = PagingGuard(replace(request, max_pages=3), step, counted_records=6)
    for number in range(1, 4):
        small.check(_page((f"k{number}", 1)), number)
    with pytest.raises(PagingError, match="over the entity's max_pages of 3"):
        small.check(_page(("k4", 1)), 4)


def test_a_server_trickling_bytes_fails_at_the_deadline_with_the_setting_to_change(
        tmp_path, simulator_url, fast_retries):
    """Each response of teams sends 16 bytes every 50 ms (a page would take seconds, and
    httpx's per-read timeout never fires); DATAVERSE_RESPONSE_DEADLINE_SECONDS cuts each one."""
    simulator, url = simulator_url
    config = tmp_path / "entities.json"
    config.write_text(json.dumps({"groups": {"hourly": {"cron": "0 * * * *"}}, "entities": [
        {"name": "teams", "group": "hourly", "page_size": 4}]}))
    settings = load_settings({
        "DATAVERSE_URL": url, "DATAVERSE_SOURCE": "simulator",
        "DATAVERSE_ENTITIES_CONFIG": str(config), "DATAVERSE_DB_PATH": str(tmp_path / "m.db"),
        "DATAVERSE_ARCHIVE_DIR": str(tmp_path / "archive"),
        "DATAVERSE_RESPONSE_DEADLINE_SECONDS": "0.4",
    })
    mirror = Mirror(simulator, settings, build_definitions(settings),
                    DagsterInstance.ephemeral(), url)
    simulator.inject("trickle", count=100, entity="teams", seconds=0.05, chunk=16)
    started = time.monotonic()
    _, result = mirror.run("hourly")
    assert time.monotonic() - started < 15
    assert not result.success
    message = root_error(result)
    assert "\n" not in message and "Error: teams: GET " in message
    assert f"failed after {FAST.max_attempts} attempts" in message
    assert "no complete response within the 0.4 s deadline" in message
    assert "DATAVERSE_RESPONSE_DEADLINE_SECONDS" in message
    settled = time.monotonic() + 5  # a request is logged once the simulator sees the hang-up
    while simulator.in_flight and time.monotonic() < settled:
        time.sleep(0.01)
    pages = [r for r in simulator.stats.request_log
             if r.entity == "teams" and "count=true" not in r.target]
    assert len(pages) == FAST.max_attempts  # each cut response was retried, then given up
    with mirror.connection() as connection:
        assert connection.execute("SELECT status FROM _sync_state WHERE entity = 'teams'"
                                  ).fetchone() == ("failed",)


def test_an_enormous_page_is_refused_with_the_limit_to_change(tmp_path, simulator_url):
    """Bodies stream in and are refused past DATAVERSE_MAX_RESPONSE_MB (default 512, far
    above any 5000-row Dataverse page); here the limit is 20 KB and a page is larger."""
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "accounts", "incremental": "full"}],
                         max_response_mb=0.02)
    _, result = mirror.run("hourly")
    assert not result.success
    message = root_error(result)
    assert "accounts: GET " in message
    assert "over the limit of 20,971 (DATAVERSE_MAX_RESPONSE_MB)" in message
    assert "lower the entity's page_size" in message and "\n" not in message
    # Not retried: the same request would be as large.
    pages = [r for r in mirror.simulator.stats.request_log
             if r.entity == "accounts" and "count=true" not in r.target]
    assert len(pages) == 1
    small = mirror_of(tmp_path, simulator_url,
                        [{"name": "accounts", "incremental": "full", "page_size": 8}],
                        name="small", max_response_mb=0.02)
    _, result = small.run("hourly")
    assert result.success, failure_messages(result)
