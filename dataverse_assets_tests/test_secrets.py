"""Secrets never leak: a full sync with a recognisable secret, then every file it produced
(database, archive, Dagster's instance storage and logs) is searched for it and its tokens."""

from pathlib import Path

from dagster import DagsterInstance

from dataverse_assets.cli import new_change_set_key
from dataverse_assets.config import load_settings
from dataverse_assets.definitions import build_definitions
from dataverse_assets_tests.conftest import failure_messages, write_entities_config

SECRET = "S3CR3T-do-not-leak-7f1e2d"
WRONG = "WR0NG-secret-must-not-leak-93a1"


def produced_files(root: Path):
    for path in root.rglob("*"):
        if path.is_file():
            yield path


def test_a_full_sync_leaves_no_secret_or_token_anywhere(tmp_path, simulator_url, monkeypatch,
                                                         capfd):
    simulator, url = simulator_url
    simulator.client_secret = SECRET
    config = write_entities_config(tmp_path / "entities.json", page_size=200)
    environment = {
        "DATAVERSE_URL": url, "DATAVERSE_SOURCE": "live", "DATAVERSE_AUTHORITY": url,
        "DATAVERSE_CLIENT_ID": simulator.client_id, "DATAVERSE_CLIENT_SECRET": SECRET,
        "DATAVERSE_DB_PATH": str(tmp_path / "mirror.db"),
        "DATAVERSE_ARCHIVE_DIR": str(tmp_path / "archive"),
        "DATAVERSE_ENTITIES_CONFIG": str(config),
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(dotenv=False)
    defs = build_definitions(settings)
    (tmp_path / "dagster_home").mkdir()
    with DagsterInstance.local_temp(tempdir=str(tmp_path / "dagster_home")) as instance:
        for group in ("hourly", "daily"):
            key = new_change_set_key(instance, group)
            result = defs.resolve_job_def(f"sync_{group}").execute_in_process(
                instance=instance, partition_key=key, raise_on_error=False)
            assert result.success, failure_messages(result)
        # A wrong secret: a clear failure, and the wrong secret is not repeated anywhere.
        monkeypatch.setenv("DATAVERSE_CLIENT_SECRET", WRONG)
        key = new_change_set_key(instance, "daily")
        failed = build_definitions(load_settings(dotenv=False)).resolve_job_def(
            "sync_daily").execute_in_process(instance=instance, partition_key=key,
                                             raise_on_error=False)
        assert not failed.success
        messages = failure_messages(failed)
        assert "DATAVERSE_CLIENT_SECRET" in messages and "401" in messages

    tokens = list(simulator._tokens)
    assert tokens, "the sync should have used bearer tokens"
    needles = [SECRET.encode(), WRONG.encode(), *(t.encode() for t in tokens)]
    searched = 0
    for path in produced_files(tmp_path):
        data = path.read_bytes()
        searched += 1
        for needle in needles:
            assert needle not in data, f"{needle[:6]!r}... found in {path}"
    assert searched > 20  # database, WAL, archive pages, manifests, instance storage
    output = capfd.readouterr()
    for needle in needles:
        assert needle.decode() not in output.out + output.err
    assert SECRET not in messages and WRONG not in messages
