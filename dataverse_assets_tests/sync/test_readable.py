"""The readable side of a published change set, on a hand-made archive: choice labels in the
view, multi-select child tables exact through updates and deletes, lookup names and tables,
calendar dates unshifted, the label language chosen in the config."""


import pytest

from dataverse_assets.archive.change_sets import (
    ATTRIBUTE_METADATA,
    ENTITY_DEFINITION,
)
from dataverse_assets.config import EntityConfig, LabelsConfig
from dataverse_assets_tests.helpers import stage_and_publish
from dataverse_assets_tests.store.test_choices import option


@pytest.fixture
def store(each_store):
    """Every test here runs in each kind of store (docs/store-backends.md)."""
    return each_store

DEFINITION = {
    "LogicalName": "thing", "EntitySetName": "things", "PrimaryIdAttribute": "thingid",
    "Attributes": [
        {"LogicalName": "thingid", "AttributeType": "Uniqueidentifier"},
        {"LogicalName": "name", "AttributeType": "String"},
        {"LogicalName": "statuscode", "AttributeType": "Status"},
        {"LogicalName": "areas", "AttributeType": "Virtual",
         "AttributeTypeName": {"Value": "MultiSelectPicklistType"}},
        {"LogicalName": "areasname", "AttributeType": "Virtual",
         "AttributeTypeName": {"Value": "VirtualType"}},
        {"LogicalName": "ownerid", "AttributeType": "Owner"},
        {"LogicalName": "accountid", "AttributeType": "Lookup"},
        {"LogicalName": "birthdate", "AttributeType": "DateTime"},
    ],
}


def attribute_metadata(active="Active"):
    return {
        "organization": {"value": [{"languagecode": 1033}]},
        "Status": {"value": [{"LogicalName": "statuscode", "OptionSet": {
            "Name": "thing_statuscode", "IsGlobal": False,
            "Options": [option(1, (1033, active), (1031, "Aktiv"), State=0),
                        option(2, (1033, "Inactive"), (1031, "Inaktiv"), State=1)]}}]},
        "MultiSelectPicklist": {"value": [{"LogicalName": "areas", "GlobalOptionSet": {
            "Name": "area", "IsGlobal": True,
            "Options": [option(30, (1033, "Oncology")), option(10, (1033, "Cardiology")),
                        option(20, (1033, "Neurology"))]}}]},
        "Lookup": {"value": [{"LogicalName": "ownerid", "Targets": ["systemuser", "team"]},
                             {"LogicalName": "accountid", "Targets": ["account"]}]},
        "DateTime": {"value": [{"LogicalName": "birthdate", "Format": "DateOnly",
                                "DateTimeBehavior": {"Value": "DateOnly"}}]},
        "EntitySets": {"value": [{"LogicalName": "systemuser", "EntitySetName": "systemusers"},
                                 {"LogicalName": "team", "EntitySetName": "teams"},
                                 {"LogicalName": "account", "EntitySetName": "accounts"}]},
    }


def record(n, areas, owner_table="systemuser", status=1):
    return {
        "@odata.etag": f'W/"{n}"', "thingid": f"id-{n}", "name": f"thing {n}",
        "statuscode@OData.Community.Display.V1.FormattedValue": "whatever the server says",
        "statuscode": status, "areas": areas,
        "_ownerid_value@OData.Community.Display.V1.FormattedValue": f"Owner {n}",
        "_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname": owner_table,
        "_ownerid_value": f"owner-{n}",
        "_accountid_value": None if n == 2 else f"account-{n}",
        "birthdate": "1990-01-31",
    }


def publish_records(store, change_set, records, metadata=None, entity=None):
    return stage_and_publish(
        store, change_set, records,
        entity or EntityConfig(name="things", group="daily", incremental="full"),
        files={ENTITY_DEFINITION: DEFINITION,
               ATTRIBUTE_METADATA: metadata or attribute_metadata()})


def view(store, columns):
    with store.connection() as connection:
        return connection.execute(
            f"SELECT thingid, {columns} FROM things__readable ORDER BY thingid").fetchall()


def test_the_view_shows_labels_lookup_names_and_tables_and_dates_as_sent(store):
    publish_records(store, "20260101T000000Z", [
        record(1, "10,30"), record(2, None, owner_table="team", status=2), record(3, "")])
    assert view(store, "statuscode_label, areas_labels, ownerid_name, ownerid_table,"
                       " accountid_table, birthdate") == [
        # Labels in option order (Oncology is listed before Cardiology), "; "-joined.
        ("id-1", "Active", "Oncology; Cardiology", "Owner 1", "systemusers", "accounts",
         "1990-01-31"),
        # A polymorphic lookup's table is the row's own annotation; a null lookup has none.
        ("id-2", "Inactive", None, "Owner 2", "teams", None, "1990-01-31"),
        ("id-3", "Active", None, "Owner 3", "systemusers", "accounts", "1990-01-31"),
    ]
    # Every column of the table is in the view as well.
    assert view(store, "name, statuscode, areas, _ownerid_value")[0] == (
        "id-1", "thing 1", 1, "10,30", "owner-1")


def test_multi_select_child_rows_follow_every_update_and_delete_and_history_keeps_the_old(
        store):
    publish_records(store, "20260101T000000Z", [record(1, "10,30"), record(2, "20")])
    # id-1 drops Cardiology and gains Neurology; id-2 is deleted (not in the snapshot).
    publish_records(store, "20260102T000000Z", [record(1, "30,20"), record(4, "10")])
    with store.connection() as connection:
        assert connection.execute(
            "SELECT record_id, option_value FROM things__areas ORDER BY 1, 2").fetchall() == [
            ("id-1", 20), ("id-1", 30), ("id-4", 10)]
        assert connection.execute(
            "SELECT thingid, areas, change_kind FROM things__history ORDER BY 1").fetchall() == [
            ("id-1", "10,30", "update"), ("id-2", "20", "delete")]
    assert view(store, "areas_labels") == [("id-1", "Oncology; Neurology"),
                                           ("id-4", "Cardiology")]


def test_a_relabelled_option_shows_at_once_and_is_reported_as_drift(store):
    publish_records(store, "20260101T000000Z", [record(1, "10")])
    result = publish_records(store, "20260102T000000Z", [record(1, "10")],
                             metadata=attribute_metadata(active="Open"))
    # Only the label changed: no row was written again.
    assert (result.updated, result.unchanged) == (0, 1)
    assert view(store, "statuscode_label") == [("id-1", "Open")]
    with store.connection() as connection:
        assert connection.execute(
            "SELECT kind, column_name, severity, detail FROM _schema_drift"
            " WHERE change_set = '20260102T000000Z'").fetchall() == [
            ("option_relabelled", "statuscode=1", "info", "statuscode 1: 'Active' -> 'Open'")]


def test_the_label_language_comes_from_the_config(store):
    german = EntityConfig(name="things", group="daily", incremental="full",
                          labels=LabelsConfig(language_code=1031))
    publish_records(store, "20260101T000000Z", [record(1, "10"), record(2, "10", status=2)],
                    entity=german)
    assert view(store, "statuscode_label") == [("id-1", "Aktiv"), ("id-2", "Inaktiv")]
    publish_records(store, "20260102T000000Z", [record(1, "10"), record(2, "10", status=2)])
    assert view(store, "statuscode_label") == [("id-1", "Active"), ("id-2", "Inactive")]


def test_a_first_publish_of_many_rows_fills_the_child_table_too(store):
    records = [record(n, "10,20,30" if n % 2 else "20") for n in range(1, 301)]
    publish_records(store, "20260101T000000Z", records)
    with store.connection() as connection:
        assert connection.execute("SELECT count(*) FROM things__areas").fetchone() == (
            150 * 3 + 150,)

