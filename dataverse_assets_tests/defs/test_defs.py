"""The whole graph, as `dagster dev` and `dagster definitions validate` load it."""

import os
import sqlite3
import subprocess
import sys

import pytest
from dagster import AssetKey

from dataverse_assets.config import DEFAULT_ENTITIES_CONFIG, load_entities_config, load_settings
from dataverse_assets.definitions import defs
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.errors import ConfigError
from dataverse_assets.names import KEY_EXAMPLE
from dataverse_assets_tests.helpers import mirror_of

CONFIG = load_entities_config(DEFAULT_ENTITIES_CONFIG)


def asset_graph():
    return defs.resolve_asset_graph()


def test_every_entity_has_three_assets_in_its_cadence_group():
    graph = asset_graph()
    for entity in CONFIG.entities:
        for layer in ("raw", "staging", "canonical"):
            node = graph.get(AssetKey([layer, entity.name]))
            assert node.group_name == entity.group
            assert node.description and len(node.description) > 20
            assert node.partitions_def.name == f"change_sets_{entity.group}"
    assert len(list(graph.get_all_asset_keys())) == 3 * len(CONFIG.entities)


def test_every_partitioned_asset_states_the_change_set_key_format():
    """Dagster's dynamic partitions carry no description: each asset's own says what a key
    looks like, so a key typed into the UI's "Add a partition" box can be right."""
    graph = asset_graph()
    for entity in CONFIG.entities:
        for layer in ("raw", "staging", "canonical"):
            description = graph.get(AssetKey([layer, entity.name])).description
            assert "YYYYMMDDTHHMMSSZ" in description and KEY_EXAMPLE in description, (
                layer, entity.name, description)
            assert "change-set create --group" in description, (layer, entity.name)


def test_each_node_names_its_layer_in_its_kinds():
    """The graph labels a node by the key's last part (three `accounts`); the kinds drawn on
    every node say which layer it is, and what it is made of."""
    graph = asset_graph()
    for entity in CONFIG.entities:
        kinds = {layer: graph.get(AssetKey([layer, entity.name])).kinds
                 for layer in ("raw", "staging", "canonical")}
        assert kinds == {"raw": {"raw", "dataverse", "json"}, "staging": {"staging", "sqlite"},
                         "canonical": {"canonical", "dataverse", "sqlite"}}, entity.name


def test_layers_chain_and_filtered_entities_wait_for_their_linking_tables():
    graph = asset_graph()
    assert graph.get(AssetKey(["canonical", "vin_candidates"])).parent_keys == {
        AssetKey(["staging", "vin_candidates"])}
    assert graph.get(AssetKey(["staging", "vin_candidates"])).parent_keys == {
        AssetKey(["raw", "vin_candidates"])}
    assert graph.get(AssetKey(["raw", "accounts"])).parent_keys == {
        AssetKey(["staging", "vin_vin_candidate_accountset"]),
        AssetKey(["staging", "vin_candidates"]), AssetKey(["staging", "vin_clinicaltrials"])}


def test_one_sync_job_per_cadence_group_and_all_resources_bound():
    for group in CONFIG.groups:
        job = defs.resolve_job_def(f"sync_{group}")
        keys = {n.key for n in job.asset_layer.asset_graph.asset_nodes if n.is_executable}
        assert {k.path[-1] for k in keys} == {e.name for e in CONFIG.entities_in_group(group)}
    defs.validate_loadable(defs)


def test_runs_launched_by_dagster_execute_their_steps_in_one_process_by_default():
    for environ, expected in (({}, "in_process"),
                              ({"DATAVERSE_EXECUTOR": "multiprocess"}, "multiprocess")):
        built = build_definitions(load_settings(environ, dotenv=False))
        for job in ("sync_hourly", "sync_daily", "__ASSET_JOB"):
            assert built.resolve_job_def(job).executor_def.name == expected


def test_an_unknown_executor_is_a_clear_error():
    with pytest.raises(ConfigError,
                       match="DATAVERSE_EXECUTOR: .*'in_process', 'multiprocess' or 'celery'"):
        load_settings({"DATAVERSE_EXECUTOR": "threads"}, dotenv=False)


def test_the_celery_executor_without_dagster_celery_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dagster_celery", None)  # as if not installed
    settings = load_settings({"DATAVERSE_EXECUTOR": "celery",
                              "DATAVERSE_DB_PATH": str(tmp_path / "m.db")}, dotenv=False)
    with pytest.raises(ConfigError, match=r"DATAVERSE_EXECUTOR=celery needs dagster-celery: "
                                          r"pip install -e '\.\[deploy\]'"):
        build_definitions(settings)


def test_dagster_asset_materialize_runs_an_entity_in_one_process(tmp_path):
    """What CI and a user run: `dagster asset materialize` on the embedded simulator."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAVERSE_")}
    env.update(DAGSTER_HOME=str(home), DATAVERSE_DB_PATH=str(tmp_path / "mirror.db"),
               DATAVERSE_ARCHIVE_DIR=str(tmp_path / "archive"))
    bin_dir = os.path.dirname(sys.executable)
    key = subprocess.run([f"{bin_dir}/dataverse-assets", "change-set", "create", "--group",
                          "daily"], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout.strip()
    run = subprocess.run(
        [f"{bin_dir}/dagster", "asset", "materialize", "-m", "dataverse_assets", "--select",
         "raw/teams,staging/teams,canonical/teams", "--partition", key],
        env=env, capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "RUN_SUCCESS" in log
    assert "Executing steps in process" in log and "Launching subprocess" not in log
    connection = sqlite3.connect(tmp_path / "mirror.db")
    assert connection.execute("SELECT count(*) FROM teams").fetchone()[0] > 0


def test_the_row_count_check_names_a_first_change_tracking_read_as_such(tmp_path, simulator_url):
    mirror = mirror_of(tmp_path, simulator_url, [{"name": "teams"}])
    _, result = mirror.run("hourly")
    assert result.success
    (check,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "row_count"]
    assert check.passed
    assert check.description == (
        f"{len(mirror.simulator.records('teams'))} rows, as the source listed (first "
        "change-tracking read: distinct records the source returned).")
