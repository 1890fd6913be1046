"""The archive replayed, byte for byte, with no network: rebuilding a mirror through Dagster."""

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from pydantic import Field

from dataverse_assets.archive.change_sets import (
    ATTRIBUTE_METADATA,
    ENTITY_DEFINITION,
    ChangeSetArchive,
    list_change_sets,
)
from dataverse_assets.archive.storage import ArchiveStorage, open_storage
from dataverse_assets.errors import (
    ChangeSetNotArchivedError,
)
from dataverse_assets.source.base import DataverseSource, SourceSession
from dataverse_assets.source.client import (
    FetchStats,
    Page,
)
from dataverse_assets.source.query import PageQuery


class ArchiveSession(SourceSession):
    """Serves only what is archived: the newest archived metadata of an entity; any request
    for pages or records is refused (raw/E reuses archived change sets before asking)."""

    def __init__(self, archive_dir: ArchiveStorage) -> None:
        self.archive_dir = archive_dir
        self.stats = FetchStats()

    async def entity_definition(self, entity_set: str) -> dict | None:
        for change_set in reversed(list_change_sets(self.archive_dir, entity_set)):
            definition = ChangeSetArchive(self.archive_dir, entity_set, change_set).read_json(
                ENTITY_DEFINITION)
            if isinstance(definition, dict):
                return definition
        return None

    async def attribute_metadata(self, entity_set: str, definition: dict) -> dict | None:
        for change_set in reversed(list_change_sets(self.archive_dir, entity_set)):
            metadata = ChangeSetArchive(self.archive_dir, entity_set, change_set).read_json(
                ATTRIBUTE_METADATA)
            if isinstance(metadata, dict):
                return metadata
        return None

    def _refuse(self, entity_set: str, what: str) -> ChangeSetNotArchivedError:
        return ChangeSetNotArchivedError(
            f"{entity_set}: the archive source (DATAVERSE_SOURCE=archive) cannot fetch {what}; "
            f"it replays only change sets archived in {self.archive_dir.location}"
        )

    def iter_pages(self, entity_set: str, query: PageQuery,
                   start_url: str | None = None) -> AsyncIterator[Page]:
        raise self._refuse(entity_set, "pages")

    async def get_record(self, entity_set: str, record_id: str,
                         select: tuple[str, ...] = ()) -> tuple[str, bytes, dict]:
        raise self._refuse(entity_set, f"record {record_id}")


class ArchiveSource(DataverseSource):
    """Replays the raw archive, byte for byte, with no network: rebuilding a mirror through
    Dagster. raw/E finds each change set already archived and reuses it; a change set that is
    not archived is an error naming the entity and the change set."""

    archive_dir: str = Field(description="The archive to replay: a folder or "
                             "s3://bucket/prefix (DATAVERSE_ARCHIVE_URL or DATAVERSE_ARCHIVE_DIR).")
    s3_endpoint_url: str | None = Field(None, description="DATAVERSE_S3_ENDPOINT_URL.")
    s3_region: str | None = Field(None, description="DATAVERSE_S3_REGION.")

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
            yield ArchiveSession(open_storage(self.archive_dir,
                                              endpoint_url=self.s3_endpoint_url,
                                              region=self.s3_region))

        return session()
