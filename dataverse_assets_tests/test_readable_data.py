"""What an analyst reads, end to end against the simulated org: choice labels, multi-select
choices, lookups with their table and name, and calendar dates, each equal to what the org says,
kept through option changes, record changes and a rebuild from the archive."""

from collections import Counter

import orjson
import pytest
from dagster import AssetCheckSeverity

from dataverse_assets.ops import cli
from dataverse_assets.ops.rebuild import rebuild
from dataverse_assets.simulator.choices import parse_multi_select
from dataverse_assets.store.db import connect
from dataverse_assets.sync.stage import content_hash
from dataverse_assets_tests.conftest import failure_messages
from dataverse_assets_tests.helpers import mirror_of

ENTITIES = [{"name": "vin_candidates"}, {"name": "contacts"}, {"name": "vin_clinicaltrials"}]
SET_NAMES = {"account": "accounts", "contact": "contacts", "systemuser": "systemusers",
             "team": "teams"}
STAGE, WITHDRAWN = "vin_stage", 100000003


def readable(mirror, entity: str, key: str) -> dict[str, dict]:
    """The entity's readable view, by primary key."""
    with mirror.connection() as connection:
        cursor = connection.execute(f"SELECT * FROM {entity}__readable")
        columns = [d[0] for d in cursor.description]
        return {row[columns.index(key)]: dict(zip(columns, row, strict=True))
                for row in cursor.fetchall()}


def children(mirror, table: str) -> set[tuple[str, int]]:
    with mirror.connection() as connection:
        return set(connection.execute(f"SELECT record_id, option_value FROM {table}"))


def label(simulator, entity: str, attribute: str, value, language: int = 1033) -> str | None:
    option = simulator.option_set(entity, attribute).option(int(value))
    return None if option is None else option.labels.get(language, option.labels[1033])


def labels(simulator, entity: str, attribute: str, codes: str | None) -> str | None:
    """What the view shows for a multi-select: labels in option order, '; '-joined."""
    if codes is None:
        return None
    chosen = set(parse_multi_select(codes))
    order = simulator.option_set(entity, attribute).values()
    return "; ".join(label(simulator, entity, attribute, v) for v in order if v in chosen)


def drift(mirror, group: str = "hourly"):
    key, result = mirror.run(group)
    assert result.success, failure_messages(result)
    return {e.asset_key.path[-1]: e for e in result.get_asset_check_evaluations()
            if e.check_name == "schema_drift"}


@pytest.fixture(params=["sqlite", "postgresql"])
def mirror(request, tmp_path, simulator_url):
    """Synced once, in each kind of store (docs/store-backends.md)."""
    url = (None if request.param == "sqlite"
           else request.getfixturevalue("postgres_store_url"))
    mirror = mirror_of(tmp_path, simulator_url, ENTITIES, store_url=url)
    mirror.sync("hourly")
    return mirror


def test_labels_lookups_and_dates_in_the_view_are_what_the_org_says(mirror):
    simulator = mirror.simulator
    contacts = readable(mirror, "contacts", "contactid")
    assert len(contacts) == len(simulator.records("contacts"))
    tables = Counter()
    for record in simulator.records("contacts"):
        row = contacts[record["contactid"]]
        assert row["statuscode_label"] == label(simulator, "contacts", "statuscode",
                                                record["statuscode"])
        assert row["statecode_label"] == label(simulator, "contacts", "statecode",
                                               record["statecode"])
        parent = record["_parentcustomerid_value"]
        target = simulator.lookup_target("contacts", record["contactid"],
                                         "_parentcustomerid_value")
        assert row["parentcustomerid_table"] == (SET_NAMES[target] if parent else None)
        assert row["parentcustomerid_name"] == (
            simulator.primary_name(target, parent) if parent else None)
        tables[row["parentcustomerid_table"]] += 1
        # DateOnly: the calendar day the org holds, no time, no shift by any time zone.
        assert row["birthdate"] == record["birthdate"]
        assert record["birthdate"] is None or len(record["birthdate"]) == 10
    assert tables["accounts"] and tables["contacts"], tables  # both targets of the Customer

    candidates = readable(mirror, "vin_candidates", "vin_candidateid")
    expected_children = set()
    for record in simulator.records("vin_candidates"):
        row = candidates[record["vin_candidateid"]]
        assert row[f"{STAGE}_label"] == label(simulator, "vin_candidates", STAGE,
                                              record[STAGE])
        assert row["vin_enrolled_label"] == ("Yes" if record["vin_enrolled"] else "No")
        codes = record["vin_therapeuticareas"]
        assert row["vin_therapeuticareas"] == codes  # kept as the org sends it
        assert row["vin_therapeuticareas_labels"] == labels(
            simulator, "vin_candidates", "vin_therapeuticareas", codes)
        expected_children |= {(record["vin_candidateid"], v)
                              for v in parse_multi_select(codes or "")}
    assert expected_children
    assert children(mirror, "vin_candidates__vin_therapeuticareas") == expected_children

    trials = readable(mirror, "vin_clinicaltrials", "vin_clinicaltrialid")
    for record in simulator.records("vin_clinicaltrials"):
        # A global option set: the same labels as the candidates' multi-select.
        assert trials[record["vin_clinicaltrialid"]]["vin_therapeuticarea_label"] == (
            None if record["vin_therapeuticarea"] is None else
            label(simulator, "vin_candidates", "vin_therapeuticareas",
                  record["vin_therapeuticarea"]))
        assert trials[record["vin_clinicaltrialid"]]["vin_startdate"] == record["vin_startdate"]


def test_options_added_relabelled_and_removed_show_in_the_view_and_as_drift(mirror):
    simulator = mirror.simulator
    simulator.set_option_label("vin_candidates", STAGE, 100000001, "Qualified")
    simulator.add_option("vin_candidates", STAGE, 100000004, "Deferred")
    simulator.remove_option("vin_candidates", STAGE, WITHDRAWN)

    check = drift(mirror)["vin_candidates"]

    assert not check.passed and check.severity == AssetCheckSeverity.WARN
    assert "options removed (warning): " in check.description
    assert "options added: " in check.description and "Deferred" in check.description
    assert "options relabelled: " in check.description and "Qualified" in check.description
    rows = readable(mirror, "vin_candidates", "vin_candidateid").values()
    by_stage = {row[STAGE]: row[f"{STAGE}_label"] for row in rows}
    assert by_stage[100000001] == "Qualified"
    assert by_stage[WITHDRAWN] is None  # the org has no label for it any more; the code stays
    with mirror.connection() as connection:
        assert connection.execute(
            "SELECT label FROM _choice_labels WHERE entity = 'vin_candidates'"
            " AND attribute = ? AND option_value = 100000004 AND language_code = 1033",
            (STAGE,)).fetchall() == [("Deferred",)]
    # Nothing changed since: the next change set finds no drift.
    assert drift(mirror)["vin_candidates"].passed


def test_multi_select_children_follow_updates_and_deletes_and_history_keeps_each_version(
        mirror):
    simulator = mirror.simulator
    table = "vin_candidates__vin_therapeuticareas"
    first, second = (r["vin_candidateid"] for r in simulator.records("vin_candidates")[:2])
    simulator.update("vin_candidates", first, {"vin_therapeuticareas": "100000000,100000002"})
    simulator.update("vin_candidates", second, {"vin_therapeuticareas": None})
    mirror.sync("hourly")
    assert {v for r, v in children(mirror, table) if r == first} == {100000000, 100000002}
    assert not {v for r, v in children(mirror, table) if r == second}

    simulator.update("vin_candidates", first, {"vin_therapeuticareas": "100000002,100000004"})
    simulator.delete("vin_candidates", second)
    mirror.sync("hourly")

    assert {v for r, v in children(mirror, table) if r == first} == {100000002, 100000004}
    expected = {(r["vin_candidateid"], v) for r in simulator.records("vin_candidates")
                for v in parse_multi_select(r["vin_therapeuticareas"] or "")}
    assert children(mirror, table) == expected
    assert readable(mirror, "vin_candidates", "vin_candidateid")[first][
        "vin_therapeuticareas_labels"] == "Neurology; Rare Diseases"
    with mirror.connection() as connection:
        versions = [row[0] for row in connection.execute(
            "SELECT vin_therapeuticareas FROM vin_candidates__history"
            " WHERE vin_candidateid = ? ORDER BY valid_from", (first,))]
        deleted = connection.execute(
            "SELECT vin_therapeuticareas FROM vin_candidates__history"
            " WHERE vin_candidateid = ? ORDER BY valid_from DESC", (second,)).fetchone()
    assert versions[-1] == "100000000,100000002"  # superseded; the current one is in E
    assert deleted == (None,)  # the deleted record's last version: no areas chosen


def test_labels_in_the_configured_language_fall_back_to_the_base_language(
        tmp_path, simulator_url):
    mirror = mirror_of(tmp_path, simulator_url, [
        {"name": "accounts", "labels": {"language_code": 1031}}, {"name": "contacts"}])
    mirror.sync("hourly")
    accounts = readable(mirror, "accounts", "accountid").values()
    shown = {(row["industrycode"], row["industrycode_label"]) for row in accounts
             if row["industrycode"] is not None}
    assert (7, "Beratung") in shown  # translated
    assert (2, "Agriculture and Non-petrol Natural Resource Extraction") in shown  # not
    assert {row["statecode_label"] for row in accounts} == {"Aktiv", "Inaktiv"}
    # Another entity keeps the org's base language.
    assert {row["statecode_label"] for row in readable(
        mirror, "contacts", "contactid").values()} == {"Active", "Inactive"}


def test_a_rebuild_from_the_archive_alone_reads_the_same(mirror, tmp_path):
    simulator = mirror.simulator
    simulator.set_option_label("vin_candidates", STAGE, 100000002, "Randomised")
    candidate = simulator.records("vin_candidates")[3]["vin_candidateid"]
    simulator.update("vin_candidates", candidate, {"vin_therapeuticareas": "100000001"})
    mirror.sync("hourly")
    into = tmp_path / "rebuilt.db"

    rebuild(mirror.settings.entities, mirror.settings.archive_dir, into)

    with connect(into) as rebuilt, mirror.connection() as live:
        for table in ("vin_candidates__readable", "contacts__readable",
                      "vin_clinicaltrials__readable", "vin_candidates__vin_therapeuticareas",
                      "_choice_labels", "_lookup_targets"):
            query = f"SELECT * FROM {table} ORDER BY 1, 2"
            ignore = {"sync_time", "updated_at"}
            names = [d[0] for d in live.execute(query).description]
            keep = [i for i, n in enumerate(names) if n not in ignore]
            # Sorted whole: ORDER BY 1, 2 leaves ties, which two databases may order apart
            # (the live store may be PostgreSQL, the rebuild is SQLite).
            assert sorted(([r[i] for i in keep] for r in rebuilt.execute(query)), key=repr) == \
                sorted(([r[i] for i in keep] for r in live.execute(query)), key=repr), table
        assert "Randomised" in {r[0] for r in rebuilt.execute(
            f"SELECT {STAGE}_label FROM vin_candidates__readable")}


def test_a_change_tracking_read_that_loses_its_delta_link_is_read_again_without_annotations(
        tmp_path, simulator_url):
    """Reported of Dataverse: a change-tracking read with annotations may end without its
    deltaLink. The sync reads that page set again without annotations, keeps the link, and
    the next sync reads only the changes."""
    simulator, _ = simulator_url
    simulator.omit_delta_link_with_annotations = True
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "vin_candidates"}])
    mirror.sync("hourly")
    with mirror.connection() as connection:
        mode, token = connection.execute(
            "SELECT mode, delta_token FROM _sync_state WHERE entity = 'vin_candidates'"
        ).fetchone()
    assert mode == "change_tracking" and token
    candidate = simulator.records("vin_candidates")[0]["vin_candidateid"]
    simulator.update("vin_candidates", candidate, {"vin_stage": 100000002})
    mirror.sync("hourly")
    row = readable(mirror, "vin_candidates", "vin_candidateid")[candidate]
    assert (row[STAGE], row[f"{STAGE}_label"]) == (100000002, "Enrolled")
    with mirror.connection() as connection:
        staged = connection.execute(
            "SELECT count(*) FROM _change_history WHERE entity = 'vin_candidates'"
            " AND change_set = (SELECT max(change_set) FROM _change_history)").fetchone()[0]
    assert staged == 1  # a delta read: only the changed record


def test_a_mirror_that_hashed_annotations_is_not_rewritten_when_they_are_ignored(
        tmp_path, simulator_url):
    """Reads carry annotations (formatted values change when a label does, not the record);
    the content hash ignores them. A mirror made when hashes included them is rehashed once,
    not written again record by record."""
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "vin_candidates",
                                                  "incremental": "full"}])
    mirror.sync("hourly")
    with mirror.connection() as connection:
        bodies = connection.execute("SELECT rowid, json_response FROM vin_candidates").fetchall()
        connection.executemany(
            "UPDATE vin_candidates SET _content_hash = ? WHERE rowid = ?",
            [(content_hash(orjson.loads(body), False), rowid) for rowid, body in bodies])
        connection.execute("DELETE FROM _hash_rule")
        connection.commit()
        history_before = connection.execute(
            "SELECT count(*) FROM vin_candidates__history").fetchone()[0]
    mirror.simulator.set_option_label("vin_candidates", STAGE, 100000000, "Pre-screening")

    key = mirror.sync("hourly")

    with mirror.connection() as connection:
        updated, unchanged = connection.execute(
            "SELECT updated, unchanged FROM _publish_state WHERE entity = 'vin_candidates'"
            " AND change_set = ?", (key,)).fetchone()
        assert connection.execute(
            "SELECT count(*) FROM vin_candidates__history").fetchone()[0] == history_before
    assert (updated, unchanged) == (0, len(bodies))


def test_the_sync_says_where_to_read_the_labels(tmp_path, simulator_url, monkeypatch, capsys):
    mirror = mirror_of(tmp_path, simulator_url, ENTITIES)
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    assert cli.main(["sync"]) == 0
    out = capsys.readouterr().out
    assert ("readable views: 3 (<entity>__readable: choice labels, lookup names and tables);"
            " choice columns in vin_candidates (4), contacts (2), vin_clinicaltrials (3)") in out
