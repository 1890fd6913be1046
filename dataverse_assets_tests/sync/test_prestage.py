"""Staging while pages arrive (sync.prestage): staging/E takes the rows the fetch staged, and
they are exactly the rows staging the archive gives; when they cannot be, the archive is staged.
"""

import pytest
from dagster import AssetKey

from dataverse_assets.simulator.model import SimAttribute
from dataverse_assets.store.db import quote_identifier, table_columns
from dataverse_assets.store.tables import staging_keys_table, staging_table
from dataverse_assets.sync import prestage
from dataverse_assets_tests.conftest import ENTITY_NAMES
from dataverse_assets_tests.helpers import mutate

TRIALS = "vin_clinicaltrials"


@pytest.fixture
def mirror(each_mirror):
    """Every test here runs in each kind of store (docs/store-backends.md)."""
    return each_mirror


def staged_while_fetching(mirror, entity: str) -> bool:
    event = mirror.instance.get_latest_materialization_event(AssetKey(["staging", entity]))
    assert event is not None, entity
    return event.asset_materialization.metadata["staged_while_fetching"].value


def staged_rows(mirror, entity: str, table_of=staging_table) -> list[tuple]:
    """Every staged row of the entity, every column but the change set's key (each mirror's
    runs have their own keys), in a stable order."""
    table = table_of(entity)
    with mirror.connection() as connection:
        columns = [c for c in table_columns(connection, table) if c != "_change_set"]
        return sorted(connection.execute(
            f"SELECT {', '.join(map(quote_identifier, columns))}"
            f" FROM {quote_identifier(table)}").fetchall(), key=repr)


def mirrored(mirror, entity: str) -> list[tuple]:
    with mirror.connection() as connection:
        pk = connection.execute("SELECT primary_key FROM _schema WHERE entity = ?"
                                " ORDER BY version DESC", (entity,)).fetchone()[0]
        return connection.execute(
            f"SELECT {quote_identifier(pk)}, json_response, _content_hash"
            f" FROM {quote_identifier(entity)} ORDER BY 1").fetchall()


def sync_both(on, off, monkeypatch) -> None:
    for mirror, setting in ((on, "true"), (off, "false")):
        monkeypatch.setenv(prestage.STAGE_WHILE_FETCHING_ENV, setting)
        mirror.sync_all()


def test_rows_staged_while_fetching_are_the_rows_staging_the_archive_gives(
        make_each_mirror, monkeypatch):
    # vin_candidates scans its keys and versions every change set (key pages staged too).
    scanning = {"vin_candidates": {"reconcile_every_hours": 0.0001}}
    on, off = make_each_mirror("on", scanning), make_each_mirror("off", scanning)
    filtered = {e.name for e in on.settings.entities.entities if e.filtered}
    sync_both(on, off, monkeypatch)  # first syncs: every mode's first read
    for entity in ENTITY_NAMES:
        # Taken as staged during the fetch, except filtered entities (their ids in scope).
        assert staged_while_fetching(on, entity) is (entity not in filtered), entity
        assert staged_while_fetching(off, entity) is False, entity
    mutate(on.simulator)  # creates, updates and deletes in every mode
    sync_both(on, off, monkeypatch)
    for entity in ENTITY_NAMES:
        assert staged_while_fetching(on, entity) is (entity not in filtered), entity
        assert staged_rows(on, entity) == staged_rows(off, entity), entity
        assert mirrored(on, entity) == mirrored(off, entity), entity
    scanned = staged_rows(on, "vin_candidates", staging_keys_table)
    assert scanned and scanned == staged_rows(off, "vin_candidates", staging_keys_table)


def test_a_change_set_whose_schema_evolves_is_staged_from_the_archive(make_each_mirror,
                                                                      monkeypatch):
    monkeypatch.setenv(prestage.STAGE_WHILE_FETCHING_ENV, "true")
    mirror = make_each_mirror("evolving", overrides={TRIALS: {"schema_evolution": "evolve"}})
    mirror.sync("hourly")
    mirror.simulator.add_column(TRIALS, SimAttribute("vin_site_count", "Integer"),
                                default=lambda row: len(row["vin_name"]))
    trial = mirror.simulator.records(TRIALS)[0]["vin_clinicaltrialid"]
    mirror.simulator.update(TRIALS, trial, {"vin_name": "Renamed"})
    mirror.sync("hourly")
    # The fetch staged with the locked schema; staging/E evolved it: the archive is staged.
    assert staged_while_fetching(mirror, TRIALS) is False
    expected = next(r["vin_site_count"] for r in mirror.simulator.records(TRIALS)
                    if r["vin_clinicaltrialid"] == trial)
    with mirror.connection() as connection:
        assert connection.execute(
            f"SELECT vin_site_count FROM {TRIALS} WHERE vin_clinicaltrialid = ?",
            (trial,)).fetchone() == (expected,) != (None,)


def test_a_stager_that_fails_gives_up_and_the_archive_is_staged(mirror, monkeypatch):
    monkeypatch.setenv(prestage.STAGE_WHILE_FETCHING_ENV, "true")
    real = prestage.stage_records

    def failing(context, number, *args):
        if number == 2:
            raise RuntimeError("the stager broke")
        return real(context, number, *args)

    monkeypatch.setattr(prestage, "stage_records", failing)
    mirror.sync("hourly")
    # vin_candidates has more than one page (40 rows a page): its stager broke on page 2.
    assert staged_while_fetching(mirror, "vin_candidates") is False
    source = {r["vin_candidateid"] for r in mirror.simulator.records("vin_candidates")}
    with mirror.connection() as connection:
        assert {row[0] for row in connection.execute(
            "SELECT vin_candidateid FROM vin_candidates")} == source


@pytest.mark.parametrize("setting", ["maybe"])
def test_a_setting_that_is_not_true_or_false_is_refused_in_one_line(monkeypatch, setting):
    monkeypatch.setenv(prestage.STAGE_WHILE_FETCHING_ENV, setting)
    with pytest.raises(ValueError, match="expected true or false"):
        prestage.stage_while_fetching()
