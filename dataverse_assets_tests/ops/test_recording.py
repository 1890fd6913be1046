"""`dataverse-assets fixtures record`: real responses into the fixture layout, replayed through
Dagster to the same canonical rows as the live sync."""

import json
from pathlib import Path

import orjson
from dagster import DagsterInstance

from dataverse_assets.config import Settings
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.ops import cli
from dataverse_assets.ops.cli import new_change_set_key
from dataverse_assets.ops.recording import Scrubber
from dataverse_assets.simulator import SIMULATOR_CLIENT_SECRET
from dataverse_assets.source.fixture import FixtureSource
from dataverse_assets.store.db import connect, quote_identifier
from dataverse_assets.store.tables import SYNC_COLUMNS
from dataverse_assets_tests.conftest import failure_messages
from dataverse_assets_tests.truth import PRIMARY_KEYS

RECORDED = ["vin_candidates", "vin_clinicaltrials", "vin_vin_candidate_accountset", "accounts"]
FULL = {"incremental": "full"}


def record(mirror, tmp_path, monkeypatch, *args: str) -> Path:
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "fixtures"
    assert cli.main(["fixtures", "record", "--out", str(out), *args]) == 0
    return out


def replay(fixtures: Path, config_path: Path, folder: Path, entities: list[str]):
    """Sync the recorded entities from the fixtures, through Dagster; returns the database."""
    raw = json.loads(config_path.read_text())
    raw["entities"] = [e for e in raw["entities"] if e["name"] in entities]
    folder.mkdir()
    (folder / "entities.json").write_text(json.dumps(raw))
    settings = Settings(db_path=folder / "replay.db", archive_dir=folder / "archive",
                        entities_config_path=folder / "entities.json", source="fixture",
                        fixtures_dir=fixtures)
    defs = build_definitions(settings, FixtureSource(directory=str(fixtures)))
    with DagsterInstance.ephemeral() as instance:
        key = new_change_set_key(instance, "hourly")
        result = defs.resolve_job_def("sync_hourly").execute_in_process(
            instance=instance, partition_key=key, raise_on_error=False)
    assert result.success, failure_messages(result)
    return connect(settings.db_path)


def table_contents(connection, entity: str) -> dict[str, dict]:
    """Every row by key: its typed columns and json_response, without the sync bookkeeping
    (when it was fetched, which change set wrote it)."""
    bookkeeping = {name for name, _ in SYNC_COLUMNS} - {"json_response"} | {"valid_from"}
    cursor = connection.execute(f"SELECT * FROM {quote_identifier(entity)}")
    names = [d[0] for d in cursor.description]
    rows = {}
    for row in cursor:
        values = dict(zip(names, row, strict=True))
        values["json_response"] = orjson.loads(values["json_response"])
        rows[values[PRIMARY_KEYS[entity]]] = {k: v for k, v in values.items()
                                              if k not in bookkeeping}
    return rows


def test_replaying_a_recording_gives_the_canonical_rows_of_the_live_sync(
        make_mirror, tmp_path, monkeypatch, capsys):
    mirror = make_mirror(overrides={"vin_candidates": FULL, "vin_clinicaltrials": FULL})
    # accounts are filtered: their linking tables are recorded with them.
    fixtures = record(mirror, tmp_path, monkeypatch, "--entity", "accounts", "--pages", "10")
    printed = capsys.readouterr().out
    assert sorted(p.name for p in fixtures.iterdir() if p.is_dir()) == sorted(RECORDED)
    assert "accounts: " in printed and "mode filtered" in printed
    for entity in RECORDED:
        assert (fixtures / entity / "entity_definition.json").exists()
        assert sorted(fixtures.glob(f"{entity}/page-*.json"))
    mirror.sync("hourly")  # the live sync, from the same org state

    replayed = replay(fixtures, mirror.settings.entities_config_path, tmp_path / "replay",
                      RECORDED)
    live = mirror.connection()
    for entity in RECORDED:
        expected = table_contents(live, entity)
        assert expected, entity
        assert table_contents(replayed, entity) == expected, entity


def test_recording_caps_pages_fetches_needed_records_and_scrubs_stably(
        mirror, tmp_path, monkeypatch, capsys):
    fixtures = record(mirror, tmp_path, monkeypatch, "--entity", "accounts", "--pages", "1",
                      "--page-size", "10", "--scrub", "name", "--scrub", "emailaddress1")
    for entity in ("vin_candidates", "vin_clinicaltrials", "vin_vin_candidate_accountset"):
        assert [p.name for p in sorted(fixtures.glob(f"{entity}/page-*.json"))] == [
            "page-00001.json"]
    # One page of each linking table names more accounts than one page of ids holds: the
    # rest were asked for one by one and saved as records/<id>.json.
    singles = sorted((fixtures / "accounts" / "records").glob("*.json"))
    assert singles
    manifest = orjson.loads((fixtures / "recording.json").read_bytes())
    assert manifest["scrubbed_columns"] == ["emailaddress1", "name"]
    accounts = {a["accountid"]: a for a in mirror.simulator.records("accounts")}

    saved = [orjson.loads(p.read_bytes()) for p in singles]
    for page in fixtures.glob("accounts/page-*.json"):
        saved += orjson.loads(page.read_bytes())["value"]
    fakes = {}
    for account in saved:
        original = accounts[account["accountid"]]  # keys are not scrubbed: links still match
        assert account["name"] != original["name"] and account["name"].startswith("scrubbed-")
        assert account["emailaddress1"] is None or account["emailaddress1"].endswith(
            "@example.invalid")
        assert account["accountnumber"] == original["accountnumber"]  # not asked for
        fakes[account["accountid"]] = account["name"]
    # The same input gives the same fake: a trial's sponsor shows the account's fake name.
    trials = orjson.loads((fixtures / "vin_clinicaltrials" / "page-00001.json").read_bytes())
    sponsors = [t for t in trials["value"] if t["_vin_sponsorid_value"] in fakes]
    assert sponsors
    for trial in sponsors:
        assert (trial["_vin_sponsorid_value@OData.Community.Display.V1.FormattedValue"]
                == fakes[trial["_vin_sponsorid_value"]])

    everything = b"".join(p.read_bytes() for p in fixtures.rglob("*") if p.is_file())
    for original in accounts.values():
        assert original["name"].encode() not in everything
    # Only bodies are written: no secret, no token, no Authorization header.
    for secret in [SIMULATOR_CLIENT_SECRET, *mirror.simulator.issued_access_tokens()]:
        assert secret.encode() not in everything
    assert b"Bearer" not in everything and b"access_token" not in everything

    # The scrubbed recording replays: every linked account comes back, under its own key.
    replayed = replay(fixtures, mirror.settings.entities_config_path, tmp_path / "replay",
                      RECORDED)
    assert set(table_contents(replayed, "accounts")) == set(fakes)


def test_scrubbed_values_keep_their_shape():
    scrubber = Scrubber(["c"], salt=b"fixed")
    guid = "3F2C1A9E-0B5D-4C1E-9A77-5D1B2C3D4E5F"
    assert scrubber.fake(guid) == scrubber.fake(guid.lower())  # GUIDs compare without case
    fake_guid = scrubber.fake(guid)
    assert len(fake_guid) == 36 and fake_guid != guid.lower()
    assert scrubber.fake("+1 (425) 555-0100")[:4] == "+1 ("
    assert scrubber.fake("1965-05-08T00:00:00Z").endswith("T00:00:00Z")
    assert len(str(scrubber.fake(201348))) <= 6
    assert scrubber.fake(None) is None and scrubber.fake(True) is True
    assert Scrubber(["c"], salt=b"other").fake("x") != scrubber.fake("x")
