"""Saved responses from a directory, for tests and offline demos."""

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import orjson

from dataverse_assets.errors import (
    DataverseRequestError,
)
from dataverse_assets.source.base import DataverseSource, SourceSession
from dataverse_assets.source.client import (
    FetchStats,
    Page,
)
from dataverse_assets.source.query import PageQuery


class FixtureSession(SourceSession):
    """Saved responses on disk: `<dir>/<entity>/page-*.json`, `entity_definition.json` and
    `attribute_metadata.json`.

    Queries are not evaluated: the saved pages are what the entity returns.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.stats = FetchStats()

    async def entity_definition(self, entity_set: str) -> dict | None:
        path = self.directory / entity_set / "entity_definition.json"
        return orjson.loads(path.read_bytes()) if path.exists() else None

    async def attribute_metadata(self, entity_set: str, definition: dict) -> dict | None:
        path = self.directory / entity_set / "attribute_metadata.json"
        return orjson.loads(path.read_bytes()) if path.exists() else None

    async def get_record(self, entity_set: str, record_id: str,
                         select: tuple[str, ...] = ()) -> tuple[str, bytes, dict]:
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


