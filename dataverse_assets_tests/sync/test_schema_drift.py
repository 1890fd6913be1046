"""The locked schema, drift between change sets, evolve mode and the asset checks, through
Dagster against the simulator: a column is added, one removed and one retyped, and the checks
say exactly that while the data keeps landing."""

import asyncio

import orjson
import pytest
from dagster import AssetCheckSeverity, DagsterInstance, MetadataValue

from dataverse_assets.config import Settings
from dataverse_assets.defs.checks import FRESHNESS_JOB, relation_identifier
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.ops.cli import new_change_set_key
from dataverse_assets.simulator import SimAttribute
from dataverse_assets.source.fixture import FixtureSource
from dataverse_assets.source.query import PageQuery
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.store.db import quote_identifier, table_columns
from dataverse_assets.store.schema import infer_schema_from_records, schema_from_metadata
from dataverse_assets_tests.conftest import ENTITY_NAMES, Mirror, failure_messages
from dataverse_assets_tests.helpers import duplicate_a_team_key
from dataverse_assets_tests.truth import PRIMARY_KEYS, canonical_rows, without_annotations

TRIALS = "vin_clinicaltrials"


@pytest.fixture
def mirror(each_mirror):
    """The tests that take `mirror` run in each kind of store (docs/store-backends.md)."""
    return each_mirror


def evaluations(result, check_name: str) -> dict:
    """entity -> the check's evaluation in a run."""
    return {e.asset_key.path[-1]: e for e in result.get_asset_check_evaluations()
            if e.check_name == check_name}


def meta(evaluation, name: str):
    return evaluation.metadata[name].value


def columns_of(entries: list[dict], *keys: str) -> list[tuple]:
    return sorted(tuple(entry[k] for k in keys) for entry in entries)


def run_ok(mirror: Mirror, group: str):
    key, result = mirror.run(group)
    assert result.success, failure_messages(result)
    return key, result


def schema_versions(mirror: Mirror, entity: str) -> list[tuple[int, list[str]]]:
    with mirror.connection() as connection:
        return [(version, [c["name"] for c in orjson.loads(columns)]) for version, columns in
                connection.execute("SELECT version, columns_json FROM _schema WHERE entity = ?"
                                   " ORDER BY version", (entity,))]


def test_metadata_and_records_discover_the_same_schema(simulator_url):
    """For every configured entity, EntityDefinitions and the records, both as the client
    reads them over HTTP, give the same columns, SQLite types and primary key."""
    _, url = simulator_url

    async def discover() -> dict[str, tuple[dict, list[dict]]]:
        source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=url)
        found = {}
        async with source.open_session() as session:
            for entity in ENTITY_NAMES:
                definition = await session.entity_definition(entity)
                found[entity] = (definition, [record async for page in session.iter_pages(
                    entity, PageQuery()) for record in page.records])
        return found

    for entity, (definition, records) in asyncio.run(discover()).items():
        from_metadata = schema_from_metadata(entity, definition)
        from_records = infer_schema_from_records(entity, records)
        assert from_records.primary_key == from_metadata.primary_key == PRIMARY_KEYS[entity]
        assert {c.name: c.sqlite_type for c in from_records.columns} == \
            {c.name: c.sqlite_type for c in from_metadata.columns}, entity
        assert all(c.type_known for c in from_records.columns), entity
        assert from_metadata.excluded == from_records.excluded == ()


SMALL_HOURLY = [
    {"name": "vin_candidates", "group": "hourly"},
    {"name": TRIALS, "group": "hourly"},
    {"name": "vin_vin_candidate_accountset", "group": "hourly", "incremental": "full"},
    {"name": "accounts", "group": "hourly", "filtered": True,
     "linked_from": [{"entity": "vin_vin_candidate_accountset", "column": "accountid"}]},
]


def small_mirror(tmp_path, simulator_url, entities: list[dict],
                 instance: DagsterInstance | None = None, name: str = "config") -> Mirror:
    """A mirror of a few entities (fewer steps per run), optionally on an existing
    database and Dagster instance under a changed config."""
    simulator, url = simulator_url
    config = tmp_path / f"{name}.json"
    config.write_text(orjson.dumps({
        "groups": {"hourly": {"cron": "0 * * * *"}},
        "entities": [{"page_size": 40, **e} for e in entities],
    }).decode())
    settings = Settings(db_path=tmp_path / "mirror.db", archive_dir=tmp_path / "archive",
                        entities_config_path=config, source="simulator")
    source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=url)
    return Mirror(simulator, settings, build_definitions(settings, source=source),
                  instance or DagsterInstance.ephemeral())


def test_added_removed_and_retyped_columns_are_reported_exactly_and_data_lands(
        tmp_path, simulator_url):
    mirror = small_mirror(tmp_path, simulator_url, SMALL_HOURLY)
    simulator = mirror.simulator
    first, result = run_ok(mirror, "hourly")
    drift = evaluations(result, "schema_drift")
    assert set(drift) == {e["name"] for e in SMALL_HOURLY}
    assert all(e.passed and e.partition == first for e in drift.values())
    # Counts are reconciled only where the change set knows the source's total.
    counts = evaluations(result, "row_count")
    for entity in ("vin_vin_candidate_accountset", TRIALS, "vin_candidates"):
        assert counts[entity].passed and meta(counts[entity], "reconciled"), entity
        assert meta(counts[entity], "source_count") == len(simulator.records(entity))
    assert meta(counts["accounts"], "reconciled") is False
    assert "filtered" in meta(counts["accounts"], "reason")

    trials = [r["vin_clinicaltrialid"] for r in simulator.records(TRIALS)]
    simulator.add_column(TRIALS, SimAttribute("vin_site_count", "Integer"),
                         default=lambda row: len(row["vin_name"]))
    simulator.remove_column(TRIALS, "vin_startdate")
    simulator.change_column_type(TRIALS, "vin_phase", "String")
    for key in trials[:2]:
        simulator.update(TRIALS, key, {"vin_name": f"Renamed {key[:4]}"})

    second, result = run_ok(mirror, "hourly")

    drift = evaluations(result, "schema_drift")
    check = drift[TRIALS]
    assert not check.passed and check.severity == AssetCheckSeverity.ERROR
    assert check.partition == second
    assert columns_of(meta(check, "added"), "column", "type", "attribute_type") == [
        ("vin_site_count", "INTEGER", "Integer")]
    assert columns_of(meta(check, "removed"), "column", "type", "attribute_type") == [
        ("vin_startdate", "TEXT", "DateTime")]
    assert columns_of(meta(check, "type_changed"), "column", "locked_type", "live_type",
                      "locked_attribute_type", "live_attribute_type") == [
        ("vin_phase", "INTEGER", "TEXT", "Picklist", "String")]
    assert meta(check, "excluded") == []
    assert meta(check, "live_schema_from") == "metadata"
    assert all(e.passed for entity, e in drift.items() if entity != TRIALS)
    assert meta(evaluations(result, "row_count")["vin_candidates"], "reconciled") is False

    # The data still lands: every field in json_response, the locked columns as they were.
    with mirror.connection() as connection:
        rows = canonical_rows(connection, TRIALS)
        assert "vin_site_count" not in table_columns(connection, TRIALS)
    for key in trials[:2]:
        assert without_annotations(rows[key]["json_response"]) == simulator.record(TRIALS, key)
        assert rows[key]["vin_startdate"] is None
        # The column keeps its locked INTEGER affinity; json_response has the text as sent.
        phase = simulator.record(TRIALS, key)["vin_phase"]
        assert isinstance(phase, str) and rows[key]["vin_phase"] == int(phase)
    assert rows[trials[3]]["vin_startdate"] is not None  # not refetched: as it was
    assert schema_versions(mirror, TRIALS)[-1][0] == 1  # freeze keeps the lock

    # Switched to evolve: the next change set adds the column and fills it from json_response.
    evolving = small_mirror(tmp_path, simulator_url, [
        {**e, "schema_evolution": "evolve"} if e["name"] == TRIALS else e for e in SMALL_HOURLY
    ], instance=mirror.instance, name="evolve")
    simulator.update(TRIALS, trials[5], {"vin_name": "Renamed in the evolve change set"})
    third, result = run_ok(evolving, "hourly")

    check = evaluations(result, "schema_drift")[TRIALS]
    assert check.severity == AssetCheckSeverity.ERROR  # removed + retyped are still breaking
    [added] = meta(check, "added")
    assert (added["column"], added["type"]) == ("vin_site_count", "INTEGER")
    assert "schema version 2" in added["action"]
    versions = schema_versions(evolving, TRIALS)
    assert [v for v, _ in versions] == [1, 2]
    assert versions[1][1] == versions[0][1] + ["vin_site_count"]
    with evolving.connection() as connection:
        rows = canonical_rows(connection, TRIALS)
        assert "vin_site_count" in table_columns(connection, f"{TRIALS}__history")
        history = connection.execute(
            f"SELECT vin_site_count, json_response FROM {TRIALS}__history"
            " WHERE vin_clinicaltrialid = ?", (trials[0],)).fetchall()
    for key in trials[:2] + trials[5:6]:  # backfilled (first two) and staged (the sixth)
        assert rows[key]["vin_site_count"] == simulator.record(TRIALS, key)["vin_site_count"]
    for key in trials[2:5]:  # never refetched: their json_response has no such field
        assert rows[key]["vin_site_count"] is None
    assert history and all(count is None for count, _ in history)  # pre-column versions

    fourth, result = run_ok(evolving, "hourly")
    check = evaluations(result, "schema_drift")[TRIALS]
    assert meta(check, "added") == []
    assert [e["column"] for e in meta(check, "removed")] == ["vin_startdate"]
    with evolving.connection() as connection:
        recorded = connection.execute(
            "SELECT change_set, kind, column_name FROM _schema_drift WHERE entity = ?"
            " ORDER BY change_set, kind", (TRIALS,)).fetchall()
    assert recorded == [
        (second, "added", "vin_site_count"), (second, "removed", "vin_startdate"),
        (second, "type_changed", "vin_phase"),
        (third, "added", "vin_site_count"), (third, "removed", "vin_startdate"),
        (third, "type_changed", "vin_phase"),
        (fourth, "removed", "vin_startdate"), (fourth, "type_changed", "vin_phase"),
    ]
    mirror.instance.dispose()


def test_hostile_column_names_from_metadata_are_added_or_reported(make_each_mirror):
    mirror = make_each_mirror(overrides={"teams": {"schema_evolution": "evolve"}})
    postgres = mirror.settings.store.kind == "postgresql"
    simulator = mirror.simulator
    mirror.sync("daily")
    hostile = {"order": ("Integer", 7), 'a"b c': ("String", "dq \" and ' sq"),
               "a'b": ("String", "it's"), "ünïcödé 名前": ("String", "ü"),
               "x" * 200: ("Decimal", 2.5), "select": ("Boolean", True),
               # SQLite's type names, which the PostgreSQL store renders in its DDL
               "TEXT": ("String", "a TEXT value"), "REAL": ("Integer", 3)}
    for name, (kind, value) in hostile.items():
        simulator.add_column("teams", SimAttribute(name, kind), default=value)
    simulator.add_column("teams", SimAttribute("Name", "String"), default="case twin")
    teams = [r["teamid"] for r in simulator.records("teams")]
    simulator.update("teams", teams[0], {"name": "Changed"})

    key, result = run_ok(mirror, "daily")

    check = evaluations(result, "schema_drift")["teams"]
    excluded = {e["column"]: e["reason"] for e in meta(check, "excluded")}
    assert "only in letter case" in excluded.pop("Name")
    if postgres:
        # PostgreSQL would cut a name past 63 bytes short: it is not a column there.
        assert "longer than 63 bytes" in excluded.pop("x" * 200)
        hostile.pop("x" * 200)
    assert not excluded
    assert sorted(e["column"] for e in meta(check, "added")) == sorted(hostile)
    with mirror.connection() as connection:
        assert set(hostile) <= set(table_columns(connection, "teams"))
        assert "Name" not in table_columns(connection, "teams")
        rows = canonical_rows(connection, "teams")
    for team in teams:
        record = simulator.record("teams", team)
        for name in hostile:
            want = int(record[name]) if isinstance(record[name], bool) else record[name]
            # Changed rows were staged with the columns; the rest were filled from json_response
            # (which, not refetched, has no such field yet).
            assert rows[team][name] == (want if team == teams[0] else None), (team, name)
        new_fields = set() if team == teams[0] else {*hostile, "Name", "x" * 200}
        assert without_annotations(rows[team]["json_response"]) == {
            k: v for k, v in record.items() if k not in new_fields}
    assert orjson.loads(rows[teams[0]]["json_response"])["Name"] == "case twin"


def test_a_broken_primary_key_fails_the_step_through_the_blocking_check(mirror):
    mirror.sync("daily")
    with mirror.connection() as connection:
        key = duplicate_a_team_key(connection)

    _, result = mirror.run("daily")

    assert not result.success
    assert "blocking asset check" in failure_messages(result)
    check = evaluations(result, "primary_key")["teams"]
    assert not check.passed and check.severity == AssetCheckSeverity.ERROR
    assert meta(check, "duplicate_keys") == 1
    assert meta(check, "duplicate_examples") == [{"key": key.lower(), "rows": 2}]
    others = evaluations(result, "primary_key")
    assert others["systemusers"].passed and others["businessunits"].passed


def test_a_key_scan_that_lists_a_record_the_mirror_lacks_brings_it_in_and_says_so(
        make_each_mirror):
    mirror = make_each_mirror(overrides={"systemusers": {"reconcile_every_hours": 1e-9}})
    mirror.sync("daily")
    # Created with an old modifiedon: the incremental query never sees it, the key scan does,
    # and the record is fetched by id in the same change set.
    hidden = mirror.simulator.create("systemusers", {"modifiedon": "2020-01-01T00:00:00Z"})

    _, result = run_ok(mirror, "daily")

    assert hidden["systemuserid"] in canonical_rows(mirror.connection(), "systemusers")
    count = evaluations(result, "row_count")["systemusers"]
    assert count.passed and "key-only scan" in meta(count, "basis")
    assert meta(count, "source_count") == len(mirror.simulator.records("systemusers"))
    found = evaluations(result, "mirror_matches_source")["systemusers"]
    assert not found.passed and found.severity == AssetCheckSeverity.WARN
    assert (meta(found, "missing"), meta(found, "stale"), meta(found, "extra")) == (1, 0, 0)


def test_freshness_warns_when_a_group_has_not_published_since_its_cron_tick(mirror):
    _, result = run_ok(mirror, "daily")
    assert all(e.passed for e in evaluations(result, "freshness").values())
    job = mirror.defs.resolve_job_def(FRESHNESS_JOB)
    with mirror.connection() as connection:
        connection.execute("UPDATE _publish_state SET finished_at = '2020-01-01T00:00:00Z'"
                           " WHERE entity = 'teams'")

    result = job.execute_in_process(instance=mirror.instance)

    fresh = evaluations(result, "freshness")
    assert set(fresh) == set(ENTITY_NAMES)
    assert not fresh["teams"].passed and fresh["teams"].severity == AssetCheckSeverity.WARN
    assert meta(fresh["teams"], "last_complete_publish") == "2020-01-01T00:00:00+00:00"
    # The grace period is the group's config: text, so the UI draws no constant series of it.
    assert "grace_minutes" not in fresh["teams"].metadata
    assert fresh["teams"].metadata["grace"] == MetadataValue.text("30 minutes")
    assert fresh["systemusers"].passed
    assert not fresh["vin_candidates"].passed  # the hourly group never synced
    assert fresh["vin_candidates"].description == "Never published."
    assert "age_minutes" not in fresh["vin_candidates"].metadata  # no -1 in the plotted series
    assert meta(fresh["teams"], "age_minutes") > 0


def test_canonical_materialization_carries_the_column_schema(mirror):
    _, result = run_ok(mirror, "daily")
    [materialization] = [m for m in result.asset_materializations_for_node("canonical__teams")]
    schema = materialization.metadata["dagster/column_schema"].value
    names = [c.name for c in schema.columns]
    assert names[0] == "teamid" and schema.columns[0].constraints.unique
    assert {"name", "_businessunitid_value", "json_response", "sync_time"} <= set(names)
    assert next(c for c in schema.columns if c.name == "teamtype").type == "INTEGER"
    assert materialization.metadata["schema_version"].value == 1
    # Dagster's table conventions: each column's Dataverse type and what it is, the rows, the
    # table's name in the mirror.
    # The org's display name and, where a maker wrote one, its description come first.
    described = {c.name: c.description for c in schema.columns}
    assert described["teamid"] == "AttributeType Uniqueidentifier; Teamid; primary key"
    assert described["teamtype"] == (
        "AttributeType Picklist; Teamtype: The kind of team: owner, access, security group or "
        "Office group.; choice (Picklist): labels in teams__readable")
    assert described["_businessunitid_value"].startswith(
        "AttributeType Lookup; Businessunitid; lookup ")
    assert described["_businessunitid_value"].endswith(" to businessunits")
    assert all(described.values()), described
    with mirror.connection() as connection:
        rows = connection.execute("SELECT count(*) FROM teams").fetchone()[0]
    assert materialization.metadata["dagster/row_count"].value == rows > 0
    assert materialization.metadata["dagster/relation_identifier"].value == (
        relation_identifier(mirror.settings.store.address, "teams"))
    assert materialization.metadata["dagster/relation_identifier"].value.endswith(
        ".main.teams" if mirror.settings.store.kind == "sqlite" else ".public.teams")


@pytest.fixture
def hostile_fixtures(tmp_path):
    folder = tmp_path / "fixtures" / "hostiles"
    folder.mkdir(parents=True)

    def write(records: list[dict]) -> None:
        (folder / "page-00001.json").write_bytes(
            orjson.dumps({"@odata.context": "saved", "value": records}))

    return tmp_path / "fixtures", write


HOSTILE_KEPT = ["hostileid", "order", "select", 'a"b', "a'b", "with space", "ünïcödé",
                "x" * 200, "name"]


def hostile_record(number: int, **extra) -> dict:
    return {"@odata.etag": f'W/"{number}"', "hostileid": f"id-{number}", "order": number,
            "select": "s", 'a"b': "dq", "a'b": "sq", "with space": number + 0.5,
            "ünïcödé": "ü", "x" * 200: "long", "name": "lower", "Name": "upper",
            "JSON_RESPONSE": "reserved", "": "empty", "nul\x00key": "nul", "_op": "meta",
            **extra}


def test_hostile_names_from_records_round_trip_or_are_reported(tmp_path, hostile_fixtures):
    directory, write = hostile_fixtures
    config = tmp_path / "entities.json"
    config.write_text(orjson.dumps({
        "groups": {"daily": {"cron": "0 3 * * *"}},
        "entities": [{"name": "hostiles", "group": "daily", "incremental": "full",
                      "schema_evolution": "evolve"}],
    }).decode())
    settings = Settings(db_path=tmp_path / "m.db", archive_dir=tmp_path / "archive",
                        entities_config_path=config, source="fixture", fixtures_dir=directory)
    defs = build_definitions(settings, FixtureSource(directory=str(directory)))
    job = defs.resolve_job_def("sync_daily")
    instance = DagsterInstance.ephemeral()
    mirror = Mirror(None, settings, defs, instance)

    def sync(records: list[dict]):
        write(records)
        key = new_change_set_key(instance, "daily")
        result = job.execute_in_process(instance=instance, partition_key=key,
                                        raise_on_error=False)
        assert result.success, failure_messages(result)
        return evaluations(result, "schema_drift")["hostiles"]

    first = [hostile_record(1), hostile_record(2)]
    check = sync(first)

    with mirror.connection() as connection:
        columns = table_columns(connection, "hostiles")
        rows = connection.execute(
            f"SELECT {', '.join(quote_identifier(c) for c in HOSTILE_KEPT)}, json_response"
            " FROM hostiles ORDER BY hostileid").fetchall()
    assert columns[:len(HOSTILE_KEPT)] == HOSTILE_KEPT
    for row, record in zip(rows, first, strict=True):
        assert list(row[:-1]) == [record[c] for c in HOSTILE_KEPT]
        assert orjson.loads(row[-1]) == record  # nothing dropped
    assert not check.passed and check.severity == AssetCheckSeverity.WARN
    excluded = {e["column"]: e["reason"] for e in meta(check, "excluded")}
    assert set(excluded) == {"Name", "JSON_RESPONSE", "", "nul\x00key", "_op"}
    assert "'name' only in letter case" in excluded["Name"]
    assert "sync column '_op'" in excluded["_op"]

    # A later change set brings a keyword and both quotes; "ORDER" cannot sit next to "order".
    second = [hostile_record(1, group=5, ORDER=9, maybe=None, **{"a\"b c'd": "both"}),
              hostile_record(3, group=6, ORDER=9, maybe=None, **{"a\"b c'd": None})]
    check = sync(second)

    added = {e["column"]: e for e in meta(check, "added")}
    assert {name: e["type"] for name, e in added.items()} == {
        'a"b c\'d': "TEXT", "group": "INTEGER", "maybe": None}
    assert "not added yet" in added["maybe"]["action"]  # only nulls: no type to add it with
    assert [e["column"] for e in meta(check, "excluded")] == ["ORDER"]  # the rest: said once
    assert check.severity == AssetCheckSeverity.WARN
    with mirror.connection() as connection:
        rows = connection.execute(
            'SELECT hostileid, "group", "a""b c\'d", "order" FROM hostiles ORDER BY 1').fetchall()
        history = connection.execute(
            "SELECT hostileid, change_kind FROM hostiles__history ORDER BY 1").fetchall()
        columns = table_columns(connection, "hostiles")
    assert rows == [("id-1", 5, "both", 1), ("id-3", 6, None, 3)]
    assert "maybe" not in columns
    assert history == [("id-1", "update"), ("id-2", "delete")]
    instance.dispose()
