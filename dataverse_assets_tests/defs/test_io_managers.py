"""Each layer persists through its IO manager, so a test (or another store) can swap the
output side without touching asset code."""

import warnings

import pytest
from dagster import ConfigurableIOManager, InputContext, OutputContext

from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.defs.io_managers import PublishRequest
from dataverse_assets.defs.partitions import add_change_sets
from dataverse_assets.defs.schedules import sync_job_name
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.store.db import table_exists
from dataverse_assets.store.tables import staging_table
from dataverse_assets_tests.conftest import ENTITY_NAMES, failure_messages


@pytest.fixture
def mirror(each_mirror):
    """Every test here runs in each kind of store (docs/store-backends.md)."""
    return each_mirror


REQUESTS: list[tuple[str, str]] = []


class RecordingCanonicalIOManager(ConfigurableIOManager):
    """Keeps what canonical/E asked to publish instead of publishing it."""

    # A resource class without fields makes Dagster read pydantic's deprecated `__fields__`
    # (its compat layer falls back to it when `model_fields` is empty).
    name: str = "recording"

    def handle_output(self, context: OutputContext, obj: PublishRequest) -> None:
        REQUESTS.append((obj.entity.name, obj.change_set))

    def load_input(self, context: InputContext):
        raise AssertionError("nothing reads canonical/E in this test")


def test_canonical_output_side_is_swappable_without_changing_asset_code(mirror):
    REQUESTS.clear()
    source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=mirror.url)
    defs = build_definitions(mirror.settings, source=source, resources={
        "canonical_io_manager": RecordingCanonicalIOManager()})
    key = "20260101T000000Z"
    add_change_sets(mirror.instance, "daily", [key])
    result = defs.resolve_job_def(sync_job_name("daily")).execute_in_process(
        instance=mirror.instance, partition_key=key, raise_on_error=False)
    assert result.success, failure_messages(result)
    daily = sorted(e.name for e in mirror.settings.entities.entities_in_group("daily"))
    # Every entity's change set reached the swapped manager, staged but never published.
    assert sorted(REQUESTS) == [(name, key) for name in daily]
    with mirror.connection() as connection:
        for name in daily:
            assert not table_exists(connection, name)
            assert connection.execute(
                f'SELECT count(*) FROM "{staging_table(name)}"').fetchone()[0] > 0


def test_a_sync_run_warns_of_nothing_deprecated(mirror):
    """Dagster's deprecation notices are fixed where we cause them, not filtered: a whole sync
    run (sources, store, the three IO managers, checks) raises none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        mirror.sync("daily")
    deprecated = sorted({f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                         if issubclass(w.category, DeprecationWarning)})
    assert deprecated == []
