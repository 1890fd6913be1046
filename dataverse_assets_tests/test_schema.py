import pytest

from dataverse_assets.schema import (
    detect_primary_key,
    infer_schema_from_records,
    schema_from_metadata,
    singular,
)


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
