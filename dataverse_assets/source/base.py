"""The injected API source: one abstract resource, several implementations.

Assets only ever see `DataverseSource.open_session()`; swapping live Dataverse for the
simulator or saved fixtures changes no asset code.
"""


from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from dagster import ConfigurableResource

from dataverse_assets.source.client import (
    FetchStats,
    Page,
)
from dataverse_assets.source.query import PageQuery


class SourceSession(ABC):
    """What a fetch can ask of a source during one run."""

    stats: FetchStats

    @abstractmethod
    async def entity_definition(self, entity_set: str) -> dict | None:
        """The EntityDefinitions entry (with Attributes) or None when metadata is unavailable."""

    async def attribute_metadata(self, entity_set: str, definition: dict) -> dict | None:
        """The entity's attribute metadata beyond names and types, as the source sent it:
        {"organization": ..., "<kind>": <response>, "EntitySets": ...} for the choice kinds,
        lookups (targets) and date columns it has (store.choices parses it); None when the
        source has none."""
        return None

    @abstractmethod
    def iter_pages(self, entity_set: str, query: PageQuery,
                   start_url: str | None = None) -> AsyncIterator[Page]:
        """Pages of an entity set (or of a stored delta link), yielded as they arrive."""

    @abstractmethod
    async def get_record(self, entity_set: str, record_id: str,
                         select: tuple[str, ...] = ()) -> tuple[str, bytes, dict]:
        """One record by id, with `select`'s columns (all when empty) and the annotations:
        (url, verbatim body, record); DataverseRequestError if missing."""

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


class DataverseSource(ConfigurableResource, ABC):
    """Where change sets come from. Implementations: live, simulator, fixture."""

    @abstractmethod
    def open_session(self) -> AbstractAsyncContextManager[SourceSession]:
        """An async context manager yielding a session for one run's fetches."""

    def check_fetchable(self, entity_set: str, change_set: str) -> None:
        """Raise when this source cannot fetch the change set (asked before a fetch starts).
        Sources that reach Dataverse can fetch anything; the archive source cannot."""
