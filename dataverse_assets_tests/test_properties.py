"""Property tests (hypothesis): filter building against the simulator's $filter parser,
identifier quoting against SQLite, primary-key detection, and the publish diff (applying a
plan to canonical gives the staged state), each on the real code."""

import asyncio
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataverse_assets.publish import lock_schema, publish_change_set
from dataverse_assets.query import PageQuery, id_filter, string_literal
from dataverse_assets.schema import Column, EntitySchema, detect_primary_key, sqlite_fold
from dataverse_assets.simulator.odata import BoolOp, Comparison, parse_filter
from dataverse_assets.sources import SimulatorSource, embedded_simulator
from dataverse_assets.staging import STAGING_META_COLUMNS, StagedRecords, content_hash, write_staged
from dataverse_assets.store import connect, quote_identifier

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
    from dataverse_assets.staging import STAGING_COUNTS, _PageContext, _stage_page

    records = [{**record, "id": f"k{n}"} for n, record in enumerate(records)]
    context = _PageContext(change_set="cs", pk="id", names=tuple(names),
                           hash_ignore_annotations=False, scope_ids=None)
    counts = dict.fromkeys(STAGING_COUNTS, 0)
    rows, _ = _stage_page(context, 1, {}, orjson.dumps({"value": records}), counts, [])
    assert [row[1] for row in rows] == [r["id"] for r in records]
    for row, record in zip(rows, records, strict=True):
        meta = len(STAGING_META_COLUMNS)
        assert row[meta:meta + len(names)] == tuple(record.get(n) for n in names)
        assert orjson.loads(row[-1]) == record
