"""`dataverse-assets doctor` against the loopback simulator: what passes, what fails, and that
the secret never shows."""

import json
import re
from contextlib import closing

import orjson
import pytest

from dataverse_assets.config import DEFAULT_ENTITIES_CONFIG
from dataverse_assets.ops import cli
from dataverse_assets.ops.doctor import FAIL, INFO, PASS, WARN, ratelimit_headroom
from dataverse_assets.simulator import SIMULATOR_CLIENT_ID, ServiceProtectionLimits
from dataverse_assets_tests.postgres_server import connect as postgres_connect
from dataverse_assets_tests.servers import free_port

WRONG_SECRET = "not-the-secret-7Q~xYz"


def entities_file(tmp_path, extra: list[dict] | None = None, page_size: int = 40):
    raw = json.loads(DEFAULT_ENTITIES_CONFIG.read_text())
    for entity in raw["entities"]:
        entity["page_size"] = page_size
    raw["entities"] += extra or []
    path = tmp_path / "entities_config.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture
def doctor_env(tmp_path, monkeypatch, simulator_url):
    """The environment of a person pointing the mirror at the loopback org."""
    _, url = simulator_url
    monkeypatch.setenv("DATAVERSE_DB_PATH", str(tmp_path / "mirror.db"))
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(entities_file(tmp_path)))
    monkeypatch.setenv("DATAVERSE_URL", url)
    monkeypatch.setenv("DATAVERSE_SOURCE", "simulator")
    return url


def run_doctor_json(capsys, *args: str) -> tuple[int, dict]:
    code = cli.main(["doctor", "--json", *args])
    out = capsys.readouterr().out
    return code, orjson.loads(out)


def by_entity(report: dict, entity: str | None) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"] if c["entity"] == entity}


def test_doctor_passes_every_check_against_the_simulator(doctor_env, capsys):
    code, report = run_doctor_json(capsys)
    assert code == 0 and report["ok"]
    general = by_entity(report, None)
    assert [c["name"] for c in report["checks"][:5]] == [
        "configuration", "store", "tenant discovery", "access token", "org access"]
    assert all(general[name]["status"] == PASS for name in
               ("configuration", "store", "tenant discovery", "access token", "org access"))
    assert general["store"]["detail"].endswith(
        "mirror.db does not exist yet: the first sync creates it")
    candidates = by_entity(report, "vin_candidates")
    assert list(candidates) == ["reachable", "primary key, modifiedon", "change tracking",
                                "choices", "paging", "$filter on the key"]
    assert all(c["status"] == PASS for c in candidates.values())
    assert "'vin_candidateid'" in candidates["primary key, modifiedon"]["detail"]
    assert "incremental mode 'change_tracking'" in candidates["change tracking"]["detail"]
    assert "pages of 40 honoured" in candidates["paging"]["detail"]
    assert "nextLink followed" in candidates["paging"]["detail"]
    assert "vin_name eq 'O''Brien'" in candidates["$filter on the key"]["detail"]
    # What the readable view will show, from the org's attribute metadata.
    assert candidates["choices"]["detail"] == (
        "4 choice columns (1 Boolean, 1 MultiSelectPicklist, 1 Picklist, 1 State), 13 options,"
        " 13 labelled in language 1033; 2 lookups (1 polymorphic)")
    assert "1 DateOnly" in by_entity(report, "contacts")["choices"]["detail"]
    # No x-ms-ratelimit-* headers from the simulator: said so, not failed.
    assert general["throttling headroom"]["status"] == INFO
    assert "not reported" in general["throttling headroom"]["detail"]


def test_tables_without_change_tracking_are_info_with_the_mode_used(doctor_env, capsys):
    code, report = run_doctor_json(capsys, "--entity", "systemusers", "--entity",
                                   "vin_vin_candidate_accountset")
    assert code == 0
    users = by_entity(report, "systemusers")["change tracking"]
    assert users["status"] == INFO
    assert users["detail"].startswith("not enabled; incremental mode 'modifiedon'")
    junction = by_entity(report, "vin_vin_candidate_accountset")
    assert junction["change tracking"]["status"] == INFO
    assert "incremental mode 'full'" in junction["change tracking"]["detail"]
    assert "no modifiedon column" in junction["primary key, modifiedon"]["detail"]
    assert {c["entity"] for c in report["checks"]} == {
        None, "systemusers", "vin_vin_candidate_accountset"}


def test_the_doctor_checks_a_postgresql_store_without_writing_to_it(
        doctor_env, monkeypatch, capsys, postgres_store_url, postgres_cluster):
    url = postgres_store_url
    monkeypatch.setenv("DATAVERSE_STORE_URL", url)
    code, report = run_doctor_json(capsys)
    store = by_entity(report, None)["store"]
    assert code == 0 and store["status"] == PASS, store
    database = url.rsplit("/", 1)[1]
    assert re.fullmatch(rf"PostgreSQL [0-9.]+.*, database {database} as {postgres_cluster.user}:"
                        r" no entity mirrored yet \(the first sync creates the tables\)",
                        store["detail"]), store
    with closing(postgres_connect(url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert cursor.fetchone() == (0,)  # read only: not even the bookkeeping tables
        # A user who may not create tables (PostgreSQL 15 grants CREATE on public to no one).
        cursor.execute(f"CREATE ROLE reader_{database} LOGIN")
        connection.commit()
    monkeypatch.setenv("DATAVERSE_STORE_URL", url.replace(
        f"{postgres_cluster.user}@", f"reader_{database}@"))
    code, report = run_doctor_json(capsys)
    store = by_entity(report, None)["store"]
    assert code == 1 and store["status"] == FAIL
    assert store["detail"].endswith("the user may not create tables in schema public")
    assert store["fix"].startswith(f"GRANT CREATE ON SCHEMA public TO reader_{database} ")
    # A server that does not answer: said in one line, with what to check.
    monkeypatch.setenv("DATAVERSE_STORE_URL", f"postgresql://someone@127.0.0.1:{free_port()}/x")
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("FAIL  store"))
    assert "cannot connect to the PostgreSQL store" in line, out
    assert "-> check that the server runs and DATAVERSE_STORE_URL names it" in out


def test_wrong_secret_fails_at_the_token_and_never_shows_the_secret(tmp_path, monkeypatch,
                                                                     simulator_url, capsys):
    _, url = simulator_url
    monkeypatch.setenv("DATAVERSE_DB_PATH", str(tmp_path / "mirror.db"))
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(entities_file(tmp_path)))
    monkeypatch.setenv("DATAVERSE_SOURCE", "live")
    monkeypatch.setenv("DATAVERSE_URL", url)
    monkeypatch.setenv("DATAVERSE_AUTHORITY", url)
    monkeypatch.setenv("DATAVERSE_CLIENT_ID", SIMULATOR_CLIENT_ID)
    monkeypatch.setenv("DATAVERSE_CLIENT_SECRET", WRONG_SECRET)

    assert cli.main(["doctor"]) == 1
    text = capsys.readouterr()
    code, report = run_doctor_json(capsys)
    assert code == 1 and not report["ok"]
    general = by_entity(report, None)
    assert general["tenant discovery"]["status"] == PASS
    token = general["access token"]
    assert token["status"] == FAIL
    assert "AADSTS7000215" in token["detail"] and "DATAVERSE_CLIENT_SECRET" in token["fix"]
    assert {c["status"] for c in report["checks"] if c["entity"]} == {"SKIP"}
    for output in (text.out, text.err, json.dumps(report)):
        assert WRONG_SECRET not in output
    assert "FAIL  access token" in text.out and "-> check DATAVERSE_CLIENT_ID" in text.out


def test_an_entity_the_org_lacks_fails_with_a_suggestion(tmp_path, monkeypatch, doctor_env,
                                                          capsys):
    typo = {"name": "acounts", "group": "daily"}
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG",
                       str(entities_file(tmp_path, extra=[typo])))
    code, report = run_doctor_json(capsys)
    assert code == 1 and not report["ok"]
    (check,) = by_entity(report, "acounts").values()  # nothing more to check without it
    assert check["name"] == "reachable" and check["status"] == FAIL
    assert "no entity set 'acounts' (404)" in check["detail"]
    assert "did you mean 'accounts'" in check["detail"]
    assert "entity set name" in check["fix"]
    # The other entities still pass.
    assert all(c["status"] in (PASS, INFO) for c in report["checks"]
               if c["entity"] not in ("acounts",))


def test_a_table_the_application_user_may_not_read_fails_with_the_fix(
        doctor_env, simulator_url, capsys):
    sim, _ = simulator_url
    sim.deny_read("teams")
    code, report = run_doctor_json(capsys, "--entity", "teams", "--entity", "vin_candidates")
    assert code == 1 and not report["ok"]
    (check,) = by_entity(report, "teams").values()
    assert check["status"] == FAIL and "refused (403)" in check["detail"]
    assert "missing prvReadteam privilege" in check["detail"]
    assert "Read privilege" in check["fix"]
    assert all(c["status"] == PASS for c in by_entity(report, "vin_candidates").values())


def test_a_bad_entities_file_fails_the_first_check(tmp_path, monkeypatch, doctor_env, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"groups": {"daily": {"cron": "0 3 * * *"}},
                                "entities": [{"name": "teams", "group": "daily",
                                              "incremental": "sometimes"}]}))
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(path))
    code, report = run_doctor_json(capsys)
    assert code == 1
    (check,) = report["checks"]
    assert check["name"] == "configuration" and check["status"] == FAIL
    assert "entity 'teams' (entities[0]), field 'incremental'" in check["detail"]


@pytest.mark.parametrize("variable, value, expected", [
    ("DATAVERSE_URL", "http://contoso.crm.dynamics.com",
     "DATAVERSE_URL: plain http:// to a host other than this machine"),
    ("DATAVERSE_AUTHORITY", "http://login.example.com",
     "DATAVERSE_AUTHORITY: plain http:// to a host other than this machine"),
    ("DATAVERSE_CLIENT_SECRET", "Qz7#kp", "DATAVERSE_CLIENT_SECRET: shorter than 8 characters"),
    ("DATAVERSE_URL", "contoso.crm.dynamics.com",
     "DATAVERSE_URL: 'contoso.crm.dynamics.com' has no scheme; write https://"),
])
def test_the_doctor_reports_an_unsafe_live_setting_as_the_sync_does(
        variable, value, expected, doctor_env, simulator_url, monkeypatch, capsys):
    sim, url = simulator_url
    monkeypatch.setenv("DATAVERSE_SOURCE", "live")
    monkeypatch.setenv("DATAVERSE_AUTHORITY", url)
    monkeypatch.setenv("DATAVERSE_CLIENT_ID", SIMULATOR_CLIENT_ID)
    monkeypatch.setenv("DATAVERSE_CLIENT_SECRET", "long-enough-secret")
    monkeypatch.setenv(variable, value)
    assert cli.main(["doctor"]) == 1
    text = capsys.readouterr()
    code, report = run_doctor_json(capsys)
    assert code == 1
    (check,) = report["checks"]  # nothing is sent anywhere
    assert check["name"] == "configuration" and check["status"] == FAIL
    assert check["detail"].startswith(expected)
    if "http://" in value:
        assert "set DATAVERSE_ALLOW_INSECURE_HTTP=true" in check["detail"]
    assert f"FAIL  configuration  {expected}" in text.out
    assert "Qz7#kp" not in text.out + text.err + json.dumps(report)
    assert not sim.stats.request_log
    assert cli.main(["sync"]) == 2 and expected in capsys.readouterr().err


def test_throttling_headroom_from_a_throttling_org(doctor_env, simulator_url, capsys):
    sim, _ = simulator_url
    sim.limits = ServiceProtectionLimits.dataverse()
    code, report = run_doctor_json(capsys, "--entity", "teams")
    headroom = by_entity(report, None)["throttling headroom"]
    assert code == 0 and headroom["status"] == PASS
    assert "x-ms-ratelimit-burst-remaining-xrm-requests: 59" in headroom["detail"]
    # Another client of the same application user has used nearly all of the window.
    sim.limits = ServiceProtectionLimits(max_requests=400, max_execution_seconds=1200.0)
    code, report = run_doctor_json(capsys, "--entity", "teams")
    headroom = by_entity(report, None)["throttling headroom"]
    assert code == 0 and headroom["status"] == WARN  # a warning, not a failure
    assert "requests budget is left" in headroom["fix"]


def test_throttling_headroom_reads_the_ratelimit_headers():
    plenty = ratelimit_headroom({"x-ms-ratelimit-burst-remaining-xrm-requests": "5999",
                                 "x-ms-ratelimit-time-remaining-xrm-requests": "1,199.50",
                                 "Content-Type": "application/json"})
    assert plenty.status == PASS
    assert plenty.detail == ("x-ms-ratelimit-burst-remaining-xrm-requests: 5999; "
                             "x-ms-ratelimit-time-remaining-xrm-requests: 1,199.50")
    scarce = ratelimit_headroom({"X-MS-RateLimit-Burst-Remaining-XRM-Requests": "120"})
    assert scarce.status == WARN and "requests" in scarce.fix
    assert ratelimit_headroom({}).detail.startswith("not reported")


def test_choices_count_the_options_shown_in_the_base_language_for_want_of_a_translation(
        tmp_path, monkeypatch, doctor_env, capsys):
    """industrycode is only partly translated to German in the org: the doctor says how many
    options the readable view will show in the base language instead, and what to do."""
    path = entities_file(tmp_path, page_size=40)
    raw = json.loads(path.read_text())
    raw["labels"] = {"language_code": 1031}
    path.write_text(json.dumps(raw))
    code, report = run_doctor_json(capsys)
    accounts = by_entity(report, "accounts")["choices"]
    assert accounts["status"] == INFO
    assert ("labelled in language 1031 (6 shown in the base language 1033: no label in 1031)"
            in accounts["detail"])
    assert "labels.language_code" in accounts["fix"]
    assert by_entity(report, "vin_clinicaltrials")["choices"]["status"] == INFO  # vin_phase
    assert by_entity(report, "contacts")["choices"]["status"] == PASS
