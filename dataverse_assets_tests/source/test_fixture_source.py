"""The fixture source: saved responses on disk flow through the same assets as live data."""

import json

import orjson
from dagster import DagsterInstance

from dataverse_assets.config import Settings
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.ops.cli import new_change_set_key
from dataverse_assets.source.fixture import FixtureSource
from dataverse_assets.store.db import connect

RECORDS = [
    {"@odata.etag": 'W/"101"', "vin_candidateid": "00000000-0000-4000-8000-000000000001",
     "vin_name": "Ann O'Hara", "vin_score": 7.5, "vin_enrolled": True,
     "modifiedon": "2025-01-02T03:04:05Z"},
    {"@odata.etag": 'W/"102"', "vin_candidateid": "00000000-0000-4000-8000-000000000002",
     "vin_name": "東京 office", "vin_score": None, "vin_enrolled": False,
     "modifiedon": "2025-01-03T03:04:05Z"},
    {"@odata.etag": 'W/"103"', "vin_candidateid": "00000000-0000-4000-8000-000000000003",
     "vin_name": "", "vin_score": 3, "vin_enrolled": False,
     "modifiedon": "2025-01-04T03:04:05Z"},
]


def write_fixture(directory):
    folder = directory / "vin_candidates"
    folder.mkdir(parents=True)
    first = {"@odata.context": "x", "value": RECORDS[:2], "@odata.nextLink": "saved"}
    second = {"@odata.context": "x", "value": RECORDS[2:]}
    (folder / "page-00001.json").write_bytes(orjson.dumps(first))
    (folder / "page-00002.json").write_bytes(orjson.dumps(second))


def test_saved_pages_become_canonical_rows_without_metadata(tmp_path):
    write_fixture(tmp_path / "fixtures")
    config = tmp_path / "entities.json"
    config.write_text(json.dumps({
        "groups": {"daily": {"cron": "0 3 * * *"}},
        "entities": [{"name": "vin_candidates", "group": "daily", "incremental": "full"}],
    }))
    settings = Settings(db_path=tmp_path / "m.db", archive_dir=tmp_path / "archive",
                        entities_config_path=config, source="fixture",
                        fixtures_dir=tmp_path / "fixtures")
    defs = build_definitions(settings, FixtureSource(directory=str(tmp_path / "fixtures")))
    with DagsterInstance.ephemeral() as instance:
        key = new_change_set_key(instance, "daily")
        result = defs.resolve_job_def("sync_daily").execute_in_process(
            instance=instance, partition_key=key)
    assert result.success
    connection = connect(settings.db_path)
    rows = connection.execute(
        "SELECT vin_candidateid, vin_name, vin_score, vin_enrolled, json_response"
        " FROM vin_candidates ORDER BY vin_candidateid").fetchall()
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (r["vin_candidateid"], r["vin_name"], r["vin_score"], int(r["vin_enrolled"]))
        for r in RECORDS
    ]
    assert [orjson.loads(r[4]) for r in rows] == RECORDS
    schema = connection.execute(
        "SELECT primary_key, decided_from FROM _schema WHERE entity='vin_candidates'").fetchone()
    assert schema == ("vin_candidateid", "sample")
