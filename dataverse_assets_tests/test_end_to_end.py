"""Whole syncs through Dagster against the simulator over loopback HTTP."""

import orjson
import pytest

from dataverse_assets.store.db import quote_identifier
from dataverse_assets_tests.truth import (
    CONFIGURED,
    FILTERED,
    assert_mirror_equals_simulator,
    canonical_rows,
    expected_records,
)


@pytest.fixture
def mirror(each_mirror):
    """Every test here runs in each kind of store (docs/store-backends.md)."""
    return each_mirror


def test_first_sync_mirrors_every_configured_entity(mirror):
    mirror.sync_all()
    for entity in CONFIGURED + list(FILTERED):
        assert_mirror_equals_simulator(mirror, entity)
    # Filtered entities hold only the linked records, not the whole table.
    assert len(expected_records(mirror.simulator, "accounts")) < len(
        mirror.simulator.records("accounts"))
    with mirror.connection() as connection:
        watermark = connection.execute(
            "SELECT watermark FROM _sync_state WHERE entity = 'vin_candidates'").fetchone()[0]
    assert watermark == max(r["modifiedon"] for r in mirror.simulator.records("vin_candidates"))


def test_archive_holds_every_page_and_a_manifest(mirror):
    key = mirror.sync("hourly")
    folder = mirror.settings.archive_dir / "vin_candidates" / key
    manifest = orjson.loads((folder / "manifest.json").read_bytes())
    pages = sorted(folder.glob("page-*.json.gz"))
    assert manifest["summary"]["records"] == 130
    assert len(pages) == manifest["summary"]["pages"] == 4  # 130 rows, 40 per page
    assert all("Authorization" not in str(r) and "Bearer" not in str(r)
               for r in manifest["requests"])


def test_second_change_set_fetches_only_what_changed(mirror):
    simulator = mirror.simulator
    mirror.sync_all()
    with mirror.connection() as connection:
        before = {e: canonical_rows(connection, e) for e in ("vin_candidates", "accounts")}

    created = [simulator.create("vin_candidates", {"vin_name": "Zoë O'Neil"})
               for _ in range(2)]
    changed_key = sorted(before["vin_candidates"])[5]
    simulator.update("vin_candidates", changed_key, {"vin_name": "Renamed \"quoted\""})
    linked_account = sorted(before["accounts"])[3]
    simulator.update("accounts", linked_account, {"name": "Contoso (renamed)"})
    unlinked = next(r["accountid"] for r in simulator.records("accounts")
                    if r["accountid"] not in before["accounts"])
    simulator.create("vin_vin_candidate_accountset", {
        "vin_candidateid": created[0]["vin_candidateid"], "accountid": unlinked})
    simulator.reset_stats()

    key = mirror.sync("hourly")

    assert simulator.stats.rows_served["vin_candidates"] == 3
    for entity in CONFIGURED[:5] + list(FILTERED):
        assert_mirror_equals_simulator(mirror, entity)
    with mirror.connection() as connection:
        after = {e: canonical_rows(connection, e) for e in ("vin_candidates", "accounts")}
        publish = connection.execute(
            "SELECT created, updated, unchanged, deleted FROM _publish_state"
            " WHERE entity = 'vin_candidates' AND change_set = ?", (key,)).fetchone()
        history = connection.execute(
            "SELECT vin_name FROM vin_candidates__history WHERE vin_candidateid = ?",
            (changed_key,)).fetchall()
    assert publish == (2, 1, 0, 0)
    assert history == [(before["vin_candidates"][changed_key]["vin_name"],)]
    assert unlinked in after["accounts"]
    # Rows outside the change set are not rewritten.
    touched = {changed_key, *(c["vin_candidateid"] for c in created)}
    for entity, keys in (("vin_candidates", touched), ("accounts", {linked_account, unlinked})):
        for pk, row in before[entity].items():
            if pk not in keys:
                assert after[entity][pk]["sync_time"] == row["sync_time"]
                assert after[entity][pk]["updated_at"] == row["updated_at"]
        for pk in keys - set(before[entity]):
            assert pk in after[entity]
    assert after["accounts"][linked_account]["name"] == "Contoso (renamed)"


def test_nothing_changed_means_nothing_written_and_little_fetched(mirror):
    mirror.sync_all()
    with mirror.connection() as connection:
        snapshot = {e: canonical_rows(connection, e) for e in CONFIGURED + list(FILTERED)}
        watermarks = dict(connection.execute("SELECT entity, watermark FROM _sync_state"))
    mirror.simulator.reset_stats()
    mirror.sync_all()
    served = mirror.simulator.stats.rows_served
    assert served["vin_candidates"] == 0  # change tracking: an empty delta
    # modifiedon and filtered entities read their watermark's second again (`ge`): only the
    # records stamped in that one second, and unchanged, they write nothing.
    for entity in ("vin_clinicaltrials", "systemusers", "accounts", "contacts"):
        again = [r for r in mirror.simulator.records(entity)
                 if r["modifiedon"] == watermarks[entity]]
        assert served[entity] == len(again) < 5, entity
    with mirror.connection() as connection:
        for entity, rows in snapshot.items():
            assert canonical_rows(connection, entity) == rows, entity


def test_full_snapshot_tables_lose_rows_that_vanished(mirror):
    mirror.sync("hourly")
    junction = "vin_vin_candidate_clinicaltrialset"
    gone = mirror.simulator.records(junction)[0]["vin_vin_candidate_clinicaltrialid"]
    mirror.simulator.delete(junction, gone)
    key = mirror.sync("hourly")
    assert_mirror_equals_simulator(mirror, junction)
    with mirror.connection() as connection:
        defunct = connection.execute(
            "SELECT change_set FROM _defunct WHERE entity = ? AND id = ?", (junction, gone)
        ).fetchone()
        kept = connection.execute(
            f"SELECT change_kind FROM {quote_identifier(junction + '__history')}"
            f" WHERE vin_vin_candidate_clinicaltrialid = ?", (gone,)).fetchone()
    assert defunct == (key,) and kept == ("delete",)
