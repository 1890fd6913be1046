"""Change sets done right: every incremental mode mirrors creates, updates and deletes, keeps
old versions in history, and survives a failure at any step without loss or double-apply."""

import uuid

import orjson
import pytest

from dataverse_assets.store.db import quote_identifier
from dataverse_assets.sync.faults import armed
from dataverse_assets_tests.conftest import failure_messages
from dataverse_assets_tests.helpers import mutate
from dataverse_assets_tests.truth import (
    assert_mirror_equals_simulator,
    canonical_rows,
    mirror_contents,
)

HOURLY = [
    "vin_candidates", "vin_clinicaltrials", "vin_vin_candidate_accountset",
    "vin_vin_clinicaltrial_contactset", "vin_vin_candidate_clinicaltrialset", "accounts",
    "contacts",
]
RECONCILE_EVERY_TIME = {"reconcile_every_hours": 1e-9}


@pytest.fixture
def mirror(each_mirror):
    """Every test here runs in each kind of store (docs/store-backends.md)."""
    return each_mirror


def manifest(mirror, entity, key):
    path = mirror.settings.archive_dir / entity / key / "manifest.json"
    return orjson.loads(path.read_bytes())


def history(mirror, entity, pk_column, key):
    with mirror.connection() as connection:
        return connection.execute(
            f"SELECT json_response, change_kind FROM {quote_identifier(entity + '__history')}"
            f" WHERE {quote_identifier(pk_column)} = ?", (key,)).fetchall()


def defunct(mirror, entity):
    with mirror.connection() as connection:
        return dict(connection.execute(
            "SELECT id, reason FROM _defunct WHERE entity = ?", (entity,)).fetchall())


def publish_counts(mirror, entity, key):
    with mirror.connection() as connection:
        return connection.execute(
            "SELECT status, created, updated, deleted, unchanged FROM _publish_state"
            " WHERE entity = ? AND change_set = ?", (entity, key)).fetchone()


def test_change_tracking_delivers_creates_updates_and_deletes(mirror):
    simulator = mirror.simulator
    mirror.sync("hourly")
    before = {k: orjson.loads(r["json_response"]) for k, r in
              canonical_rows(mirror.connection(), "vin_candidates").items()}
    keys = sorted(before)
    created = simulator.create("vin_candidates", {"vin_name": "New candidate"})
    simulator.update("vin_candidates", keys[1], {"vin_name": "Updated once"})
    simulator.update("vin_candidates", keys[3], {"vin_name": "First update"})
    simulator.update("vin_candidates", keys[3], {"vin_name": "Second update"})
    simulator.delete("vin_candidates", keys[2])
    ghost = simulator.create("vin_candidates", {"vin_name": "Here and gone"})
    simulator.delete("vin_candidates", ghost["vin_candidateid"])
    simulator.reset_stats()

    key = mirror.sync("hourly")

    assert manifest(mirror, "vin_candidates", key)["mode"] == "change_tracking"
    assert simulator.stats.rows_served["vin_candidates"] <= 5  # only the changes
    assert_mirror_equals_simulator(mirror, "vin_candidates")
    assert publish_counts(mirror, "vin_candidates", key) == ("COMPLETE", 1, 2, 1, 0)
    assert history(mirror, "vin_candidates", "vin_candidateid", keys[1]) == [
        (orjson.dumps(before[keys[1]]).decode(), "update")]
    # Updated twice between change sets: the version we had is kept once.
    assert [orjson.loads(h[0]) for h in
            history(mirror, "vin_candidates", "vin_candidateid", keys[3])] == [before[keys[3]]]
    assert [h[1] for h in history(mirror, "vin_candidates", "vin_candidateid", keys[2])] == [
        "delete"]
    gone = defunct(mirror, "vin_candidates")
    assert gone[keys[2]] == "deleted in source"
    # Created and deleted between two syncs: a delete of a record we never had.
    assert ghost["vin_candidateid"] in gone
    assert created["vin_candidateid"] not in gone


def test_expired_delta_token_falls_back_to_a_full_resync_with_deletes(mirror):
    simulator = mirror.simulator
    first = mirror.sync("hourly")
    # The first read of a change-tracked table is called what it is; only a lost token resyncs.
    assert manifest(mirror, "vin_candidates", first)["mode"] == "initial"
    assert manifest(mirror, "vin_candidates", first)["reason"] == "first sync"
    keys = sorted(canonical_rows(mirror.connection(), "vin_candidates"))
    simulator.delete("vin_candidates", keys[0])
    simulator.update("vin_candidates", keys[1], {"vin_name": "After expiry"})
    simulator.create("vin_candidates", {"vin_name": "Created after expiry"})
    simulator.expire_delta_tokens()

    key = mirror.sync("hourly")

    recorded = manifest(mirror, "vin_candidates", key)
    assert recorded["mode"] == "change_tracking_resync"
    assert "expired" in recorded["reason"]
    assert_mirror_equals_simulator(mirror, "vin_candidates")
    assert defunct(mirror, "vin_candidates")[keys[0]] == "no longer in the source"
    assert publish_counts(mirror, "vin_candidates", key)[1:4] == (1, 1, 1)
    # The new delta link works again: nothing changed, nothing served.
    simulator.reset_stats()
    key = mirror.sync("hourly")
    assert manifest(mirror, "vin_candidates", key)["mode"] == "change_tracking"
    assert simulator.stats.rows_served["vin_candidates"] == 0


def test_modifiedon_entities_find_deletes_with_a_key_only_scan(make_each_mirror):
    mirror = make_each_mirror(overrides={"vin_clinicaltrials": RECONCILE_EVERY_TIME})
    simulator = mirror.simulator
    mirror.sync("hourly")
    keys = sorted(canonical_rows(mirror.connection(), "vin_clinicaltrials"))
    simulator.delete("vin_clinicaltrials", keys[0])
    simulator.update("vin_clinicaltrials", keys[1], {"vin_name": "Phase change"})
    simulator.create("vin_clinicaltrials", {"vin_name": "New trial"})

    key = mirror.sync("hourly")

    recorded = manifest(mirror, "vin_clinicaltrials", key)
    assert recorded["mode"] == "modifiedon" and recorded["reconciled"]
    assert [p["kind"] for p in recorded["pages"]][0] == "keys"
    assert_mirror_equals_simulator(mirror, "vin_clinicaltrials")
    assert defunct(mirror, "vin_clinicaltrials") == {keys[0]: "no longer in the source"}
    assert publish_counts(mirror, "vin_clinicaltrials", key)[1:4] == (1, 1, 1)


def test_a_write_in_the_watermarks_own_second_is_not_lost(mirror):
    """Dataverse stamps in whole seconds: a record written in the same second as the last
    record read, after that read, carries the watermark's own stamp."""
    simulator = mirror.simulator
    mirror.sync("hourly")
    keys = sorted(canonical_rows(mirror.connection(), "vin_clinicaltrials"))
    # Ahead of the wall clock, every write below gets this one stamp, however slow the test.
    stamp = simulator.advance_clock(3600).strftime("%Y-%m-%dT%H:%M:%SZ")
    simulator.update("vin_clinicaltrials", keys[0], {"vin_name": "Read by the second sync"})
    simulator.update("vin_clinicaltrials", keys[2], {"vin_name": "Read, then left alone"})
    second = mirror.sync("hourly")
    assert manifest(mirror, "vin_clinicaltrials", second)["mode"] == "modifiedon"
    with mirror.connection() as connection:
        watermark = connection.execute(
            "SELECT watermark FROM _sync_state WHERE entity = 'vin_clinicaltrials'").fetchone()[0]
    assert watermark == stamp

    written = simulator.update("vin_clinicaltrials", keys[1], {"vin_name": "Same second, later"})
    again = simulator.update("vin_clinicaltrials", keys[0], {"vin_name": "Changed again"})
    assert written["modifiedon"] == again["modifiedon"] == stamp
    third = mirror.sync("hourly")

    rows = canonical_rows(mirror.connection(), "vin_clinicaltrials")
    assert orjson.loads(rows[keys[1]]["json_response"])["vin_name"] == "Same second, later"
    # Same stamp as the version mirrored, other content: an update, not a stale version.
    assert orjson.loads(rows[keys[0]]["json_response"])["vin_name"] == "Changed again"
    assert_mirror_equals_simulator(mirror, "vin_clinicaltrials")
    # The second's other record was read again; unchanged, it published as nothing.
    assert publish_counts(mirror, "vin_clinicaltrials", third) == ("COMPLETE", 0, 2, 0, 1)


def test_key_scans_follow_their_own_cadence(mirror):
    """By default (every 24 h) the second change set of the day does no key scan."""
    mirror.sync("hourly")
    gone = sorted(canonical_rows(mirror.connection(), "vin_clinicaltrials"))[0]
    mirror.simulator.delete("vin_clinicaltrials", gone)
    key = mirror.sync("hourly")
    assert not manifest(mirror, "vin_clinicaltrials", key)["reconciled"]
    assert gone in canonical_rows(mirror.connection(), "vin_clinicaltrials")


def test_filtered_entities_drop_deleted_records_and_mark_dangling_links_defunct(make_each_mirror):
    mirror = make_each_mirror(overrides={"accounts": RECONCILE_EVERY_TIME})
    simulator = mirror.simulator
    mirror.sync("hourly")
    linked = sorted(canonical_rows(mirror.connection(), "accounts"))
    simulator.delete("accounts", linked[0])
    dangling = str(uuid.UUID(int=12345, version=4))
    candidate = simulator.records("vin_candidates")[0]["vin_candidateid"]
    simulator.create("vin_vin_candidate_accountset",
                     {"vin_candidateid": candidate, "accountid": dangling})

    key = mirror.sync("hourly")

    rows = canonical_rows(mirror.connection(), "accounts")
    assert linked[0] not in rows and set(linked[1:]) <= set(rows)
    gone = defunct(mirror, "accounts")
    assert gone[linked[0]] == "no longer in the source"
    assert gone[dangling] == "not found (404)"
    assert manifest(mirror, "accounts", key)["missing"][0]["status"] == 404
    # A defunct id is not asked for again.
    key = mirror.sync("hourly")
    request = orjson.loads(
        (mirror.settings.archive_dir / "accounts" / key / "request.json").read_bytes())
    assert dangling not in request["expected_ids"]
    assert manifest(mirror, "accounts", key)["missing"] == []


def test_lookup_links_follow_the_annotated_target_table(make_each_mirror):
    links = [{"entity": "vin_vin_candidate_accountset", "column": "accountid"},
             {"entity": "vin_clinicaltrials", "column": "_vin_sponsorid_value",
              "lookup_target": "account"}]
    right = make_each_mirror("right", overrides={"accounts": {"linked_from": links}})
    links[1]["lookup_target"] = "contact"
    wrong = make_each_mirror("wrong", overrides={"accounts": {"linked_from": links}})
    simulator = right.simulator
    through_junction = {r["accountid"] for r in simulator.records("vin_vin_candidate_accountset")}
    only_sponsors = {r["_vin_sponsorid_value"] for r in simulator.records("vin_clinicaltrials")
                     } - through_junction - {None}
    assert only_sponsors
    right.sync("hourly")
    wrong.sync("hourly")
    assert only_sponsors <= set(canonical_rows(right.connection(), "accounts"))
    assert not only_sponsors & set(canonical_rows(wrong.connection(), "accounts"))


def test_rerunning_a_published_change_set_changes_nothing(mirror):
    key = mirror.sync("hourly")
    with mirror.connection() as connection:
        before = {e: canonical_rows(connection, e) for e in HOURLY}
    mirror.simulator.reset_stats()
    _, result = mirror.run("hourly", key)
    assert result.success, failure_messages(result)
    assert mirror.simulator.stats.rows_served["vin_candidates"] == 0  # archive reused
    with mirror.connection() as connection:
        assert {e: canonical_rows(connection, e) for e in HOURLY} == before


@pytest.mark.parametrize("point", [
    "fetch.after_page", "fetch.after_archive", "publish.before_plan", "publish.mid_plan",
    "publish.mid_execute", "publish.before_watermark",
])
def test_a_failure_at_any_step_loses_nothing_and_applies_nothing_twice(make_each_mirror, point):
    clean = make_each_mirror("clean")
    faulty = make_each_mirror("faulty", overrides={"vin_candidates": {"publish_chunk_rows": 2}})
    clean.sync("hourly")
    faulty.sync("hourly")
    mutate(clean.simulator)
    clean.sync("hourly")

    with armed(point, after=1 if point == "publish.mid_execute" else 0):
        failed_key, result = faulty.run("hourly")
    assert not result.success
    assert "injected fault at " + point in failure_messages(result)
    with faulty.connection() as connection:
        state = connection.execute(
            "SELECT status FROM _sync_state WHERE entity = 'vin_candidates'").fetchone()
    assert state[0] in ("failed", "in_progress")  # never claimed complete
    if point.startswith("publish."):
        with faulty.connection() as connection:
            details = connection.execute(
                "SELECT status, failed_operation, error_code, error, retry_count"
                " FROM _publish_state WHERE entity = 'vin_candidates' AND change_set = ?",
                (failed_key,)).fetchone()
        assert details[0] == "FAILED" and details[2] == "InjectedFault"
        assert details[1] == {"publish.before_plan": "prepare", "publish.mid_plan": "plan",
                              "publish.mid_execute": "execute",
                              "publish.before_watermark": "execute"}[point]
        assert point in details[3] and details[4] == 1

    faulty.sync("hourly")
    assert mirror_contents(faulty, HOURLY) == mirror_contents(clean, HOURLY)
    for entity in HOURLY:
        assert_mirror_equals_simulator(faulty, entity)
    with faulty.connection() as connection:
        statuses = dict(connection.execute(
            "SELECT change_set, status FROM _publish_state WHERE entity = 'vin_candidates'"))
    if failed_key in statuses:  # it got far enough to be archived: published first, in order
        assert statuses[failed_key] == "COMPLETE"
