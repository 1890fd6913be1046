"""`dataverse-assets report`: a self-contained status page from the database."""

import os
import re
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import DagsterInstance

from dataverse_assets.config import PROJECT_ROOT, Settings
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.ops import cli
from dataverse_assets.ops.report import FAILED, FRESH, LATE, NEVER, collect_report, entity_state
from dataverse_assets.simulator import DataverseSimulator, serve_on_loopback
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.sync.faults import armed
from dataverse_assets_tests.conftest import (
    ENTITY_NAMES,
    SMALL_ROW_COUNTS,
    Mirror,
    write_entities_config,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ENTITIES = ["vin_candidates", "vin_clinicaltrials", "vin_vin_candidate_accountset",
            "vin_vin_clinicaltrial_contactset", "vin_vin_candidate_clinicaltrialset",
            "accounts", "contacts", "systemusers", "businessunits", "teams"]


@dataclass
class History:
    mirror: Mirror
    failed: set[str]  # entities whose latest change set failed


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> Iterator[History]:
    """One mirror for the module (the page only reads it): two hourly change sets, and a
    daily one whose publish failed."""
    folder = tmp_path_factory.mktemp("report")
    simulator = DataverseSimulator(ENTITY_NAMES, seed=7, row_counts=SMALL_ROW_COUNTS)
    with serve_on_loopback(simulator) as url, \
            DagsterInstance.local_temp(tempdir=str(folder)) as instance:
        settings = Settings(
            db_path=folder / "mirror.db", archive_dir=folder / "archive",
            entities_config_path=write_entities_config(folder / "entities.json", 40),
            source="simulator")
        source = SimulatorSource(entity_names=ENTITY_NAMES, base_url=url)
        mirror = Mirror(simulator, settings, build_definitions(settings, source=source),
                        instance, url)
        mirror.sync("hourly")
        simulator.create("vin_candidates", {"vin_name": "Report me"})
        mirror.sync("hourly")
        with armed("publish.mid_plan"):
            _, result = mirror.run("daily")
        assert not result.success
        with mirror.connection() as connection:
            failed = {row[0] for row in connection.execute(
                "SELECT entity FROM _publish_state WHERE status = 'FAILED'")}
        yield History(mirror, failed)


def render(mirror, tmp_path, monkeypatch, capsys) -> tuple[Path, str]:
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "status.html"
    assert cli.main(["report", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    return out, out.read_text(encoding="utf-8")


def charts_of(page: str) -> list[str]:
    return re.findall(r"<svg class=\"chart\".*?</svg>", page, flags=re.S)


def test_status_page_shows_every_entity_its_state_and_plots(history, tmp_path, monkeypatch,
                                                            capsys):
    failed = history.failed
    assert failed
    _, page = render(history.mirror, tmp_path, monkeypatch, capsys)

    states = dict(re.findall(r'<tr data-entity="(\w+)" data-state="(\w+)">', page))
    assert list(states) == ENTITIES
    assert {e for e, s in states.items() if s == "failed"} == failed
    assert all(s == "fresh" for e, s in states.items() if e not in failed)
    assert "injected fault at publish.mid_plan" in page  # the failure says why
    rows = re.search(r'<tr data-entity="teams".*?</tr>', page, flags=re.S).group(0)
    assert "daily <code>30 2 * * *</code>" in rows

    charts = charts_of(page)
    titles = [re.search(r'aria-label="([^"]+)"', c).group(1) for c in charts]
    assert titles == ["Rows changed per change set (created + updated + deleted)",
                      "Sync duration (fetch + publish)",
                      "Publish latency (fetch start to publish)",
                      "Errors and retries per change set (all entities)",
                      "Fresh tables per cadence group (%, by its cron and grace)"]
    for chart in charts:
        assert chart.count('class="point"') >= 2
    rows_changed = charts[0]
    # Two change sets per hourly entity: the candidate created in the second one (a point and
    # the line's name at its end).
    assert rows_changed.count('<circle class="point" data-series="vin_candidates"') == 2
    assert "vin_candidates" in rows_changed and "rows changed 1<" in rows_changed
    assert re.search(r"failed attempts [1-9]", charts[3])

    with history.mirror.connection() as connection:
        change_sets = sorted({row[0] for row in connection.execute(
            "SELECT change_set FROM _publish_state")})
    for chart in charts[:4]:
        # The x axis names the change sets (the newest always), not just two moments.
        named = re.findall(r'<text class="tick change-set"[^>]*>([^<]+)</text>', chart)
        assert named and set(named) <= set(change_sets) and change_sets[-1] in named, named
        # Every line is named at its end, each entity in its own colour on every chart.
        labels = re.findall(r'<text class="direct-label" data-series="([^"]+)"[^>]*'
                            r'fill="(#[0-9a-f]{6})"', chart)
        assert sorted(n for n, _ in labels) == sorted(set(re.findall(
            r'<circle class="point" data-series="([^"]+)"', chart)))
        assert len({c for _, c in labels}) == len(labels)
    colours = [dict(re.findall(r'class="direct-label" data-series="([^"]+)"[^>]*'
                               r'fill="(#[0-9a-f]{6})"', chart)) for chart in charts[:3]]
    assert len({c["vin_candidates"] for c in colours}) == 1

    # Latency from the fetch's start: seconds here, not the age of the source's records.
    latencies = [float(v) for v in re.findall(r": latency ([0-9.]+)s<", charts[2])]
    assert latencies and max(latencies) < 120, latencies

    # Freshness over time: each group's share of fresh tables, ending with today's states.
    freshness = charts[4]
    last = {group: re.findall(rf"{group} [0-9-]+ [0-9:]+: (\d+) of (\d+) tables fresh",
                              freshness)[-1] for group in ("hourly", "daily")}
    sizes = {g: str(len(history.mirror.settings.entities.entities_in_group(g)))
             for g in ("hourly", "daily")}
    assert last["hourly"] == (sizes["hourly"], sizes["hourly"])
    # Its only change set failed on the tables that failed: those were never published.
    assert last["daily"] == (str(int(sizes["daily"]) - len(failed)), sizes["daily"])

    # Self-contained: no script, no reference to anything outside the file.
    assert "<script" not in page
    assert not re.search(r"https?://", page)
    assert not re.search(r"\b(src|href)\s*=", page)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_two_days_later_every_table_that_did_not_fail_is_late(history):
    later = datetime.now(UTC) + timedelta(days=2)
    with history.mirror.connection() as connection:
        report = collect_report(connection, history.mirror.settings.entities, now=later)
    states = {e.entity: e.state for e in report.entities}
    assert {e: s for e, s in states.items() if e not in history.failed} == {
        e: LATE for e in ENTITIES if e not in history.failed}
    assert {states[e] for e in history.failed} == {FAILED}


def test_entity_state_orders_failure_before_freshness():
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    assert entity_state("FAILED", "completed", True, moment) == FAILED
    assert entity_state("COMPLETE", "failed", True, moment) == FAILED
    assert entity_state(None, None, False, None) == NEVER
    assert entity_state("COMPLETE", "completed", True, moment) == FRESH
    assert entity_state("COMPLETE", "completed", False, moment) == LATE


def _browser_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return CHROMIUM.exists()


@pytest.mark.skipif(not _browser_available() and os.environ.get("CI") != "true",
                    reason="needs playwright and /usr/bin/chromium (required when CI=true)")
def test_status_page_opens_offline_in_a_browser(history, tmp_path, monkeypatch, capsys):
    from playwright.sync_api import sync_playwright

    failed = history.failed
    out, _ = render(history.mirror, tmp_path, monkeypatch, capsys)
    artifacts = PROJECT_ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(out.as_uri())
            assert page.title() == "Dataverse mirror status"
            assert page.locator("tbody tr").count() == len(ENTITIES)
            for entity in failed:
                state = page.locator(f'tr[data-entity="{entity}"] .state').inner_text()
                assert state == "failed"
            assert page.locator("svg.chart").count() == 5
            assert page.locator("svg.chart circle.point").count() > 20
            box = page.locator("svg.chart").first.bounding_box()
            assert box and box["width"] > 300 and box["height"] > 150  # drawn, not collapsed
            page.screenshot(path=str(artifacts / "status-page.png"), full_page=True)
        finally:
            browser.close()
    assert requested == [out.as_uri()]  # the page itself, nothing else
    assert (artifacts / "status-page.png").stat().st_size > 10_000
    shutil.copy(out, artifacts / "status-page.html")


def test_latency_runs_from_the_fetch_not_from_the_records_own_timestamps(history, tmp_path):
    """A change set of records last modified years ago, fetched and published in seconds, is
    seconds late, not years."""
    copy = sqlite3.connect(tmp_path / "copy.db")
    with history.mirror.connection() as connection:
        connection.backup(copy)
    copy.execute("UPDATE _publish_state SET source_timestamp = '2020-01-01T00:00:00Z'")
    report = collect_report(copy, history.mirror.settings.entities)
    copy.close()
    latencies = [p.latency_seconds for p in report.points if p.latency_seconds is not None]
    assert latencies and max(latencies) < 120, latencies
