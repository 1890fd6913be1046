"""Tests of the Dataverse Web API simulator, mostly over real loopback HTTP."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import re
import time
import tracemalloc
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataverse_assets.ops import cli
from dataverse_assets.simulator import (
    SIMULATOR_CLIENT_ID,
    SIMULATOR_CLIENT_SECRET,
    SIMULATOR_TENANT_ID,
    DataverseSimulator,
    FaultPlan,
    ServiceProtectionLimits,
    SimulatedConnectionReset,
    create_app,
    entity_spec_for,
    serve_on_loopback,
)
from dataverse_assets.simulator.engine import CollectionQuery, fetch_page
from dataverse_assets.simulator.lazy import LazyKeyIndex, LazyRowSource
from dataverse_assets.simulator.odata import (
    compile_filter,
    guid_order_key,
    parse_filter,
)
from dataverse_assets.simulator.protection import (
    CONCURRENCY_CODE,
    EXECUTION_TIME_CODE,
    REQUESTS_CODE,
)

API = "/api/data/v9.2"
ALL_ENTITIES = [
    "accounts",
    "contacts",
    "systemusers",
    "businessunits",
    "teams",
    "vin_candidates",
    "vin_clinicaltrials",
    "vin_vin_candidate_accountset",
    "vin_vin_clinicaltrial_contactset",
    "vin_vin_candidate_clinicaltrialset",
]
SMALL_COUNTS = {
    "accounts": 60,
    "contacts": 120,
    "systemusers": 8,
    "businessunits": 3,
    "teams": 4,
    "vin_candidates": 80,
    "vin_clinicaltrials": 10,
    "vin_vin_candidate_accountset": 70,
    "vin_vin_clinicaltrial_contactset": 90,
    "vin_vin_candidate_clinicaltrialset": 50,
}
DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
GUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------------------------


def fetch_token(base: str) -> str:
    response = httpx.post(
        f"{base}/{SIMULATOR_TENANT_ID}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": SIMULATOR_CLIENT_ID,
            "client_secret": SIMULATOR_CLIENT_SECRET,
            "scope": f"{base}/.default",
        },
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def api_client(base: str, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=base,
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
        },
        timeout=30,
    )


def follow(
    client: httpx.Client,
    url: str,
    *,
    params: dict[str, str] | None = None,
    prefer: str | None = None,
    between_pages: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], list[httpx.Response]]:
    """Every row of a paged read, following each nextLink unchanged."""
    headers = {"Prefer": prefer} if prefer else {}
    responses: list[httpx.Response] = []
    rows: list[dict[str, Any]] = []
    response = client.get(url, params=params, headers=headers)
    while True:
        assert response.status_code == 200, response.text
        responses.append(response)
        body = response.json()
        rows.extend(body["value"])
        link = body.get("@odata.nextLink")
        if not link:
            return rows, responses
        if between_pages is not None:
            between_pages(len(responses))
        response = client.get(link, headers=headers)


def truth_ids(sim: DataverseSimulator, entity_set: str) -> list[str]:
    pk = sim.spec(entity_set).primary_id_attribute
    return [row[pk] for row in sim.records(entity_set)]


@pytest.fixture(scope="module")
def org() -> Iterator[tuple[DataverseSimulator, str]]:
    """A default-sized org served over loopback; tests using it must not mutate it."""
    sim = DataverseSimulator(ALL_ENTITIES)
    with serve_on_loopback(sim) as base:
        yield sim, base


@pytest.fixture(scope="module")
def client(org: tuple[DataverseSimulator, str]) -> Iterator[httpx.Client]:
    _, base = org
    with api_client(base, fetch_token(base)) as c:
        yield c


@pytest.fixture()
def fresh() -> Iterator[tuple[DataverseSimulator, str, httpx.Client]]:
    """A small org of its own, for tests that mutate data or look at counters."""
    sim = DataverseSimulator(ALL_ENTITIES, seed=7, row_counts=SMALL_COUNTS)
    with serve_on_loopback(sim) as base, api_client(base, fetch_token(base)) as c:
        yield sim, base, c


def error_of(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


# ---------------------------------------------------------------------------------------------
# Model: seed, clock, mutation API
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_org_and_different_seed_differs() -> None:
    a = DataverseSimulator(ALL_ENTITIES, seed=3, row_counts=SMALL_COUNTS)
    b = DataverseSimulator(list(reversed(ALL_ENTITIES)), seed=3, row_counts=SMALL_COUNTS)
    c = DataverseSimulator(ALL_ENTITIES, seed=4, row_counts=SMALL_COUNTS)
    for name in ALL_ENTITIES:
        assert a.records(name) == b.records(name), name
        assert a.records(name) != c.records(name), name
    assert len(a.records("contacts")) == 120


def test_seed_rows_are_realistic(org: tuple[DataverseSimulator, str]) -> None:
    sim, _ = org
    expected = {"accounts": 600, "contacts": 1500, "systemusers": 40, "businessunits": 5,
                "teams": 12, "vin_candidates": 800, "vin_clinicaltrials": 60,
                "vin_vin_candidate_accountset": 700, "vin_vin_clinicaltrial_contactset": 900,
                "vin_vin_candidate_clinicaltrialset": 500}
    etags: set[str] = set()
    for name, count in expected.items():
        spec = sim.spec(name)
        rows = sim.records(name)
        assert len(rows) == count, name
        for row in rows:
            assert list(row)[0] == "@odata.etag"
            assert re.fullmatch(r'W/"\d+"', row["@odata.etag"])
            etags.add(row["@odata.etag"])
            assert set(row) == {"@odata.etag", *spec.columns}
            assert GUID_RE.match(row[spec.primary_id_attribute])
            if spec.has_modifiedon:
                assert DATETIME_RE.match(row["createdon"]) and DATETIME_RE.match(row["modifiedon"])
                assert "2024-01-01T00:00:00Z" <= row["createdon"] <= row["modifiedon"]
                assert row["modifiedon"] <= "2026-01-01T00:00:00Z"
    # Versions are org-wide, so no two rows share an etag.
    assert len(etags) == sum(expected.values())

    contacts = sim.records("contacts")
    contact_ids = set(truth_ids(sim, "contacts"))
    account_ids = set(truth_ids(sim, "accounts"))
    accounts = sim.records("accounts")
    assert all(
        a["_primarycontactid_value"] in contact_ids
        for a in accounts
        if a["_primarycontactid_value"] is not None
    )
    assert any(a["_primarycontactid_value"] is None for a in accounts)
    assert all(a["versionnumber"] == int(a["@odata.etag"][3:-1]) for a in accounts)
    owners = set(truth_ids(sim, "systemusers")) | set(truth_ids(sim, "teams"))
    assert all(c["_ownerid_value"] in owners for c in contacts)

    texts = [str(v) for row in accounts + contacts for v in row.values() if isinstance(v, str)]
    assert any("O'Bryan" in t for t in texts)
    assert any('"' in t for t in texts)
    assert any("Zürich" in t or "東京" in t for t in texts)
    assert any("🚀" in t for t in texts)
    assert any("," in t for t in texts)
    assert "" in texts
    assert any(c["jobtitle"] is None for c in contacts)
    assert any(c["birthdate"] is None for c in contacts)
    assert any(isinstance(a["revenue"], float) for a in accounts)

    units = sim.records("businessunits")
    assert sum(u["_parentbusinessunitid_value"] is None for u in units) == 1

    candidate_ids = set(truth_ids(sim, "vin_candidates"))
    links = sim.records("vin_vin_candidate_accountset")
    pairs = [(r["vin_candidateid"], r["accountid"]) for r in links]
    assert len(set(pairs)) == len(pairs)
    assert all(a in candidate_ids and b in account_ids for a, b in pairs)
    assert not sim.spec("vin_vin_candidate_accountset").has_modifiedon


def test_entity_specs() -> None:
    accounts = entity_spec_for("accounts")
    assert (accounts.logical_name, accounts.primary_id_attribute) == ("account", "accountid")
    assert accounts.change_tracking_enabled and accounts.has_modifiedon
    assert accounts.attribute("primarycontactid").targets == ("contact",)
    assert "_primarycontactid_value" in accounts.columns
    assert not entity_spec_for("systemusers").change_tracking_enabled
    assert not entity_spec_for("vin_clinicaltrials").change_tracking_enabled
    junction = entity_spec_for("vin_vin_clinicaltrial_contactset")
    assert junction.primary_id_attribute == "vin_vin_clinicaltrial_contactid"
    assert junction.columns == ["vin_vin_clinicaltrial_contactid", "vin_clinicaltrialid",
                                "contactid"]
    fallback = entity_spec_for("widgets", row_count=3)
    assert (fallback.logical_name, fallback.primary_id_attribute) == ("widget", "widgetid")
    assert fallback.change_tracking_enabled and fallback.row_count == 3
    assert set(fallback.columns) == {"widgetid", "name", "statecode", "createdon", "modifiedon"}


def test_writes_within_one_second_share_their_stamp_unless_the_clock_is_strict(
        fresh: tuple[DataverseSimulator, str, httpx.Client]) -> None:
    sim, _, client = fresh
    ahead = sim.advance_clock(3600)  # ahead of the wall clock: every write gets this stamp
    keys = [r["accountid"] for r in sim.records("accounts")]
    one = sim.update("accounts", keys[0], {"name": "one"})
    two = sim.update("accounts", keys[1], {"name": "two"})
    stamp = ahead.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert one["modifiedon"] == two["modifiedon"] == stamp
    assert one["@odata.etag"] != two["@odata.etag"]
    # The filter compares against the stamp: `gt` leaves out that second, `ge` has both.
    assert _filter_ids(client, "accounts", f"modifiedon gt {stamp}") == []
    assert set(_filter_ids(client, "accounts", f"modifiedon ge {stamp}")) == {keys[0], keys[1]}

    strict = DataverseSimulator(["accounts"], row_counts={"accounts": 5}, strict_clock=True)
    first, second = strict.now(), strict.now()
    assert (second - first).total_seconds() >= 1


def test_clock_and_mutations() -> None:
    sim = DataverseSimulator(["accounts", "contacts", "vin_vin_candidate_accountset"],
                             row_counts={"accounts": 20, "contacts": 20,
                                         "vin_vin_candidate_accountset": 5})
    latest = max(r["modifiedon"] for r in sim.records("accounts"))
    first = sim.now()
    assert first.tzinfo is not None and first >= datetime.fromisoformat(latest)
    second = sim.now()
    assert second >= first and second.microsecond == 0  # whole seconds, never backwards

    created = sim.create("accounts", {"name": "Créée, \"quoted\" O'Neil"})
    assert created["name"] == "Créée, \"quoted\" O'Neil"
    assert created["createdon"] == created["modifiedon"] >= second.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert sim.record("accounts", created["accountid"]) == created
    version_before = sim.version

    updated = sim.update("accounts", created["accountid"].upper(), {"revenue": 12.5})
    assert updated["revenue"] == 12.5 and updated["modifiedon"] >= created["modifiedon"]
    assert updated["@odata.etag"] == f'W/"{sim.version}"' and sim.version > version_before
    assert updated["versionnumber"] == sim.version
    assert sim.records("accounts")[[r["accountid"] for r in sim.records("accounts")].index(
        created["accountid"])] == updated

    sim.delete("accounts", created["accountid"])
    assert sim.record("accounts", created["accountid"]) is None
    assert len(sim.records("accounts")) == 20
    with pytest.raises(KeyError):
        sim.delete("accounts", created["accountid"])
    with pytest.raises(KeyError):
        sim.update("accounts", created["accountid"], {"name": "x"})
    with pytest.raises(KeyError):
        sim.create("accounts", {"no_such_column": 1})

    account = truth_ids(sim, "accounts")[0]
    link = sim.create("vin_vin_candidate_accountset", {"accountid": account})
    assert link["accountid"] == account and GUID_RE.match(link["vin_candidateid"])
    with pytest.raises(ValueError):
        sim.create("vin_vin_candidate_accountset",
                   {"accountid": account, "vin_candidateid": link["vin_candidateid"]})
    sim.delete("vin_vin_candidate_accountset", link["vin_vin_candidate_accountid"])
    assert len(sim.records("vin_vin_candidate_accountset")) == 5


def test_records_follow_sql_server_guid_order(org: tuple[DataverseSimulator, str]) -> None:
    # SqlGuid's documented example: the last group is the most significant.
    guids = ["3aaaaaaa-bbbb-cccc-dddd-2eeeeeeeeeee", "2aaaaaaa-bbbb-cccc-dddd-1eeeeeeeeeee",
             "1aaaaaaa-bbbb-cccc-dddd-3eeeeeeeeeee"]
    assert sorted(guids, key=guid_order_key) == [guids[1], guids[0], guids[2]]
    sim, _ = org
    ids = truth_ids(sim, "accounts")
    assert ids == sorted(ids, key=guid_order_key)


# ---------------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------------


def test_tenant_discovery_challenge(org: tuple[DataverseSimulator, str]) -> None:
    _, base = org
    response = httpx.get(f"{base}{API}/")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == (
        f"Bearer authorization_uri={base}/{SIMULATOR_TENANT_ID}/oauth2/authorize, "
        f"resource_id={base}/"
    )
    for path in (f"{API}/accounts", f"{API}/nothing_here", f"{API}/$metadata"):
        denied = httpx.get(f"{base}{path}", headers={"Authorization": "Bearer not-a-token"})
        assert denied.status_code == 401
        assert denied.headers["WWW-Authenticate"] == response.headers["WWW-Authenticate"]


def test_org_url_is_the_resource_id() -> None:
    sim = DataverseSimulator(["accounts"], row_counts={"accounts": 3},
                             org_url="https://contoso.crm.dynamics.com/")
    with serve_on_loopback(sim) as base:
        header = httpx.get(f"{base}{API}/").headers["WWW-Authenticate"]
        assert header.endswith(", resource_id=https://contoso.crm.dynamics.com/")
        token_url = f"{base}/{SIMULATOR_TENANT_ID}/oauth2/v2.0/token"
        form = {"grant_type": "client_credentials", "client_id": SIMULATOR_CLIENT_ID,
                "client_secret": SIMULATOR_CLIENT_SECRET}
        good = httpx.post(token_url,
                          data={**form, "scope": "https://contoso.crm.dynamics.com/.default"})
        assert good.status_code == 200
        wrong = httpx.post(token_url, data={**form, "scope": "https://other.crm/.default"})
        assert wrong.status_code == 400 and 500011 in wrong.json()["error_codes"]


def test_token_flow(fresh: tuple[DataverseSimulator, str, httpx.Client]) -> None:
    sim, base, _ = fresh
    token_url = f"{base}/{SIMULATOR_TENANT_ID}/oauth2/v2.0/token"
    form = {"grant_type": "client_credentials", "client_id": SIMULATOR_CLIENT_ID,
            "client_secret": SIMULATOR_CLIENT_SECRET, "scope": f"{base}/.default"}
    ok = httpx.post(token_url, data=form)
    assert ok.status_code == 200
    body = ok.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == body["ext_expires_in"] == 3599
    assert len(body["access_token"]) >= 20
    assert SIMULATOR_CLIENT_SECRET not in ok.text

    bad_secret = "Wrong~Secret~Value-123"
    wrong = httpx.post(token_url, data={**form, "client_secret": bad_secret})
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"
    assert wrong.json()["error_codes"] == [7000215]
    assert wrong.json()["error_description"].startswith("AADSTS7000215: Invalid client secret")
    assert bad_secret not in wrong.text and SIMULATOR_CLIENT_SECRET not in wrong.text
    wrong_id = httpx.post(token_url, data={**form, "client_id": "someone-else"})
    assert wrong_id.status_code == 401 and wrong_id.json()["error"] == "invalid_client"

    unknown = httpx.post(f"{base}/11111111-2222-3333-4444-555555555555/oauth2/v2.0/token",
                         data=form)
    assert unknown.status_code == 400
    assert unknown.json()["error_description"].startswith("AADSTS90002")

    headers = {"Authorization": f"Bearer {body['access_token']}"}
    assert httpx.get(f"{base}{API}/accounts", headers=headers).status_code == 200
    sim.expire_all_tokens()
    expired = httpx.get(f"{base}{API}/accounts", headers=headers)
    assert expired.status_code == 401
    assert expired.headers["WWW-Authenticate"].startswith(
        f"Bearer authorization_uri={base}/{SIMULATOR_TENANT_ID}/oauth2/authorize"
    )
    assert "expired" in error_of(expired)["message"]
    assert body["access_token"] not in expired.text
    renewed = httpx.post(token_url, data=form).json()["access_token"]
    again = httpx.get(f"{base}{API}/accounts",
                      headers={"Authorization": f"Bearer {renewed}"})
    assert again.status_code == 200


def test_token_lifetime_is_enforced() -> None:
    sim = DataverseSimulator(["accounts"], row_counts={"accounts": 2}, token_lifetime_seconds=0)
    token = sim.issue_access_token()
    assert sim.access_token_state(token) == "expired"
    assert sim.access_token_state("nonsense") == "unknown"


# ---------------------------------------------------------------------------------------------
# Paging
# ---------------------------------------------------------------------------------------------


def test_paging_returns_every_row_once(
    org: tuple[DataverseSimulator, str], client: httpx.Client
) -> None:
    sim, base = org
    rows, responses = follow(client, f"{API}/contacts", prefer="odata.maxpagesize=200")
    assert [r["contactid"] for r in rows] == truth_ids(sim, "contacts")
    assert rows == sim.records("contacts")
    assert len(responses) == 8
    for number, response in enumerate(responses, start=1):
        assert response.headers["Preference-Applied"] == "odata.maxpagesize=200"
        assert response.headers["Content-Type"] == "application/json; odata.metadata=minimal"
        assert response.headers["OData-Version"] == "4.0"
        body = response.json()
        assert body["@odata.context"] == f"{base}{API}/$metadata#contacts"
        if number < len(responses):
            assert len(body["value"]) == 200
            link = body["@odata.nextLink"]
            assert link.startswith(f"{base}{API}/contacts?")
            token = dict(parse_qsl(urlsplit(link).query))["$skiptoken"]
            assert token.startswith(f'<cookie pagenumber="{number + 1}" pagingcookie="')
            assert token.endswith('" istracking="False" />')
        else:
            assert len(body["value"]) == 100 and "@odata.nextLink" not in body


def test_skiptoken_resent_as_parameter(
    org: tuple[DataverseSimulator, str], client: httpx.Client
) -> None:
    sim, _ = org
    params = {"$select": "name,revenue", "$filter": "statecode eq 0"}
    headers = {"Prefer": "odata.maxpagesize=70"}
    ids: list[str] = []
    response = client.get(f"{API}/accounts", params=params, headers=headers)
    pages = 0
    while True:
        body = response.json()
        pages += 1
        ids.extend(r["accountid"] for r in body["value"])
        assert all(set(r) == {"@odata.etag", "name", "revenue", "accountid"}
                   for r in body["value"])
        if "@odata.nextLink" not in body:
            break
        query = dict(parse_qsl(urlsplit(body["@odata.nextLink"]).query))
        assert query["$select"] == "name,revenue" and query["$filter"] == "statecode eq 0"
        response = client.get(f"{API}/accounts", params=query, headers=headers)
    expected = [r["accountid"] for r in sim.records("accounts") if r["statecode"] == 0]
    assert ids == expected and pages > 3


def test_page_size_is_capped_at_5000() -> None:
    sim = DataverseSimulator(["accounts"], row_counts={"accounts": 5003})
    with serve_on_loopback(sim) as base, api_client(base, fetch_token(base)) as c:
        big = c.get(f"{API}/accounts", params={"$select": "name"},
                    headers={"Prefer": "odata.maxpagesize=20000"})
        assert len(big.json()["value"]) == 5000 and "@odata.nextLink" in big.json()
        assert big.headers["Preference-Applied"] == "odata.maxpagesize=5000"
        default = c.get(f"{API}/accounts", params={"$select": "name"})
        assert len(default.json()["value"]) == 5000 and "@odata.nextLink" in default.json()
        assert "Preference-Applied" not in default.headers
        rows, responses = follow(c, f"{API}/accounts", params={"$select": "name"})
        assert len(rows) == 5003 and len(responses) == 2


def test_top_stops_paging(client: httpx.Client) -> None:
    response = client.get(f"{API}/contacts", params={"$top": "7"},
                          headers={"Prefer": "odata.maxpagesize=3"})
    body = response.json()
    assert len(body["value"]) == 7 and "@odata.nextLink" not in body
    assert client.get(f"{API}/contacts", params={"$top": "0"}).json()["value"] == []
    bad = client.get(f"{API}/contacts", params={"$top": "-1"})
    assert bad.status_code == 400


def test_skip_is_rejected(client: httpx.Client) -> None:
    response = client.get(f"{API}/accounts", params={"$skip": "10"})
    assert response.status_code == 400
    assert error_of(response)["message"] == "The query parameter $skip is not supported"


def test_deleting_a_record_removes_its_many_to_many_associations(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = fresh
    links = sim.records("vin_vin_candidate_accountset")
    candidate = links[0]["vin_candidateid"]
    named = {r["vin_vin_candidate_accountid"] for r in links if r["vin_candidateid"] == candidate}
    other_sets = {name: len(sim.records(name)) for name in
                  ("vin_vin_clinicaltrial_contactset", "vin_vin_candidate_clinicaltrialset")}
    trials = sum(r["vin_candidateid"] == candidate
                 for r in sim.records("vin_vin_candidate_clinicaltrialset"))
    sim.delete("vin_candidates", candidate)
    left = sim.records("vin_vin_candidate_accountset")
    assert len(left) == len(links) - len(named)
    assert not any(r["vin_candidateid"] == candidate for r in left)
    assert len(sim.records("vin_vin_candidate_clinicaltrialset")) == (
        other_sets["vin_vin_candidate_clinicaltrialset"] - trials)
    assert len(sim.records("vin_vin_clinicaltrial_contactset")) == (
        other_sets["vin_vin_clinicaltrial_contactset"])
    gone = next(iter(named))
    response = client.get(f"{API}/vin_vin_candidate_accountset({gone})")
    assert response.status_code == 404


def test_count_stops_at_5000_and_retrieve_total_record_count_sizes_the_table() -> None:
    sim = DataverseSimulator(["accounts", "teams"], seed=3, row_counts={"accounts": 7200})
    with serve_on_loopback(sim) as base, api_client(base, fetch_token(base)) as client:
        body = client.get(f"{API}/accounts", params={"$count": "true", "$top": "1"}).json()
        assert body["@odata.count"] == 5000
        assert body["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] is True
        small = client.get(f"{API}/teams", params={"$count": "true", "$top": "1"}).json()
        assert "@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded" not in small
        sim.delete("accounts", sim.records("accounts")[0]["accountid"])
        totals = client.get(f"{API}/RetrieveTotalRecordCount(EntityNames=@tables)",
                            params={"@tables": "['account','team']"}).json()
        assert totals["EntityRecordCountCollection"]["Keys"] == ["account", "team"]
        assert totals["EntityRecordCountCollection"]["Values"] == [7199, len(
            sim.records("teams"))]
        unknown = client.get(f"{API}/RetrieveTotalRecordCount(EntityNames=@tables)",
                             params={"@tables": "['acount']"})
        assert unknown.status_code == 404 and "acount" in error_of(unknown)["message"]


def test_a_table_without_read_privilege_answers_403(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, base, client = fresh
    sim.deny_read("teams", sim.client_id)
    refused = client.get(f"{API}/teams")
    assert refused.status_code == 403
    assert error_of(refused)["code"] == "0x80040220"
    assert "missing prvReadteam privilege" in error_of(refused)["message"]
    other = api_client(base, sim.issue_access_token("another-app"))
    assert other.get(f"{API}/teams").status_code == 200  # another role may read it
    sim.allow_read("teams")
    assert client.get(f"{API}/teams").status_code == 200


def test_count(org: tuple[DataverseSimulator, str], client: httpx.Client) -> None:
    sim, _ = org
    body = client.get(f"{API}/contacts", params={"$count": "true", "$filter": "statecode eq 1"},
                      headers={"Prefer": "odata.maxpagesize=5"}).json()
    assert body["@odata.count"] == sum(r["statecode"] == 1 for r in sim.records("contacts"))
    assert len(body["value"]) == 5


def test_invalid_skiptoken_is_rejected(client: httpx.Client) -> None:
    response = client.get(f"{API}/accounts", params={"$skiptoken": "<cookie nonsense />"})
    assert response.status_code == 400
    # A cookie made for one $orderby does not fit another.
    first = client.get(f"{API}/accounts", params={"$orderby": "name"},
                       headers={"Prefer": "odata.maxpagesize=5"}).json()
    token = dict(parse_qsl(urlsplit(first["@odata.nextLink"]).query))["$skiptoken"]
    mismatch = client.get(f"{API}/accounts", params={"$skiptoken": token})
    assert mismatch.status_code == 400


def _asgi_follow(
    sim: DataverseSimulator,
    url: str,
    page_size: int,
    params: dict[str, str] | None = None,
    between_pages: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Page through a collection in-process (no sockets), for fast property tests."""

    async def run() -> list[dict[str, Any]]:
        transport = httpx.ASGITransport(app=create_app(sim))
        headers = {"Authorization": f"Bearer {sim.issue_access_token()}",
                   "Prefer": f"odata.maxpagesize={page_size}"}
        rows: list[dict[str, Any]] = []
        async with httpx.AsyncClient(transport=transport, base_url="http://sim.test",
                                     headers=headers) as c:
            response = await c.get(url, params=params)
            while True:
                assert response.status_code == 200, response.text
                body = response.json()
                assert len(body["value"]) <= page_size
                rows.extend(body["value"])
                if "@odata.nextLink" not in body:
                    return rows
                if between_pages is not None:
                    between_pages()
                response = await c.get(body["@odata.nextLink"])

    return asyncio.run(run())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(0, 300), page_size=st.integers(1, 50), seed=st.integers(0, 1000),
       ordered=st.booleans())
def test_paging_property(rows: int, page_size: int, seed: int, ordered: bool) -> None:
    sim = DataverseSimulator(["vin_candidates"], seed=seed, row_counts={"vin_candidates": rows})
    params = {"$orderby": "vin_stage desc,vin_score asc"} if ordered else None
    served = _asgi_follow(sim, f"{API}/vin_candidates", page_size, params)
    ids = [r["vin_candidateid"] for r in served]
    assert sorted(ids) == sorted(truth_ids(sim, "vin_candidates"))
    assert len(ids) == len(set(ids)) == rows
    if not ordered:
        assert ids == truth_ids(sim, "vin_candidates")
    else:
        keys = [(-r["vin_stage"], r["vin_score"] is not None, r["vin_score"] or 0) for r in served]
        assert keys == sorted(keys)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(0, 120), page_size=st.integers(1, 20), data=st.data(),
       ordered=st.booleans())
def test_paging_is_stable_under_concurrent_changes(
    rows: int, page_size: int, data: st.DataObject, ordered: bool
) -> None:
    sim = DataverseSimulator(["vin_candidates"], row_counts={"vin_candidates": rows})
    initial = set(truth_ids(sim, "vin_candidates"))
    deleted: set[str] = set()
    seen_ever = set(initial)

    def mutate() -> None:
        for _ in range(data.draw(st.integers(0, 3))):
            current = truth_ids(sim, "vin_candidates")
            action = data.draw(st.sampled_from(["create", "delete", "update"]))
            if action == "create" or not current:
                seen_ever.add(sim.create("vin_candidates")["vin_candidateid"])
            elif action == "delete":
                victim = data.draw(st.sampled_from(current))
                sim.delete("vin_candidates", victim)
                deleted.add(victim)
            elif not ordered:  # updating a sort column mid-paging may legitimately move rows
                sim.update("vin_candidates", data.draw(st.sampled_from(current)),
                           {"vin_score": 1.5})

    params = {"$orderby": "vin_name asc"} if ordered else None
    served = _asgi_follow(sim, f"{API}/vin_candidates", page_size, params, mutate)
    ids = [r["vin_candidateid"] for r in served]
    assert len(ids) == len(set(ids)), "a row was served twice"
    assert initial - deleted <= set(ids), "a row present throughout was skipped"
    assert set(ids) <= seen_ever


# ---------------------------------------------------------------------------------------------
# $select, $orderby, $filter
# ---------------------------------------------------------------------------------------------


def test_select(org: tuple[DataverseSimulator, str], client: httpx.Client) -> None:
    sim, base = org
    body = client.get(f"{API}/accounts",
                      params={"$select": "name,_primarycontactid_value", "$top": "3"}).json()
    assert body["@odata.context"] == f"{base}{API}/$metadata#accounts(name,_primarycontactid_value)"
    for row in body["value"]:
        assert list(row) == ["@odata.etag", "name", "_primarycontactid_value", "accountid"]
        truth = sim.record("accounts", row["accountid"])
        assert truth is not None and row["name"] == truth["name"]
        assert row["@odata.etag"] == truth["@odata.etag"]
    bad = client.get(f"{API}/accounts", params={"$select": "name,nosuchcolumn"})
    assert bad.status_code == 400
    assert error_of(bad) == {
        "code": "0x80060888",
        "message": "Could not find a property named 'nosuchcolumn' on type "
        "'Microsoft.Dynamics.CRM.account'.",
    }
    # Lookups are only reachable as _x_value; Virtual columns are not returned at all.
    for hidden in ("primarycontactid", "industrycodename"):
        assert client.get(f"{API}/accounts", params={"$select": hidden}).status_code == 400


def _sql_sorted(rows: list[dict[str, Any]], order: list[tuple[str, bool]], pk: str,
                folded: set[str]) -> list[dict[str, Any]]:
    """Reference ordering: nulls first ascending, case-insensitive strings, pk tie-break."""
    result = sorted(rows, key=lambda r: guid_order_key(r[pk]))
    for column, descending in reversed(order):
        def key(row: dict[str, Any], column: str = column) -> tuple[Any, ...]:
            value = row[column]
            if value is None:
                return (0,)
            return (1, value.casefold() if column in folded else value)
        result = sorted(result, key=key, reverse=descending)
    return result


def test_orderby(org: tuple[DataverseSimulator, str], client: httpx.Client) -> None:
    sim, _ = org
    rows, responses = follow(
        client, f"{API}/contacts",
        params={"$orderby": "lastname asc,jobtitle desc", "$select": "lastname,jobtitle"},
        prefer="odata.maxpagesize=97",
    )
    expected = _sql_sorted(sim.records("contacts"), [("lastname", False), ("jobtitle", True)],
                           "contactid", {"lastname", "jobtitle"})
    assert [r["contactid"] for r in rows] == [r["contactid"] for r in expected]
    assert len(responses) == 16
    desc = client.get(f"{API}/accounts", params={"$orderby": "revenue desc", "$top": "40"})
    revenues = [r["revenue"] for r in desc.json()["value"]]
    non_null = [r for r in revenues if r is not None]
    assert non_null == sorted(non_null, reverse=True) and revenues[0] is not None
    bad = client.get(f"{API}/accounts", params={"$orderby": "nosuch desc"})
    assert bad.status_code == 400 and "nosuch" in error_of(bad)["message"]


def _filter_ids(client: httpx.Client, entity_set: str, expression: str) -> list[str]:
    rows, _ = follow(client, f"{API}/{entity_set}", params={"$filter": expression})
    pk = entity_spec_for(entity_set).primary_id_attribute
    return [r[pk] for r in rows]


def _truth(sim: DataverseSimulator, entity_set: str,
           predicate: Callable[[dict[str, Any]], bool]) -> list[str]:
    pk = sim.spec(entity_set).primary_id_attribute
    return [r[pk] for r in sim.records(entity_set) if predicate(r)]


def test_filter_string_literals(org: tuple[DataverseSimulator, str], client: httpx.Client) -> None:
    sim, _ = org
    obryan = _filter_ids(client, "contacts", "lastname eq 'O''Bryan'")
    assert obryan and obryan == _truth(sim, "contacts", lambda r: r["lastname"] == "O'Bryan")
    # Dataverse's collation is case-insensitive.
    assert _filter_ids(client, "contacts", "lastname eq 'o''bryan'") == obryan
    quoted = _filter_ids(client, "accounts", "name eq 'The \"Best\" Company'")
    assert quoted == _truth(sim, "accounts", lambda r: r["name"] == 'The "Best" Company')
    empty = _filter_ids(client, "accounts", "name eq ''")
    assert empty and empty == _truth(sim, "accounts", lambda r: r["name"] == "")
    unicode_city = _filter_ids(client, "accounts", "address1_city eq 'Zürich'")
    assert unicode_city == _truth(sim, "accounts", lambda r: r["address1_city"] == "Zürich")
    contains = _filter_ids(client, "accounts", "contains(name,'contoso')")
    assert contains == _truth(sim, "accounts",
                              lambda r: r["name"] is not None and "contoso" in r["name"].lower())

    expression = "lastname eq 'O'Bryan'"
    bad = client.get(f"{API}/contacts", params={"$filter": expression})
    assert bad.status_code == 400
    assert error_of(bad)["message"] == (
        f"There is an unterminated literal at position {len(expression)} in '{expression}'."
    )
    unterminated = client.get(f"{API}/contacts", params={"$filter": "lastname eq 'abc"})
    assert error_of(unterminated)["message"] == (
        "There is an unterminated literal at position 16 in 'lastname eq 'abc'."
    )


def test_filter_datetimes(org: tuple[DataverseSimulator, str], client: httpx.Client) -> None:
    sim, _ = org

    def parsed(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    cutoff = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
    after = _filter_ids(client, "accounts", "modifiedon gt 2025-06-01T12:00:00Z")
    assert after and after == _truth(sim, "accounts", lambda r: parsed(r["modifiedon"]) > cutoff)
    exact = sim.records("accounts")[10]["modifiedon"]
    at_or_after = _filter_ids(client, "accounts", f"modifiedon ge {exact}")
    assert sim.records("accounts")[10]["accountid"] in at_or_after
    assert sim.records("accounts")[10]["accountid"] not in _filter_ids(
        client, "accounts", f"modifiedon gt {exact}")
    fraction = exact.replace("Z", ".250Z")
    assert sim.records("accounts")[10]["accountid"] not in _filter_ids(
        client, "accounts", f"modifiedon ge {fraction}")
    assert sim.records("accounts")[10]["accountid"] in _filter_ids(
        client, "accounts", f"modifiedon lt {fraction}")
    offset = _filter_ids(client, "accounts", "modifiedon gt 2025-06-01T14:00:00+02:00")
    assert offset == after
    quoted = client.get(f"{API}/accounts", params={"$filter": "modifiedon gt '2025-06-01'"})
    assert quoted.status_code == 400 and "incompatible types" in error_of(quoted)["message"]


def test_filter_guid_or_chain(org: tuple[DataverseSimulator, str], client: httpx.Client) -> None:
    sim, _ = org
    ids = truth_ids(sim, "contacts")[::29][:50]
    assert len(ids) == 50
    terms = []
    for i, guid in enumerate(ids):
        literal = guid.upper() if i % 3 == 0 else guid
        terms.append(f"contactid eq '{literal}'" if i % 2 else f"contactid eq {literal}")
    terms.append("contactid eq 00000000-0000-0000-0000-000000000001")
    found = _filter_ids(client, "contacts", " or ".join(terms))
    assert found == sorted(ids, key=guid_order_key)
    lookup = sim.records("contacts")[3]["_parentcustomerid_value"] or truth_ids(sim, "accounts")[0]
    by_lookup = _filter_ids(client, "contacts", f"_parentcustomerid_value eq {lookup.upper()}")
    assert by_lookup == _truth(sim, "contacts", lambda r: r["_parentcustomerid_value"] == lookup)


def test_pk_or_chain_does_not_scan_the_table() -> None:
    sim = DataverseSimulator(["accounts"], row_counts={"accounts": 3000})
    table = sim.table("accounts")
    ids = truth_ids(sim, "accounts")[::60]
    expression = " or ".join(f"accountid eq {g}" for g in ids)
    expr = parse_filter(expression, table.column_types, "account")
    predicate = compile_filter(expr)
    calls = 0

    def counting(row: dict[str, Any]) -> bool:
        nonlocal calls
        calls += 1
        return predicate(row)

    query = CollectionQuery(table=table, filter_text=expression, filter_expr=expr,
                            predicate=counting)
    rows, more = fetch_page(query, None, 5000)
    assert [r["accountid"] for r in rows] == ids and not more
    assert calls <= len(ids)
    # Key ranges are bisected too, and agree with the default order.
    middle = truth_ids(sim, "accounts")[1000]
    expr = parse_filter(f"accountid gt {middle}", table.column_types, "account")
    predicate = compile_filter(expr)
    calls = 0
    ranged = CollectionQuery(table=table, filter_expr=expr, predicate=counting)
    rows, _ = fetch_page(ranged, None, 5000)
    assert [r["accountid"] for r in rows] == truth_ids(sim, "accounts")[1001:]
    assert calls == 0  # a pure key range is answered by the bounds: no row is tested


def test_filter_logic(org: tuple[DataverseSimulator, str], client: httpx.Client) -> None:
    sim, _ = org
    assert _filter_ids(client, "contacts", "jobtitle eq null") == _truth(
        sim, "contacts", lambda r: r["jobtitle"] is None)
    assert _filter_ids(client, "contacts", "jobtitle ne null") == _truth(
        sim, "contacts", lambda r: r["jobtitle"] is not None)
    # ne keeps nulls, as Dataverse's condition does.
    assert _filter_ids(client, "contacts", "jobtitle ne 'CRA'") == _truth(
        sim, "contacts", lambda r: r["jobtitle"] != "CRA")
    assert _filter_ids(client, "contacts", "not (statecode eq 0)") == _truth(
        sim, "contacts", lambda r: r["statecode"] != 0)
    expression = ("(statecode eq 1 or lastname eq 'Smith') and not (jobtitle eq null) "
                  "and birthdate lt 1980-01-01T00:00:00Z")
    assert _filter_ids(client, "contacts", expression) == _truth(
        sim, "contacts",
        lambda r: (r["statecode"] == 1 or r["lastname"] == "Smith")
        and r["jobtitle"] is not None
        and r["birthdate"] is not None and r["birthdate"] < "1980-01-01T00:00:00Z",
    )
    assert _filter_ids(client, "accounts", "revenue ge 1000000.5 and numberofemployees lt 5000"
                       ) == _truth(
        sim, "accounts",
        lambda r: r["revenue"] is not None and r["revenue"] >= 1000000.5
        and r["numberofemployees"] is not None and r["numberofemployees"] < 5000,
    )
    assert _filter_ids(client, "vin_candidates", "vin_enrolled eq true") == _truth(
        sim, "vin_candidates", lambda r: r["vin_enrolled"] is True)
    for broken, fragment in [
        ("statecode eq", "Expression expected"),
        ("statecode eq 1 and", "Expression expected"),
        ("(statecode eq 1", "')' or operator expected at position 15"),
        ("statecode eq 1)", "Syntax error at position 14"),
        ("statecode equals 1", "Syntax error"),
        ("nosuch eq 1", "Could not find a property named 'nosuch'"),
        ("statecode eq 'a'", "incompatible types"),
        ("lastname eq 5", "incompatible types"),
    ]:
        response = client.get(f"{API}/contacts", params={"$filter": broken})
        assert response.status_code == 400, broken
        assert fragment in error_of(response)["message"], broken


# ---------------------------------------------------------------------------------------------
# Change tracking
# ---------------------------------------------------------------------------------------------

DELTA_LINK_RE = re.compile(r"\$deltatoken=\d+%21\d{2}%2f\d{2}%2f\d{4}%20\d{2}%3a\d{2}%3a\d{2}$")


def test_change_tracking_round_trip(fresh: tuple[DataverseSimulator, str, httpx.Client]) -> None:
    sim, base, client = fresh
    select = {"$select": "fullname,jobtitle"}
    prefer = "odata.track-changes,odata.maxpagesize=50"
    rows, responses = follow(client, f"{API}/contacts", params=select, prefer=prefer)
    assert [r["contactid"] for r in rows] == truth_ids(sim, "contacts")
    for response in responses:
        assert "odata.track-changes" in response.headers["Preference-Applied"]
        assert "odata.maxpagesize=50" in response.headers["Preference-Applied"]
    assert all("@odata.deltaLink" not in r.json() for r in responses[:-1])
    delta_link = responses[-1].json()["@odata.deltaLink"]
    assert delta_link.startswith(f"{base}{API}/contacts?$select=fullname,jobtitle&$deltatoken=")
    assert DELTA_LINK_RE.search(delta_link)

    created = sim.create("contacts", {"firstname": "Ada", "lastname": "O'Delta"})
    updated_id = rows[5]["contactid"]
    sim.update("contacts", updated_id, {"jobtitle": "Changed"})
    deleted_id = rows[7]["contactid"]
    sim.delete("contacts", deleted_id)
    ephemeral = sim.create("contacts")["contactid"]
    sim.delete("contacts", ephemeral)
    twice = rows[9]["contactid"]
    sim.update("contacts", twice, {"jobtitle": "First"})
    sim.update("contacts", twice, {"jobtitle": "Second"})

    changes, pages = follow(client, delta_link, prefer="odata.track-changes,odata.maxpagesize=2")
    assert len(pages) == 3
    for page in pages:
        assert page.json()["@odata.context"] == (
            f"{base}{API}/$metadata#contacts(fullname,jobtitle)/$delta"
        )
    kinds = ["delete" if "reason" in c else "upsert" for c in changes]
    assert kinds == ["upsert", "upsert", "upsert", "delete", "delete"]
    upserts = {c["contactid"]: c for c in changes[:3]}
    assert set(upserts) == {created["contactid"], updated_id, twice}
    for contact_id, change in upserts.items():
        assert set(change) == {"@odata.etag", "fullname", "jobtitle", "contactid"}
        truth = sim.record("contacts", contact_id)
        assert truth is not None
        assert change["@odata.etag"] == truth["@odata.etag"]
        assert change["jobtitle"] == truth["jobtitle"]
    assert upserts[twice]["jobtitle"] == "Second"
    assert changes[3:] == [
        {"@odata.context": f"{base}{API}/$metadata#contacts/$deletedEntity", "id": deleted_id,
         "reason": "deleted"},
        {"@odata.context": f"{base}{API}/$metadata#contacts/$deletedEntity", "id": ephemeral,
         "reason": "deleted"},
    ]
    next_link = pages[-1].json()["@odata.deltaLink"]
    assert DELTA_LINK_RE.search(next_link) and next_link != delta_link
    quiet, _ = follow(client, next_link, prefer="odata.track-changes")
    assert quiet == []


def test_changes_during_initial_sync_reach_the_next_delta(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = fresh
    first_id = truth_ids(sim, "contacts")[0]

    def touch(page: int) -> None:
        if page == 1:
            sim.update("contacts", first_id, {"jobtitle": "Edited mid-sync"})

    rows, responses = follow(client, f"{API}/contacts", prefer="odata.track-changes,"
                             "odata.maxpagesize=40", between_pages=touch)
    assert len(rows) == 120
    changes, _ = follow(client, responses[-1].json()["@odata.deltaLink"])
    assert [c["contactid"] for c in changes] == [first_id]
    assert changes[0]["jobtitle"] == "Edited mid-sync"


def test_a_delta_token_from_the_last_page_misses_edits_of_rows_already_served() -> None:
    """delta_token_moment="last_page": the token marks the read's last page, so an edit of a
    row served earlier is in no delta (the default pins the first page: see above)."""
    sim = DataverseSimulator(ALL_ENTITIES, seed=7, row_counts=SMALL_COUNTS,
                             delta_token_moment="last_page")
    with serve_on_loopback(sim) as base, api_client(base, fetch_token(base)) as client:
        first_id = truth_ids(sim, "contacts")[0]

        def touch(page: int) -> None:
            if page == 1:
                sim.update("contacts", first_id, {"jobtitle": "Edited mid-sync"})

        _, responses = follow(client, f"{API}/contacts", prefer="odata.track-changes,"
                              "odata.maxpagesize=40", between_pages=touch)
        changes, _ = follow(client, responses[-1].json()["@odata.deltaLink"])
    assert changes == []


def test_page_number_paging_skips_a_row_when_an_earlier_one_moves() -> None:
    """paging="page_number": page N is the N-th slice of the result as it is then; a row of
    page 1 edited (so ordered last by modifiedon) shifts the rest: one row is never served."""
    sim = DataverseSimulator(ALL_ENTITIES, seed=7, row_counts=SMALL_COUNTS,
                             paging="page_number")
    order = {"$orderby": "modifiedon asc,contactid asc"}
    with serve_on_loopback(sim) as base, api_client(base, fetch_token(base)) as client:
        before, _ = follow(client, f"{API}/contacts", params=order,
                           prefer="odata.maxpagesize=40")
        ids = [r["contactid"] for r in before]

        def touch(page: int) -> None:
            if page == 1:
                sim.update("contacts", ids[0], {"jobtitle": "Edited mid-read"})

        rows, _ = follow(client, f"{API}/contacts", params=order,
                         prefer="odata.maxpagesize=40", between_pages=touch)
    served = [r["contactid"] for r in rows]
    assert ids[40] not in served and served.count(ids[0]) == 2  # skipped / served twice
    assert set(served) | {ids[40]} == set(ids)


def _what_a_read_loses(sim: DataverseSimulator) -> dict[str, bool]:
    """Over loopback: is a row skipped when an earlier one is edited between pages (a read by
    modifiedon), and is an edit of a row already served in no delta (a tracked read)?"""
    order = {"$orderby": "modifiedon asc,contactid asc"}
    with serve_on_loopback(sim) as base, api_client(base, fetch_token(base)) as client:
        ids = [r["contactid"] for r in follow(client, f"{API}/contacts", params=order)[0]]

        def touch(page: int) -> None:
            if page == 1:
                sim.update("contacts", ids[0], {"jobtitle": f"Edited {uuid.uuid4()}"})

        rows, _ = follow(client, f"{API}/contacts", params=order,
                         prefer="odata.maxpagesize=40", between_pages=touch)
        _, responses = follow(client, f"{API}/contacts", prefer="odata.track-changes,"
                              "odata.maxpagesize=40", between_pages=touch)
        changes, _ = follow(client, responses[-1].json()["@odata.deltaLink"])
    return {"row skipped": {r["contactid"] for r in rows} != set(ids),
            "edit in no delta": changes == []}


def test_the_simulator_command_serves_unsafe_paging_when_asked(capsys) -> None:
    """`dataverse-assets simulator --paging page_number --delta-token-moment last_page` serves
    a table whose paging loses rows and whose delta misses edits; by default it does neither;
    a value it does not know is one error line."""
    def simulator(*flags: str) -> DataverseSimulator:
        return cli.build_simulator(cli.build_parser().parse_args(
            ["simulator", "--port", "0", "--rows", "contacts=120", *flags]))

    assert _what_a_read_loses(simulator()) == {"row skipped": False, "edit in no delta": False}
    assert _what_a_read_loses(simulator("--paging", "page_number")) == {
        "row skipped": True, "edit in no delta": False}
    assert _what_a_read_loses(simulator("--delta-token-moment", "last_page")) == {
        "row skipped": False, "edit in no delta": True}
    for flag, bad in (("--paging", "cursor"), ("--delta-token-moment", "middle")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["simulator", flag, bad])
        assert exit_.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and f"argument {flag}: invalid choice: '{bad}'" in errors[0]


def test_delta_paging_is_pinned_to_its_window(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = fresh
    _, responses = follow(client, f"{API}/contacts", prefer="odata.track-changes")
    delta_link = responses[-1].json()["@odata.deltaLink"]
    changed = truth_ids(sim, "contacts")[:4]
    for contact_id in changed:
        sim.update("contacts", contact_id, {"jobtitle": "Round one"})

    def touch_served(page: int) -> None:
        # Re-changing a row already served must not shift the rest of the window.
        sim.update("contacts", changed[page - 1], {"jobtitle": f"Round two {page}"})
        if page == 1:
            # Deleted after the window closed: skipped now, reported by the next delta.
            sim.delete("contacts", changed[3])

    rows, pages = follow(client, delta_link, prefer="odata.track-changes,odata.maxpagesize=1",
                         between_pages=touch_served)
    assert [r["contactid"] for r in rows] == changed[:3] and len(pages) == 4
    assert pages[-1].json()["value"] == []
    again, _ = follow(client, pages[-1].json()["@odata.deltaLink"])
    assert [r.get("contactid", r.get("id")) for r in again] == changed
    assert again[-1]["reason"] == "deleted"


def test_change_tracking_rejections(fresh: tuple[DataverseSimulator, str, httpx.Client]) -> None:
    _, _, client = fresh
    prefer = {"Prefer": "odata.track-changes"}
    for option, value in [("$filter", "statecode eq 0"), ("$orderby", "fullname"),
                          ("$top", "5"), ("$expand", "parentcustomerid_account")]:
        response = client.get(f"{API}/contacts", params={option: value}, headers=prefer)
        assert response.status_code == 400, option
    disabled = client.get(f"{API}/systemusers", headers=prefer)
    assert disabled.status_code == 400
    assert error_of(disabled) == {
        "code": "0x80072491",
        "message": "Entity 'systemuser' is not enabled for change tracking.",
    }
    junction = client.get(f"{API}/vin_vin_candidate_accountset", headers=prefer)
    assert error_of(junction)["code"] == "0x80072491"


def test_expired_delta_token(fresh: tuple[DataverseSimulator, str, httpx.Client]) -> None:
    sim, _, client = fresh
    _, responses = follow(client, f"{API}/accounts", prefer="odata.track-changes")
    link = responses[-1].json()["@odata.deltaLink"]
    assert client.get(link).status_code == 200
    sim.expire_delta_tokens()
    expired = client.get(link)
    assert expired.status_code == 400
    assert error_of(expired) == {
        "code": "0x80044352",
        "message": "Version stamp associated with the client has expired. Please perform a "
        "full sync.",
    }
    # A full sync issues a fresh, working token.
    _, responses = follow(client, f"{API}/accounts", prefer="odata.track-changes")
    fresh_link = responses[-1].json()["@odata.deltaLink"]
    assert client.get(fresh_link).status_code == 200
    # Age-based expiry uses the simulator clock: seven days by default.
    sim.advance_clock(7 * 24 * 3600 - 60)
    assert client.get(fresh_link).status_code == 200
    sim.advance_clock(120)
    assert error_of(client.get(fresh_link))["code"] == "0x80044352"


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def test_entity_definitions_match_the_data(
    org: tuple[DataverseSimulator, str], client: httpx.Client
) -> None:
    sim, base = org
    response = client.get(f"{API}/EntityDefinitions", params={
        "$select": "LogicalName,EntitySetName,PrimaryIdAttribute,ChangeTrackingEnabled",
        "$expand": "Attributes($select=LogicalName,AttributeType)",
    })
    assert response.status_code == 200
    body = response.json()
    assert "@odata.nextLink" not in body
    definitions = {d["EntitySetName"]: d for d in body["value"]}
    assert set(definitions) == set(ALL_ENTITIES)
    for name in ALL_ENTITIES:
        spec = sim.spec(name)
        definition = definitions[name]
        assert definition["LogicalName"] == spec.logical_name
        assert definition["PrimaryIdAttribute"] == spec.primary_id_attribute
        assert definition["ChangeTrackingEnabled"] == spec.change_tracking_enabled
        attributes = {a["LogicalName"]: a for a in definition["Attributes"]}
        for attribute in definition["Attributes"]:
            assert set(attribute) == {"@odata.type", "MetadataId", "LogicalName",
                                      "AttributeType"}
            assert attribute["@odata.type"].startswith("#Microsoft.Dynamics.CRM.")
        assert attributes[spec.primary_id_attribute]["AttributeType"] == "Uniqueidentifier"
        for row in sim.records(name)[:50]:
            for key in row:
                if key == "@odata.etag":
                    continue
                match = re.fullmatch(r"_(\w+)_value", key)
                if match:
                    assert attributes[match.group(1)]["AttributeType"] in (
                        "Lookup", "Customer", "Owner"), key
                else:
                    assert key in attributes, key
                    # Virtual columns are never in rows, but for two kinds Dataverse lists
                    # as Virtual all the same: multi-select choices and file columns.
                    assert attributes[key]["AttributeType"] != "Virtual" or key in (
                        "vin_therapeuticareas", "vin_resume"), key
    account_attributes = {a["LogicalName"]: a["AttributeType"]
                          for a in definitions["accounts"]["Attributes"]}
    assert account_attributes["ownerid"] == "Owner"
    assert account_attributes["revenue"] == "Money"
    assert account_attributes["industrycodename"] == "Virtual"
    assert account_attributes["modifiedon"] == "DateTime"
    assert "modifiedon" not in {a["LogicalName"] for a in
                                definitions["vin_vin_candidate_accountset"]["Attributes"]}

    filtered = client.get(f"{API}/EntityDefinitions", params={
        "$select": "LogicalName,EntitySetName", "$filter": "LogicalName eq 'account'"}).json()
    assert [d["EntitySetName"] for d in filtered["value"]] == ["accounts"]

    single = client.get(f"{API}/EntityDefinitions(LogicalName='vin_candidate')",
                        params={"$select": "EntitySetName"}).json()
    assert single["EntitySetName"] == "vin_candidates" and "value" not in single
    assert single["@odata.context"].endswith("$metadata#EntityDefinitions(EntitySetName)/$entity")

    attrs = client.get(f"{API}/EntityDefinitions(LogicalName='contact')/Attributes").json()
    by_name = {a["LogicalName"]: a for a in attrs["value"]}
    assert by_name["parentcustomerid"]["AttributeType"] == "Customer"
    assert by_name["parentcustomerid"]["Targets"] == ["account", "contact"]
    assert by_name["contactid"]["IsPrimaryId"] is True

    missing = client.get(f"{API}/EntityDefinitions(LogicalName='nothing')")
    assert missing.status_code == 404


def test_csdl_metadata(org: tuple[DataverseSimulator, str], client: httpx.Client) -> None:
    sim, _ = org
    response = client.get(f"{API}/$metadata")
    assert response.status_code == 200 and "xml" in response.headers["Content-Type"]
    root = ET.fromstring(response.content)
    edm = "{http://docs.oasis-open.org/odata/ns/edm}"
    types = {t.get("Name"): t for t in root.iter(f"{edm}EntityType")}
    sets = {s.get("Name"): s.get("EntityType") for s in root.iter(f"{edm}EntitySet")}
    # organizations is served too (the org's one row), as in every Dataverse org.
    assert set(sets) == {*ALL_ENTITIES, "organizations"}
    for name in ALL_ENTITIES:
        spec = sim.spec(name)
        assert sets[name] == f"Microsoft.Dynamics.CRM.{spec.logical_name}"
        entity_type = types[spec.logical_name]
        key = [r.get("Name") for r in entity_type.iter(f"{edm}PropertyRef")]
        assert key == [spec.primary_id_attribute]
        properties = {p.get("Name"): p.get("Type") for p in entity_type.iter(f"{edm}Property")}
        assert set(properties) == set(spec.columns)
    assert types["account"].find(f"{edm}Property[@Name='modifiedon']").get("Type") == (
        "Edm.DateTimeOffset")


# ---------------------------------------------------------------------------------------------
# Annotations, single records, errors, stats
# ---------------------------------------------------------------------------------------------


def test_annotations(org: tuple[DataverseSimulator, str], client: httpx.Client) -> None:
    sim, _ = org
    formatted = "@OData.Community.Display.V1.FormattedValue"
    prefer = {"Prefer": 'odata.include-annotations="*",odata.maxpagesize=100'}
    response = client.get(f"{API}/accounts", headers=prefer, params={
        "$select": "industrycode,revenue,createdon,_primarycontactid_value,_ownerid_value,name"})
    assert response.headers["Preference-Applied"] == (
        'odata.maxpagesize=100,odata.include-annotations="*"')
    rows = response.json()["value"]
    assert len(rows) == 100
    contacts = {r["contactid"]: r for r in sim.records("contacts")}
    users = {r["systemuserid"]: r for r in sim.records("systemusers")}
    teams = {r["teamid"]: r for r in sim.records("teams")}
    saw_picklist = saw_team = False
    for row in rows:
        assert f"name{formatted}" not in row
        if row["industrycode"] is not None:
            saw_picklist = True
            assert isinstance(row[f"industrycode{formatted}"], str)
        if row["revenue"] is not None:
            # In the record's own currency (US Dollar, Euro or Swiss Franc).
            assert row[f"revenue{formatted}"][:1] in ("$", "€", "C")
        assert re.fullmatch(r"\d{1,2}/\d{1,2}/\d{4} \d{1,2}:\d{2} [AP]M",
                            row[f"createdon{formatted}"])
        contact = row["_primarycontactid_value"]
        if contact is not None:
            assert row["_primarycontactid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == (
                "contact")
            assert row[f"_primarycontactid_value{formatted}"] == contacts[contact]["fullname"]
        owner = row["_ownerid_value"]
        target = row["_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"]
        assert target in ("systemuser", "team")
        if target == "team":
            saw_team = True
            assert row[f"_ownerid_value{formatted}"] == teams[owner]["name"]
        else:
            assert row[f"_ownerid_value{formatted}"] == users[owner]["fullname"]
    assert saw_picklist and saw_team
    candidate = client.get(f"{API}/vin_candidates", params={"$top": "1"},
                           headers={"Prefer": 'odata.include-annotations="*"'}).json()["value"][0]
    assert candidate[f"vin_enrolled{formatted}"] in ("Yes", "No")
    assert candidate[f"statecode{formatted}"] in ("Active", "Inactive")
    plain = client.get(f"{API}/accounts", params={"$top": "5"})
    assert "Preference-Applied" not in plain.headers
    assert not any("@" in k for r in plain.json()["value"] for k in r if k != "@odata.etag")


def test_record_by_id(org: tuple[DataverseSimulator, str], client: httpx.Client) -> None:
    sim, base = org
    truth = sim.records("contacts")[42]
    response = client.get(f"{API}/contacts({truth['contactid']})")
    assert response.status_code == 200
    body = response.json()
    assert body.pop("@odata.context") == f"{base}{API}/$metadata#contacts/$entity"
    assert body == truth
    upper = client.get(f"{API}/contacts({truth['contactid'].upper()})",
                       params={"$select": "fullname"}).json()
    assert upper["fullname"] == truth["fullname"] and "jobtitle" not in upper
    missing_id = "00000000-0000-0000-0000-00000000abcd"
    missing = client.get(f"{API}/contacts({missing_id})")
    assert missing.status_code == 404
    assert error_of(missing) == {
        "code": "0x80040217",
        "message": f"contact With Id = {missing_id} Does Not Exist",
    }
    assert client.get(f"{API}/contacts(not-a-guid)").status_code == 400


def test_unknown_entity_set(client: httpx.Client) -> None:
    response = client.get(f"{API}/foo")
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json; odata.metadata=minimal"
    assert response.headers["OData-Version"] == "4.0"
    assert error_of(response) == {
        "code": "0x80060888",
        "message": "Resource not found for the segment 'foo'.",
    }


def test_repeated_query_option_is_rejected(client: httpx.Client) -> None:
    response = client.get(f"{API}/accounts?$select=name&$select=revenue")
    assert response.status_code == 400
    assert "more than once" in error_of(response)["message"]


def test_stats(fresh: tuple[DataverseSimulator, str, httpx.Client]) -> None:
    sim, base, client = fresh
    sim.reset_stats()
    assert sim.stats.requests == 0 and not sim.stats.status_counts
    rows, responses = follow(client, f"{API}/accounts", prefer="odata.maxpagesize=25")
    assert len(responses) == 3
    client.get(f"{API}/foo")
    client.get(f"{API}/EntityDefinitions")
    fetch_token(base)
    assert sim.stats.requests == 4
    assert sim.stats.requests_by_entity == {"accounts": 3}
    assert sim.stats.rows_served["accounts"] == 60 == len(rows)
    assert sim.stats.token_requests == 1
    assert sim.stats.metadata_requests == 1
    assert sim.stats.status_counts == {200: 5, 404: 1}
    sim.reset_stats()
    assert sim.stats.requests == 0 and sim.stats.rows_served == {}


def test_server_stops_cleanly() -> None:
    sim = DataverseSimulator(["teams"], row_counts={"teams": 2})
    with serve_on_loopback(sim) as base:
        assert httpx.get(f"{base}{API}/").status_code == 401
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}{API}/", timeout=2)


# ---------------------------------------------------------------------------------------------
# Service protection limits
# ---------------------------------------------------------------------------------------------


def _throttled(response: httpx.Response, code: str) -> float:
    """Assert a Dataverse 429 with this code; return its Retry-After."""
    assert response.status_code == 429, response.text
    assert error_of(response)["code"] == code
    return float(response.headers["Retry-After"])


def test_service_protection_is_off_by_default(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = fresh
    assert not sim.limits.enabled
    statuses = {client.get(f"{API}/teams").status_code for _ in range(150)}
    assert statuses == {200} and sim.stats.throttled == 0
    real = ServiceProtectionLimits.dataverse()
    assert (real.max_requests, real.max_execution_seconds, real.max_concurrent,
            real.window_seconds) == (6000, 1200.0, 52, 300.0)


def test_every_answer_reports_the_budget_left_in_the_ratelimit_headers(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = fresh
    assert "x-ms-ratelimit-burst-remaining-xrm-requests" not in client.get(f"{API}/teams").headers
    sim.limits = ServiceProtectionLimits(max_requests=5, max_execution_seconds=30.0)
    lefts = []
    for _ in range(5):
        headers = client.get(f"{API}/teams").headers
        lefts.append(int(headers["x-ms-ratelimit-burst-remaining-xrm-requests"]))
        seconds = float(headers["x-ms-ratelimit-time-remaining-xrm-requests"].replace(",", ""))
        assert 29.0 < seconds <= 30.0
    assert lefts == [4, 3, 2, 1, 0]  # counting the request being answered
    throttled = client.get(f"{API}/teams")
    assert throttled.status_code == 429
    assert "x-ms-ratelimit-burst-remaining-xrm-requests" not in throttled.headers


def test_request_limit_throttles_and_retry_after_grows_while_the_client_pushes(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, base, client = fresh
    sim.limits = ServiceProtectionLimits(max_requests=3, window_seconds=0.3,
                                         retry_after_granularity=0.05, push_penalty_seconds=0.2)
    assert [client.get(f"{API}/teams").status_code for _ in range(3)] == [200] * 3
    first = client.get(f"{API}/teams")
    first_wait = _throttled(first, REQUESTS_CODE)
    assert 0.05 <= first_wait <= 0.3
    assert "Number of requests exceeded the limit of 3" in error_of(first)["message"]
    pushed = _throttled(client.get(f"{API}/teams"), REQUESTS_CODE)
    assert pushed > first_wait  # pushing during a throttle only makes it longer
    # Another application user has limits of its own.
    other = api_client(base, sim.issue_access_token("another-app"))
    assert other.get(f"{API}/teams").status_code == 200
    time.sleep(pushed + 0.05)
    assert client.get(f"{API}/teams").status_code == 200  # the window slid on
    assert sim.stats.throttled == 2 and sim.stats.requests_while_throttled == 1
    assert sim.stats.throttled_by_code == {REQUESTS_CODE: 2}
    assert sim.stats.status_counts[429] == 2
    assert [r.retry_after for r in sim.stats.request_log if r.status == 429] == [
        first_wait, pushed]


def test_execution_time_limit_counts_slow_requests(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = fresh
    sim.limits = ServiceProtectionLimits(max_execution_seconds=0.1, window_seconds=1.0,
                                         retry_after_granularity=0.05)
    sim.inject("slow", count=2, seconds=0.06)
    assert [client.get(f"{API}/teams").status_code for _ in range(2)] == [200, 200]
    response = client.get(f"{API}/teams")
    wait = _throttled(response, EXECUTION_TIME_CODE)
    assert 0.5 <= wait <= 1.0
    assert "Combined execution time" in error_of(response)["message"]


def test_concurrency_limit_refuses_at_once(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, base, _ = fresh
    sim.limits = ServiceProtectionLimits(max_concurrent=2, concurrency_retry_after=0.5,
                                         retry_after_granularity=0.5)
    sim.fault_plan = FaultPlan(rates={"slow": 1.0}, slow_seconds=(0.3, 0.3))
    token = fetch_token(base)

    async def burst() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as c:
            return await asyncio.gather(*(c.get(f"{API}/teams") for _ in range(4)))

    responses = asyncio.run(burst())
    assert sorted(r.status_code for r in responses) == [200, 200, 429, 429]
    for response in responses:
        if response.status_code == 429:
            assert _throttled(response, CONCURRENCY_CODE) == 0.5
            assert "concurrent requests exceeded the limit of 2" in error_of(response)["message"]
    assert sim.stats.max_concurrency >= 3


# ---------------------------------------------------------------------------------------------
# Injected faults
# ---------------------------------------------------------------------------------------------


def test_server_error_bursts_look_like_gateways_and_dataverse(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = fresh
    sim.inject("server_error", count=2, entity="teams", status=502)
    sim.inject("server_error", entity="teams", status=503, body="json")
    accounts = client.get(f"{API}/accounts")  # another entity: untouched
    responses = [client.get(f"{API}/teams") for _ in range(4)]
    assert accounts.status_code == 200
    assert [r.status_code for r in responses] == [502, 502, 503, 200]
    assert "502 Bad Gateway" in responses[0].text
    assert responses[0].headers["content-type"].startswith("text/html")
    assert set(error_of(responses[2])) == {"code", "message"}
    assert sim.stats.faults == {"server_error": 3}
    assert sim.stats.status_counts[502] == 2 and sim.stats.status_counts[503] == 1
    assert [r.fault for r in sim.stats.request_log][-4:] == ["server_error"] * 3 + [None]


def test_a_connection_reset_drops_the_socket_mid_body(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = fresh
    sim.inject("reset", entity="accounts")
    with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
        client.get(f"{API}/accounts")
    assert client.get(f"{API}/accounts").status_code == 200
    # In-process there is no socket: the transport raises an httpx transport error instead.
    sim.inject("reset", entity="accounts")

    async def in_process() -> None:
        transport = httpx.ASGITransport(app=create_app(sim))
        headers = {"Authorization": f"Bearer {sim.issue_access_token()}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://sim.test",
                                     headers=headers) as c:
            await c.get(f"{API}/accounts")

    with pytest.raises(httpx.TransportError) as excinfo:
        asyncio.run(in_process())
    assert isinstance(excinfo.value, SimulatedConnectionReset)
    assert sim.stats.faults["reset"] == 2


def test_slow_and_malformed_responses(fresh: tuple[DataverseSimulator, str, httpx.Client]) -> None:
    sim, _, client = fresh
    sim.inject("slow", entity="teams", seconds=0.25)
    started = time.monotonic()
    assert client.get(f"{API}/teams").status_code == 200
    assert time.monotonic() - started >= 0.25
    sim.inject("malformed", entity="teams")
    truncated = client.get(f"{API}/teams")
    assert truncated.status_code == 200
    assert int(truncated.headers["content-length"]) == len(truncated.content)
    with pytest.raises(ValueError):
        truncated.json()
    sim.inject("malformed", entity="teams", body="html")
    html = client.get(f"{API}/teams")
    assert html.status_code == 200 and html.text.lstrip().startswith("<!DOCTYPE HTML")
    assert sim.stats.faults == {"slow": 1, "malformed": 2}


def test_token_expiry_and_records_changing_between_pages(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = fresh
    before = {row["accountid"]: row for row in sim.records("accounts")}
    # Mutations wait for a nextLink request: the client is between pages.
    sim.inject("delete_records", entity="accounts", rows=2)
    sim.inject("modify_records", entity="accounts", rows=3, after=1)
    rows, responses = follow(client, f"{API}/accounts", prefer="odata.maxpagesize=20")
    after = {row["accountid"]: row for row in sim.records("accounts")}
    assert len(before) - len(after) == 2
    edited = [pk for pk in after if after[pk]["name"] != before[pk]["name"]]
    assert len(edited) == 3 and all(after[pk]["name"].endswith(" (edited)") for pk in edited)
    assert all(after[pk]["modifiedon"] > before[pk]["modifiedon"] for pk in edited)
    ids = [row["accountid"] for row in rows]
    assert len(ids) == len(set(ids)) and set(after) <= set(ids) <= set(before)
    assert sim.stats.faults == {"modify_records": 1, "delete_records": 1}
    sim.inject("token_expiry")
    expired = client.get(f"{API}/teams")
    assert expired.status_code == 401 and "expired" in error_of(expired)["message"]
    assert "WWW-Authenticate" in expired.headers


def test_repeat_next_link_points_back_at_the_page_served(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, base, client = fresh
    first = client.get(f"{API}/accounts", headers={"Prefer": "odata.maxpagesize=10"})
    link = first.json()["@odata.nextLink"]
    sim.inject("repeat_next_link", entity="accounts")
    second = client.get(link, headers={"Prefer": "odata.maxpagesize=10"})
    assert second.json()["@odata.nextLink"] == link
    assert second.json()["value"] != first.json()["value"]


def test_endless_next_link_serves_the_same_page_under_a_new_link_each_time(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = fresh
    sim.inject("endless_next_link", count=3, entity="teams")
    prefer = {"Prefer": "odata.track-changes,odata.maxpagesize=100"}
    first = client.get(f"{API}/teams", headers=prefer)  # every row: no nextLink of its own
    links = [first.json()["@odata.nextLink"]]
    pages = [first.json()]
    for _ in range(2):
        pages.append(client.get(links[-1], headers=prefer).json())
        links.append(pages[-1]["@odata.nextLink"])
    assert len(set(links)) == 3, "each link is new"
    assert all(page["value"] == pages[0]["value"] for page in pages), "the same rows each time"
    assert all("@odata.deltaLink" not in page for page in pages)
    after = client.get(links[-1], headers=prefer).json()  # the fault is used up
    assert after["value"] == pages[0]["value"] and "@odata.deltaLink" in after
    assert sim.stats.faults == {"endless_next_link": 3}


def test_trickle_sends_the_body_a_piece_at_a_time(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = fresh
    whole = client.get(f"{API}/teams", headers={"Prefer": "odata.maxpagesize=2"}).content
    sim.inject("trickle", entity="teams", seconds=0.01, chunk=len(whole) // 10)
    started = time.monotonic()
    pieces: list[bytes] = []
    with client.stream("GET", f"{API}/teams", headers={"Prefer": "odata.maxpagesize=2"}) as r:
        headers_after = time.monotonic() - started
        pieces = list(r.iter_raw())
    assert b"".join(pieces) == whole and len(pieces) >= 10
    assert headers_after < 0.05 and time.monotonic() - started >= 0.09
    assert sim.stats.faults == {"trickle": 1}


def test_redirect_points_at_another_host_and_echo_headers_repeats_the_token(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, _, client = fresh
    sim.inject("redirect", entity="teams", host="https://elsewhere.invalid")
    moved = client.get(f"{API}/teams?$top=1")
    assert moved.status_code == 302 and not moved.is_success
    assert moved.headers["location"] == "https://elsewhere.invalid/api/data/v9.2/teams?$top=1"
    sim.inject("echo_headers", entity="teams")
    echoed = client.get(f"{API}/teams")
    assert echoed.status_code == 400
    token = client.headers["Authorization"].removeprefix("Bearer ")
    assert f'"authorization":"Bearer {token}"' in error_of(echoed)["message"]
    assert sim.stats.faults == {"redirect": 1, "echo_headers": 1}


def test_a_fault_plan_is_a_seeded_random_scenario() -> None:
    def run(seed: int) -> list[tuple[str | None, int]]:
        sim = DataverseSimulator(["teams"], row_counts={"teams": 3})
        sim.fault_plan = FaultPlan(seed=seed, rates={"server_error": 0.2, "malformed": 0.1},
                                   burst=(2, 4))

        async def go() -> None:
            transport = httpx.ASGITransport(app=create_app(sim))
            headers = {"Authorization": f"Bearer {sim.issue_access_token()}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://sim.test",
                                         headers=headers) as c:
                for _ in range(60):
                    await c.get(f"{API}/teams")

        asyncio.run(go())
        assert sum(sim.stats.faults.values()) == sum(
            1 for r in sim.stats.request_log if r.fault)
        return [(r.fault, r.status) for r in sim.stats.request_log]

    first, again, other = run(5), run(5), run(6)
    assert first == again and first != other
    kinds = [kind for kind, _ in first]
    assert "server_error" in kinds and "malformed" in kinds
    # A 5xx comes in bursts of 2..4.
    runs = [len(list(g)) for k, g in itertools.groupby(kinds) if k == "server_error"]
    assert runs and min(runs) >= 2
    with pytest.raises(ValueError, match="unknown fault kind"):
        DataverseSimulator(["teams"], row_counts={"teams": 1}).inject("gremlins")
    assert FaultPlan.parse("seed=3,reset=0.5").rates == {"reset": 0.5}


def test_request_log_and_max_concurrency(
    fresh: tuple[DataverseSimulator, str, httpx.Client],
) -> None:
    sim, base, _ = fresh
    sim.reset_stats()
    sim.fault_plan = FaultPlan(rates={"slow": 1.0}, slow_seconds=(0.1, 0.1))
    token = fetch_token(base)

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10,
                                     headers={"Authorization": f"Bearer {token}"}) as c:
            await asyncio.gather(*(c.get(f"{API}/teams") for _ in range(5)))

    asyncio.run(burst())
    assert sim.stats.max_concurrency == 5
    log = [r for r in sim.stats.request_log if r.entity == "teams"]
    # asyncio may wake a sleep up to its clock resolution early.
    assert len(log) == 5 and all(r.finished - r.arrived >= 0.095 for r in log)
    assert all(r.target == f"{API}/teams" and r.status == 200 for r in log)
    sim.reset_stats()
    assert sim.stats.max_concurrency == 0 and not sim.stats.request_log


# ---------------------------------------------------------------------------------------------
# Scale: lazily generated tables
# ---------------------------------------------------------------------------------------------


def test_a_million_row_table_is_generated_lazily_in_little_memory() -> None:
    tracemalloc.start()
    try:
        started = time.perf_counter()
        sim = DataverseSimulator(["accounts", "contacts", "systemusers", "teams"],
                                 row_counts={"accounts": 1_000_000, "contacts": 200})
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 10 and peak < 60_000_000  # the eager generator would need gigabytes
    table = sim.table("accounts")
    assert table.lazy is not None and len(table.rows) == len(table.order_keys) == 1_000_000
    again = DataverseSimulator(["accounts", "contacts", "systemusers", "teams"],
                               row_counts={"accounts": 1_000_000, "contacts": 200})
    middle = table.key_to_pk[table.order_keys[500_000]]
    assert sim.record("accounts", middle) == again.record("accounts", middle)
    # A page from the middle, by key range, costs what the first page costs.
    rows, more = fetch_page(CollectionQuery(table=table, filter_expr=parse_filter(
        f"accountid gt {middle}", table.column_types, "account")), None, 5000)
    assert more and len(rows) == 5000
    assert rows[0]["accountid"] == table.key_to_pk[table.order_keys[500_001]]
    keys = [guid_order_key(r["accountid"]) for r in rows]
    assert keys == sorted(keys)
    row = rows[0]
    assert set(row) == {"@odata.etag", *sim.spec("accounts").columns}
    assert row["versionnumber"] == int(row["@odata.etag"][3:-1])
    assert "2024-01-01T00:00:00Z" <= row["createdon"] <= row["modifiedon"] <= "2026-01-01T00:00:00Z"
    contact_ids = set(truth_ids(sim, "contacts"))
    assert all(r["_primarycontactid_value"] in contact_ids for r in rows
               if r["_primarycontactid_value"] is not None)


def test_lazy_tables_page_filter_annotate_and_change_like_held_ones() -> None:
    eager = DataverseSimulator(["accounts", "contacts", "systemusers", "teams"], seed=9,
                               row_counts={"accounts": 300})
    sim = DataverseSimulator(["accounts", "contacts", "systemusers", "teams"], seed=9,
                             row_counts={"accounts": 300}, lazy_entities=["accounts"])
    assert sim.table("accounts").lazy is not None and eager.table("accounts").lazy is None
    rows = sim.records("accounts")
    account_ids = {r["accountid"] for r in rows}
    linked = [c["_parentcustomerid_value"] for c in sim.records("contacts")
              if c["_parentcustomerid_value"] is not None and sim.lookup_target(
                  "contacts", c["contactid"], "_parentcustomerid_value") == "account"]
    assert linked and set(linked) <= account_ids
    assert [r["accountid"] for r in rows] == sorted(
        (r["accountid"] for r in rows), key=guid_order_key)
    assert len({r["@odata.etag"] for r in rows}) == 300
    served = _asgi_follow(sim, f"{API}/accounts", 40)
    assert served == rows
    industry = next(r["industrycode"] for r in rows if r["industrycode"] is not None)
    filtered = _asgi_follow(sim, f"{API}/accounts", 25,
                            {"$filter": f"industrycode eq {industry}", "$select": "name"})
    assert [r["accountid"] for r in filtered] == [
        r["accountid"] for r in rows if r["industrycode"] == industry]
    annotated = _annotated(sim, f"{API}/accounts?$select=_ownerid_value")
    users, teams = set(truth_ids(sim, "systemusers")), set(truth_ids(sim, "teams"))
    for row in annotated:
        target = row["_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"]
        assert row["_ownerid_value"] in {"systemuser": users, "team": teams}[target]
    assert {r["_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"]
            for r in annotated} == {"systemuser", "team"}

    tracked, delta_link = _tracking_read(sim, "accounts")
    assert len(tracked) == 300
    created = sim.create("accounts", {"name": "Lazy & Co"})
    updated = rows[10]["accountid"]
    sim.update("accounts", updated, {"name": "Renamed"})
    deleted = rows[20]["accountid"]
    sim.delete("accounts", deleted)
    current = sim.records("accounts")
    assert len(current) == 300 and deleted not in {r["accountid"] for r in current}
    assert _asgi_follow(sim, f"{API}/accounts", 33) == current
    assert sim.record("accounts", updated)["name"] == "Renamed"
    changes, _ = _tracking_read(sim, "accounts", delta_link)
    assert {c.get("accountid") or c.get("id") for c in changes} == {
        created["accountid"], updated, deleted}


def _annotated(sim: DataverseSimulator, url: str) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        transport = httpx.ASGITransport(app=create_app(sim))
        headers = {"Authorization": f"Bearer {sim.issue_access_token()}",
                   "Prefer": 'odata.include-annotations="*"'}
        async with httpx.AsyncClient(transport=transport, base_url="http://sim.test",
                                     headers=headers) as c:
            return (await c.get(url)).json()["value"]

    return asyncio.run(run())


def _tracking_read(sim: DataverseSimulator, entity_set: str,
                   link: str | None = None) -> tuple[list[dict[str, Any]], str]:
    async def run() -> tuple[list[dict[str, Any]], str]:
        transport = httpx.ASGITransport(app=create_app(sim))
        headers = {"Authorization": f"Bearer {sim.issue_access_token()}",
                   "Prefer": "odata.track-changes,odata.maxpagesize=70"}
        rows: list[dict[str, Any]] = []
        async with httpx.AsyncClient(transport=transport, base_url="http://sim.test",
                                     headers=headers) as c:
            body = (await c.get(link or f"{API}/{entity_set}")).json()
            while True:
                rows.extend(body["value"])
                if "@odata.deltaLink" in body:
                    return rows, body["@odata.deltaLink"]
                body = (await c.get(body["@odata.nextLink"])).json()

    return asyncio.run(run())


@settings(max_examples=60, deadline=None)
@given(count=st.integers(0, 60), operations=st.lists(
    st.tuples(st.booleans(), st.integers(0, 10**6)), max_size=40))
def test_lazy_key_index_behaves_like_a_sorted_list(
    count: int, operations: list[tuple[bool, int]]
) -> None:
    source = LazyRowSource(count=count, seed=1, primary_key="accountid")
    index = LazyKeyIndex(count, source.order_key)
    truth = [source.order_key(i) for i in range(count)]
    for insert, number in operations:
        if insert or not truth:
            key = guid_order_key(str(uuid.UUID(int=number * 7919 % 2**128, version=4)))
            if key in truth:
                continue
            bisect.insort(truth, key)
            bisect.insort(index, key)
        else:
            position = number % len(truth)
            del truth[position]
            del index[position]
        assert len(index) == len(truth)
    assert list(index) == truth
    assert [index[i] for i in range(len(truth))] == truth
    assert index[1:4] == truth[1:4]
    for key in truth[:5]:
        assert bisect.bisect_left(index, key) == bisect.bisect_left(truth, key)
    assert [source.index_of(source.pk(i)) for i in range(count)] == list(range(count))


@pytest.mark.parametrize("lazy", [False, True])
def test_descending_key_order_walks_the_index_backwards(lazy: bool) -> None:
    sim = DataverseSimulator(["accounts"], seed=5, row_counts={"accounts": 90},
                             lazy_entities=["accounts"] if lazy else ())
    ids = truth_ids(sim, "accounts")
    served = _asgi_follow(sim, f"{API}/accounts", 7, {"$orderby": "accountid desc"})
    assert [r["accountid"] for r in served] == ids[::-1]
    ranged = _asgi_follow(sim, f"{API}/accounts", 4, {
        "$orderby": "accountid desc", "$filter": f"accountid lt {ids[50]} and statecode eq 0"})
    assert [r["accountid"] for r in ranged] == [
        r["accountid"] for r in sim.records("accounts")[:50][::-1] if r["statecode"] == 0]
    assert not sim.table("accounts").cache  # nothing was sorted
