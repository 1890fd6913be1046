"""The Dagster UI, checked in a real browser.

`dg dev` (what `make dev` runs) starts from the project root on loopback against a temporary
DAGSTER_HOME, database and archive; headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; no browser download) walks the README's path: the asset graph (every configured
entity's three assets in its cadence group, each node naming its layer), an asset's page,
a materialization of one entity launched from the UI for a registered change set, the run's
page until it succeeds, the canonical asset's metadata and column schema; then the status page
(`dataverse-assets report`) of the same mirror. Screenshots go to test-artifacts/screenshots/
(CI keeps test-artifacts/), the server's log to test-artifacts/.

Skipped where Chromium or Playwright is missing, except in CI (CI=true), where that fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

from dataverse_assets.config import DEFAULT_ENTITIES_CONFIG, load_entities_config
from dataverse_assets_tests.servers import free_port, missing

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"
CHROMIUM = Path(os.environ.get("DATAVERSE_TEST_CHROMIUM", "/usr/bin/chromium"))
# As root on a closed network: no sandbox, and no background connections to Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
BIN = Path(sys.executable).parent  # the venv's console scripts: dg
# `dataverse-assets` of this checkout (the console script may belong to another editable one).
CLI = [sys.executable, "-m", "dataverse_assets.ops.cli"]
LOCATION = "dataverse_assets"  # `dagster dev -m dataverse_assets` names the code location so
GROUP, ENTITY = "daily", "teams"  # a small entity: three assets, a dozen rows
LAYERS = ("raw", "staging", "canonical")
STARTUP_TIMEOUT_S = 120
RUN_TIMEOUT_S = 120
UI_TIMEOUT_MS = 30_000


def _require_browser() -> None:
    absent = []
    if not CHROMIUM.exists():
        absent.append(f"{CHROMIUM} (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        absent.append("the playwright package (pip install -e '.[dev]')")
    if not absent:
        return
    missing("browser test needs " + " and ".join(absent),
            "CI must check the UI in a browser (.ci/run installs chromium)")


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql", data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@dataclass
class DagsterDev:
    url: str
    env: dict[str, str]
    db_path: Path
    process: subprocess.Popen


def _wait_until_loaded(server: DagsterDev, log_path: Path) -> None:
    """Poll until the webserver answers and the code location has loaded (bounded)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"dagster dev exited with {server.process.returncode}:\n"
                        f"{log_path.read_text()[-3000:]}")
        try:
            data = _graphql(server.url, "{ workspaceOrError { ... on Workspace {"
                                        " locationEntries { name loadStatus } } } }")
            entries = data["data"]["workspaceOrError"]["locationEntries"]
            if any(e["name"] == LOCATION and e["loadStatus"] == "LOADED" for e in entries):
                return
            last_error = f"locations: {entries}"
        except (OSError, urllib.error.URLError, KeyError, TypeError, ValueError) as exc:
            last_error = repr(exc)
        time.sleep(0.5)
    pytest.fail(f"dagster dev not ready after {STARTUP_TIMEOUT_S}s ({last_error}):\n"
                f"{log_path.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C for dagster dev (it stops its webserver, daemon, code server and runs), then
    SIGKILL to the whole process group whatever is left."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # its own group: start_new_session below
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _default_sigint() -> None:
    # A shell without job control starts background jobs with SIGINT ignored; dagster dev
    # maps SIGTERM to its SIGINT handler, so it must not inherit that, or it cannot be stopped.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def dagster_dev(tmp_path) -> Iterator[DagsterDev]:
    _require_browser()
    home = tmp_path / "dagster_home"
    home.mkdir()
    # No telemetry, and no "join the community" dialog over the page.
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "VIRTUAL_ENV": sys.prefix,  # as activated: `dg` warns when the project's is not
        "DATAVERSE_DB_PATH": str(tmp_path / "mirror.db"),
        "DATAVERSE_ARCHIVE_DIR": str(tmp_path / "archive"),
        "DATAVERSE_ENTITIES_CONFIG": str(DEFAULT_ENTITIES_CONFIG),
        # The embedded simulator, whatever a developer's .env says (empty wins over .env).
        "DATAVERSE_SOURCE": "simulator",
        "DATAVERSE_URL": "",
    }
    port = free_port()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / "ui-dagster-dev.log"
    with log_path.open("w") as log:
        # The README's command (`make dev`): `dg dev` from the project root, which finds the
        # project through [tool.dg] in pyproject.toml; everything it writes goes to tmp_path.
        process = subprocess.Popen(
            [str(BIN / "dg"), "dev", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_default_sigint,
        )
    server = DagsterDev(f"http://127.0.0.1:{port}", env, tmp_path / "mirror.db", process)
    try:
        _wait_until_loaded(server, log_path)
        yield server
    finally:
        _stop(process)


@pytest.fixture
def browser_page(dagster_dev):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            # Assertions wait 5 s by default, not the page's timeout: on a loaded machine the
            # graph's layout (a web worker) took longer than that to draw its nodes.
            expect.set_options(timeout=UI_TIMEOUT_MS)
            yield page
        finally:
            expect.set_options(timeout=5_000)
            browser.close()


def _register_change_set(server: DagsterDev, group: str) -> str:
    result = subprocess.run(
        [*CLI, "change-set", "create", "--group", group], cwd=ROOT, env=server.env,
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d{8}T\d{6}Z", key), result.stdout
    return key


def _asset_links_shown(page) -> set[str]:
    """Asset keys ("raw/teams") of the asset nodes the page links to."""
    hrefs = page.locator('a[href^="/assets/"]').evaluate_all("els => els.map(e => e.href)")
    return {urlparse(href).path.removeprefix("/assets/") for href in hrefs}


def _metadata_value(page, key: str) -> str:
    row = page.get_by_role("row").filter(has=page.get_by_text(key, exact=True)).first
    return row.get_by_role("cell").last.inner_text().strip()


def _check_groups(page, server: DagsterDev, config) -> None:
    from playwright.sync_api import expect

    page.goto(f"{server.url}/asset-groups")  # the global lineage: one node per group
    for group in config.groups:
        if config.entities_in_group(group):
            expect(page.get_by_text(group, exact=True).first).to_be_visible()
    for group in config.groups:
        entities = config.entities_in_group(group)
        if not entities:
            continue
        page.goto(f"{server.url}/locations/{LOCATION}/asset-groups/{group}")
        expected = {f"{layer}/{e.name}" for e in entities for layer in LAYERS}
        for key in sorted(expected):  # auto-waits until the graph has drawn each node
            expect(page.locator(f'a[href^="/assets/{key}?"]').first).to_be_visible()
        assert _asset_links_shown(page) == expected, group
        # Every node is labelled with the entity alone; its kinds tag says the layer.
        for layer in LAYERS:
            expect(page.get_by_text(layer, exact=True)).to_have_count(len(entities))
        page.screenshot(path=SCREENSHOTS / f"ui-graph-{group}.png")


def _materialize_from_ui(page, server: DagsterDev, key: str) -> str:
    """Filter the group's graph to the entity, Materialize, pick the partition, launch;
    returns the run's page path."""
    from playwright.sync_api import expect

    page.goto(f"{server.url}/locations/{LOCATION}/asset-groups/{GROUP}")
    expect(page.locator(f'a[href^="/assets/canonical/{ENTITY}?"]').first).to_be_visible()
    page.locator(".CodeMirror:visible").first.click()  # "Search and filter assets"
    page.keyboard.type(" or ".join(f'key:"{layer}/{ENTITY}"' for layer in LAYERS))
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/lineage~"))  # the filter is applied
    others = [e.name for e in load_entities_config(DEFAULT_ENTITIES_CONFIG).entities_in_group(GROUP)
              if e.name != ENTITY]
    for other in others:
        expect(page.locator(f'a[href^="/assets/canonical/{other}?"]')).to_have_count(0)
    assert _asset_links_shown(page) == {f"{layer}/{ENTITY}" for layer in LAYERS}

    page.get_by_role("button", name="Materialize all…").click()
    dialog = page.locator(".dagster-dialog")
    expect(dialog.get_by_text("Launch runs to materialize 3 assets")).to_be_visible()
    dialog.get_by_text("Select a partition or create one").click()
    page.get_by_text(key, exact=True).first.click()  # in the partition picker's popover
    launch = dialog.get_by_role("button", name="Launch 1 run")
    expect(launch).to_be_enabled()
    launch.click()
    view = page.get_by_role("link", name="View", exact=True)  # the "Launched run" toast
    expect(view).to_have_attribute("href", re.compile(r"^/runs/"))
    run_path = view.get_attribute("href")
    view.click()
    return run_path


def _wait_for_run(page, run_path: str) -> None:
    from playwright.sync_api import expect

    expect(page).to_have_url(re.compile(re.escape(run_path)))
    success = page.get_by_text("RUN_SUCCESS", exact=True)
    failure = page.get_by_text(re.compile(r"^(RUN_FAILURE|RUN_CANCELED)$"))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if success.count():
            return
        if failure.count():
            page.screenshot(path=SCREENSHOTS / "ui-run.png")
            pytest.fail(f"the run failed in the UI: {run_path}")
        page.wait_for_timeout(500)
    page.screenshot(path=SCREENSHOTS / "ui-run.png")
    pytest.fail(f"the run did not succeed within {RUN_TIMEOUT_S}s: {run_path}")


def _check_status_page(page, server: DagsterDev, key: str) -> None:
    """The status page of the mirror the UI just synced: the entity fresh, the change set
    named on the charts' x axes, each line named at its end."""
    from playwright.sync_api import expect

    out = ARTIFACTS / "status.html"
    result = subprocess.run([*CLI, "report", "--out", str(out)], cwd=ROOT, env=server.env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    page.goto(out.as_uri())
    expect(page.locator(f'tr[data-entity="{ENTITY}"] .state')).to_have_text("fresh")
    expect(page.locator("svg.chart")).to_have_count(5)
    expect(page.locator("svg.chart text.change-set", has_text=key).first).to_be_visible()
    expect(page.locator(f'svg.chart text.direct-label[data-series="{ENTITY}"]').first
           ).to_be_visible()
    page.screenshot(path=SCREENSHOTS / "status-page.png", full_page=True)


def test_asset_graph_materialize_one_entity_and_its_metadata_in_chromium(browser_page, dagster_dev):
    from playwright.sync_api import expect

    page, server = browser_page, dagster_dev
    config = load_entities_config(DEFAULT_ENTITIES_CONFIG)
    assert ENTITY in {e.name for e in config.entities_in_group(GROUP)}
    key = _register_change_set(server, GROUP)
    try:
        _check_groups(page, server, config)

        page.goto(f"{server.url}/assets/canonical/{ENTITY}")  # an asset's page, before a run
        expect(page.get_by_text("Kinds", exact=True)).to_be_visible()
        for kind in ("canonical", "dataverse"):
            expect(page.get_by_text(kind, exact=True).first).to_be_visible()
        page.screenshot(path=SCREENSHOTS / "ui-asset.png")

        run_path = _materialize_from_ui(page, server, key)
        _wait_for_run(page, run_path)
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()
        expect(page.get_by_text(f"partition: {key}").first).to_be_visible()
        expect(page.get_by_text("3 assets").first).to_be_visible()
        page.screenshot(path=SCREENSHOTS / "ui-run.png")

        with sqlite3.connect(server.db_path) as db:
            rows = db.execute(f'SELECT count(*) FROM "{ENTITY}"').fetchone()[0]
            synced = dict(db.execute("SELECT entity, status FROM _sync_state"))
        assert rows > 0
        assert synced == {ENTITY: "completed"}, synced  # that entity only

        page.goto(f"{server.url}/assets/canonical/{ENTITY}")
        expect(page.get_by_text("Latest materialization")).to_be_visible()
        expect(page.get_by_text(key, exact=True).first).to_be_visible()
        expect(page.get_by_role("row").filter(
            has=page.get_by_text("rows_in_table", exact=True))).to_be_visible()
        metadata = {name: _metadata_value(page, name)
                    for name in ("publish_status", "created", "rows_in_table", "deleted")}
        assert metadata == {"publish_status": "COMPLETE", "created": str(rows),
                            "rows_in_table": str(rows), "deleted": "0"}, metadata
        page.get_by_text("rows_in_table", exact=True).scroll_into_view_if_needed()
        page.screenshot(path=SCREENSHOTS / "ui-metadata.png")
        # The column schema, each column with its Dataverse type, what the org says of it and
        # what it is to the mirror.
        described = page.get_by_text(
            "AttributeType Picklist; Teamtype: The kind of team: owner, access, security group"
            f" or Office group.; choice (Picklist): labels in {ENTITY}__readable").first
        described.scroll_into_view_if_needed()
        expect(described).to_be_visible()
        page.screenshot(path=SCREENSHOTS / "ui-columns.png")

        _check_status_page(page, server, key)
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=SCREENSHOTS / "ui-failure.png", full_page=True)
        raise
