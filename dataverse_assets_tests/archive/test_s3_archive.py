"""The archive on object storage (DATAVERSE_ARCHIVE_URL=s3://bucket/prefix): the same layout,
manifests, compaction, retention and rebuild as a folder, against an S3-compatible server the
tests start (moto, with authentication on); no credential in any object, key, log line,
exception or run metadata; a refused or unreachable store is one line and leaves the mirror
as it was."""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import sqlite3
from contextlib import closing

import orjson
import pytest
from dagster import DagsterInstance

from dataverse_assets.archive.change_sets import (
    MANIFEST,
    ChangeSetArchive,
    list_change_sets,
)
from dataverse_assets.archive.compacted import compact_change_set, rewrite_pages
from dataverse_assets.archive.storage import S3Storage, open_storage, storage_of
from dataverse_assets.config import PROJECT_ROOT, Settings, load_settings
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.errors import ArchiveError, ConfigError
from dataverse_assets.ops.cli import new_change_set_key
from dataverse_assets.ops.rebuild import rebuild
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.store.archive_retention import compact_archive
from dataverse_assets.store.db import quote_identifier
from dataverse_assets.sync import stage
from dataverse_assets_tests.conftest import ENTITY_NAMES, Mirror, write_entities_config
from dataverse_assets_tests.helpers import root_error
from dataverse_assets_tests.servers import free_port
from dataverse_assets_tests.truth import CONFIGURED, FILTERED, assert_mirror_equals_simulator

PREFIX = "org/archive"


def s3_mirror(tmp_path, simulator_url, bucket: str, endpoint: str, name: str = "s3",
              prefix: str = PREFIX, overrides: dict | None = None) -> Mirror:
    """A mirror of the loopback simulator whose archive is s3://bucket/prefix."""
    simulator, url = simulator_url
    folder = tmp_path / name
    folder.mkdir()
    config_path = write_entities_config(folder / "entities_config.json", page_size=40,
                                        overrides=overrides)
    settings = load_settings({
        "DATAVERSE_DB_PATH": str(folder / "mirror.db"),
        "DATAVERSE_ARCHIVE_URL": f"s3://{bucket}/{prefix}",
        "DATAVERSE_S3_ENDPOINT_URL": endpoint,
        "DATAVERSE_ENTITIES_CONFIG": str(config_path),
        "DATAVERSE_SOURCE": "simulator"}, dotenv=False)
    source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=url)
    (folder / "dagster_home").mkdir()
    instance = DagsterInstance.local_temp(tempdir=str(folder / "dagster_home"))
    return Mirror(simulator, settings, build_definitions(settings, source=source), instance, url)


def local_mirror(tmp_path, simulator_url, name: str = "local") -> Mirror:
    simulator, url = simulator_url
    folder = tmp_path / name
    folder.mkdir()
    config_path = write_entities_config(folder / "entities_config.json", page_size=40)
    settings = Settings(db_path=folder / "mirror.db", archive_dir=folder / "archive",
                        entities_config_path=config_path, source="simulator")
    source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=url)
    return Mirror(simulator, settings, build_definitions(settings, source=source),
                  DagsterInstance.ephemeral(), url)


def layout(keys, change_sets: dict[str, list[str]]) -> dict[tuple[str, int], list[str]]:
    """(entity, n-th change set) -> its file names: the layout without the keys' times."""
    found: dict[tuple[str, int], list[str]] = {}
    for key in keys:
        entity, change_set, name = key.split("/")
        found.setdefault((entity, change_sets[entity].index(change_set)), []).append(name)
    return {where: sorted(names) for where, names in found.items()}


def canonical(db_path) -> dict[str, list[tuple]]:
    """Every row of every canonical table there is."""
    with closing(sqlite3.connect(db_path)) as connection:
        tables = {name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {entity: sorted(connection.execute(
            f"SELECT * FROM {quote_identifier(entity)}").fetchall(), key=repr)
            for entity in ENTITY_NAMES if entity in tables}


def data_tables(db_path) -> dict[str, list[tuple]]:
    with closing(sqlite3.connect(db_path)) as connection:
        return {table: sorted(connection.execute(
            f"SELECT * FROM {quote_identifier(table)}").fetchall(), key=repr)
            for entity in ENTITY_NAMES for table in (entity, f"{entity}__history")}


# -- the whole path: sync, layout, rebuild, compaction, retention ------------------------------

def test_a_sync_to_s3_writes_the_folder_layout_as_objects_and_a_rebuild_from_it_is_equal(
        s3, tmp_path, simulator_url):
    bucket = s3.new_bucket()
    mirror = s3_mirror(tmp_path, simulator_url, bucket, s3.endpoint)
    folder_mirror = local_mirror(tmp_path, simulator_url)
    mirror.sync_all()
    folder_mirror.sync_all()

    for entity in CONFIGURED + list(FILTERED):
        assert_mirror_equals_simulator(mirror, entity)
    objects = s3.objects(bucket)
    assert objects and all(key.startswith(PREFIX + "/") for key in objects)
    keys = [key.removeprefix(PREFIX + "/") for key in objects]
    storage = storage_of(mirror.settings)
    on_s3 = {e: list_change_sets(storage, e) for e in ENTITY_NAMES}
    local = folder_mirror.settings.archive_dir
    in_folder = {e: list_change_sets(local, e) for e in ENTITY_NAMES}
    folder_keys = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    # The same files under the same names, change set by change set.
    assert layout(keys, on_s3) == layout(folder_keys, in_folder)
    manifest = ChangeSetArchive(storage, "vin_candidates", on_s3["vin_candidates"][0]).manifest()
    assert manifest["summary"]["records"] == 130 and len(manifest["pages"]) == 4
    assert gzip.decompress(objects[f"{PREFIX}/vin_candidates/{on_s3['vin_candidates'][0]}/"
                                   "page-00001.json.gz"]).startswith(b"{")
    # Nothing went to the default local folder instead.
    assert not any((PROJECT_ROOT / "data" / "archive" / e / key).exists()
                   for e, keys_ in on_s3.items() for key in keys_)

    into = tmp_path / "rebuilt.db"
    rebuild(mirror.settings.entities, storage, into)
    assert data_tables(into) == data_tables(mirror.settings.db_path)

    # Compaction: the page objects become checked Parquet parts, and rebuild stays equal.
    report = compact_archive(storage, mirror.settings.entities, older_than_days=0)
    assert report.compacted and report.bytes_after < report.bytes_before
    key = on_s3["vin_candidates"][0]
    names = storage.names(f"vin_candidates/{key}")
    assert "pages-0001-of-0001.parquet" in names and not any(
        n.startswith("page-") for n in names)
    into2 = tmp_path / "rebuilt-from-parquet.db"
    rebuild(mirror.settings.entities, storage, into2)
    assert data_tables(into2) == data_tables(mirror.settings.db_path)


def test_retention_on_s3_deletes_no_op_change_sets_and_rebuild_stays_equal(
        s3, tmp_path, simulator_url):
    bucket = s3.new_bucket()
    mirror = s3_mirror(tmp_path, simulator_url, bucket, s3.endpoint)
    for _ in range(3):  # the second and third change nothing
        mirror.sync("hourly")
    storage = storage_of(mirror.settings)
    entity = "vin_vin_candidate_accountset"  # full snapshots: the middle one is a no-op
    before = list_change_sets(storage, entity)
    raw = json.loads(mirror.settings.entities_config_path.read_text())
    raw["archive"] = {"retention_days": 0}
    mirror.settings.entities_config_path.write_text(json.dumps(raw))
    config = load_settings({"DATAVERSE_ENTITIES_CONFIG": str(mirror.settings.entities_config_path)},
                           dotenv=False).entities

    report = compact_archive(storage, config, db_path=mirror.settings.db_path,
                             older_than_days=0)

    assert (entity, before[1]) in {(d.entity, d.change_set) for d in report.deleted}
    assert list_change_sets(storage, entity) == [before[0], before[2]]
    assert not storage.holds_anything(f"{entity}/{before[1]}")  # every object of it gone
    into = tmp_path / "rebuilt.db"
    rebuild(config, storage, into)
    assert canonical(into) == canonical(mirror.settings.db_path)


def test_a_change_set_without_a_manifest_is_not_listed_and_its_fetch_starts_over(
        s3, tmp_path, simulator_url):
    bucket = s3.new_bucket()
    mirror = s3_mirror(tmp_path, simulator_url, bucket, s3.endpoint)
    key = new_change_set_key(mirror.instance, "hourly")
    storage = storage_of(mirror.settings)
    died = ChangeSetArchive(storage, "vin_candidates", key)  # a fetch that died mid-way
    died.start()
    for number in range(1, 10):
        died.write_page(number, b'{"value": [{"vin_candidateid": "stale"}]}')

    assert list_change_sets(storage, "vin_candidates") == []
    assert not died.is_complete()

    mirror.run("hourly", key)

    assert list_change_sets(storage, "vin_candidates") == [key]
    assert died.page_names() == [f"page-{n:05d}.json.gz" for n in range(1, 5)]
    assert_mirror_equals_simulator(mirror, "vin_candidates")


def test_staging_workers_read_pages_from_s3(s3, tmp_path, simulator_url, monkeypatch):
    """Worker processes get the storage pickled (bucket, prefix, endpoint: no client, no
    credential) and read the pages themselves."""
    bucket = s3.new_bucket()
    mirror = s3_mirror(tmp_path, simulator_url, bucket, s3.endpoint)
    monkeypatch.setenv(stage.STAGING_WORKERS_ENV, "2")
    monkeypatch.setattr(stage, "PARALLEL_STAGING_MIN_PAGES", 2)
    monkeypatch.setenv("DATAVERSE_STAGE_WHILE_FETCHING", "false")
    storage = storage_of(mirror.settings)
    assert s3.secret_access_key.encode() not in pickle.dumps(storage)

    mirror.sync("hourly")

    assert_mirror_equals_simulator(mirror, "vin_candidates")


# -- credentials: nowhere, and refused ones in one line -----------------------------------------

def test_no_object_key_log_line_error_or_run_metadata_holds_the_secret(
        s3, tmp_path, simulator_url, caplog, capsys):
    caplog.set_level(logging.DEBUG, logger="botocore")
    caplog.set_level(logging.DEBUG, logger="dataverse_assets")
    bucket = s3.new_bucket()
    mirror = s3_mirror(tmp_path, simulator_url, bucket, s3.endpoint)
    results = [mirror.run(group)[1] for group in ("hourly", "daily")]
    storage = storage_of(mirror.settings)
    compact_archive(storage, mirror.settings.entities, older_than_days=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_SECRET_ACCESS_KEY", "a-wrong-secret-" + "x" * 25)
        results.append(mirror.run("hourly")[1])
    assert not results[-1].success and all(r.success for r in results[:-1])

    secret = s3.secret_access_key
    texts = [caplog.text, *capsys.readouterr()]
    texts += [repr(event) for result in results for event in result.all_events]
    texts += [str(mirror.instance.all_logs(result.run_id)) for result in results]
    texts += [root_error(results[-1])]
    for key, body in s3.objects(bucket).items():
        texts.append(key)
        texts.append(body.decode("latin-1"))
        if key.endswith(".gz"):
            texts.append(gzip.decompress(body).decode("latin-1"))
    for entity in ENTITY_NAMES:
        for key in list_change_sets(storage, entity):
            texts.extend(body.decode("latin-1") for body in
                         ChangeSetArchive(storage, entity, key).iter_page_bodies())
    for path in mirror.settings.db_path.parent.iterdir():
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    assert len(texts) > 100 and any("s3://" in t for t in texts)
    leaked = [t[:200] for t in texts if secret in t or "a-wrong-secret" in t]
    assert not leaked


def test_a_wrong_secret_is_one_line_and_leaves_the_mirror_as_it_was(
        s3, tmp_path, simulator_url, monkeypatch):
    bucket = s3.new_bucket()
    mirror = s3_mirror(tmp_path, simulator_url, bucket, s3.endpoint)
    mirror.sync("hourly")
    simulator = mirror.simulator
    simulator.create("vin_candidates", {"vin_name": "Written while the store refused us"})
    before = canonical(mirror.settings.db_path)
    archived = s3.objects(bucket).keys()

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong" + s3.secret_access_key[5:])
    key, result = mirror.run("hourly")

    assert not result.success
    message = root_error(result)
    assert "\n" not in message, message
    assert f"s3://{bucket}/{PREFIX}" in message and s3.endpoint in message, message
    assert "AWS_SECRET_ACCESS_KEY" in message and "refused" in message, message
    assert s3.secret_access_key[5:] not in message
    assert canonical(mirror.settings.db_path) == before
    assert s3.objects(bucket).keys() == archived  # nothing of the failed change set

    # With the right secret the same change set completes: nothing was lost.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_access_key)
    _, again = mirror.run("hourly", key)
    assert again.success
    assert_mirror_equals_simulator(mirror, "vin_candidates")


def test_an_unreachable_endpoint_is_one_line_naming_it(s3, tmp_path, simulator_url):
    nothing_there = f"http://127.0.0.1:{free_port()}"
    mirror = s3_mirror(tmp_path, simulator_url, "mirror-archive-nowhere", nothing_there)

    _, result = mirror.run("hourly")

    message = root_error(result)
    assert not result.success and "\n" not in message, message
    assert nothing_there in message and "cannot be reached" in message, message
    assert "s3://mirror-archive-nowhere/" in message
    assert not mirror.settings.db_path.exists() or canonical(mirror.settings.db_path) == {}


def test_a_missing_bucket_is_one_line_naming_it(s3):
    storage = open_storage("s3://no-such-bucket-here/a", endpoint_url=s3.endpoint)
    with pytest.raises(ArchiveError) as caught:
        ChangeSetArchive(storage, "accounts", "20260101T000000Z").start()
    message = str(caught.value)
    assert "s3://no-such-bucket-here/a" in message and s3.endpoint in message
    assert "bucket does not exist" in message and "\n" not in message


# -- the storage itself, both kinds ----------------------------------------------------------

def page_bodies(pages: int) -> list[bytes]:
    return [orjson.dumps({"value": [{"thingid": f"id-{page}-{n}", "text": "x" * 500}
                                    for n in range(200)]}) for page in range(1, pages + 1)]


@pytest.fixture
def storage(archive_root):
    return archive_root


def test_pages_manifest_and_listing_behave_the_same_on_both(storage):
    archive = ChangeSetArchive(storage, "things", "20260101T000000Z")
    archive.start()
    bodies = page_bodies(3)
    for number, body in enumerate(bodies, start=1):
        archive.write_page(number, body)
    assert list_change_sets(storage, "things") == []  # no manifest yet
    archive.finish({"mode": "full", "summary": {},
                    "pages": [{"kind": "snapshot", "shape": "collection"}] * 3})
    ChangeSetArchive(storage, "things", "20260102T000000Z").start()  # never finished

    assert list_change_sets(storage, "things") == ["20260101T000000Z"]
    assert archive.is_complete() and archive.manifest()["mode"] == "full"
    assert archive.page_names() == [f"page-{n:05d}.json.gz" for n in (1, 2, 3)]
    assert list(archive.iter_page_bodies()) == bodies
    assert [r for _, r in archive.iter_page_records()][0][0]["thingid"] == "id-1-0"
    assert archive.read_json("missing.json") is None

    done = compact_change_set(archive, zstd_level=3)
    assert done is not None and not done.kept_pages
    assert archive.compacted_parts() == ["pages-0001-of-0001.parquet"]
    assert archive.page_names() == []
    assert list(archive.iter_page_bodies()) == bodies

    assert rewrite_pages(archive, lambda body, shape: body.replace(b"x" * 500, b"y")) == 3
    assert list(archive.iter_page_bodies()) == [b.replace(b"x" * 500, b"y") for b in bodies]


def test_an_incomplete_set_of_parts_is_ignored_and_compaction_starts_over(storage):
    """A crash between two part uploads (or renames): the page files still count."""
    archive = ChangeSetArchive(storage, "things", "20260101T000000Z")
    archive.start()
    bodies = page_bodies(4)
    for number, body in enumerate(bodies, start=1):
        archive.write_page(number, body)
    archive.finish({"mode": "full", "summary": {},
                    "pages": [{"kind": "snapshot", "shape": "collection"}] * 4})
    storage.put(archive.key("pages-0001-of-0002.parquet"), b"half of a compaction")

    assert archive.compacted_parts() == [] and list(archive.iter_page_bodies()) == bodies
    assert compact_change_set(archive, part_bytes=len(bodies[0]) * 2) is not None
    assert archive.compacted_parts() == ["pages-0001-of-0002.parquet",
                                         "pages-0002-of-0002.parquet"]
    assert list(archive.iter_page_bodies()) == bodies


def test_deleting_a_change_set_removes_its_manifest_and_every_object(storage):
    from dataverse_assets.archive.compacted import delete_change_set

    archive = ChangeSetArchive(storage, "things", "20260101T000000Z")
    archive.start()
    archive.write_page(1, b'{"value": []}')
    archive.finish({"mode": "full", "summary": {}, "pages": [{}]})
    assert delete_change_set(archive) > 0
    assert not archive.is_complete() and not storage.holds_anything(archive.folder)
    assert not storage.exists(archive.key(MANIFEST))


# -- configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "words"), [
    ("s3://", "no bucket"),
    ("s3:///prefix", "no bucket"),
    ("ftp://host/x", "ftp:// is not supported"),
    ("s3://Bad_Bucket/x", "bucket name is not one S3 accepts"),
    ("s3://ab/x", "bucket name is not one S3 accepts"),
    ("s3://192.168.1.1/x", "bucket name is not one S3 accepts"),
    ("s3://bucket/a//b", "empty, '.' or '..' segment"),
    ("s3://bucket/a/../b", "empty, '.' or '..' segment"),
    ("s3://AKIAEXAMPLE:topsecretvalue@bucket/x", "credentials"),
    ("s3://bucket/x?secret=topsecretvalue", "credentials"),
    ("file://otherhost/x", "file:///absolute/path"),
])
def test_a_bad_archive_url_is_one_line_naming_the_variable(value, words):
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATAVERSE_ARCHIVE_URL": value}, dotenv=False)
    message = str(caught.value)
    assert message.startswith("DATAVERSE_ARCHIVE_URL: ") and words in message, message
    assert "\n" not in message and "topsecretvalue" not in message


def test_archive_url_and_dir_agree_or_are_refused(tmp_path):
    folder = tmp_path / "archive"
    same = load_settings({"DATAVERSE_ARCHIVE_URL": f"file://{folder}",
                          "DATAVERSE_ARCHIVE_DIR": str(folder)}, dotenv=False)
    assert same.archive_dir == folder and same.archive_location == str(folder)
    assert load_settings({"DATAVERSE_ARCHIVE_URL": str(folder)},
                         dotenv=False).archive_dir == folder
    for url in (f"file://{tmp_path / 'other'}", "s3://bucket/prefix"):
        with pytest.raises(ConfigError) as caught:
            load_settings({"DATAVERSE_ARCHIVE_URL": url, "DATAVERSE_ARCHIVE_DIR": str(folder)},
                          dotenv=False)
        assert "DATAVERSE_ARCHIVE_URL" in str(caught.value)
        assert "DATAVERSE_ARCHIVE_DIR" in str(caught.value)
    s3 = load_settings({"DATAVERSE_ARCHIVE_URL": "s3://bucket/team/archive/",
                        "DATAVERSE_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
                        "DATAVERSE_S3_REGION": "eu-west-1"}, dotenv=False)
    storage = storage_of(s3)
    assert isinstance(storage, S3Storage) and storage.location == "s3://bucket/team/archive"
    assert (storage.endpoint_url, storage.region) == ("http://127.0.0.1:9000", "eu-west-1")


def test_an_s3_endpoint_over_plain_http_is_refused_unless_on_this_machine():
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATAVERSE_ARCHIVE_URL": "s3://bucket/x",
                       "DATAVERSE_S3_ENDPOINT_URL": "http://minio.example.com:9000"},
                      dotenv=False)
    assert str(caught.value).startswith("DATAVERSE_S3_ENDPOINT_URL: plain http://")
    with pytest.raises(ConfigError, match="no user:password"):
        load_settings({"DATAVERSE_ARCHIVE_URL": "s3://bucket/x",
                       "DATAVERSE_S3_ENDPOINT_URL": "https://key:secret@minio.example.com"},
                      dotenv=False)
    for allowed in ("https://minio.example.com:9000", "http://localhost:9000"):
        assert load_settings({"DATAVERSE_ARCHIVE_URL": "s3://bucket/x",
                              "DATAVERSE_S3_ENDPOINT_URL": allowed},
                             dotenv=False).s3_endpoint_url == allowed
