"""Property tests (hypothesis): filter building against the simulator's $filter parser,
identifier quoting against SQLite, primary-key detection, the publish diff (applying a
plan to canonical gives the staged state), and hostile configs (one that validates syncs), each
on the real code."""

import asyncio
import json
import math
import re
import sqlite3
import tempfile
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, get_args, get_origin
from urllib.parse import parse_qsl

import httpx
import orjson
from dagster import DagsterInstance
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from dataverse_assets.config import (
    _ENV_FIELDS,
    ArchiveConfig,
    EntityConfig,
    GroupConfig,
    LabelsConfig,
    LinkSource,
    MaintenanceConfig,
    Settings,
    load_settings,
)
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.errors import ConfigError
from dataverse_assets.simulator.odata import BoolOp, Comparison, parse_filter
from dataverse_assets.source.query import PageQuery, id_filter, string_literal
from dataverse_assets.source.simulator import SimulatorSource, embedded_simulator
from dataverse_assets.store.archive_retention import compact_archive
from dataverse_assets.store.db import connect, quote_identifier
from dataverse_assets.store.maintenance import retain_bookkeeping
from dataverse_assets.store.schema import Column, EntitySchema, detect_primary_key, sqlite_fold
from dataverse_assets.store.schema_registry import lock_schema
from dataverse_assets.sync.publish_execute import publish_change_set
from dataverse_assets.sync.stage import (
    STAGING_COUNTS,
    STAGING_META_COLUMNS,
    PageContext,
    StagedRecords,
    _stage_page,
    content_hash,
    write_staged,
)
from dataverse_assets_tests.conftest import Mirror, failure_messages

# Any text an id or a value can hold: quotes, unicode, whitespace, URL-special characters.
# (Not NUL: no URL or SQLite identifier carries it; not lone surrogates: not valid UTF-8.)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=40)
HOSTILE = st.one_of(TEXT, st.sampled_from([
    "'", "''", "O'Bryan", "a''b'", "' or 1 eq 1 or '", "&$filter=x", "#frag", "+ %20 %",
    "名前 ü 🚀", "\u202e", " leading and trailing ", "a\nb\tc", "eq", "null", "(", ")"]))
QUICK = settings(max_examples=60, deadline=None)


def comparisons(expression) -> list[Comparison]:
    if isinstance(expression, Comparison):
        return [expression]
    assert isinstance(expression, BoolOp) and expression.op == "or"
    return [c for item in expression.items for c in comparisons(item)]


@QUICK
@given(st.lists(HOSTILE, min_size=1, max_size=8))
def test_any_id_round_trips_through_the_filter_builder_and_the_simulators_parser(ids):
    expression = id_filter("name", ids)
    # As the URL carries it: encoded by httpx, decoded the way the simulator decodes it.
    url = httpx.URL("http://org.invalid/api/data/v9.2/accounts",
                    params=PageQuery(filter=expression).params())
    [(key, received)] = parse_qsl(url.query.decode(), keep_blank_values=True)
    assert key == "$filter" and received == expression
    parsed = comparisons(parse_filter(received, {"name": "String"}, "account"))
    assert [(c.column, c.op, c.value) for c in parsed] == [("name", "eq", i) for i in ids]
    assert parse_filter(f"name ne {string_literal(ids[0])}", {"name": "String"},
                        "account").value == ids[0]


SIMULATED = ["accounts"]


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=HOSTILE)
def test_a_record_is_found_by_any_name_through_the_client_and_the_simulator(value):
    """End to end: the record is created with the value, then asked for by a filter on it."""
    source = SimulatorSource(entity_names=SIMULATED, seed=901)
    sim = embedded_simulator(901, SIMULATED)
    created = sim.create("accounts", {"name": value})["accountid"]

    async def ask() -> list[dict]:
        async with source.open_session() as session:
            query = PageQuery(select=("accountid", "name"), filter=id_filter("name", [value]))
            return [r async for page in session.iter_pages("accounts", query)
                    for r in page.records]

    found = asyncio.run(ask())
    assert created in {r["accountid"] for r in found}
    # Dataverse compares strings case-insensitively; every match equals the value so.
    assert all(r["name"].casefold() == value.casefold() for r in found)
    sim.delete("accounts", created)


IDENTIFIER = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                     min_size=1, max_size=60)


@QUICK
@given(st.lists(IDENTIFIER, min_size=1, max_size=5, unique_by=sqlite_fold), IDENTIFIER)
def test_quoted_identifiers_are_accepted_by_sqlite_and_name_the_same_column(names, table):
    connection = sqlite3.connect(":memory:")
    columns = ", ".join(f"{quote_identifier(n)} TEXT" for n in names)
    connection.execute(f"CREATE TABLE {quote_identifier(table)} ({columns})")
    connection.execute(
        f"INSERT INTO {quote_identifier(table)} ({', '.join(map(quote_identifier, names))})"
        f" VALUES ({', '.join('?' for _ in names)})", [f"value of {n}" for n in names])
    for name in names:
        cursor = connection.execute(
            f"SELECT {quote_identifier(name)} FROM {quote_identifier(table)}")
        assert cursor.description[0][0] == name
        assert cursor.fetchone() == (f"value of {name}",)
    assert [row[1] for row in connection.execute(
        f"PRAGMA table_info({quote_identifier(table)})")] == names
    assert connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                              ).fetchone() == (table,)


ENTITY = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
COLUMN = st.one_of(st.from_regex(r"_?[a-z][a-z0-9_]{0,12}", fullmatch=True), TEXT)


@QUICK
@given(ENTITY, st.lists(COLUMN, max_size=8, unique=True), st.randoms())
def test_primary_key_detection(entity, columns, random):
    key, why = detect_primary_key(entity, columns)
    assert why
    if columns:
        assert key in columns
    else:
        assert key.endswith("id")
    lowered = {c.lower(): c for c in columns}
    if f"{entity}id" in lowered:
        assert key == lowered[f"{entity}id"]
    id_columns = [c for c in columns if c.lower().endswith("id") and not c.startswith("_")]
    if id_columns:
        assert key.lower().endswith("id") and not key.startswith("_")
        # With an id column to choose, the choice does not depend on the column order.
        shuffled = list(columns)
        random.shuffle(shuffled)
        assert detect_primary_key(entity, shuffled)[0] == key
    # The config, then the metadata, always win.
    assert detect_primary_key(entity, columns, "configured")[0] == "configured"
    assert detect_primary_key(entity, columns, None, "fromMetadata")[0] == "fromMetadata"


# -- the publish diff ------------------------------------------------------------------------

KEYS = st.one_of(st.sampled_from(["a", "b", "c", "d", "e", "O'Bryan", "名前", "A"]), TEXT.filter(
    bool))
RECORD = st.fixed_dictionaries({"name": st.one_of(st.none(), TEXT),
                                "size": st.one_of(st.none(), st.integers(-10, 10))})
STATE = st.dictionaries(KEYS, RECORD, max_size=8)
SCHEMA = EntitySchema("things", "thingid", (Column("thingid", "TEXT"), Column("name", "TEXT"),
                                            Column("size", "INTEGER")), "sample")


def _staged(change_set: str, mode: str, upserts: dict[str, dict],
            deletes: list[str]) -> StagedRecords:
    names = SCHEMA.column_names
    rows = []
    for key, values in upserts.items():
        record = {"thingid": key, **values}
        rows.append((change_set, key, "upsert", content_hash(record), None,
                     *(record.get(n) for n in names), orjson.dumps(record).decode()))
    for key in deletes:
        rows.append((change_set, key, "delete", None, None, *(None for _ in names),
                     orjson.dumps({"id": key, "reason": "deleted"}).decode()))
    assert len(STAGING_META_COLUMNS) == 5
    return StagedRecords("things", change_set, SCHEMA, mode, None, None, None, False, None,
                         "2026-01-01T00:00:00Z", iter([(rows, [])]))


def _publish(connection, change_set: str, mode: str, upserts: dict, deletes: list) -> None:
    write_staged(connection, _staged(change_set, mode, upserts, deletes))
    publish_change_set(connection, SCHEMA, change_set, mode=mode, watermark_after=None)


def _canonical(connection) -> dict[str, dict]:
    return {key: {k: v for k, v in orjson.loads(body).items() if k != "thingid"}
            for key, body in connection.execute("SELECT thingid, json_response FROM things")}


@settings(max_examples=50, deadline=None)
@given(before=STATE, after=STATE, tracked=st.booleans(), data=st.data())
def test_applying_a_plan_to_canonical_gives_the_staged_state(before, after, tracked, data):
    """A full snapshot makes canonical equal to it; a change-tracking change set (changed
    rows and deletes only) makes canonical equal to the old state with the changes applied.
    Every replaced or deleted version is in history."""
    with tempfile.TemporaryDirectory() as folder:
        connection = connect(Path(folder) / "m.db")
        lock_schema(connection, SCHEMA)
        _publish(connection, "20260101T000000Z", "full", before, [])
        assert _canonical(connection) == before
        if tracked:
            changed = {k: v for k, v in after.items() if before.get(k) != v}
            gone = [k for k in before if k not in after]
            # Deletes of records never mirrored must be harmless too.
            gone += data.draw(st.lists(KEYS.filter(lambda k: k not in before and k not in after),
                                       max_size=2, unique=True))
            _publish(connection, "20260102T000000Z", "change_tracking", changed, gone)
        else:
            _publish(connection, "20260102T000000Z", "full", after, [])
        assert _canonical(connection) == after
        history = connection.execute(
            "SELECT thingid, change_kind FROM things__history").fetchall()
        expected = sorted(
            [(k, "update") for k in before if k in after and before[k] != after[k]]
            + [(k, "delete") for k in before if k not in after])
        assert sorted(history) == expected
        defunct = {row[0] for row in connection.execute("SELECT id FROM _defunct")}
        assert {k for k in before if k not in after} <= defunct
        # Published again, nothing changes (the plan is all unchanged).
        _publish(connection, "20260103T000000Z", "full", after, [])
        assert _canonical(connection) == after
        assert connection.execute("SELECT count(*) FROM things__history").fetchone()[0] == \
            len(expected)
        connection.close()


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), TEXT)


@QUICK
@given(st.lists(st.sampled_from(["a", "b", "c@x", "d e", "f"]), unique=True, max_size=5),
       st.lists(st.dictionaries(st.sampled_from(["a", "b", "c@x", "d e", "f", "g"]),
                                JSON_SCALARS), max_size=6))
def test_a_staged_row_has_each_columns_value_or_null_whatever_fields_a_record_lacks(
        names, records):

    records = [{**record, "id": f"k{n}"} for n, record in enumerate(records)]
    context = PageContext(change_set="cs", pk="id", names=tuple(names),
                           hash_ignore_annotations=False, scope_ids=None)
    counts = dict.fromkeys(STAGING_COUNTS, 0)
    rows, _ = _stage_page(context, 1, {}, orjson.dumps({"value": records}), counts, [])
    assert [row[1] for row in rows] == [r["id"] for r in records]
    for row, record in zip(rows, records, strict=True):
        meta = len(STAGING_META_COLUMNS)
        assert row[meta:meta + len(names)] == tuple(record.get(n) for n in names)
        assert orjson.loads(row[-1]) == record


# -- configs: one that validates runs ---------------------------------------------------------

# Two small tables of the embedded simulator: teams (12 rows, modifiedon, so its reconcile
# clock matters) and the business units its teams name (5, filtered: linked_from).
CONFIG_ENTITIES = ["teams", "businessunits"]


def _base_config() -> dict:
    """A valid config with every field written out, so each one can be replaced."""
    teams = EntityConfig(name="teams", group="hourly", incremental="modifiedon")
    units = EntityConfig(name="businessunits", group="hourly", filtered=True,
                         linked_from=[{"entity": "teams", "column": "_businessunitid_value"}])
    return {"groups": {"hourly": GroupConfig(cron="0 * * * *").model_dump()},
            "entities": [teams.model_dump(), units.model_dump()],
            "archive": ArchiveConfig().model_dump(),
            "maintenance": MaintenanceConfig().model_dump(),
            "labels": LabelsConfig().model_dump()}


def _children(value: object) -> list[tuple[int | str, object]]:
    if isinstance(value, dict):
        return list(value.items())
    return list(enumerate(value)) if isinstance(value, list) else []


def _paths(value: object, path: tuple = ()) -> list[tuple]:
    """Every key and index below `value`, as paths."""
    return [p for key, item in _children(value) for p in [(*path, key),
                                                           *_paths(item, (*path, key))]]


def _objects(value: object, path: tuple = ()) -> list[tuple]:
    """The paths of the non-empty objects (a key can be repeated in those)."""
    return ([path] if isinstance(value, dict) and value else []) + [
        p for key, item in _children(value) for p in _objects(item, (*path, key))]


CONFIG_PATHS = _paths(_base_config())
MODELS = {"groups": GroupConfig, "entities": EntityConfig, "archive": ArchiveConfig,
          "maintenance": MaintenanceConfig, "labels": LabelsConfig, "linked_from": LinkSource}
NOT_NUMBERS = st.sampled_from([
    float("nan"), float("inf"), float("-inf"), True, False, None, "", "5000", "NaN", [], [1],
    {}, {"a": 1}, 1e308, -1e308, 1e-308, 2**63, 2**64, 10**30, -(10**30), 0.5, 2.5, 100.0])
HOSTILE_VALUES = st.one_of(NOT_NUMBERS, st.integers(), st.floats(), st.text(max_size=8))
# Names that are invalid or reserved (a valid name the org lacks fails its fetch by design:
# test_an_entity_the_org_does_not_have_fails_its_fetch_with_one_clear_line).
HOSTILE_NAMES = st.sampled_from([
    "sqlite_master", "SQLITE_sequence", "teams__history", "teams__readable", "teams__pk_nocase",
    "businessunits__modifiedon", "1teams", "_teams", "", " teams", "teams;", "a" * 129,
    "名前", "teams\n"])
CRONS = st.sampled_from(["0 * * * *", "*/5 * * * *", "0 0 29 2 *", "59 23 31 12 *", "@daily",
                         "0 0 31 4 *", "0 0 30 2 *", "every hour", "", "* * * * * * *"])


def _usable_values(path: tuple) -> st.SearchStrategy | None:
    """Values a user could mean for the field at `path`: anything in its range (both ends
    too), every choice, working names and expressions. None for containers and names."""
    name = path[-1]
    model = next((MODELS[p] for p in reversed(path) if p in MODELS), None)
    info = model.model_fields.get(name) if model and isinstance(name, str) else None
    if info is None:
        return None
    kinds = set(get_args(info.annotation)) or {info.annotation}
    if kinds & {int, float} and bool not in kinds:
        bounds = {type(m).__name__: m for m in info.metadata}
        low, high = bounds["Ge"].ge, bounds["Le"].le
        return st.one_of(st.sampled_from([low, high]), st.integers(low, high),
                         *([st.floats(low, high)] if float in kinds else []),
                         *([st.none()] if type(None) in kinds else []))
    if bool in kinds:
        return st.booleans()
    if all(get_origin(k) is Literal for k in kinds):
        return st.sampled_from([v for k in kinds for v in get_args(k)])
    return {
        "cron": st.sampled_from(["0 * * * *", "*/5 * * * *", "0 0 29 2 *", "59 23 31 12 *",
                                 "@daily"]),
        "description": st.text(max_size=20),
        "orderby": st.sampled_from([None, "name asc", "modifiedon desc, name"]),
        # Another target table links nothing (any text is allowed; it is a value to match).
        "lookup_target": st.one_of(st.sampled_from([None, "businessunit"]), st.text(max_size=5)),
    }.get(name)


def _hostile_values(path: tuple) -> st.SearchStrategy:
    name = path[-1]
    specific = {"name": HOSTILE_NAMES, "entity": HOSTILE_NAMES, "cron": CRONS,
                "group": st.sampled_from(["daily", "Hourly", ""]),
                "orderby": st.sampled_from(["name; x", "1 asc", ""]),
                "column": st.sampled_from(["", "x y", "a'b"]),
                "primary_key": st.sampled_from(["", "x y", "a'b"])}.get(name)
    return HOSTILE_VALUES if specific is None else st.one_of(specific, HOSTILE_VALUES)


def _changes(paths: list[tuple], values, max_size: int) -> st.SearchStrategy:
    return st.lists(st.sampled_from(paths).flatmap(
        lambda path: st.tuples(st.just(path), values(path))), max_size=max_size)


USABLE_CHANGES = _changes([p for p in CONFIG_PATHS if _usable_values(p) is not None],
                          _usable_values, 4)
HOSTILE_CHANGES = _changes(CONFIG_PATHS, _hostile_values, 2)


def _has(container: object, key: int | str) -> bool:
    if isinstance(container, list):
        return isinstance(key, int) and key < len(container)
    return isinstance(container, dict) and key in container


def _apply(raw: dict, changes: list[tuple[tuple, object]]) -> dict:
    """Set each path to its value (skipped when an earlier change replaced its parent)."""
    for path, value in changes:
        parent: object = raw
        for part in path[:-1]:
            parent = parent[part] if _has(parent, part) else None  # type: ignore[index]
        if _has(parent, path[-1]):
            parent[path[-1]] = value  # type: ignore[index]
    return raw


def _json_text(value: object, repeat_at: tuple | None, path: tuple = ()) -> str:
    """json.dumps (NaN and Infinity as Python writes them), with the first key of the object
    at `repeat_at` written twice."""
    if isinstance(value, dict):
        items = [f"{json.dumps(k)}: {_json_text(v, repeat_at, (*path, k))}"
                 for k, v in value.items()]
        if path == repeat_at and items:
            items.append(items[0])
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_json_text(v, repeat_at, (*path, n))
                               for n, v in enumerate(value)) + "]"
    return json.dumps(value)


def _both(field: str, value: object) -> list[tuple[tuple, object]]:
    return [(("entities", n, field), value) for n in (0, 1)]


MAINTENANCE_DAYS = [name for name in MaintenanceConfig.model_fields if name.endswith("_days")]
MAXIMA = [(("groups", "hourly", "freshness_grace_minutes"), 527_040),
          (("groups", "hourly", "cron"), "0 0 29 2 *"),
          *_both("page_size", 5000), *_both("parallel_ranges", 52),
          *_both("publish_chunk_rows", 100_000_000), *_both("reconcile_every_hours", 8760),
          (("archive", "compact_after_days"), 36_500), (("archive", "retention_days"), 36_500),
          (("archive", "zstd_level"), 22), (("archive", "staging_keep_change_sets"), 1_000_000),
          *[(("maintenance", field), 36_500) for field in MAINTENANCE_DAYS],
          (("labels", "language_code"), 65_535)]
MINIMA = [(("groups", "hourly", "freshness_grace_minutes"), 0),
          *_both("page_size", 1), *_both("parallel_ranges", 1), *_both("publish_chunk_rows", 1),
          *_both("reconcile_every_hours", 0),
          (("archive", "compact_after_days"), 0), (("archive", "retention_days"), 0),
          (("archive", "zstd_level"), 1), (("archive", "staging_keep_change_sets"), 1),
          (("archive", "retention_mode"), "rebase"),
          *[(("maintenance", field), 0) for field in MAINTENANCE_DAYS],
          (("labels", "language_code"), 1)]


# 60 generated configs (a third to a half of them sync) and the 11 examples: ~45 s.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(usable=USABLE_CHANGES, hostile=st.one_of(st.just([]), HOSTILE_CHANGES),
       repeat=st.one_of(st.just(None), st.just(None), st.integers(0, 40)))
@example(usable=MAXIMA, hostile=[], repeat=None)
@example(usable=MINIMA, hostile=[], repeat=None)
@example(usable=[], hostile=[(("groups", "hourly", "cron"), "0 0 31 4 *")], repeat=None)
@example(usable=[], hostile=[(("entities", 0, "reconcile_every_hours"), 1e308)], repeat=None)
@example(usable=[], hostile=[(("groups", "hourly", "freshness_grace_minutes"), 1e300)],
         repeat=None)
@example(usable=[], hostile=[(("archive", "compact_after_days"), 1e308)], repeat=None)
@example(usable=[], hostile=[(("maintenance", "sync_log_days"), 1e308)], repeat=None)
@example(usable=[], hostile=[(("entities", 1, "publish_chunk_rows"), 1e30)], repeat=None)
@example(usable=[], hostile=[(("entities", 0, "page_size"), True)], repeat=None)
@example(usable=[], hostile=[(("entities", 0, "name"), "sqlite_master")], repeat=None)
@example(usable=[], hostile=[], repeat=3)
def test_a_config_either_names_the_field_it_gets_wrong_or_syncs(usable, hostile, repeat):
    """Usable and hostile values in the fields of a small valid config: either a one-line
    error naming where, or two syncs (the second reads the first's reconcile clock) with their
    freshness checks, then a compaction and the bookkeeping retention as if far in the future,
    all complete with rows in the mirror."""
    raw = _apply(_base_config(), usable + hostile)
    objects = _objects(raw)
    repeat_at = objects[repeat % len(objects)] if repeat is not None else None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "entities.json"
        path.write_text(_json_text(raw, repeat_at))
        mirror_settings = Settings(db_path=Path(folder) / "mirror.db",
                                   archive_dir=Path(folder) / "archive",
                                   entities_config_path=path, source="simulator")
        try:
            defs = build_definitions(mirror_settings,
                                     source=SimulatorSource(entity_names=CONFIG_ENTITIES))
        except ConfigError as exc:
            message = str(exc)
            assert message.startswith(f"{path}: ") and "\n" not in message, message
            # Where: a field, a group, an entity (cross-references name it), a repeated key.
            where = message.removeprefix(f"{path}: ")
            assert re.match(r"(field |group |entity |entities\[|top level: (entity|key) )",
                            where), message
            assert repeat_at is None or "is given twice" in message, message
            event("refused")
            return
        event("synced")
        assert repeat_at is None, "a key given twice was accepted"
        config = mirror_settings.entities
        sim = embedded_simulator(42, CONFIG_ENTITIES)
        with DagsterInstance.ephemeral() as instance:
            mirror = Mirror(sim, mirror_settings, defs, instance)
            for _ in range(2):
                _, result = mirror.run("hourly")
                assert result.success, failure_messages(result)
        with closing(connect(mirror_settings.db_path)) as connection:
            teams = {row[0] for row in connection.execute("SELECT teamid FROM teams")}
            units = {row[0] for row in connection.execute(
                "SELECT businessunitid FROM businessunits")}
        assert teams == {r["teamid"] for r in sim.records("teams")}
        linked = {r["_businessunitid_value"] for r in sim.records("teams")}
        # Another lookup_target (any text is allowed) links no team to a business unit.
        target = config.entity("businessunits").linked_from[0].lookup_target
        assert units == (linked if target in (None, "businessunit") else set())
        later = datetime.now(UTC) + timedelta(days=36_501)
        compact_archive(mirror_settings.archive_dir, config, db_path=mirror_settings.db_path,
                        now=later)
        # And the bookkeeping retention, with the maintenance section's days.
        with closing(connect(mirror_settings.db_path)) as connection:
            retain_bookkeeping(connection, config, now=later)


# -- the environment: a numeric variable either names itself or loads in its range -------------

ENV_NUMBERS = {variable: name for variable, name in _ENV_FIELDS.items()
               if (set(get_args(Settings.model_fields[name].annotation))
                   or {Settings.model_fields[name].annotation}) & {int, float}}
ENV_TEXT = st.one_of(
    st.integers().map(str), st.floats().map(str), st.floats().map(repr),
    st.decimals(allow_nan=True).map(str), st.text(max_size=12),
    st.text("0123456789.eE+-_ ,xX", max_size=12),
    st.sampled_from(["inf", "-inf", "Infinity", "nan", "NaN", "1e308", "-0", "0x10", "0b1",
                     "1_000", " 5", "5 ", "+5", "1,000", "true", "false", "1e3", "5.0",
                     "\u0665", "\uff15", "5\n", "\t5", "None", "null", "[]", "{}"]))


@settings(max_examples=300, deadline=None)
@given(variable=st.sampled_from(sorted(ENV_NUMBERS)), text=ENV_TEXT)
def test_a_numeric_environment_variable_either_names_itself_or_loads_in_range(variable, text):
    """Whatever text a numeric DATAVERSE_* variable holds: one line naming the variable, or
    settings holding a finite number of the field's kind within its documented range."""
    name = ENV_NUMBERS[variable]
    try:
        loaded = load_settings({variable: text})
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{variable}: ") and "\n" not in message, (text, message)
        event("refused")
        return
    event("loaded")
    value = getattr(loaded, name)
    info = Settings.model_fields[name]
    bounds = {type(m).__name__: m for m in info.metadata}
    kinds = set(get_args(info.annotation)) or {info.annotation}
    assert not isinstance(value, bool) and isinstance(value, int | float), (text, value)
    assert math.isfinite(value) and bounds["Ge"].ge <= value <= bounds["Le"].le, (text, value)
    if float not in kinds:
        assert isinstance(value, int), (text, value)
