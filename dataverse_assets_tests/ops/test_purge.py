"""`dataverse-assets purge`: a column taken out of `select` is erased from the mirror, its
history, staging, the change log and the archive (page files and compacted parts), and the
next sync sees the records as unchanged."""

import gzip

import orjson
import pytest

from dataverse_assets.archive.change_sets import (
    ENTITY_DEFINITION,
    ChangeSetArchive,
    list_change_sets,
)
from dataverse_assets.archive.compacted import compact_change_set, iter_compacted_bodies
from dataverse_assets.config import EntityConfig
from dataverse_assets.errors import ConfigError
from dataverse_assets.ops.cli import main as cli_main
from dataverse_assets.ops.purge import purge_column
from dataverse_assets.store.db import table_exists
from dataverse_assets_tests.helpers import stage_and_publish, store_environment
from dataverse_assets_tests.sync.test_readable import publish_records, record, view

DEFINITION = {
    "LogicalName": "contact", "EntitySetName": "contacts", "PrimaryIdAttribute": "contactid",
    "Attributes": [{"LogicalName": "contactid", "AttributeType": "Uniqueidentifier"},
                   {"LogicalName": "fullname", "AttributeType": "String"},
                   {"LogicalName": "emailaddress1", "AttributeType": "String"}],
}
EVERYTHING = EntityConfig(name="contacts", group="daily", incremental="full")
NO_EMAIL = EntityConfig(name="contacts", group="daily", incremental="full",
                        select=["fullname"])


@pytest.fixture
def store(each_store):
    """Every test here runs on each kind of store (conftest.each_store)."""
    return each_store


def contact(n, email=True, name=None):
    record = {"@odata.etag": f'W/"{n}"', "contactid": f"id-{n:04d}",
              "fullname": name or f"Person {n}"}
    if email:
        record["emailaddress1"] = f"person{n}@example.com"
        record["emailaddress1@OData.Community.Display.V1.FormattedValue"] = f"person{n}@ex"
    return record


def sync(store, change_set, records, entity, select=None):
    return stage_and_publish(store, change_set, records, entity,
                             request={"primary_key": "contactid", "select": select},
                             files={ENTITY_DEFINITION: DEFINITION})


def everything_mentioning_email(store) -> list[str]:
    found = []
    with store.connection() as connection:
        for table in ("contacts", "contacts__history", "_staging__contacts"):
            found += [f"{table}: {row}" for row in connection.execute(
                f"SELECT * FROM {table} WHERE emailaddress1 IS NOT NULL"
                " OR json_response LIKE '%emailaddress1%'")]
        found += [f"change log: {row}" for row in connection.execute(
            "SELECT changes FROM _change_history WHERE changes LIKE '%emailaddress1%'"
            " UNION ALL SELECT changes FROM _publish_plan WHERE changes LIKE '%emailaddress1%'")]
    for change_set in list_change_sets(store.archive_dir, "contacts"):
        archive = ChangeSetArchive(store.archive_dir, "contacts", change_set)
        bodies = (list(iter_compacted_bodies(archive)) if archive.is_compacted()
                  else [gzip.decompress(p.read_bytes()) for p in archive.page_paths()])
        found += [f"archive {change_set}" for body in bodies if b"@example.com" in body]
    return found


def test_purge_erases_a_deselected_column_everywhere_and_the_next_sync_changes_nothing(
        store, monkeypatch, capsys, tmp_path):
    people = [contact(n) for n in range(1, 301)]
    sync(store, "20260101T000000Z", people, EVERYTHING)
    renamed = [contact(n, name="Renamed" if n == 1 else None) for n in range(1, 301)]
    sync(store, "20260102T000000Z", renamed, EVERYTHING)  # id-0001's old version: history
    # The team drops the email from `select`: fetched without it from now on.
    sync(store, "20260103T000000Z", [contact(n, email=False) for n in range(1, 301)],
         NO_EMAIL, select=["contactid", "fullname"])
    first = ChangeSetArchive(store.archive_dir, "contacts", "20260101T000000Z")
    compact_change_set(first)
    assert first.is_compacted()
    assert len(everything_mentioning_email(store)) > 300  # old values are still everywhere

    with pytest.raises(ConfigError, match="still in 'select'"):
        purge_column(store, EntityConfig(name="contacts", group="daily",
                                         select=["fullname", "emailaddress1"]), "emailaddress1")
    with pytest.raises(ConfigError, match="every column is mirrored"):
        purge_column(store, EVERYTHING, "emailaddress1")
    result = purge_column(store, NO_EMAIL, "emailaddress1")

    assert everything_mentioning_email(store) == []
    assert result.archive_pages == 2 and result.change_sets == 2
    # Each record's version with the email went to history when the email left `select`.
    assert result.rows["contacts__history"] == 301
    with store.connection() as connection:
        assert connection.execute(
            "SELECT fullname, json_response FROM contacts WHERE contactid = 'id-0001'"
        ).fetchone() == ("Person 1", '{"@odata.etag":"W/\\"1\\"","contactid":"id-0001",'
                                     '"fullname":"Person 1"}')
    # The compacted change set still reads (checked parts), minus the email.
    assert b"Person 300" in b"".join(iter_compacted_bodies(first))
    # Hashes were recomputed: the same records again are unchanged, nothing is rewritten.
    again = sync(store, "20260104T000000Z", [contact(n, email=False) for n in range(1, 301)],
                 NO_EMAIL, select=["contactid", "fullname"])
    assert (again.created, again.updated, again.deleted, again.unchanged) == (0, 0, 0, 300)


def test_the_cli_says_what_it_would_erase_and_only_erases_with_yes(store, monkeypatch,
                                                                   capsys, tmp_path):
    sync(store, "20260101T000000Z", [contact(1)], EVERYTHING)
    config = tmp_path / "entities.json"
    config.write_text(orjson.dumps({
        "groups": {"daily": {"cron": "0 3 * * *"}},
        "entities": [{"name": "contacts", "group": "daily", "incremental": "full",
                      "select": ["fullname"]}]}).decode())
    for name, value in store_environment(store.db_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DATAVERSE_ARCHIVE_DIR", store.archive_dir)
    monkeypatch.setenv("DATAVERSE_ENTITIES_CONFIG", str(config))
    assert cli_main(["purge", "--entity", "contacts", "--column", "emailaddress1"]) == 0
    assert "Run again with --yes" in capsys.readouterr().out
    assert everything_mentioning_email(store)
    # A run holding the entity (its lock in this store) makes purge wait, then give up.
    monkeypatch.setenv("DATAVERSE_LOCK_WAIT_SECONDS", "0.3")
    with store.entity_lock("contacts", owner="sync-run-1", purpose="publish"):
        assert cli_main(["purge", "--entity", "contacts", "--column", "emailaddress1",
                         "--yes"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: contacts is locked by run sync-run-1 (pid ") and err.count(
        "\n") == 1, err
    assert everything_mentioning_email(store)
    assert cli_main(["purge", "--entity", "contacts", "--column", "emailaddress1",
                     "--yes"]) == 0
    assert "purged 'emailaddress1' from contacts" in capsys.readouterr().out
    assert everything_mentioning_email(store) == []
    assert cli_main(["purge", "--entity", "contact", "--column", "emailaddress1"]) == 2
    assert "unknown entity 'contact'; did you mean 'contacts'?" in capsys.readouterr().err


def test_purging_a_multi_select_column_drops_its_child_table_and_the_view_reads_on(store):
    """The child table `E__<column>` goes; the readable view, which read it, is made again
    without its labels (PostgreSQL refuses to drop a table a view reads; SQLite's view would
    name a table that is gone)."""
    publish_records(store, "20260101T000000Z", [record(1, "10,30"), record(2, "20")])
    assert view(store, "areas_labels") == [("id-1", "Oncology; Cardiology"),
                                           ("id-2", "Neurology")]
    without = EntityConfig(name="things", group="daily", incremental="full",
                           select=["thingid", "name", "statuscode"])

    purge_column(store, without, "areas")

    with store.connection() as connection:
        assert not table_exists(connection, "things__areas")
        assert connection.execute(
            "SELECT count(*) FROM things WHERE areas IS NOT NULL").fetchone() == (0,)
        columns = [d[0] for d in connection.execute(
            "SELECT * FROM things__readable").description]
    assert "areas_labels" not in columns
    assert view(store, "statuscode_label, ownerid_name") == [("id-1", "Active", "Owner 1"),
                                                             ("id-2", "Active", "Owner 2")]
