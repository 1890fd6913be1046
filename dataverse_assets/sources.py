"""The injected API source: one abstract resource, several implementations.

Assets only ever see `DataverseSource.open_session()`; swapping live Dataverse for the
simulator or saved fixtures changes no asset code.
"""


import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import orjson
from dagster import ConfigurableResource
from pydantic import Field

from dataverse_assets.auth import ClientCredentials
from dataverse_assets.client import (
    DataverseClient,
    DataverseRequestError,
    FetchStats,
    Page,
    RetryPolicy,
)
from dataverse_assets.query import PageQuery, string_literal

METADATA_SELECT = "LogicalName,EntitySetName,PrimaryIdAttribute,ChangeTrackingEnabled"


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


class ClientSession(SourceSession):
    """A session over the HTTP client (live Dataverse or the simulator)."""

    def __init__(self, client: DataverseClient) -> None:
        self.client = client
        self.stats = client.stats

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
        return definitions[0] if definitions else None

    def iter_pages(self, entity_set: str, query: PageQuery,
                   start_url: str | None = None) -> AsyncIterator[Page]:
        return self.client.iter_pages(entity_set, query, start_url)

    async def get_record(self, entity_set: str, record_id: str) -> tuple[str, bytes, dict]:
        return await self.client.get_record(entity_set, record_id)


class DataverseSource(ConfigurableResource, ABC):
    """Where change sets come from. Implementations: live, simulator, fixture."""

    @abstractmethod
    def open_session(self) -> AbstractAsyncContextManager[SourceSession]:
        """An async context manager yielding a session for one run's fetches."""


@asynccontextmanager
async def _client_session(
    *, org_url: str, client_id: str, client_secret: str, authority: str, tenant_id: str | None,
    max_concurrency: int, timeout_seconds: float, transport: httpx.AsyncBaseTransport | None = None,
    retry_policy: RetryPolicy | None = None,
) -> AsyncIterator[SourceSession]:
    limits = httpx.Limits(max_connections=max_concurrency + 2,
                          max_keepalive_connections=max_concurrency + 2)
    async with httpx.AsyncClient(
        transport=transport, timeout=httpx.Timeout(timeout_seconds), limits=limits,
        follow_redirects=False,
    ) as http:
        credentials = ClientCredentials(
            http, org_url=org_url, client_id=client_id, client_secret=client_secret,
            authority=authority, tenant_id=tenant_id,
        )
        client = DataverseClient(http, credentials, org_url=org_url,
                                 max_concurrency=max_concurrency, retry_policy=retry_policy)
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

    def open_session(self) -> AbstractAsyncContextManager[SourceSession]:
        return _client_session(
            org_url=self.url, client_id=self.client_id, client_secret=self.client_secret,
            authority=self.authority, tenant_id=self.tenant_id,
            max_concurrency=self.max_concurrency, timeout_seconds=self.timeout_seconds,
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

    def open_session(self) -> AbstractAsyncContextManager[SourceSession]:
        from dataverse_assets.simulator import (
            SIMULATOR_CLIENT_ID,
            SIMULATOR_CLIENT_SECRET,
            create_app,
        )

        transport = None
        org_url = self.base_url
        if org_url is None:
            simulator = embedded_simulator(self.seed, self.entity_names)
            transport = httpx.ASGITransport(app=create_app(simulator))
            org_url = "http://simulator.invalid"
        return _client_session(
            org_url=org_url, client_id=SIMULATOR_CLIENT_ID, client_secret=SIMULATOR_CLIENT_SECRET,
            authority=org_url, tenant_id=None, max_concurrency=self.max_concurrency,
            timeout_seconds=self.timeout_seconds, transport=transport,
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
