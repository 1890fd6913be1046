from datetime import datetime, timedelta

import pytest

from dataverse_assets.defs.checks import freshness_status
from dataverse_assets.store.schema import (
    RESERVED_COLUMNS,
    Column,
    EntitySchema,
    compare_schemas,
    detect_primary_key,
    infer_schema_from_records,
    schema_from_metadata,
    singular,
    split_usable_columns,
)
from dataverse_assets.store.tables import HISTORY_COLUMNS, SYNC_COLUMNS
from dataverse_assets.sync.stage import STAGING_META_COLUMNS


@pytest.mark.parametrize(("entity_set", "expected"), [
    ("accounts", "account"),
    ("vin_candidates", "vin_candidate"),
    ("vin_vin_candidate_accountset", "vin_vin_candidate_account"),
    ("businesses", "business"),
    ("activityparties", "activityparty"),
])
def test_singular(entity_set, expected):
    assert singular(entity_set) == expected


def test_primary_key_chain_on_the_seed_examples():
    assert detect_primary_key("vin_candidates", ["vin_name", "vin_candidateid"])[0] == \
        "vin_candidateid"
    assert detect_primary_key("accounts", ["_ownerid_value", "accountid", "name"])[0] == \
        "accountid"
    assert detect_primary_key(
        "vin_vin_candidate_accountset",
        ["vin_candidateid", "accountid", "vin_vin_candidate_accountid"],
    )[0] == "vin_vin_candidate_accountid"


def test_primary_key_chain_on_tricky_names():
    # No <entity>id: the shortest *id column not starting with '_' wins.
    pk, reason = detect_primary_key("people", ["_parentid_value", "personguid", "rowid", "zid"])
    assert pk == "zid" and "shortest" in reason
    assert detect_primary_key("things", ["name", "value"])[0] == "name"
    assert detect_primary_key("things", ["name"], override="value")[0] == "value"
    assert detect_primary_key("accounts", ["ACCOUNTID"])[0] == "ACCOUNTID"


def test_metadata_maps_attribute_types_and_lookups():
    definition = {
        "PrimaryIdAttribute": "contactid",
        "ChangeTrackingEnabled": True,
        "Attributes": [
            {"LogicalName": "contactid", "AttributeType": "Uniqueidentifier"},
            {"LogicalName": "fullname", "AttributeType": "String"},
            {"LogicalName": "parentcustomerid", "AttributeType": "Customer"},
            {"LogicalName": "numberofchildren", "AttributeType": "Integer"},
            {"LogicalName": "creditlimit", "AttributeType": "Money"},
            {"LogicalName": "donotemail", "AttributeType": "Boolean"},
            {"LogicalName": "modifiedon", "AttributeType": "DateTime"},
            {"LogicalName": "fullname_virtual", "AttributeType": "Virtual"},
        ],
    }
    schema = schema_from_metadata("contacts", definition)
    types = {c.name: c.sqlite_type for c in schema.columns}
    assert schema.primary_key == "contactid" and schema.columns[0].name == "contactid"
    assert types == {"contactid": "TEXT", "fullname": "TEXT", "_parentcustomerid_value": "TEXT",
                     "numberofchildren": "INTEGER", "creditlimit": "REAL",
                     "donotemail": "INTEGER", "modifiedon": "TEXT"}
    assert schema.change_tracking is True


def test_sample_inference_uses_every_non_null_value():
    records = [
        {"@odata.etag": "W/\"1\"", "thingid": "a", "score": 1, "note": None, "flag": True},
        {"thingid": "b", "score": 2.5, "note": "x", "flag": False,
         "score@OData.Community.Display.V1.FormattedValue": "2.5"},
    ]
    schema = infer_schema_from_records("things", records)
    types = {c.name: c.sqlite_type for c in schema.columns}
    assert types == {"thingid": "TEXT", "score": "REAL", "note": "TEXT", "flag": "INTEGER"}
    assert schema.primary_key == "thingid"


# -- hostile column names -------------------------------------------------------------------

HOSTILE = ["order", "select", 'a"b', "a'b", "with space", "ünïcödé", "x" * 200, "group",
           "名前", " padded "]


def test_hostile_names_are_kept_as_they_are():
    columns = [Column("thingid", "TEXT"), *(Column(n, "TEXT") for n in HOSTILE)]
    kept, excluded = split_usable_columns(columns)
    assert [c.name for c in kept] == ["thingid", *HOSTILE]
    assert excluded == []


def test_names_sqlite_cannot_tell_apart_are_excluded_with_a_reason():
    columns = [Column(n, "TEXT") for n in
               ["thingid", "Name", "name", "NAME", "JSON_Response", "Sync_Time", "_PK", "",
                "nul\x00key", "Ä", "ä"]]
    kept, excluded = split_usable_columns(columns)
    # SQLite folds ASCII letters only: "Ä" and "ä" are two columns.
    assert [c.name for c in kept] == ["thingid", "Name", "Ä", "ä"]
    reasons = {e.name: e.reason for e in excluded}
    assert set(reasons) == {"name", "NAME", "JSON_Response", "Sync_Time", "_PK", "",
                            "nul\x00key"}
    assert "only in letter case" in reasons["name"] and "'Name'" in reasons["name"]
    assert "sync column 'json_response'" in reasons["JSON_Response"]
    assert "empty" in reasons[""] and "NUL" in reasons["nul\x00key"]
    assert all(r.endswith("kept in json_response only") for r in reasons.values())


def test_every_column_the_sync_adds_is_reserved():
    added = {n for n, _ in SYNC_COLUMNS + HISTORY_COLUMNS} | set(STAGING_META_COLUMNS)
    assert added <= RESERVED_COLUMNS


def test_primary_key_survives_a_case_variant_that_comes_first():
    definition = {"PrimaryIdAttribute": "thingid", "Attributes": [
        {"LogicalName": "THINGID", "AttributeType": "String"},
        {"LogicalName": "thingid", "AttributeType": "Uniqueidentifier"},
    ]}
    schema = schema_from_metadata("things", definition)
    assert schema.column_names == ["thingid"]
    assert [e.name for e in schema.excluded] == ["THINGID"]


def test_primary_key_chain_with_hostile_neighbours():
    assert detect_primary_key("orders", ["order", "orderid", "select"])[0] == "orderid"
    assert detect_primary_key("people", ['a"bid', "zid", "_ownerid_value"])[0] == "zid"


def test_a_field_only_ever_null_is_typed_text_but_marked_unknown():
    schema = infer_schema_from_records("things", [{"thingid": "a", "note": None}])
    assert schema.column("note") == Column("note", "TEXT", None, type_known=False)
    assert Column.from_json(schema.column("note").as_json()) == schema.column("note")


# -- drift ----------------------------------------------------------------------------------

def metadata_schema(*attributes: tuple[str, str]) -> EntitySchema:
    return schema_from_metadata("things", {"PrimaryIdAttribute": "thingid", "Attributes": [
        {"LogicalName": "thingid", "AttributeType": "Uniqueidentifier"},
        *({"LogicalName": n, "AttributeType": t} for n, t in attributes)]})


def changes_by_kind(changes):
    return {(c.kind, c.column): (c.severity, c.locked_type, c.live_type) for c in changes}


def test_metadata_drift_names_the_exact_columns_and_types():
    locked = metadata_schema(("name", "String"), ("score", "Integer"), ("ownerid", "Owner"),
                             ("code", "Picklist"))
    live = metadata_schema(("name", "String"), ("score", "Decimal"), ("code", "Integer"),
                           ("sites", "Integer"), ("Name", "String"))
    assert changes_by_kind(compare_schemas(locked, live)) == {
        ("type_changed", "score"): ("breaking", "INTEGER", "REAL"),
        ("type_changed", "code"): ("info", "INTEGER", "INTEGER"),  # Picklist -> Integer
        ("added", "sites"): ("info", None, "INTEGER"),
        ("excluded", "Name"): ("info", None, "TEXT"),
        ("removed", "_ownerid_value"): ("breaking", "TEXT", None),
    }
    assert compare_schemas(locked, locked) == []


def test_which_case_variant_the_live_side_kept_does_not_matter():
    locked = metadata_schema(("name", "String"))
    live = metadata_schema(("Name", "String"), ("name", "String"))
    assert changes_by_kind(compare_schemas(locked, live)) == {
        ("excluded", "Name"): ("info", None, "TEXT")}


def test_record_drift_ignores_nulls_and_whole_numbers_in_a_real_column():
    locked = infer_schema_from_records("things", [
        {"thingid": "a", "score": 1.5, "count": 2, "note": "x", "later": None}])
    live = infer_schema_from_records("things", [
        {"thingid": "b", "score": 2, "count": 2.5, "note": None, "later": 7, "new": None}])
    assert changes_by_kind(compare_schemas(locked, live)) == {
        ("type_changed", "count"): ("info", "INTEGER", "REAL"),
        ("type_changed", "later"): ("info", "TEXT", "INTEGER"),  # locked while only null
        ("added", "new"): ("info", None, None),
    }
    live = infer_schema_from_records("things", [{"thingid": "b", "score": "n/a"}])
    assert changes_by_kind(compare_schemas(locked, live)) == {
        ("type_changed", "score"): ("breaking", "REAL", "TEXT"),
        ("removed", "count"): ("breaking", "INTEGER", None),
        ("removed", "note"): ("breaking", "TEXT", None),
        ("removed", "later"): ("breaking", "TEXT", None),
    }


# -- freshness ------------------------------------------------------------------------------

def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize(("last", "now", "fresh", "due"), [
    # hourly, 30 minutes' grace: at 10:20 the 09:00 tick must be covered, at 10:31 the 10:00 one
    ("2026-01-01T09:05:00+00:00", "2026-01-01T10:20:00+00:00", True, "2026-01-01T09:00:00+00:00"),
    ("2026-01-01T09:05:00+00:00", "2026-01-01T10:31:00+00:00", False, "2026-01-01T10:00:00+00:00"),
    ("2026-01-01T10:12:00+00:00", "2026-01-01T10:31:00+00:00", True, "2026-01-01T10:00:00+00:00"),
    (None, "2026-01-01T10:31:00+00:00", False, "2026-01-01T10:00:00+00:00"),
])
def test_freshness_follows_the_groups_cron(last, now, fresh, due):
    status = freshness_status("0 * * * *", at(last) if last else None, at(now),
                              timedelta(minutes=30))
    assert (status.fresh, status.due_tick) == (fresh, at(due))


def test_daily_freshness_allows_a_day_between_ticks():
    status = freshness_status("30 2 * * *", at("2026-01-01T02:40:00+00:00"),
                              at("2026-01-02T02:59:00+00:00"), timedelta(minutes=30))
    assert status.fresh and status.due_tick == at("2026-01-01T02:30:00+00:00")
    status = freshness_status("30 2 * * *", at("2026-01-01T02:40:00+00:00"),
                              at("2026-01-02T03:01:00+00:00"), timedelta(minutes=30))
    assert not status.fresh
