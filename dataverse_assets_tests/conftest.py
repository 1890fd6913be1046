"""Shared fixtures: a simulator served on loopback, and a mirror wired to it through Dagster."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import DagsterInstance, Definitions

from dataverse_assets.cli import new_change_set_key
from dataverse_assets.config import DEFAULT_ENTITIES_CONFIG, Settings
from dataverse_assets.definitions import build_definitions, sync_job_name
from dataverse_assets.simulator import DataverseSimulator, serve_on_loopback
from dataverse_assets.sources import SimulatorSource
from dataverse_assets.store import connect

SMALL_ROW_COUNTS = {
    "accounts": 90, "contacts": 120, "systemusers": 12, "businessunits": 4, "teams": 6,
    "vin_candidates": 130, "vin_clinicaltrials": 25, "vin_vin_candidate_accountset": 70,
    "vin_vin_clinicaltrial_contactset": 80, "vin_vin_candidate_clinicaltrialset": 60,
}


@dataclass
class Mirror:
    """A mirror database synced through Dagster from a loopback simulator."""

    simulator: DataverseSimulator
    settings: Settings
    defs: Definitions
    instance: DagsterInstance

    def sync(self, group: str) -> str:
        key = new_change_set_key(self.instance, group)
        result = self.defs.resolve_job_def(sync_job_name(group)).execute_in_process(
            instance=self.instance, partition_key=key, raise_on_error=False,
        )
        assert result.success, _failure_messages(result)
        return key

    def sync_all(self) -> list[str]:
        return [self.sync(group) for group in ("hourly", "daily")]

    def connection(self):
        return connect(self.settings.db_path)


def _failure_messages(result) -> str:
    messages = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            messages.append(f"{event.step_key}: {event.step_failure_data.error.to_string()}")
    return "\n".join(messages)


def write_entities_config(path: Path, page_size: int) -> Path:
    raw = json.loads(DEFAULT_ENTITIES_CONFIG.read_text())
    for entity in raw["entities"]:
        entity["page_size"] = page_size  # small pages: every sync follows nextLinks
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture
def mirror(tmp_path) -> Iterator[Mirror]:
    config_path = write_entities_config(tmp_path / "entities_config.json", page_size=40)
    settings = Settings(
        db_path=tmp_path / "mirror.db", archive_dir=tmp_path / "archive",
        entities_config_path=config_path, source="simulator",
    )
    simulator = DataverseSimulator(
        [e.name for e in settings.entities.entities], seed=7, row_counts=SMALL_ROW_COUNTS,
    )
    with serve_on_loopback(simulator) as url:
        source = SimulatorSource(
            entity_names=[e.name for e in settings.entities.entities], base_url=url,
        )
        defs = build_definitions(settings, source=source)
        with DagsterInstance.ephemeral() as instance:
            yield Mirror(simulator, settings, defs, instance)
