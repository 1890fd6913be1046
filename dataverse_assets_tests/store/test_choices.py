"""Attribute metadata as the mirror stores it: labels of every choice kind in each language,
lookup targets, option changes since the last metadata, and what a malformed answer does."""

import sqlite3

from dataverse_assets.store.choices import (
    ensure_choice_tables,
    label_counts,
    option_changes,
    parse_attribute_metadata,
    store_attribute_metadata,
    stored_metadata,
)


def label(*pairs):
    localized = [{"Label": text, "LanguageCode": code} for code, text in pairs]
    return {"LocalizedLabels": localized, "UserLocalizedLabel": localized[0] if localized else None}


def option(value, *pairs, **extra):
    return {"Value": value, "Label": label(*pairs), **extra}


def metadata(industry=None, status=None):
    industry = industry or [option(1, (1033, "Accounting"), (1031, "Buchhaltung")),
                            option(7, (1033, "Consulting"))]
    status = status or [option(1, (1033, "Active"), (1031, "Aktiv"), State=0),
                        option(2, (1033, "Inactive"), State=1)]
    return {
        "organization": {"value": [{"languagecode": 1033}]},
        "Picklist": {"value": [
            {"LogicalName": "industrycode", "OptionSet": {
                "Name": "account_industrycode", "IsGlobal": False, "Options": industry},
             "GlobalOptionSet": None},
            {"LogicalName": "vin_priority", "OptionSet": None, "GlobalOptionSet": {
                "Name": "vin_priority", "IsGlobal": True,
                "Options": [option(100000000, (1033, "Low")), option(100000001, (1033, "High"))]}},
        ]},
        "MultiSelectPicklist": {"value": [
            {"LogicalName": "vin_areas", "OptionSet": {
                "Name": "vin_area", "IsGlobal": True,
                "Options": [option(3, (1033, "Oncology")), option(1, (1033, "Cardiology"))]},
             "GlobalOptionSet": {"Name": "vin_area", "IsGlobal": True}},
        ]},
        "Status": {"value": [{"LogicalName": "statuscode", "OptionSet": {
            "Name": "account_statuscode", "IsGlobal": False, "Options": status}}]},
        "Boolean": {"value": [{"LogicalName": "donotphone", "OptionSet": {
            "Name": "account_donotphone", "IsGlobal": False,
            "TrueOption": option(1, (1033, "Do Not Allow")),
            "FalseOption": option(0, (1033, "Allow"))}}]},
        "Lookup": {"value": [
            {"LogicalName": "parentcustomerid", "Targets": ["account", "contact"]},
            {"LogicalName": "ownerid", "Targets": ["systemuser", "team"]}]},
        "DateTime": {"value": [
            {"LogicalName": "birthdate", "Format": "DateOnly",
             "DateTimeBehavior": {"Value": "DateOnly"}},
            {"LogicalName": "createdon", "Format": "DateAndTime",
             "DateTimeBehavior": {"Value": "UserLocal"}}]},
        "EntitySets": {"value": [{"LogicalName": "account", "EntitySetName": "accounts"},
                                 {"LogicalName": "contact", "EntitySetName": "contacts"}]},
    }


def test_every_choice_kind_parses_with_its_languages_state_and_global_set():
    parsed = parse_attribute_metadata(metadata())
    assert parsed.base_language_code == 1033
    assert parsed.choice_columns == {"industrycode": "Picklist", "vin_priority": "Picklist",
                                     "vin_areas": "MultiSelectPicklist",
                                     "statuscode": "Status", "donotphone": "Boolean"}
    by_key = {(o.attribute, o.value): o for o in parsed.options}
    assert by_key[("industrycode", 1)].labels == ((1033, "Accounting"), (1031, "Buchhaltung"))
    assert not by_key[("industrycode", 1)].is_global
    assert by_key[("vin_priority", 100000001)].is_global
    assert by_key[("vin_priority", 100000001)].option_set_name == "vin_priority"
    assert by_key[("statuscode", 2)].state_value == 1
    assert (by_key[("donotphone", 0)].labels, by_key[("donotphone", 1)].labels) == (
        ((1033, "Allow"),), ((1033, "Do Not Allow"),))
    # Option order is the set's order, not the values' (labels of a multi-select join in it).
    assert [o.value for o in parsed.options if o.attribute == "vin_areas"] == [3, 1]
    assert parsed.lookups == {"parentcustomerid": ["account", "contact"],
                              "ownerid": ["systemuser", "team"]}
    assert parsed.date_only == ["birthdate"]
    assert parsed.entity_sets == {"account": "accounts", "contact": "contacts"}
    assert parsed.skipped == 0


def test_a_malformed_answer_is_skipped_and_counted_never_guessed():
    raw = metadata()
    raw["Picklist"]["value"].append({"LogicalName": "broken", "OptionSet": "not an object"})
    raw["Picklist"]["value"][0]["OptionSet"]["Options"].append({"Value": "7", "Label": {}})
    raw["Status"] = ["not", "odata"]
    raw["Lookup"]["value"].append({"LogicalName": 5, "Targets": ["x"]})
    parsed = parse_attribute_metadata(raw)
    assert "broken" not in parsed.choice_columns and "statuscode" not in parsed.choice_columns
    assert parsed.skipped == 3
    assert {(o.attribute, o.value) for o in parsed.options if o.attribute == "industrycode"} == {
        ("industrycode", 1), ("industrycode", 7)}
    assert parse_attribute_metadata("nonsense").choice_columns == {}


def stored(connection, raw, change_set):
    parsed = parse_attribute_metadata(raw)
    changes = option_changes(connection, "accounts", parsed)
    written = store_attribute_metadata(connection, "accounts", change_set, raw, parsed,
                                       {a: f"_{a}_value" for a in parsed.lookups})
    return changes, written


def test_unchanged_metadata_writes_nothing_and_a_change_says_which_options(tmp_path):
    connection = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    ensure_choice_tables(connection)
    assert stored(connection, metadata(), "20260101T000000Z") == ([], True)
    rows = connection.execute("SELECT count(*) FROM _choice_labels").fetchone()[0]
    assert rows == 12  # industry 2+1, priority 2, areas 2, status 2+1, boolean 2
    assert stored(connection, metadata(), "20260102T000000Z") == ([], False)
    assert stored_metadata(connection, "accounts")["change_set"] == "20260101T000000Z"
    relabelled = metadata(
        industry=[option(1, (1033, "Accountancy")), option(9, (1033, "Design"))])
    changes, written = stored(connection, relabelled, "20260103T000000Z")
    assert written
    assert [(c.kind, c.attribute, c.value, c.before, c.after) for c in changes] == [
        ("option_relabelled", "industrycode", 1, "Accounting", "Accountancy"),
        ("option_removed", "industrycode", 7, "Consulting", None),
        ("option_added", "industrycode", 9, None, "Design"),
    ]
    assert connection.execute(
        "SELECT label FROM _choice_labels WHERE attribute = 'industrycode' AND option_value = 1"
        " AND language_code = 1033").fetchone() == ("Accountancy",)
    # German labels of the old set are gone with it: the table is what the source says now.
    assert connection.execute(
        "SELECT count(*) FROM _choice_labels WHERE attribute = 'industrycode'"
        " AND language_code = 1031").fetchone() == (0,)
    assert connection.execute(
        "SELECT target_entity FROM _lookup_targets WHERE attribute = 'parentcustomerid'"
        " ORDER BY 1").fetchall() == [("accounts",), ("contacts",)]
    assert connection.execute(
        "SELECT target_entity, target_logical_name FROM _lookup_targets"
        " WHERE attribute = 'ownerid' ORDER BY 2").fetchall() == [
        (None, "systemuser"), (None, "team")]
    assert label_counts(connection) == {"accounts": (5, 11)}
