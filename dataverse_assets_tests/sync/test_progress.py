"""Progress of long fetches: lines with pages, rows, rows/s and ETA, at a bounded rate."""

import asyncio
from urllib.parse import unquote

import httpx

from dataverse_assets.archive.change_sets import ChangeSetArchive
from dataverse_assets.config import EntityConfig
from dataverse_assets.source.auth import ClientCredentials
from dataverse_assets.source.client import DataverseClient
from dataverse_assets.source.live import ClientSession
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.sync.fetch import fetch_change_set
from dataverse_assets.sync.fetch_plan import plan_fetch
from dataverse_assets.sync.progress import (
    FetchProgress,
    ProgressReporter,
    ProgressSink,
    ProgressUpdate,
    fetch_reporter,
    format_duration,
    listening,
    phase_reporter,
)
from dataverse_assets_tests.conftest import ENTITY_NAMES

ORG = "https://org.example.com"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_million_row_fetch_logs_every_few_seconds_not_every_page():
    clock, lines = FakeClock(), []
    reporter = ProgressReporter("accounts", "20260101T000000Z",
                                [ProgressSink(lambda u: lines.append(u.line()), 10.0)],
                                clock=clock)
    total = 1_000_000
    for page in range(1, 201):  # 200 pages of 5000 rows, one every 0.25 s: 50 s in all
        clock.now += 0.25
        reporter(FetchProgress(page, page * 5000, total))
    reporter.finish()
    assert len(lines) == 6  # at 10, 20, 30, 40, 50 s, and the final line
    assert lines[0] == ("accounts: 40 pages, 200,000 / 1,000,000 rows (20%), 20,000 rows/s, "
                        "ETA 40s")
    assert lines[-1] == "accounts: 200 pages, 1,000,000 / 1,000,000 rows (100%), " \
                        "20,000 rows/s, done in 50s"


def test_without_a_total_there_is_no_eta():
    update = ProgressUpdate("teams", "k", pages=3, records=150, total=None,
                            elapsed_seconds=3.0)
    assert update.eta_seconds is None
    assert update.line() == "teams: 3 pages, 150 rows, 50 rows/s"


def test_terminal_stays_quiet_for_short_fetches_and_reports_long_ones():
    clock, dagster_log, terminal = FakeClock(), [], []
    with listening(terminal.append):
        quick = fetch_reporter("teams", "k1", dagster_log.append, clock=clock)
        clock.now += 0.5
        quick(FetchProgress(1, 12, 12))
        quick.finish(1, 12)
        slow = fetch_reporter("accounts", "k2", dagster_log.append, clock=clock)
        for page in range(1, 31):
            clock.now += 1.0
            slow(FetchProgress(page, page * 100, 3000))
        slow.finish(30, 3000)
    outside = fetch_reporter("contacts", "k3", dagster_log.append, clock=clock)
    clock.now += 3
    outside(FetchProgress(1, 10, None))
    # The run's log: every 10 s and a final line per fetch.
    assert dagster_log == [
        "teams: 1 page, 12 / 12 rows (100%), 24 rows/s, done in 0.5s",
        "accounts: 10 pages, 1,000 / 3,000 rows (33%), 100 rows/s, ETA 20s",
        "accounts: 20 pages, 2,000 / 3,000 rows (67%), 100 rows/s, ETA 10s",
        "accounts: 30 pages, 3,000 / 3,000 rows (100%), 100 rows/s, ETA 0s",
        "accounts: 30 pages, 3,000 / 3,000 rows (100%), 100 rows/s, done in 30s",
    ]
    # The terminal: every 2 s while listening, nothing for the quick fetch.
    assert [u.entity for u in terminal] == ["accounts"] * 16
    assert terminal[-1].done and not terminal[0].done
    assert terminal[0].records == 200


def test_durations_read_like_a_person_writes_them():
    assert [format_duration(s) for s in (0.25, 4, 42, 200, 7500, 3 * 86400)] == [
        "0.25s", "4s", "42s", "3m 20s", "2h 05m", "3d 0h"]


def test_fetch_reports_each_page_with_the_source_count(tmp_path, simulator_url):
    """The page loop calls the hook after every page; a whole-table read asks `$count` first."""
    simulator, url = simulator_url
    entity = EntityConfig(name="vin_candidates", group="hourly", incremental="full",
                          page_size=40)
    updates: list[FetchProgress] = []

    async def run():
        async with SimulatorSource(entity_names=ENTITY_NAMES, base_url=url).open_session() as s:
            definition = await s.entity_definition(entity.name)
            request = plan_fetch(entity, "20260101T000000Z", definition, watermark=None)
            archive = ChangeSetArchive(tmp_path, entity.name, "20260101T000000Z")
            return await fetch_change_set(s, archive, request, definition,
                                          on_progress=updates.append, count_total=True)

    summary = asyncio.run(run())
    assert [(u.pages, u.records, u.total) for u in updates] == [
        (1, 40, 130), (2, 80, 130), (3, 120, 130), (4, 130, 130)]
    assert summary.requests == 5  # four pages and one count


def test_past_the_count_limit_a_whole_table_is_sized_by_retrieve_total_record_count():
    """Dataverse stops `$count` at 5000; RetrieveTotalRecordCount sizes a whole table."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/oauth2/v2.0/token"):
            return httpx.Response(200, json={"access_token": "t", "expires_in": 3599})
        seen.append(unquote(str(request.url)).split("/v9.2/")[1])
        if request.url.path.endswith("/EntityDefinitions"):
            return httpx.Response(200, json={"value": [{"LogicalName": "account"}]})
        if "RetrieveTotalRecordCount" in request.url.path:
            return httpx.Response(200, json={"EntityRecordCountCollection": {
                "Count": 1, "IsReadOnly": False, "Keys": ["account"], "Values": [1234567]}})
        return httpx.Response(200, json={
            "@odata.count": 5000, "@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded": True,
            "value": [{"accountid": "x"}]})

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            credentials = ClientCredentials(http, org_url=ORG, client_id="c", client_secret="s",
                                            authority="https://login.example.com",
                                            tenant_id="tenant")
            session = ClientSession(DataverseClient(http, credentials, org_url=ORG))
            await session.entity_definition("accounts")
            whole = await session.count("accounts", None, "accountid")
            filtered = await session.count("accounts", "modifiedon gt 2026-01-01T00:00:00Z")
            return whole, filtered

    assert asyncio.run(run()) == (1234567, None)
    assert seen[1] == "accounts?$count=true&$top=1&$select=accountid"
    assert seen[2] == "RetrieveTotalRecordCount(EntityNames=@tables)?@tables=['account']"
    assert len(seen) == 4  # the filtered count stops at the limit: unknown, not guessed


def test_a_table_past_the_count_limit_is_sized_against_the_simulator():
    """The same over loopback: the simulator stops $count at 5000 and answers
    RetrieveTotalRecordCount with the table's size."""
    from dataverse_assets.simulator import DataverseSimulator, serve_on_loopback

    sim = DataverseSimulator(["accounts"], seed=5, row_counts={"accounts": 6100})
    with serve_on_loopback(sim) as url:
        source = SimulatorSource(entity_names=["accounts"], base_url=url)

        async def run():
            async with source.open_session() as session:
                await session.entity_definition("accounts")
                return (await session.count("accounts", None, "accountid"),
                        await session.count("accounts", "statecode eq 0", "accountid"))

        whole, filtered = asyncio.run(run())
    assert whole == 6100
    active = sum(r["statecode"] == 0 for r in sim.records("accounts"))
    assert filtered == (active if active <= 5000 else None)


def test_staging_planning_and_publishing_report_to_the_terminal_with_their_final_line():
    clock, terminal = FakeClock(), []
    with listening(terminal.append):
        staging = phase_reporter("accounts", "k", "staging", clock=clock)
        for batch in range(1, 11):
            clock.now += 0.5
            staging(FetchProgress(batch, batch * 1000, 10_000))
        staging.finish()
        planning = phase_reporter("accounts", "k", "planning", clock=clock)
        clock.now += 0.1
        planning.finish()
    lines = [u.line() for u in terminal]
    # Every 2 s while it runs, and always the final line (short phases too: the CLI times them).
    assert lines == [
        "accounts: staging 4,000 / 10,000 rows (40%), 2,000 rows/s, ETA 3s",
        "accounts: staging 8,000 / 10,000 rows (80%), 2,000 rows/s, ETA 1s",
        "accounts: staging 10,000 / 10,000 rows (100%), 2,000 rows/s, done in 5s",
        "accounts: planning, done in 0.1s",
    ]
    assert [u.phase for u in terminal] == ["staging"] * 3 + ["planning"]
