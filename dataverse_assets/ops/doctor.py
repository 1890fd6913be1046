"""`dataverse-assets doctor`: read-only checks of a setup against its org, in the order a person
would fix them, each with what to do when it fails.

Only GETs are sent (metadata, one-row reads, two small pages, one filtered read), so it is safe
against production. The secret is sent to the authority only, and never printed.
"""

from __future__ import annotations

import asyncio
import difflib
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import orjson

from dataverse_assets.config import EntityConfig, Settings, load_settings
from dataverse_assets.errors import (
    AuthenticationError,
    ConfigError,
    DataverseError,
    FetchConfigError,
    UnreachableError,
)
from dataverse_assets.modes import Mode
from dataverse_assets.names import unknown_name
from dataverse_assets.redaction import redact
from dataverse_assets.source.auth import ClientCredentials
from dataverse_assets.source.client import DataverseClient, RetryPolicy
from dataverse_assets.source.live import ClientSession, shared_ssl_context
from dataverse_assets.source.network import connection_problem
from dataverse_assets.source.query import PageQuery, id_filter, string_literal
from dataverse_assets.source.simulator import embedded_simulator
from dataverse_assets.store.choices import parse_attribute_metadata
from dataverse_assets.store.lifecycle import inspect_store
from dataverse_assets.store.schema import detect_primary_key
from dataverse_assets.sync.fetch_plan import attribute_names, choose_mode, resolve_select

PASS, FAIL, WARN, INFO, SKIP = "PASS", "FAIL", "WARN", "INFO", "SKIP"

# Pages of this size make two pages out of any table with three rows or more.
PAGING_CHECK_PAGE_SIZE = 2
# A string literal with a quote in it: the sync doubles quotes (query.string_literal).
QUOTED_PROBE = "O'Brien"
# Dataverse's service protection limits per user and 5-minute window (see DATAVERSE.md).
REQUESTS_PER_WINDOW = 6000
EXECUTION_SECONDS_PER_WINDOW = 1200.0
RATELIMIT_PREFIX = "x-ms-ratelimit-"
BURST_REMAINING = "x-ms-ratelimit-burst-remaining-xrm-requests"
TIME_REMAINING = "x-ms-ratelimit-time-remaining-xrm-requests"
# A doctor should answer in seconds: one retry, short waits.
DOCTOR_RETRY_POLICY = RetryPolicy(max_attempts=2, backoff_seconds=(1.0,), max_retry_after=30.0)


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    status: str
    detail: str
    fix: str = ""
    entity: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OrgTarget:
    """Where and how to connect: live Dataverse or a simulator (loopback or in-process)."""

    description: str
    org_url: str
    client_id: str
    client_secret: str
    authority: str
    tenant_id: str | None
    transport: httpx.AsyncBaseTransport | None = None


def org_target(settings: Settings) -> OrgTarget | None:
    """The org the settings point at; None for the fixture source (no network)."""
    if settings.source == "live":
        return OrgTarget(
            f"live Dataverse at {settings.url}", (settings.url or "").rstrip("/"),
            settings.client_id or "",
            settings.client_secret.get_secret_value() if settings.client_secret else "",
            settings.authority, settings.tenant_id,
        )
    if settings.source == "simulator":
        from dataverse_assets.simulator import (
            SIMULATOR_CLIENT_ID,
            SIMULATOR_CLIENT_SECRET,
            create_app,
        )

        if settings.url:
            url = settings.url.rstrip("/")
            return OrgTarget(f"simulator at {url}", url, SIMULATOR_CLIENT_ID,
                             SIMULATOR_CLIENT_SECRET, url, None)
        simulator = embedded_simulator(settings.simulator_seed,
                                       [e.name for e in settings.entities.entities])
        url = "http://simulator.invalid"
        return OrgTarget("the embedded simulator", url, SIMULATOR_CLIENT_ID,
                         SIMULATOR_CLIENT_SECRET, url, None,
                         httpx.ASGITransport(app=create_app(simulator)))
    return None


def ratelimit_headroom(headers: Mapping[str, str]) -> Check:
    """The throttling check from the `x-ms-ratelimit-*` headers of the last response."""
    reported = {k.lower(): v for k, v in headers.items()
                if k.lower().startswith(RATELIMIT_PREFIX)}
    if not reported:
        return Check("throttling headroom", INFO,
                     "not reported (no x-ms-ratelimit-* headers on the responses)")

    def number(name: str) -> float | None:
        try:
            return float(reported[name].replace(",", ""))
        except (KeyError, ValueError):
            return None

    burst, seconds = number(BURST_REMAINING), number(TIME_REMAINING)
    parts = [f"{k}: {v}" for k, v in sorted(reported.items())]
    low = [label for label, value, limit in (
        ("requests", burst, REQUESTS_PER_WINDOW),
        ("execution time", seconds, EXECUTION_SECONDS_PER_WINDOW),
    ) if value is not None and value < 0.1 * limit]
    if low:
        return Check(
            "throttling headroom", WARN, "; ".join(parts),
            fix=f"less than 10% of the 5-minute {' and '.join(low)} budget is left for this "
                "application user: another client is using it heavily, so syncs will be "
                "throttled (429 + Retry-After). Give the mirror its own application user or "
                "lower DATAVERSE_MAX_CONCURRENCY",
        )
    return Check("throttling headroom", PASS, "; ".join(parts))


def _quoted_probe_column(definition: dict | None, primary_key: str) -> str | None:
    """A String column to try a doubled quote on: the key itself when it is a string, else
    the primary name column ('name', '...name'), else any String column."""
    types = {a.get("LogicalName"): a.get("AttributeType")
             for a in (definition or {}).get("Attributes", [])}
    if types.get(primary_key) == "String":
        return primary_key
    strings = sorted(n for n, t in types.items() if t == "String" and n)
    for name in strings:
        if name == "name" or name.endswith("_name") or name == "fullname":
            return name
    return strings[0] if strings else None


class Doctor:
    """Runs the checks against one org; collects `Check`s in order."""

    def __init__(self, settings: Settings, target: OrgTarget,
                 entities: list[EntityConfig]) -> None:
        self.settings = settings
        self.target = target
        self.entities = entities
        self.checks: list[Check] = []
        self.last_ratelimit: dict[str, str] = {}

    def add(self, name: str, status: str, detail: str, fix: str = "",
            entity: str | None = None) -> Check:
        check = Check(name, status, redact(detail, self.target.client_secret),
                      redact(fix, self.target.client_secret), entity)
        self.checks.append(check)
        return check

    async def _remember_ratelimit(self, response: httpx.Response) -> None:
        headers = {k: v for k, v in response.headers.items()
                   if k.lower().startswith(RATELIMIT_PREFIX)}
        if headers:
            self.last_ratelimit = headers

    async def run(self) -> list[Check]:
        target = self.target
        async with httpx.AsyncClient(
            transport=target.transport, timeout=httpx.Timeout(30.0), follow_redirects=False,
            verify=shared_ssl_context(), event_hooks={"response": [self._remember_ratelimit]},
        ) as http:
            credentials = ClientCredentials(
                http, org_url=target.org_url, client_id=target.client_id,
                client_secret=target.client_secret, authority=target.authority,
                tenant_id=target.tenant_id,
            )
            if not await self._tenant_and_token(credentials):
                for entity in self.entities:
                    self.add("entity checks", SKIP, "not run: no access token",
                             entity=entity.name)
                self.add("throttling headroom", SKIP, "not checked: no access token")
                return self.checks
            client = DataverseClient(
                http, credentials, org_url=target.org_url, max_concurrency=2,
                retry_policy=DOCTOR_RETRY_POLICY,
                response_deadline_seconds=self.settings.response_deadline_seconds)
            session = ClientSession(client)
            if not await self._who_am_i(client):
                return self.checks
            for entity in self.entities:
                await self._check_entity(client, session, entity)
            throttled = client.stats.throttled
            check = ratelimit_headroom(self.last_ratelimit)
            if throttled and check.status != WARN:
                check = Check(check.name, WARN, check.detail + f"; {throttled} request(s) "
                              "were throttled (429) during these checks",
                              fix="the org is throttling this application user already; "
                                  "lower DATAVERSE_MAX_CONCURRENCY or sync at quieter times")
            self.add(check.name, check.status, check.detail, check.fix)
        return self.checks

    async def _tenant_and_token(self, credentials: ClientCredentials) -> bool:
        target = self.target
        if target.tenant_id:
            self.add("tenant discovery", PASS,
                     f"DATAVERSE_TENANT_ID is set ({target.tenant_id}); no discovery needed")
        else:
            try:
                tenant = await credentials.discover_tenant()
            except (AuthenticationError, UnreachableError, httpx.HTTPError) as exc:
                self.add("tenant discovery", FAIL, _describe(exc, target.org_url),
                         fix="check DATAVERSE_URL: the org root such as "
                             "https://contoso.crm.dynamics.com (no /api/data path), reachable "
                             "from here; or set DATAVERSE_TENANT_ID to skip discovery")
                return False
            self.add("tenant discovery", PASS,
                     f"tenant {tenant} (from the org's WWW-Authenticate challenge)")
        try:
            await credentials.token()
        except (AuthenticationError, UnreachableError, httpx.HTTPError) as exc:
            self.add("access token", FAIL, _describe(exc, target.authority),
                     fix="check DATAVERSE_CLIENT_ID and DATAVERSE_CLIENT_SECRET (the secret's "
                         "value, not its ID, and not expired) in the app registration, that "
                         "it belongs to this tenant, and DATAVERSE_AUTHORITY")
            return False
        self.add("access token", PASS,
                 f"client credentials accepted by {target.authority} (token not shown)")
        return True

    async def _who_am_i(self, client: DataverseClient) -> bool:
        try:
            _, payload = await client.get_json("WhoAmI", entity="WhoAmI")
        except (DataverseError, AuthenticationError) as exc:
            self.add("org access", FAIL, str(exc),
                     fix="add the app registration to the environment as an application "
                         "user (Power Platform admin center > Environments > Settings > "
                         "Application users) with a security role that can read the tables")
            for entity in self.entities:
                self.add("entity checks", SKIP, "not run: no access to the org",
                         entity=entity.name)
            return False
        self.add("org access", PASS,
                 f"application user {payload.get('UserId')} in organization "
                 f"{payload.get('OrganizationId')}")
        return True

    async def _check_entity(self, client: DataverseClient, session: ClientSession,
                            entity: EntityConfig) -> None:
        name = entity.name
        try:
            definition = await session.entity_definition(name)
        except (DataverseError, AuthenticationError) as exc:
            definition = None
            self.add("metadata", WARN, f"EntityDefinitions could not be read: {exc}",
                     fix="grant the security role read access to metadata (Entity, Attribute);"
                         " without it schemas are inferred from records", entity=name)
        sample = await self._reachable(client, entity, definition)
        if sample is None:
            return
        primary_key = self._key_and_modifiedon(entity, definition, sample)
        if primary_key is None:
            return
        self._change_tracking(entity, definition)
        await self._choices(session, entity, definition)
        if not await self._scope(client, entity, definition, primary_key):
            return
        first_keys = await self._paging(client, entity, primary_key)
        if first_keys:
            await self._filter_on_key(client, entity, definition, primary_key, first_keys)
        elif self.checks[-1].status != FAIL:
            self.add("$filter on the key", INFO, "not checked: the table has no rows",
                     entity=name)

    async def _reachable(self, client: DataverseClient, entity: EntityConfig,
                         definition: dict | None) -> dict | None:
        name = entity.name
        try:
            _, payload = await client.get_json(name, params={"$top": "1"}, entity=name)
        except DataverseError as exc:
            status = getattr(exc, "status", None)
            if status == 404:
                suggestions = await self._similar_entity_sets(client, name)
                hint = (f"; did you mean {', '.join(repr(s) for s in suggestions)}?"
                        if suggestions else "")
                self.add("reachable", FAIL,
                         f"the org has no entity set {name!r} (404){hint}",
                         fix="use the entity set name (the plural in API URLs, e.g. 'accounts', "
                             "'vin_candidates'), as listed by GET /api/data/v9.2/; fix 'name' in"
                             " the entities file", entity=name)
            elif status == 403:
                self.add("reachable", FAIL,
                         f"read of {name!r} refused (403): {exc}",
                         fix="give the application user's security role Read privilege on "
                             "this table (organization scope for a full mirror)", entity=name)
            else:
                self.add("reachable", FAIL, str(exc),
                         fix="see the message; retry later if it is a 5xx or a timeout",
                         entity=name)
            return None
        except AuthenticationError as exc:
            self.add("reachable", FAIL, str(exc),
                     fix="check the application user's access to this org", entity=name)
            return None
        rows = payload.get("value") or []
        logical = (definition or {}).get("LogicalName")
        if definition is None:
            self.add("reachable", WARN,
                     "entity set exists and can be read, but EntityDefinitions has no entry for "
                     "it: columns and the primary key will be inferred from records",
                     fix="check the name is the entity set name of a table", entity=name)
        else:
            self.add("reachable", PASS,
                     f"entity set exists (table {logical}), read allowed"
                     + ("" if rows else "; the table is empty"), entity=name)
        return rows[0] if rows else {}

    async def _similar_entity_sets(self, client: DataverseClient, name: str) -> list[str]:
        try:
            _, service = await client.get_json("", entity="service document")
        except (DataverseError, AuthenticationError):
            return []
        names = [str(item.get("name")) for item in service.get("value", [])
                 if isinstance(item, dict) and item.get("name")]
        return difflib.get_close_matches(name, names, n=3, cutoff=0.6)

    def _key_and_modifiedon(self, entity: EntityConfig, definition: dict | None,
                            sample: dict) -> str | None:
        name = entity.name
        columns = attribute_names(definition) | {k for k in sample if "@" not in k}
        primary_key, why = detect_primary_key(
            name, sorted(columns), entity.primary_key,
            (definition or {}).get("PrimaryIdAttribute"))
        has_modifiedon = "modifiedon" in columns
        modifiedon = ("modifiedon present" if has_modifiedon else
                      "no modifiedon column (changes come from change tracking or full "
                      "snapshots)")
        if primary_key not in columns and (definition is not None or sample):
            self.add("primary key", FAIL,
                     f"primary key {primary_key!r} ({why}) is not a column of the table",
                     fix="set 'primary_key' for this entity in the entities file to the "
                         "table's id column", entity=name)
            return None
        if entity.incremental == "modifiedon" and not has_modifiedon:
            self.add("primary key, modifiedon", FAIL,
                     f"primary key {primary_key!r}; {modifiedon}",
                     fix="incremental 'modifiedon' needs the column: use 'auto' or 'full'",
                     entity=name)
            return primary_key
        self.add("primary key, modifiedon", PASS,
                 f"primary key {primary_key!r} ({why}); {modifiedon}", entity=name)
        return primary_key

    def _change_tracking(self, entity: EntityConfig, definition: dict | None) -> None:
        name = entity.name
        tracked = bool(definition and definition.get("ChangeTrackingEnabled"))
        enabled = "enabled" if tracked else "not enabled"
        if definition is None:
            enabled = "unknown (no metadata)"
        try:
            mode = choose_mode(entity, definition)
        except FetchConfigError as exc:
            self.add("change tracking", FAIL, str(exc),
                     fix="enable change tracking on the table (Advanced options in the table's "
                         "properties) or set incremental to 'auto'", entity=name)
            return
        how = {
            "change_tracking": "delta links; deletes arrive as $deletedEntity rows",
            "modifiedon": "modifiedon watermark; deletes found by a key-only scan every "
                          f"{entity.reconcile_every_hours:g} h",
            "full": "the whole table every change set; vanished rows are deletes",
        }[mode]
        if entity.filtered:
            mode, how = Mode.FILTERED, "linked ids and a modifiedon watermark"
        self.add("change tracking", PASS if tracked else INFO,
                 f"{enabled}; incremental mode {str(mode)!r} ({how})", entity=name)

    async def _choices(self, session: ClientSession, entity: EntityConfig,
                       definition: dict | None) -> None:
        """What the readable view will show: choice columns and their labels, lookups."""
        name = entity.name
        if definition is None:
            return
        try:
            raw = await session.attribute_metadata(name, definition)
        except (DataverseError, AuthenticationError) as exc:
            self.add("choices", WARN, f"attribute metadata could not be read: {exc}",
                     fix="grant the security role read access to metadata (Attribute); "
                         "without it the sync stops at this entity", entity=name)
            return
        parsed = parse_attribute_metadata(raw)
        if not parsed.choice_columns and not parsed.lookups:
            self.add("choices", INFO, "no choice or lookup columns", entity=name)
            return
        language = (entity.labels.language_code if entity.labels else None) or \
            parsed.base_language_code
        labelled = sum(1 for o in parsed.options if any(c == language for c, _ in o.labels))
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(
            Counter(parsed.choice_columns.values()).items()))
        polymorphic = sum(1 for targets in parsed.lookups.values() if len(targets) > 1)
        missing = len(parsed.options) - labelled
        choices = (f"{_count(len(parsed.choice_columns), 'choice column')} ({kinds}), "
                   f"{_count(len(parsed.options), 'option')}, {labelled} labelled in language "
                   f"{language}" + (f" ({missing} shown in the base language "
                                    f"{parsed.base_language_code}: no label in {language})"
                                    if missing else "")
                   if parsed.choice_columns else "no choice columns")
        self.add("choices", INFO if missing else PASS,
                 f"{choices}; {_count(len(parsed.lookups), 'lookup')} ({polymorphic} polymorphic)"
                 + (f"; {len(parsed.date_only)} DateOnly" if parsed.date_only else ""),
                 fix=("add the translations in Dataverse (export, translate, import), or "
                      "choose another labels.language_code") if missing else "", entity=name)

    async def _scope(self, client: DataverseClient, entity: EntityConfig,
                     definition: dict | None, primary_key: str) -> bool:
        """`select` against the metadata and `filter` against the org (one $top=1 read)."""
        name = entity.name
        if entity.select is not None:
            try:
                keys = resolve_select(entity, definition, primary_key)
            except FetchConfigError as exc:
                self.add("select", FAIL, str(exc), fix="fix 'select' in the entities file",
                         entity=name)
                return False
            self.add("select", PASS, f"{len(keys or [])} columns: {', '.join(keys or [])}",
                     entity=name)
        if entity.filter is not None:
            try:
                _, payload = await client.get_json(name, params={
                    "$select": primary_key, "$filter": entity.filter, "$top": "1"}, entity=name)
            except DataverseError as exc:
                self.add("filter", FAIL, f"Dataverse refuses the filter: {exc}",
                         fix="fix 'filter' in the entities file (OData $filter syntax, "
                             "column logical names)", entity=name)
                return False
            self.add("filter", PASS, f"{entity.filter!r} is accepted"
                     + ("" if payload.get("value") else "; no record matches it now"),
                     entity=name)
        return True

    async def _paging(self, client: DataverseClient, entity: EntityConfig,
                      primary_key: str) -> list[str]:
        """The configured page size is honoured, and two small pages link up. Returns keys
        of the first page (for the filter check)."""
        name = entity.name
        try:
            response, first = await client.get_json(
                name, params={"$select": primary_key},
                prefer=f"odata.maxpagesize={entity.page_size}", entity=name)
            applied = response.headers.get("Preference-Applied", "")
            rows = first.get("value") or []
            if len(rows) > entity.page_size:
                self.add("paging", FAIL,
                         f"asked for pages of {entity.page_size}, got {len(rows)} rows",
                         fix="the server ignores odata.maxpagesize: report it", entity=name)
                return []
            pages = []
            query = PageQuery(select=(primary_key,), orderby=(f"{primary_key} asc",),
                              page_size=min(PAGING_CHECK_PAGE_SIZE, entity.page_size))
            async for page in client.iter_pages(name, query):
                pages.append(page)
                if len(pages) == 2:
                    break
        except (DataverseError, AuthenticationError) as exc:
            self.add("paging", FAIL, str(exc),
                     fix="see the message; the sync pages exactly like this", entity=name)
            return []
        configured = (f"pages of {entity.page_size} honoured"
                      + (f" ({applied})" if applied else " (no Preference-Applied header)"))
        keys = [str(r.get(primary_key)) for r in rows if r.get(primary_key) is not None]
        if len(pages) < 2:
            self.add("paging", INFO,
                     f"{configured}; the table has too few rows for two pages of "
                     f"{query.page_size}: nextLink not exercised", entity=name)
            return keys
        first_keys = {str(r.get(primary_key)) for r in pages[0].records}
        second_keys = {str(r.get(primary_key)) for r in pages[1].records}
        if not second_keys or first_keys & second_keys:
            self.add("paging", FAIL,
                     f"{configured}; following the nextLink gave "
                     + ("an empty page" if not second_keys else "rows of the first page again"),
                     fix="paging would skip or repeat rows: report it with the nextLink",
                     entity=name)
            return keys
        self.add("paging", PASS,
                 f"{configured}; two pages of {query.page_size} fetched, nextLink followed "
                 "(no row repeated)", entity=name)
        return keys

    async def _filter_on_key(self, client: DataverseClient, entity: EntityConfig,
                             definition: dict | None, primary_key: str,
                             keys: list[str]) -> None:
        name = entity.name
        wanted = keys[:2]
        expression = id_filter(primary_key, wanted)
        probe_column = _quoted_probe_column(definition, primary_key)
        if probe_column:
            expression += f" or {probe_column} eq {string_literal(QUOTED_PROBE)}"
        select = sorted({primary_key, probe_column or primary_key})
        try:
            _, payload = await client.get_json(
                name, params={"$select": ",".join(select), "$filter": expression}, entity=name)
        except (DataverseError, AuthenticationError) as exc:
            self.add("$filter on the key", FAIL, str(exc),
                     fix="filtered entities and targeted refresh send this filter: report the "
                         "message", entity=name)
            return
        rows = payload.get("value") or []
        got = {str(r.get(primary_key)).lower() for r in rows}
        extra = [r for r in rows if str(r.get(primary_key)).lower()
                 not in {k.lower() for k in wanted}
                 and (not probe_column or r.get(probe_column) != QUOTED_PROBE)]
        missing = [k for k in wanted if k.lower() not in got]
        quoting = (f"quote doubled in {probe_column} eq {string_literal(QUOTED_PROBE)}"
                   if probe_column else "no string column to try a quoted literal on")
        if missing or extra:
            self.add("$filter on the key", FAIL,
                     f"$filter={expression} returned {len(rows)} rows: missing {missing}, "
                     f"unexpected {len(extra)}",
                     fix="the org evaluates key filters differently: report it", entity=name)
            return
        self.add("$filter on the key", PASS,
                 f"{len(wanted)} record(s) asked for by key came back; {quoting}", entity=name)


def _describe(exc: BaseException, where: str) -> str:
    if isinstance(exc, httpx.TransportError):
        return f"cannot reach {where}: {connection_problem(exc, where).message}"
    if isinstance(exc, httpx.HTTPError):
        return f"cannot reach {where}: {type(exc).__name__}"
    return str(exc)


def _configuration(environ: Mapping[str, str] | None) -> tuple[Settings | None, Check]:
    try:
        settings = load_settings(environ) if environ is not None else load_settings()
        config = settings.entities
    except ConfigError as exc:
        return None, Check("configuration", FAIL, str(exc),
                           fix="fix the environment variable or entities file named above "
                               "(README: Configuration)")
    where = {"live": settings.url, "simulator": settings.url or "embedded",
             "fixture": str(settings.fixtures_dir), "archive": settings.archive_location}
    problems = []
    if settings.source == "live" and settings.url and "/api/data" in settings.url:
        problems.append("DATAVERSE_URL must be the org root (e.g. "
                        "https://contoso.crm.dynamics.com), without /api/data/...")
    if problems:
        return None, Check("configuration", FAIL, "; ".join(problems),
                           fix="correct DATAVERSE_URL")
    return settings, Check(
        "configuration", PASS,
        f"{Path(settings.entities_config_path).name}: {len(config.entities)} entities in "
        f"{len(config.groups)} groups; source {settings.source} ({where[settings.source]}); "
        f"database {settings.store.address}")


def _store_check(settings: Settings) -> Check:
    """Can the mirror's store be used: the SQLite file (or its folder), the PostgreSQL server
    and the user's rights there. Read only: nothing is created."""
    try:
        report = inspect_store(settings.store.address,
                               [e.name for e in settings.entities.entities])
    except ConfigError as exc:  # a PostgreSQL store while it is unfinished, psycopg missing
        return Check("store", FAIL, str(exc), fix="see the message")
    return Check("store", PASS if report.ok else FAIL, report.detail, report.fix)


def _fixture_checks(settings: Settings, entities: list[EntityConfig]) -> list[Check]:
    """The fixture source has no org to ask: check that each entity has saved pages."""
    checks = []
    folder = Path(settings.fixtures_dir or ".")
    for entity in entities:
        pages = sorted((folder / entity.name).glob("page-*.json"))
        definition_path = folder / entity.name / "entity_definition.json"
        definition = (orjson.loads(definition_path.read_bytes())
                      if definition_path.exists() else None)
        if not pages:
            checks.append(Check("saved pages", FAIL,
                                f"no page-*.json in {folder / entity.name}",
                                fix="record them: dataverse-assets fixtures record --out "
                                    f"{folder} --entity {entity.name}", entity=entity.name))
            continue
        try:
            mode = Mode.FILTERED if entity.filtered else choose_mode(entity, definition)
        except FetchConfigError as exc:
            checks.append(Check("saved pages", FAIL, str(exc),
                                entity=entity.name))
            continue
        checks.append(Check(
            "saved pages", PASS,
            f"{len(pages)} page(s)" + (", metadata" if definition else ", no metadata")
            + f"; incremental mode {str(mode)!r}", entity=entity.name))
    return checks


def run_doctor(environ: Mapping[str, str] | None = None,
               only_entities: list[str] | None = None) -> list[Check]:
    """Every check, in order. Read-only."""
    settings, configuration = _configuration(environ)
    checks = [configuration]
    if settings is None:
        return checks
    checks.append(_store_check(settings))
    entities = settings.entities.entities
    if only_entities:
        unknown = [name for name in only_entities if name not in {e.name for e in entities}]
        if unknown:
            checks.append(Check("configuration", FAIL, "; ".join(
                unknown_name("entity", name, (e.name for e in entities)) for name in unknown),
                fix="name entities listed in the entities file"))
            return checks
        entities = [e for e in entities if e.name in only_entities]
    target = org_target(settings)
    if target is None:
        if settings.source == "fixture":
            return checks + _fixture_checks(settings, entities)
        return checks + [Check("source", INFO, f"source {settings.source}: nothing to check")]
    return checks + asyncio.run(Doctor(settings, target, entities).run())


def doctor_passed(checks: list[Check]) -> bool:
    return not any(check.status == FAIL for check in checks)


def render_checks(checks: list[Check]) -> str:
    """One line per check (`PASS  name  detail`) under a heading per entity, the fix under
    each failure or warning, then the totals."""
    width = max((len(c.name) for c in checks), default=0)
    lines: list[str] = []
    entity: str | None = None
    for check in checks:
        if check.entity != entity:
            entity = check.entity
            lines += ["", entity] if entity else [""]
        lines.append(f"{check.status:<4}  {check.name:<{width}}  {check.detail}")
        if check.fix and check.status in (FAIL, WARN):
            lines.append(f"{'':<4}  {'':<{width}}  -> {check.fix}")
    counts = {status: sum(c.status == status for c in checks)
              for status in (PASS, FAIL, WARN, INFO, SKIP)}
    lines.append("")
    lines.append(", ".join(f"{n} {label}" for label, n in (
        ("passed", counts[PASS]), ("failed", counts[FAIL]), ("warnings", counts[WARN]),
        ("info", counts[INFO]), ("skipped", counts[SKIP])) if n or label == "failed"))
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
