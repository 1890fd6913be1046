"""Dagster's own CLI (`dg`) from the project root, as `make validate` and the README run it: it
finds the project through [tool.dg] in pyproject.toml, loads the same Definitions, and launches
a change set's run into the instance DAGSTER_HOME names."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from dataverse_assets.config import DEFAULT_ENTITIES_CONFIG

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts: dg


def _environment(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # VIRTUAL_ENV: this interpreter's venv counts as activated (`dg` warns when a project's
    # .venv is not the active one).
    return {**os.environ, "DAGSTER_HOME": str(home), "VIRTUAL_ENV": sys.prefix,
            "DATAVERSE_DB_PATH": str(tmp_path / "mirror.db"),
            "DATAVERSE_ARCHIVE_DIR": str(tmp_path / "archive"),
            "DATAVERSE_ENTITIES_CONFIG": str(DEFAULT_ENTITIES_CONFIG),
            "DATAVERSE_SOURCE": "simulator", "DATAVERSE_URL": ""}


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
                          check=False)


def test_dg_check_defs_loads_the_definitions_from_the_project_root(tmp_path):
    result = _run([str(BIN / "dg"), "check", "defs"], _environment(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    # Nothing but the verdict: no deprecation notice, no warning about the environment.
    assert result.stdout.splitlines() == ["All component YAML validated successfully.",
                                          "All definitions loaded successfully."], result.stdout
    assert result.stderr == "", result.stderr


def test_dg_launch_materializes_a_registered_change_set_into_dagster_home(tmp_path):
    env = _environment(tmp_path)
    # This checkout's `dataverse-assets` (its console script may belong to another checkout).
    created = _run([sys.executable, "-m", "dataverse_assets.ops.cli", "change-set", "create",
                    "--group", "daily"], env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]

    launched = _run([str(BIN / "dg"), "launch", "--assets", "group:daily", "--partition", key],
                    env)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "RUN_SUCCESS" in launched.stdout + launched.stderr
    with sqlite3.connect(tmp_path / "mirror.db") as db:
        synced = dict(db.execute("SELECT entity, status FROM _sync_state"))
    assert synced and set(synced.values()) == {"completed"}, synced
