"""Only the data the user wants: `select` and `filter` in the entities file, checked when they
meet the table's metadata and carried by every query of a change set."""

import re

import pytest

from dataverse_assets.config import EntityConfig, parse_entities_config
from dataverse_assets.errors import ConfigError, FetchConfigError
from dataverse_assets.modes import Mode
from dataverse_assets.sync.fetch_plan import plan_fetch, resync_request

DEFINITION = {
    "LogicalName": "account", "EntitySetName": "accounts", "PrimaryIdAttribute": "accountid",
    "ChangeTrackingEnabled": True,
    "Attributes": [
        {"LogicalName": "accountid", "AttributeType": "Uniqueidentifier"},
        {"LogicalName": "name", "AttributeType": "String"},
        {"LogicalName": "emailaddress1", "AttributeType": "String"},
        {"LogicalName": "statecode", "AttributeType": "State"},
        {"LogicalName": "statecodename", "AttributeType": "Virtual"},
        {"LogicalName": "primarycontactid", "AttributeType": "Lookup"},
        {"LogicalName": "modifiedon", "AttributeType": "DateTime"},
        {"LogicalName": "versionnumber", "AttributeType": "BigInt"},
    ],
}


def entity(**fields):
    return EntityConfig(name="accounts", group="daily", **fields)


def test_select_asks_for_row_keys_with_the_key_and_version_columns_always():
    request = plan_fetch(entity(select=["name", "primarycontactid"]), "20260101T000000Z",
                         DEFINITION, watermark=None)
    assert request.select == ["accountid", "name", "_primarycontactid_value", "modifiedon",
                              "versionnumber"]
    assert all(step.query.params()["$select"] == ",".join(request.select)
               for step in request.steps if step.kind != "keys")
    # A lookup named by its column is the same column.
    again = plan_fetch(entity(select=["_primarycontactid_value"]), "20260101T000000Z",
                       DEFINITION, watermark=None)
    assert "_primarycontactid_value" in again.select


@pytest.mark.parametrize(("select", "message"), [
    (["emailadress1"], "'select' names 'emailadress1', which is not a column of account "
                       "(did you mean 'emailaddress1'?)"),
    (["statecodename"], "'select' names 'statecodename', a Virtual attribute"),
])
def test_a_select_the_metadata_does_not_know_is_one_line_naming_it(select, message):
    with pytest.raises(FetchConfigError, match=re.escape(message)):
        plan_fetch(entity(select=select), "20260101T000000Z", DEFINITION, watermark=None)


def test_a_filter_goes_into_every_query_and_turns_change_tracking_into_modifiedon():
    plain = plan_fetch(entity(), "20260101T000000Z", DEFINITION, watermark=None)
    assert plain.mode == Mode.INITIAL
    request = plan_fetch(entity(filter="statecode eq 0", reconcile_every_hours=1.0),
                         "20260102T000000Z", DEFINITION, watermark="2026-01-01T00:00:00Z",
                         reconcile=True)
    assert request.mode == Mode.MODIFIEDON and request.row_filter == "statecode eq 0"
    filters = {step.kind: step.query.params()["$filter"] for step in request.steps}
    # The key scan too: a record that leaves the filter is then missing from it, and deleted.
    assert filters == {
        "keys": "(statecode eq 0)",
        "changes": "(statecode eq 0) and (modifiedon ge 2026-01-01T00:00:00Z)",
    }
    targeted = plan_fetch(entity(filter="statecode eq 0"), "20260103T000000Z", DEFINITION,
                          watermark=None,
                          targeted_ids=["00000000-0000-0000-0000-000000000001"])
    assert targeted.steps[0].query.params()["$filter"].startswith("(statecode eq 0) and (")


def test_a_resync_after_an_expired_delta_token_reads_only_the_selected_columns():
    """The full read that replaces an expired delta token is a read like any other: the
    selected columns (no deselected personal data comes back) and the annotations."""
    request = plan_fetch(entity(select=["name"]), "20260102T000000Z", DEFINITION,
                         watermark="2026-01-01T00:00:00Z",
                         delta_link="https://org.example/api/data/v9.2/accounts?$deltatoken=1")
    resync = resync_request(request, page_size=100)
    (step,) = resync.steps
    assert step.query.params()["$select"] == "accountid,name,modifiedon,versionnumber"
    assert step.query.include_annotations and resync.select == request.select


@pytest.mark.parametrize(("fields", "message"), [
    ({"filter": " "}, "is empty"),
    ({"filter": "statecode eq 0\nor 1 eq 1"}, "control character"),
    ({"filter": "statecode eq 0", "incremental": "change_tracking"}, "takes no \\$filter"),
    ({"select": ["name", "Name"]}, "'Name' is listed twice"),
    ({"select": ["name; drop"]}, "select"),
])
def test_a_bad_select_or_filter_is_refused_when_the_file_loads(fields, message):
    raw = {"groups": {"daily": {"cron": "0 3 * * *"}},
           "entities": [{"name": "accounts", "group": "daily", **fields}]}
    with pytest.raises(ConfigError, match=message):
        parse_entities_config(raw)
