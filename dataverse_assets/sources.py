"""The injected API source: one abstract resource, several implementations.

Assets only ever see `DataverseSource.open_session()`; swapping live Dataverse for the
simulator or saved fixtures changes no asset code.
"""


import functools
import os
import ssl
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import orjson
from dagster import ConfigurableResource
from pydantic import Field

from dataverse_assets.auth import DEFAULT_REFRESH_AFTER_SECONDS, SHARED_TOKENS, ClientCredentials
from dataverse_assets.client import (
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_RESPONSE_DEADLINE_SECONDS,
    DataverseClient,
    FetchStats,
    Page,
    RetryPolicy,
)
from dataverse_assets.errors import (
    AuthenticationError,
    ChangeSetNotArchivedError,
    DataverseError,
    DataverseRequestError,
)
from dataverse_assets.query import PageQuery, string_literal

METADATA_SELECT = "LogicalName,EntitySetName,PrimaryIdAttribute,ChangeTrackingEnabled"
# Dataverse stops counting at 5000 (`@odata.count` says 5000 and the limit annotation is set).
COUNT_LIMIT = 5000
COUNT_LIMIT_EXCEEDED = "@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"


class SourceSession(ABC):
    """What a fetch can ask of a source during one run."""

    stats: FetchStats

    @abstractmethod
    async def entity_definition(self, entity_set: str) -> dict | None:
        """The EntityDefinitions entry (with Attributes) or None when metadata is unavailable."""

    @abstractmethod
    def iter_pages(self, entity_set: str, query: PageQuery,
                   start_url: str | None = None) -> AsyncIterator[Page]:
        """Pages of an entity set (or of a stored delta link), yielded as they arrive."""

    @abstractmethod
    async def get_record(self, entity_set: str, record_id: str) -> tuple[str, bytes, dict]:
        """One record by id: (url, verbatim body, record); DataverseRequestError if missing."""

    def iter_pages_in_ranges(self, entity_set: str, query: PageQuery, primary_key: str,
                             ranges: int) -> AsyncIterator[Page]:
        """Pages of a query split into primary-key ranges paged in parallel, as they arrive.
        Sources that cannot split read the query in one stream."""
        return self.iter_pages(entity_set, query)

    async def count(self, entity_set: str, filter: str | None = None,
                    primary_key: str | None = None) -> int | None:
        """How many records match `filter`, when the source can say cheaply; else None."""
        return None

    async def entity_set_names(self) -> list[str]:
        """Every entity set the source serves (for suggestions when a name is wrong)."""
        return []


class ClientSession(SourceSession):
    """A session over the HTTP client (live Dataverse or the simulator)."""

    def __init__(self, client: DataverseClient) -> None:
        self.client = client
        self.stats = client.stats
        self._logical_names: dict[str, str] = {}  # entity set -> table, from metadata

    async def entity_definition(self, entity_set: str) -> dict | None:
        _, payload = await self.client.get_json(
            "EntityDefinitions",
            params={
                "$select": METADATA_SELECT,
                "$filter": f"EntitySetName eq {string_literal(entity_set)}",
                "$expand": "Attributes($select=LogicalName,AttributeType)",
            },
            entity=entity_set,
        )
        definitions = payload.get("value") or []
        if definitions and definitions[0].get("LogicalName"):
            self._logical_names[entity_set] = definitions[0]["LogicalName"]
        return definitions[0] if definitions else None

    def iter_pages(self, entity_set: str, query: PageQuery,
                   start_url: str | None = None) -> AsyncIterator[Page]:
        return self.client.iter_pages(entity_set, query, start_url)

    async def entity_set_names(self) -> list[str]:
        """From the service document; [] if it cannot be read (suggestions are optional)."""
        try:
            _, service = await self.client.get_json("", entity="service document")
        except (DataverseError, AuthenticationError):
            return []
        items = service.get("value")
        return [str(item["name"]) for item in items if isinstance(item, dict) and item.get("name")
                ] if isinstance(items, list) else []

    async def get_record(self, entity_set: str, record_id: str) -> tuple[str, bytes, dict]:
        return await self.client.get_record(entity_set, record_id)

    def iter_pages_in_ranges(self, entity_set: str, query: PageQuery, primary_key: str,
                             ranges: int) -> AsyncIterator[Page]:
        return self.client.iter_pages_in_ranges(entity_set, query, primary_key, ranges)

    async def count(self, entity_set: str, filter: str | None = None,
                    primary_key: str | None = None) -> int | None:
        """`$count=true` with `$top=1` (one row, no paging). Past Dataverse's count limit of
        5000, a whole table's size comes from RetrieveTotalRecordCount (a recent snapshot,
        close enough for an ETA); a filtered count that large is unknown (None)."""
        params = {"$count": "true", "$top": "1"}
        if primary_key:
            params["$select"] = primary_key
        if filter:
            params["$filter"] = filter
        _, payload = await self.client.get_json(entity_set, params=params, entity=entity_set)
        count = payload.get("@odata.count")
        if not isinstance(count, int):
            return None
        if not payload.get(COUNT_LIMIT_EXCEEDED) and count < COUNT_LIMIT:
            return count
        logical_name = self._logical_names.get(entity_set)
        if filter or not logical_name:
            return None
        _, payload = await self.client.get_json(
            "RetrieveTotalRecordCount(EntityNames=@tables)",
            params={"@tables": f"[{string_literal(logical_name)}]"}, entity=entity_set)
        counts = payload.get("EntityRecordCountCollection") or {}
        totals = dict(zip(counts.get("Keys") or [], counts.get("Values") or [], strict=False))
        total = totals.get(logical_name)
        return total if isinstance(total, int) and total >= count else None


class DataverseSource(ConfigurableResource, ABC):
    """Where change sets come from. Implementations: live, simulator, fixture."""

    @abstractmethod
    def open_session(self) -> AbstractAsyncContextManager[SourceSession]:
        """An async context manager yielding a session for one run's fetches."""

    def check_fetchable(self, entity_set: str, change_set: str) -> None:
        """Raise when this source cannot fetch the change set (asked before a fetch starts).
        Sources that reach Dataverse can fetch anything; the archive source cannot."""


def shared_ssl_context() -> ssl.SSLContext:
    """One verifying TLS context per process (per SSL_CERT_FILE / SSL_CERT_DIR), as httpx
    would build it: loading the CA bundle costs 25-50 ms, and every fetch session would
    otherwise load it again."""
    return _ssl_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _ssl_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    return httpx.create_ssl_context(verify=True, trust_env=True)


@asynccontextmanager
async def _client_session(
    *, org_url: str, client_id: str, client_secret: str, authority: str, tenant_id: str | None,
    max_concurrency: int, timeout_seconds: float, transport: httpx.AsyncBaseTransport | None = None,
    retry_policy: RetryPolicy | None = None,
    refresh_after_seconds: float = DEFAULT_REFRESH_AFTER_SECONDS,
    max_response_mb: float = DEFAULT_MAX_RESPONSE_BYTES / 2**20,
    response_deadline_seconds: float = DEFAULT_RESPONSE_DEADLINE_SECONDS,
) -> AsyncIterator[SourceSession]:
    limits = httpx.Limits(max_connections=max_concurrency + 2,
                          max_keepalive_connections=max_concurrency + 2)
    async with httpx.AsyncClient(
        transport=transport, timeout=httpx.Timeout(timeout_seconds), limits=limits,
        follow_redirects=False, verify=shared_ssl_context(),
    ) as http:
        credentials = ClientCredentials(
            http, org_url=org_url, client_id=client_id, client_secret=client_secret,
            authority=authority, tenant_id=tenant_id, refresh_after_seconds=refresh_after_seconds,
            # Sessions over the network share tokens; an in-process simulator (a transport)
            # is a different org each time and costs nothing to ask.
            shared=SHARED_TOKENS if transport is None else None,
        )
        client = DataverseClient(http, credentials, org_url=org_url,
                                 max_concurrency=max_concurrency, retry_policy=retry_policy,
                                 max_response_bytes=int(max_response_mb * 2**20),
                                 response_deadline_seconds=response_deadline_seconds)
        yield ClientSession(client)


class LiveDataverseSource(DataverseSource):
    """A real Dataverse org over HTTPS with OAuth client credentials."""

    url: str = Field(description="Org URL, e.g. https://contoso.crm.dynamics.com")
    client_id: str
    client_secret: str = Field(description="Set through EnvVar so the UI never shows it.")
    tenant_id: str | None = Field(None, description="Discovered from the org when not set.")
    authority: str = "https://login.microsoftonline.com"
    max_concurrency: int = Field(8, ge=1, le=52)
    timeout_seconds: float = 120.0
    max_response_mb: float = Field(
        DEFAULT_MAX_RESPONSE_BYTES / 2**20, gt=0,
        description="A response body larger than this (MB) is refused with a clear error "
        "instead of being held in memory (DATAVERSE_MAX_RESPONSE_MB).",
    )
    response_deadline_seconds: float = Field(
        DEFAULT_RESPONSE_DEADLINE_SECONDS, gt=0,
        description="One response (headers and whole body) taking longer than this is a "
        "timeout, retried like one (DATAVERSE_RESPONSE_DEADLINE_SECONDS).",
    )
    token_refresh_after_seconds: float = Field(
        DEFAULT_REFRESH_AFTER_SECONDS, gt=0,
        description="Refresh the access token this long after getting it (tokens live about "
        "an hour; never later than a minute before expiry).",
    )

    def open_session(self) -> AbstractAsyncContextManager[SourceSession]:
        return _client_session(
            org_url=self.url, client_id=self.client_id, client_secret=self.client_secret,
            authority=self.authority, tenant_id=self.tenant_id,
            max_concurrency=self.max_concurrency, timeout_seconds=self.timeout_seconds,
            refresh_after_seconds=self.token_refresh_after_seconds,
            max_response_mb=self.max_response_mb,
            response_deadline_seconds=self.response_deadline_seconds,
        )


_EMBEDDED_LOCK = threading.Lock()
_EMBEDDED: dict[tuple[int, tuple[str, ...]], object] = {}


def embedded_simulator(seed: int, entity_names: Sequence[str]):
    """The in-process simulator for a seed and entity list: one per process, so the data a
    run sees is the data a test mutated."""
    from dataverse_assets.simulator import DataverseSimulator

    key = (seed, tuple(sorted(entity_names)))
    with _EMBEDDED_LOCK:
        if key not in _EMBEDDED:
            _EMBEDDED[key] = DataverseSimulator(key[1], seed=seed)
        return _EMBEDDED[key]


class SimulatorSource(DataverseSource):
    """The built-in Dataverse simulator behind the same HTTP client as live Dataverse.

    Without `base_url` it runs in-process (httpx's ASGI transport, no sockets); with one it
    talks to a simulator already served on loopback (`dataverse-assets simulator`).
    """

    entity_names: list[str]
    seed: int = 42
    base_url: str | None = None
    max_concurrency: int = Field(8, ge=1, le=52)
    timeout_seconds: float = 60.0
    max_response_mb: float = Field(
        DEFAULT_MAX_RESPONSE_BYTES / 2**20, gt=0,
        description="A response body larger than this (MB) is refused with a clear error "
        "instead of being held in memory (DATAVERSE_MAX_RESPONSE_MB).",
    )
    response_deadline_seconds: float = Field(
        DEFAULT_RESPONSE_DEADLINE_SECONDS, gt=0,
        description="One response (headers and whole body) taking longer than this is a "
        "timeout, retried like one (DATAVERSE_RESPONSE_DEADLINE_SECONDS).",
    )
    retry_backoff_seconds: list[float] | None = Field(
        None, description="Waits between retries (default: the client's 1, 2, 4, 8, 16 s); "
        "chaos tests shorten them.")

    def open_session(self) -> AbstractAsyncContextManager[SourceSession]:
        from dataverse_assets.simulator.identity import (
            SIMULATOR_CLIENT_ID,
            SIMULATOR_CLIENT_SECRET,
        )

        transport = None
        org_url = self.base_url
        if org_url is None:
            from dataverse_assets.simulator import create_app

            simulator = embedded_simulator(self.seed, self.entity_names)
            transport = httpx.ASGITransport(app=create_app(simulator))
            org_url = "http://simulator.invalid"
        return _client_session(
            org_url=org_url, client_id=SIMULATOR_CLIENT_ID, client_secret=SIMULATOR_CLIENT_SECRET,
            authority=org_url, tenant_id=None, max_concurrency=self.max_concurrency,
            timeout_seconds=self.timeout_seconds, transport=transport,
            max_response_mb=self.max_response_mb,
            response_deadline_seconds=self.response_deadline_seconds,
            retry_policy=RetryPolicy(backoff_seconds=tuple(self.retry_backoff_seconds))
            if self.retry_backoff_seconds else None,
        )


class FixtureSession(SourceSession):
    """Saved responses on disk: `<dir>/<entity>/page-*.json` and `entity_definition.json`.

    Queries are not evaluated: the saved pages are what the entity returns.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.stats = FetchStats()

    async def entity_definition(self, entity_set: str) -> dict | None:
        path = self.directory / entity_set / "entity_definition.json"
        return orjson.loads(path.read_bytes()) if path.exists() else None

    async def get_record(self, entity_set: str, record_id: str) -> tuple[str, bytes, dict]:
        path = self.directory / entity_set / "records" / f"{record_id}.json"
        if not path.exists():
            raise DataverseRequestError(f"{entity_set}: no saved record {record_id}", status=404)
        body = path.read_bytes()
        return path.as_uri(), body, orjson.loads(body)

    async def iter_pages(self, entity_set: str, query: PageQuery,
                         start_url: str | None = None) -> AsyncIterator[Page]:
        folder = self.directory / entity_set
        paths = sorted(folder.glob("page-*.json"))
        if not paths:
            raise FileNotFoundError(
                f"{entity_set}: no saved pages in {folder} (expected page-00001.json ...)"
            )
        for number, path in enumerate(paths, start=1):
            body = path.read_bytes()
            payload = orjson.loads(body)
            self.stats.requests += 1
            self.stats.bytes += len(body)
            yield Page(number, path.as_uri(), body, payload, payload.get("@odata.nextLink"),
                       payload.get("@odata.deltaLink"))


class FixtureSource(DataverseSource):
    """Saved responses from a directory, for tests and offline demos."""

    directory: str

    def open_session(self) -> AbstractAsyncContextManager[SourceSession]:
        @asynccontextmanager
        async def session() -> AsyncIterator[SourceSession]:
            yield FixtureSession(Path(self.directory))

        return session()


class ArchiveSession(SourceSession):
    """Serves only what is archived: the newest archived metadata of an entity; any request
    for pages or records is refused (raw/E reuses archived change sets before asking)."""

    def __init__(self, archive_dir: Path) -> None:
        self.archive_dir = archive_dir
        self.stats = FetchStats()

    async def entity_definition(self, entity_set: str) -> dict | None:
        from dataverse_assets.archive.change_sets import (
            ENTITY_DEFINITION,
            ChangeSetArchive,
            list_change_sets,
        )

        for change_set in reversed(list_change_sets(self.archive_dir, entity_set)):
            definition = ChangeSetArchive(self.archive_dir, entity_set, change_set).read_json(
                ENTITY_DEFINITION)
            if isinstance(definition, dict):
                return definition
        return None

    def _refuse(self, entity_set: str, what: str) -> ChangeSetNotArchivedError:
        return ChangeSetNotArchivedError(
            f"{entity_set}: the archive source (DATAVERSE_SOURCE=archive) cannot fetch {what}; "
            f"it replays only change sets archived in {self.archive_dir}"
        )

    def iter_pages(self, entity_set: str, query: PageQuery,
                   start_url: str | None = None) -> AsyncIterator[Page]:
        raise self._refuse(entity_set, "pages")

    async def get_record(self, entity_set: str, record_id: str) -> tuple[str, bytes, dict]:
        raise self._refuse(entity_set, f"record {record_id}")


class ArchiveSource(DataverseSource):
    """Replays the raw archive, byte for byte, with no network: rebuilding a mirror through
    Dagster. raw/E finds each change set already archived and reuses it; a change set that is
    not archived is an error naming the entity and the change set."""

    archive_dir: str = Field(description="The archive to replay (DATAVERSE_ARCHIVE_DIR).")

    def check_fetchable(self, entity_set: str, change_set: str) -> None:
        raise ChangeSetNotArchivedError(
            f"{entity_set}: change set {change_set} is not archived in {self.archive_dir} "
            "(no complete manifest.json), and the archive source (DATAVERSE_SOURCE=archive) "
            "only replays archived change sets; materialize archived keys only (dataverse-assets"
            " change-set register-archived lists them) or fetch with a live or simulator source"
        )

    def open_session(self) -> AbstractAsyncContextManager[SourceSession]:
        @asynccontextmanager
        async def session() -> AsyncIterator[SourceSession]:
            yield ArchiveSession(Path(self.archive_dir))

        return session()
