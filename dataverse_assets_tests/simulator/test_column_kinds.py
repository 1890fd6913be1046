"""The simulator's choices, multi-select, polymorphic lookups, dates, money, images and files:
what a client sees over HTTP, as the Dataverse Web API serves it."""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dataverse_assets.simulator import (
    DataverseSimulator,
    FaultPlan,
    serve_on_loopback,
)
from dataverse_assets.simulator.model import CURRENCIES, money_base

from .test_simulator import (
    ALL_ENTITIES,
    API,
    SMALL_COUNTS,
    api_client,
    error_of,
    fetch_token,
    follow,
    truth_ids,
)

FORMATTED = "@OData.Community.Display.V1.FormattedValue"
LOGICAL = "@Microsoft.Dynamics.CRM.lookuplogicalname"
ANNOTATIONS = 'odata.include-annotations="*"'
CRM = "Microsoft.Dynamics.CRM."
GUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def small() -> Iterator[tuple[DataverseSimulator, str, httpx.Client]]:
    """A small org served over loopback; tests using it must not change it."""
    sim = DataverseSimulator(ALL_ENTITIES, seed=7, row_counts=SMALL_COUNTS)
    with serve_on_loopback(sim) as base, api_client(base, fetch_token(base)) as client:
        yield sim, base, client


@pytest.fixture()
def own() -> Iterator[tuple[DataverseSimulator, str, httpx.Client]]:
    """A small org of its own, for tests that change it."""
    sim = DataverseSimulator(ALL_ENTITIES, seed=7, row_counts=SMALL_COUNTS)
    with serve_on_loopback(sim, control=True) as base, api_client(
        base, fetch_token(base)
    ) as client:
        yield sim, base, client


def attributes_of(client: httpx.Client, entity: str, cast: str | None = None,
                  **params: str) -> httpx.Response:
    path = f"{API}/EntityDefinitions(LogicalName='{entity}')/Attributes"
    return client.get(path + (f"/{CRM}{cast}" if cast else ""), params=params)


def by_name(response: httpx.Response) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {item["LogicalName"]: item for item in response.json()["value"]}


def labels(label: dict[str, Any]) -> dict[int, str]:
    return {item["LanguageCode"]: item["Label"] for item in label["LocalizedLabels"]}


def annotated(client: httpx.Client, entity_set: str, **params: str) -> list[dict[str, Any]]:
    rows, _ = follow(client, f"{API}/{entity_set}", params=params,
                     prefer=f"{ANNOTATIONS},odata.maxpagesize=500")
    return rows


# ---------------------------------------------------------------------------------------------
# The seeded org: existing columns keep their values
# ---------------------------------------------------------------------------------------------

# Recorded from the simulator before these columns existed (seed 7, SMALL_COUNTS): a digest of
# every row of every table over the columns rows had then. Three of them changed shape, as
# asked: birthdate and vin_startdate became DateOnly (the same day, without its time), and
# parentcustomerid now points at a contact in some rows (those compare as null here).
_DIGESTS_BEFORE = {
    "accounts": "12072ba18c08fa3f",
    "contacts": "8e88326bdc4a45de",
    "systemusers": "0de31c654e52ff85",
    "businessunits": "c0afe970350f8099",
    "teams": "7fdce300ff1d79b5",
    "vin_candidates": "a433e5dcc8463aca",
    "vin_clinicaltrials": "2284f6335046cffd",
    "vin_vin_candidate_accountset": "93be12d3668104d5",
    "vin_vin_clinicaltrial_contactset": "7697ac03957ca5ca",
    "vin_vin_candidate_clinicaltrialset": "9077b65bcea486c9",
}
_NEW_COLUMNS = {
    "accounts": {"_transactioncurrencyid_value", "exchangerate", "revenue_base"},
    "contacts": {"entityimageid", "entityimage_timestamp", "entityimage_url"},
    "vin_candidates": {"vin_therapeuticareas", "_vin_regardingobjectid_value", "vin_resume",
                       "vin_resume_name"},
    "vin_clinicaltrials": {"vin_therapeuticarea"},
}


def test_existing_columns_keep_their_values_for_a_seed() -> None:
    sim = DataverseSimulator(ALL_ENTITIES, seed=7, row_counts=SMALL_COUNTS)
    assert sim.version == 1495  # as many versions issued as before: etags are unchanged
    first = sim.records("accounts")[0]
    assert (first["@odata.etag"], first["accountid"], first["name"], first["revenue"],
            first["industrycode"], first["modifiedon"]) == (
        'W/"1053"', "05fd5656-f85e-4675-9350-0444a6396ab0", "Trey Research AG 92",
        1575452.9761, 7, "2024-06-25T08:14:06Z")
    repointed = 0
    for name in ALL_ENTITIES:
        rows = []
        for row in sim.records(name):
            new = _NEW_COLUMNS.get(name, set())
            if new:  # after the columns rows had before
                assert set(list(row)[-len(new):]) == new, name
            kept = {k: v for k, v in row.items() if k not in new}
            if name == "contacts" and sim.lookup_target(
                    name, row["contactid"], "_parentcustomerid_value") == "contact":
                kept["_parentcustomerid_value"] = None
                repointed += 1
            rows.append(kept)
        text = json.dumps(rows, ensure_ascii=False)
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == _DIGESTS_BEFORE[name], name
    assert repointed > 0


def test_new_columns_are_deterministic_for_a_seed_and_lazy_tables_have_them() -> None:
    a = DataverseSimulator(ALL_ENTITIES, seed=3, row_counts=SMALL_COUNTS)
    b = DataverseSimulator(list(reversed(ALL_ENTITIES)), seed=3, row_counts=SMALL_COUNTS)
    for name in ("accounts", "contacts", "vin_candidates", "vin_clinicaltrials"):
        assert a.records(name) == b.records(name), name
    lazy = DataverseSimulator(ALL_ENTITIES, seed=3, row_counts={**SMALL_COUNTS,
                                                                "contacts": 3000},
                              lazy_entities=["accounts", "contacts"])
    contacts = lazy.records("contacts")
    assert len(contacts) == 3000
    assert all(set(c) == {"@odata.etag", *lazy.spec("contacts").columns} for c in contacts)
    accounts, people = set(truth_ids(lazy, "accounts")), set(truth_ids(lazy, "contacts"))
    for contact in contacts[:500]:
        value = contact["_parentcustomerid_value"]
        if value is not None:
            target = lazy.lookup_target("contacts", contact["contactid"],
                                        "_parentcustomerid_value")
            assert value in {"account": accounts, "contact": people}[target]
    for account in lazy.records("accounts"):
        assert account["revenue_base"] == money_base(account["revenue"], account["exchangerate"])


# ---------------------------------------------------------------------------------------------
# Choice metadata: option sets, labels in two languages
# ---------------------------------------------------------------------------------------------


def test_a_picklist_has_a_local_option_set_with_labels_in_two_languages(
    small: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    _, base, client = small
    response = attributes_of(client, "account", "PicklistAttributeMetadata",
                             **{"$select": "LogicalName", "$expand": "OptionSet,GlobalOptionSet"})
    body = response.json()
    assert body["@odata.context"] == (
        f"{base}{API}/$metadata#EntityDefinitions('account')/Attributes/"
        f"{CRM}PicklistAttributeMetadata(LogicalName,OptionSet,GlobalOptionSet)")
    items = by_name(response)
    assert set(items) == {"industrycode"}  # only Picklist attributes
    industry = items["industrycode"]
    assert set(industry) == {"LogicalName", "MetadataId", "OptionSet", "GlobalOptionSet"}
    assert industry["GlobalOptionSet"] is None
    option_set = industry["OptionSet"]
    assert (option_set["Name"], option_set["IsGlobal"], option_set["OptionSetType"],
            option_set["IsCustomOptionSet"]) == ("account_industrycode", False, "Picklist", False)
    options = {o["Value"]: o for o in option_set["Options"]}
    assert labels(options[1]["Label"]) == {1033: "Accounting", 1031: "Buchhaltung"}
    assert labels(options[2]["Label"]) == {
        1033: "Agriculture and Non-petrol Natural Resource Extraction"}  # no German label
    localized = options[1]["Label"]["LocalizedLabels"][0]
    assert set(localized) == {"Label", "LanguageCode", "IsManaged", "MetadataId", "HasChanged"}
    assert GUID_RE.match(localized["MetadataId"]) and localized["HasChanged"] is None
    assert options[1]["Label"]["UserLocalizedLabel"] == localized
    assert {"Value", "Label", "Description", "Color", "IsManaged", "MetadataId",
            "HasChanged"} <= set(options[1])
    custom = by_name(attributes_of(client, "vin_candidate", "PicklistAttributeMetadata",
                                   **{"$expand": "OptionSet"}))["vin_stage"]["OptionSet"]
    assert (custom["Name"], custom["IsCustomOptionSet"], custom["IsManaged"]) == (
        "vin_candidate_vin_stage", True, False)


def test_user_localized_label_is_in_the_callers_language_else_the_base_language(
    own: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = own
    sim.user_language_code = 1031
    options = {o["Value"]: o for o in by_name(attributes_of(
        client, "account", "PicklistAttributeMetadata", **{"$expand": "OptionSet"})
    )["industrycode"]["OptionSet"]["Options"]}
    assert options[1]["Label"]["UserLocalizedLabel"]["Label"] == "Buchhaltung"
    assert options[1]["Label"]["UserLocalizedLabel"]["LanguageCode"] == 1031
    fallback = options[2]["Label"]["UserLocalizedLabel"]
    assert (fallback["LanguageCode"], fallback["Label"]) == (
        1033, "Agriculture and Non-petrol Natural Resource Extraction")
    rows = annotated(client, "contacts", **{"$select": "statecode"})
    assert {r[f"statecode{FORMATTED}"] for r in rows} == {"Aktiv", "Inaktiv"}


def test_a_global_option_set_is_shared_by_two_tables(
    own: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = own
    params = {"$select": "LogicalName", "$expand": "OptionSet,GlobalOptionSet"}
    single = by_name(attributes_of(client, "vin_clinicaltrial", "PicklistAttributeMetadata",
                                   **params))["vin_therapeuticarea"]
    multi = by_name(attributes_of(client, "vin_candidate",
                                  "MultiSelectPicklistAttributeMetadata",
                                  **params))["vin_therapeuticareas"]
    for item in (single, multi):
        assert item["OptionSet"] == item["GlobalOptionSet"]
        assert (item["GlobalOptionSet"]["Name"], item["GlobalOptionSet"]["IsGlobal"]) == (
            "vin_therapeuticarea", True)
    assert single["GlobalOptionSet"] == multi["GlobalOptionSet"]
    oncology = single["GlobalOptionSet"]["Options"][0]
    assert (oncology["Value"], labels(oncology["Label"])) == (
        100000000, {1033: "Oncology", 1031: "Onkologie"})
    # As Microsoft's docs describe it: the set in GlobalOptionSet only.
    sim.option_set_null_when_global = True
    docs = by_name(attributes_of(client, "vin_clinicaltrial", "PicklistAttributeMetadata",
                                 **params))["vin_therapeuticarea"]
    assert docs["OptionSet"] is None and docs["GlobalOptionSet"] == single["GlobalOptionSet"]
    local = by_name(attributes_of(client, "vin_clinicaltrial", "PicklistAttributeMetadata",
                                  **params))["vin_phase"]
    assert local["OptionSet"]["Name"] == "vin_clinicaltrial_vin_phase"


def test_state_options_name_their_default_status_and_status_options_their_state(
    small: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    _, _, client = small
    expand = {"$select": "LogicalName", "$expand": "OptionSet($select=Options)"}
    state = by_name(attributes_of(client, "contact", "StateAttributeMetadata", **expand))
    assert set(state) == {"statecode"}
    state_set = state["statecode"]["OptionSet"]
    assert set(state_set) == {"Options", "MetadataId"}
    states = {o["Value"]: o for o in state_set["Options"]}
    assert states[0]["@odata.type"] == f"#{CRM}StateOptionMetadata"
    assert (states[0]["DefaultStatus"], states[0]["InvariantName"]) == (1, "Active")
    assert (states[1]["DefaultStatus"], states[1]["InvariantName"]) == (2, "Inactive")
    assert labels(states[1]["Label"]) == {1033: "Inactive", 1031: "Inaktiv"}
    status = by_name(attributes_of(client, "contact", "StatusAttributeMetadata", **expand))
    statuses = {o["Value"]: o for o in status["statuscode"]["OptionSet"]["Options"]}
    assert statuses[2]["@odata.type"] == f"#{CRM}StatusOptionMetadata"
    assert {v: o["State"] for v, o in statuses.items()} == {1: 0, 2: 1}
    assert labels(statuses[1]["Label"]) == {1033: "Active", 1031: "Aktiv"}


def test_a_boolean_has_a_true_and_a_false_option(
    small: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    _, _, client = small
    items = by_name(attributes_of(client, "vin_candidate", "BooleanAttributeMetadata",
                                  **{"$select": "LogicalName",
                                     "$expand": "OptionSet,GlobalOptionSet"}))
    assert set(items) == {"vin_enrolled"}
    option_set = items["vin_enrolled"]["OptionSet"]
    assert items["vin_enrolled"]["GlobalOptionSet"] is None
    assert option_set["OptionSetType"] == "Boolean" and "Options" not in option_set
    assert (option_set["TrueOption"]["Value"], option_set["FalseOption"]["Value"]) == (1, 0)
    assert labels(option_set["TrueOption"]["Label"]) == {1033: "Yes", 1031: "Ja"}
    assert labels(option_set["FalseOption"]["Label"]) == {1033: "No", 1031: "Nein"}
    only_true = by_name(attributes_of(client, "systemuser", "BooleanAttributeMetadata",
                                      **{"$expand": "OptionSet($select=TrueOption)"}))
    assert set(only_true["isdisabled"]["OptionSet"]) == {"TrueOption", "MetadataId"}


def test_lookup_and_datetime_attributes_by_cast_and_by_metadata_id(
    small: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    _, base, client = small
    lookups = by_name(attributes_of(client, "contact", "LookupAttributeMetadata",
                                    **{"$select": "LogicalName,Targets"}))
    # Customer and Owner columns are LookupAttributeMetadata too.
    assert lookups == {
        "parentcustomerid": {"LogicalName": "parentcustomerid", "Targets": ["account", "contact"],
                             "MetadataId": lookups["parentcustomerid"]["MetadataId"]},
        "ownerid": {"LogicalName": "ownerid", "Targets": ["systemuser", "team"],
                    "MetadataId": lookups["ownerid"]["MetadataId"]},
    }
    full = by_name(attributes_of(client, "contact", "LookupAttributeMetadata"))
    assert full["parentcustomerid"]["AttributeType"] == "Customer"
    assert "@odata.type" not in full["parentcustomerid"]  # the declared type
    dates = by_name(attributes_of(client, "contact", "DateTimeAttributeMetadata",
                                  **{"$select": "LogicalName,Format,DateTimeBehavior"}))
    assert {n: (d["Format"], d["DateTimeBehavior"]) for n, d in dates.items()} == {
        "birthdate": ("DateOnly", {"Value": "DateOnly"}),
        "createdon": ("DateAndTime", {"Value": "UserLocal"}),
        "modifiedon": ("DateAndTime", {"Value": "UserLocal"}),
    }
    entity_id = client.get(f"{API}/EntityDefinitions(LogicalName='vin_clinicaltrial')",
                           params={"$select": "MetadataId"}).json()["MetadataId"]
    response = client.get(
        f"{API}/EntityDefinitions({entity_id})/Attributes/{CRM}DateTimeAttributeMetadata",
        params={"$select": "LogicalName,Format", "$filter": "Format eq 'DateOnly'"})
    assert response.json()["@odata.context"] == (
        f"{base}{API}/$metadata#EntityDefinitions({entity_id})/Attributes/"
        f"{CRM}DateTimeAttributeMetadata(LogicalName,Format)")
    assert list(by_name(response)) == ["vin_startdate"]
    enums = by_name(attributes_of(client, "contact", "EnumAttributeMetadata",
                                  **{"$select": "LogicalName"}))
    # A base class lists every derived one, each naming its own type.
    assert {n: e["@odata.type"] for n, e in enums.items()} == {
        "statecode": f"#{CRM}StateAttributeMetadata",
        "statuscode": f"#{CRM}StatusAttributeMetadata"}
    one = client.get(f"{API}/EntityDefinitions(LogicalName='account')/Attributes"
                     f"(LogicalName='industrycode')/{CRM}PicklistAttributeMetadata",
                     params={"$select": "LogicalName", "$expand": "OptionSet($select=Options)"})
    body = one.json()
    assert body["@odata.context"].endswith(
        "PicklistAttributeMetadata(LogicalName,OptionSet,OptionSet(Options))/$entity")
    assert body["LogicalName"] == "industrycode" and "value" not in body
    assert set(body["OptionSet"]) == {"Options", "MetadataId"}


def test_metadata_requests_dataverse_rejects(
    small: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    _, _, client = small
    unknown = attributes_of(client, "account", "FooAttributeMetadata")
    assert unknown.status_code == 404  # no such type: no such segment
    assert error_of(unknown) == {
        "code": "0x80060888",
        "message": f"Resource not found for the segment '{CRM}FooAttributeMetadata'."}
    unrelated = attributes_of(client, "account", "EntityMetadata")
    assert unrelated.status_code == 400
    assert "neither a base type nor a sub-type" in error_of(unrelated)["message"]
    property_error = attributes_of(client, "account", "PicklistAttributeMetadata",
                                   **{"$select": "LogicalName,Targets"})
    assert property_error.status_code == 400
    assert error_of(property_error)["message"] == (
        f"Could not find a property named 'Targets' on type '{CRM}PicklistAttributeMetadata'.")
    for cast, expand in (("PicklistAttributeMetadata", "Options"),
                         ("LookupAttributeMetadata", "OptionSet")):
        bad = attributes_of(client, "account", cast, **{"$expand": expand})
        assert bad.status_code == 400
        assert error_of(bad)["message"] == (
            f"Could not find a property named '{expand}' on type '{CRM}{cast}'.")
    nested = attributes_of(client, "account", "PicklistAttributeMetadata",
                           **{"$expand": "OptionSet($select=Nope)"})
    assert error_of(nested)["message"] == (
        f"Could not find a property named 'Nope' on type '{CRM}OptionSetMetadata'.")
    missing = attributes_of(client, "nothing", "PicklistAttributeMetadata")
    assert missing.status_code == 404 and error_of(missing)["code"] == "0x80040217"
    no_attribute = client.get(f"{API}/EntityDefinitions(LogicalName='account')/Attributes"
                              f"(LogicalName='nothing')/{CRM}PicklistAttributeMetadata")
    assert no_attribute.status_code == 404
    wrong_class = client.get(f"{API}/EntityDefinitions(LogicalName='account')/Attributes"
                             f"(LogicalName='name')/{CRM}PicklistAttributeMetadata")
    assert wrong_class.status_code == 404


def test_organizations_tells_the_base_language(
    small: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, base, client = small
    response = client.get(f"{API}/organizations", params={"$select": "languagecode"})
    assert response.status_code == 200
    assert response.json() == {
        "@odata.context": f"{base}{API}/$metadata#organizations(languagecode)",
        "value": [{"@odata.etag": 'W/"1000"', "languagecode": 1033,
                   "organizationid": sim.organization_id}],
    }
    assert client.get(f"{API}/organizations",
                      params={"$select": "nope"}).status_code == 400
    service = client.get(f"{API}/").json()["value"]
    assert [s["name"] for s in service] == [*ALL_ENTITIES, "organizations"]
    definitions = client.get(f"{API}/EntityDefinitions",
                             params={"$select": "EntitySetName"}).json()["value"]
    assert {d["EntitySetName"] for d in definitions} == set(ALL_ENTITIES)


# ---------------------------------------------------------------------------------------------
# Rows: multi-select, polymorphic lookups, dates, money, images and files
# ---------------------------------------------------------------------------------------------


def test_multi_select_values_are_comma_separated_and_formatted_with_semicolons(
    own: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = own
    attributes = by_name(attributes_of(client, "vin_candidate"))
    assert attributes["vin_therapeuticareas"]["AttributeType"] == "Virtual"
    assert attributes["vin_therapeuticareas"]["AttributeTypeName"] == {
        "Value": "MultiSelectPicklistType"}
    assert attributes["vin_therapeuticareasname"]["AttributeOf"] == "vin_therapeuticareas"
    names = {1: "Oncology", 2: "Cardiology", 3: "Neurology", 4: "Immunology",
             5: "Rare Diseases"}
    rows = annotated(client, "vin_candidates", **{"$select": "vin_therapeuticareas"})
    assert any(r["vin_therapeuticareas"] is None for r in rows)
    assert any("," in (r["vin_therapeuticareas"] or "") for r in rows)
    for row in rows:
        value = row["vin_therapeuticareas"]
        if value is None:
            assert f"vin_therapeuticareas{FORMATTED}" not in row
            continue
        assert re.fullmatch(r"1000000\d\d(,1000000\d\d)*", value)
        expected = [names[int(v) - 100000000 + 1] for v in sorted(value.split(","))]
        assert row[f"vin_therapeuticareas{FORMATTED}"] == "; ".join(expected)
    pk = rows[0]["vin_candidateid"]
    sim.update("vin_candidates", pk, {"vin_therapeuticareas": [100000004, 100000000]})
    changed = client.get(f"{API}/vin_candidates({pk})", params={"$select": "vin_therapeuticareas"},
                         headers={"Prefer": ANNOTATIONS}).json()
    assert changed["vin_therapeuticareas"] == "100000004,100000000"
    assert changed[f"vin_therapeuticareas{FORMATTED}"] == "Oncology; Rare Diseases"
    sim.update("vin_candidates", pk, {"vin_therapeuticareas": "100000001"})
    assert sim.record("vin_candidates", pk)["vin_therapeuticareas"] == "100000001"


def test_polymorphic_lookups_name_their_real_target(
    small: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = small
    names = {"account": {r["accountid"]: r["name"] for r in sim.records("accounts")},
             "contact": {r["contactid"]: r["fullname"] for r in sim.records("contacts")}}
    for entity_set, column in (("contacts", "_parentcustomerid_value"),
                               ("vin_candidates", "_vin_regardingobjectid_value")):
        rows = annotated(client, entity_set, **{"$select": column})
        seen = set()
        for row in rows:
            value = row[column]
            if value is None:
                assert f"{column}{LOGICAL}" not in row
                continue
            target = row[f"{column}{LOGICAL}"]
            seen.add(target)
            assert value in names[target], (entity_set, value)
            assert row[f"{column}{FORMATTED}"] == names[target][value]
            assert row[f"{column}@Microsoft.Dynamics.CRM.associatednavigationproperty"] == (
                f"{column[1:-6]}_{target}")
        assert seen == {"account", "contact"}, entity_set
    regarding = by_name(attributes_of(client, "vin_candidate", "LookupAttributeMetadata",
                                      **{"$select": "LogicalName,Targets"}))
    assert regarding["vin_regardingobjectid"]["Targets"] == ["account", "contact"]


def test_date_only_columns_are_calendar_dates(
    own: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = own
    rows = annotated(client, "contacts", **{"$select": "birthdate,createdon"})
    born = [r for r in rows if r["birthdate"] is not None]
    assert born and all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["birthdate"]) for r in born)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["createdon"]) for r in rows)
    for row in born:
        year, month, day = row["birthdate"].split("-")
        assert row[f"birthdate{FORMATTED}"] == f"{int(month)}/{int(day)}/{year}"
    for literal in ("1980-01-01", "1980-01-01T00:00:00Z"):
        found, _ = follow(client, f"{API}/contacts", params={
            "$select": "birthdate", "$filter": f"birthdate lt {literal}"})
        assert {r["contactid"] for r in found} == {
            r["contactid"] for r in born if r["birthdate"] < "1980-01-01"}
    day = born[0]["birthdate"]
    exact, _ = follow(client, f"{API}/contacts", params={"$filter": f"birthdate eq {day}"})
    assert born[0]["contactid"] in {r["contactid"] for r in exact}
    ordered, _ = follow(client, f"{API}/contacts", params={
        "$select": "birthdate", "$orderby": "birthdate desc,contactid asc"},
        prefer="odata.maxpagesize=7")
    values = [r["birthdate"] for r in ordered if r["birthdate"] is not None]
    assert values == sorted(values, reverse=True)
    trials = sim.records("vin_clinicaltrials")
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", t["vin_startdate"]) for t in trials)
    sim.update("vin_clinicaltrials", trials[0]["vin_clinicaltrialid"],
               {"vin_startdate": "2027-03-04T22:30:00Z"})
    assert sim.record("vin_clinicaltrials",
                      trials[0]["vin_clinicaltrialid"])["vin_startdate"] == "2027-03-04"
    root = ET.fromstring(client.get(f"{API}/$metadata").content)
    edm = "{http://docs.oasis-open.org/odata/ns/edm}"
    types = {t.get("Name"): {p.get("Name"): p.get("Type") for p in t.iter(f"{edm}Property")}
             for t in root.iter(f"{edm}EntityType")}
    assert types["contact"]["birthdate"] == "Edm.Date"
    assert types["vin_clinicaltrial"]["vin_startdate"] == "Edm.Date"
    assert types["contact"]["createdon"] == "Edm.DateTimeOffset"
    assert types["vin_candidate"]["vin_therapeuticareas"] == "Edm.String"
    assert types["vin_candidate"]["vin_resume"] == "Edm.Guid"
    assert types["organization"]["languagecode"] == "Edm.Int32"


def test_money_has_a_base_currency_value_and_the_records_currency(
    own: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = own
    money = by_name(attributes_of(client, "account", "MoneyAttributeMetadata",
                                  **{"$select": "LogicalName,AttributeOf,IsBaseCurrency"}))
    assert {n: (m["AttributeOf"], m["IsBaseCurrency"]) for n, m in money.items()} == {
        "revenue": (None, False), "revenue_base": ("revenue", True)}
    lookups = by_name(attributes_of(client, "account", "LookupAttributeMetadata",
                                    **{"$select": "LogicalName,Targets"}))
    assert lookups["transactioncurrencyid"]["Targets"] == ["transactioncurrency"]
    rows = annotated(client, "accounts", **{
        "$select": "revenue,revenue_base,exchangerate,_transactioncurrencyid_value"})
    currencies = {c.id: c for c in CURRENCIES}
    seen = set()
    for row in rows:
        currency = currencies[row["_transactioncurrencyid_value"]]
        seen.add(currency.code)
        assert row["exchangerate"] == currency.exchange_rate
        assert row[f"_transactioncurrencyid_value{FORMATTED}"] == currency.name
        assert row[f"_transactioncurrencyid_value{LOGICAL}"] == "transactioncurrency"
        if row["revenue"] is None:
            assert row["revenue_base"] is None
            continue
        assert row["revenue_base"] == money_base(row["revenue"], row["exchangerate"])
        assert row[f"revenue{FORMATTED}"] == f"{currency.symbol}{row['revenue']:,.2f}"
        assert row[f"revenue_base{FORMATTED}"] == f"${row['revenue_base']:,.2f}"
    assert seen == {"USD", "EUR", "CHF"}
    assert money_base(100.005, 1.0) == 100.0 and money_base(100.015, 1.0) == 100.02  # to even
    euro = next(r for r in rows if currencies[r["_transactioncurrencyid_value"]].code == "EUR")
    version = sim.version
    sim.update("accounts", euro["accountid"], {"revenue": 923.4})
    after = sim.record("accounts", euro["accountid"])
    assert after["revenue_base"] == 1000.0 and after["@odata.etag"] == f'W/"{version + 1}"'


def test_image_and_file_columns_as_metadata_lists_them_and_rows_carry_them(
    small: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = small
    contact = by_name(attributes_of(client, "contact"))
    image = contact["entityimage"]
    assert (image["@odata.type"], image["AttributeType"], image["AttributeTypeName"]) == (
        f"#{CRM}ImageAttributeMetadata", "Virtual", {"Value": "ImageType"})
    assert {n: (contact[n]["AttributeType"], contact[n]["AttributeOf"]) for n in (
        "entityimageid", "entityimage_timestamp", "entityimage_url")} == {
        "entityimageid": ("Uniqueidentifier", None),
        "entityimage_timestamp": ("BigInt", "entityimage"),
        "entityimage_url": ("String", "entityimage")}
    candidate = by_name(attributes_of(client, "vin_candidate"))
    assert (candidate["vin_resume"]["@odata.type"], candidate["vin_resume"]["AttributeType"],
            candidate["vin_resume"]["AttributeTypeName"]) == (
        f"#{CRM}FileAttributeMetadata", "Virtual", {"Value": "FileType"})
    assert (candidate["vin_resume_name"]["AttributeType"],
            candidate["vin_resume_name"]["AttributeOf"]) == ("String", "vin_resume")
    for entity_set, attributes in (("contacts", contact), ("vin_candidates", candidate)):
        rows, _ = follow(client, f"{API}/{entity_set}")
        # Rows carry every column but the Virtual ones, except that multi-select and file
        # columns, which metadata lists as Virtual, are in rows all the same.
        in_rows = {
            (f"_{n}_value" if a["AttributeType"] in ("Lookup", "Customer", "Owner") else n)
            for n, a in attributes.items()
            if a["AttributeType"] != "Virtual" or a["AttributeTypeName"]["Value"] in (
                "MultiSelectPicklistType", "FileType")}
        assert all(set(r) == {"@odata.etag", *in_rows} for r in rows), entity_set
    contacts = sim.records("contacts")
    with_image = [c for c in contacts if c["entityimageid"] is not None]
    assert with_image and len(with_image) < len(contacts)
    for c in contacts:
        if c["entityimageid"] is None:
            assert c["entityimage_url"] is None and c["entityimage_timestamp"] is None
        else:
            assert c["entityimage_url"] == (
                f"/Image/download.aspx?Entity=contact&Attribute=entityimage"
                f"&Id={c['entityimageid']}&Timestamp={c['entityimage_timestamp']}")
    candidates = sim.records("vin_candidates")
    assert any(c["vin_resume"] for c in candidates)
    for c in candidates:
        assert (c["vin_resume"] is None) == (c["vin_resume_name"] is None)
        assert c["vin_resume"] is None or GUID_RE.match(c["vin_resume"])


# ---------------------------------------------------------------------------------------------
# Changing options at run time
# ---------------------------------------------------------------------------------------------


def _industry_labels(client: httpx.Client) -> dict[int, dict[int, str]]:
    options = by_name(attributes_of(client, "account", "PicklistAttributeMetadata",
                                    **{"$expand": "OptionSet"}))["industrycode"]["OptionSet"]
    return {o["Value"]: labels(o["Label"]) for o in options["Options"]}


def test_relabelling_changes_formatted_values_and_metadata_but_no_row(
    own: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = own
    _, delta = follow(client, f"{API}/accounts", prefer="odata.track-changes")
    delta_link = delta[-1].json()["@odata.deltaLink"]
    before = {name: sim.records(name) for name in ("accounts", "vin_candidates",
                                                   "vin_clinicaltrials")}
    version = sim.version
    industry = next(r["industrycode"] for r in before["accounts"] if r["industrycode"])
    sim.set_option_label("accounts", "industrycode", industry, "Relabelled")
    sim.set_option_label("accounts", "industrycode", industry, "Umbenannt", language_code=1031)
    sim.set_option_label("vin_candidates", "vin_therapeuticareas", 100000000, "Oncology (all)")
    sim.add_option("accounts", "industrycode", 99, "Space", language_code=1033)
    sim.update("accounts", before["accounts"][0]["accountid"], {"industrycode": 99})
    sim.remove_option("accounts", "industrycode", 33)
    assert sim.version == version + 1  # only the update made a version
    updated = before["accounts"][0]["accountid"]
    for name, rows in before.items():
        pk = sim.spec(name).primary_id_attribute
        now = {r[pk]: r for r in sim.records(name)}
        assert [now[r[pk]] for r in rows if r[pk] != updated] == [
            r for r in rows if r[pk] != updated], name
    assert _industry_labels(client)[industry] == {1033: "Relabelled", 1031: "Umbenannt"}
    assert 99 in _industry_labels(client) and 33 not in _industry_labels(client)
    rows = {r["accountid"]: r for r in annotated(client, "accounts",
                                                 **{"$select": "industrycode"})}
    for row in rows.values():
        if row["industrycode"] == industry:
            assert row[f"industrycode{FORMATTED}"] == "Relabelled"
        if row["industrycode"] == 33:  # a removed option shows its number
            assert row[f"industrycode{FORMATTED}"] == "33"
    assert rows[updated][f"industrycode{FORMATTED}"] == "Space"
    # A global set's change shows on every attribute that uses it.
    trials = annotated(client, "vin_clinicaltrials", **{"$select": "vin_therapeuticarea"})
    assert "Oncology (all)" in {t.get(f"vin_therapeuticarea{FORMATTED}") for t in trials}
    changes, _ = follow(client, delta_link, prefer="odata.track-changes")
    assert [c["accountid"] for c in changes] == [updated]
    with pytest.raises(ValueError):
        sim.add_option("accounts", "statuscode", 5, "Parked")  # a status needs its state
    sim.add_option("accounts", "statuscode", 5, "Parked", state=1)
    with pytest.raises(ValueError):
        sim.remove_option("vin_candidates", "vin_enrolled", 1)
    with pytest.raises(ValueError):
        sim.set_option_label("accounts", "name", 1, "x")
    with pytest.raises(KeyError):
        sim.remove_option("accounts", "industrycode", 12345)


def test_options_change_through_the_control_endpoint(
    own: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, base, client = own
    etags = [r["@odata.etag"] for r in sim.records("accounts")]

    def mutate(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{base}/_simulator/mutate", json=body)

    answer = mutate({"action": "set_option_label", "entity": "accounts",
                     "attribute": "industrycode", "value": 1, "label": "Bookkeeping"})
    assert answer.status_code == 200
    assert answer.json()["option_set"] == "account_industrycode"
    assert {"value": 1, "labels": {"1033": "Bookkeeping", "1031": "Buchhaltung"}} in (
        answer.json()["options"])
    assert mutate({"action": "add_option", "entity": "accounts", "attribute": "industrycode",
                   "value": 98, "label": "Neu", "language_code": 1031}).status_code == 200
    assert mutate({"action": "remove_option", "entity": "accounts",
                   "attribute": "industrycode", "value": 2}).status_code == 200
    labels_now = _industry_labels(client)
    assert labels_now[1][1033] == "Bookkeeping" and labels_now[98] == {1031: "Neu"}
    assert 2 not in labels_now
    settings = mutate({"action": "settings", "user_language_code": 1031})
    assert settings.json()["user_language_code"] == 1031 and sim.user_language_code == 1031
    rows = annotated(client, "accounts", **{"$select": "industrycode"})
    assert "Buchhaltung" in {r.get(f"industrycode{FORMATTED}") for r in rows}
    assert [r["@odata.etag"] for r in sim.records("accounts")] == etags
    for bad in ({"action": "remove_option", "entity": "accounts", "attribute": "industrycode",
                 "value": 4242},
                {"action": "set_option_label", "entity": "accounts", "attribute": "name",
                 "value": 1, "label": "x"},
                {"action": "rename"}, {"action": "settings", "colour": "blue"}):
        response = mutate(bad)
        assert response.status_code == 400, bad
        assert error_of(response)["message"]
    assert mutate({"entity": "accounts", "update": 2}).json() == {"updated": 2}


# ---------------------------------------------------------------------------------------------
# The delta link lost with annotations
# ---------------------------------------------------------------------------------------------


def _last_pages(client: httpx.Client, url: str, prefer: str) -> list[dict[str, Any]]:
    _, responses = follow(client, url, prefer=prefer)
    return [r.json() for r in responses]


def test_omit_delta_link_fault_hits_only_change_tracking_with_annotations(
    own: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = own
    tracked = "odata.track-changes,odata.maxpagesize=25"
    sim.inject("omit_delta_link", entity="contacts")
    plain = _last_pages(client, f"{API}/contacts", tracked)
    assert "@odata.deltaLink" in plain[-1]  # no annotations: the link is always sent
    untracked = _last_pages(client, f"{API}/contacts", f"{ANNOTATIONS},odata.maxpagesize=25")
    assert all("@odata.deltaLink" not in p for p in untracked)
    assert sim.stats.faults["omit_delta_link"] == 0
    pages = _last_pages(client, f"{API}/contacts", f"{tracked},{ANNOTATIONS}")
    assert len(pages) == 5 and all("@odata.nextLink" in p for p in pages[:-1])
    assert "@odata.deltaLink" not in pages[-1] and "@odata.nextLink" not in pages[-1]
    assert sim.stats.faults["omit_delta_link"] == 1
    assert [r.fault for r in sim.stats.request_log].count("omit_delta_link") == 1
    again = _last_pages(client, f"{API}/contacts", f"{tracked},{ANNOTATIONS}")
    assert "@odata.deltaLink" in again[-1]  # used up
    sim.inject("omit_delta_link")
    delta = _last_pages(client, again[-1]["@odata.deltaLink"], f"{tracked},{ANNOTATIONS}")
    assert "@odata.deltaLink" not in delta[-1]  # a delta link's read loses it too


def test_omit_delta_link_with_annotations_flag_and_fault_plan(
    own: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = own
    tracked = "odata.track-changes,odata.maxpagesize=50"
    link = _last_pages(client, f"{API}/accounts", tracked)[-1]["@odata.deltaLink"]
    sim.omit_delta_link_with_annotations = True
    for url in (f"{API}/accounts", link):
        assert "@odata.deltaLink" not in _last_pages(client, url, f"{tracked},{ANNOTATIONS}")[-1]
        assert "@odata.deltaLink" in _last_pages(client, url, tracked)[-1]
    sim.omit_delta_link_with_annotations = False
    sim.fault_plan = FaultPlan(seed=1, rates={"omit_delta_link": 1.0})
    assert "@odata.deltaLink" not in _last_pages(client, link, f"{tracked},{ANNOTATIONS}")[-1]
    assert "@odata.deltaLink" in _last_pages(client, link, tracked)[-1]
    assert FaultPlan.parse("seed=2,omit_delta_link=0.5").rates == {"omit_delta_link": 0.5}
