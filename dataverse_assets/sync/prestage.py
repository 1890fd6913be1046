"""Staging while pages arrive: a fetch hands each page it archives to a thread that stages it.

Without this, `staging/E` starts after the last page of `raw/E` and parses every page again
from the archive. With it, the fetch puts each archived page's records (already parsed) on a
bounded queue; a thread of the same process turns them into staging rows and writes them into
the staging file (store.staging_store), while the next pages are fetched. When the fetch is
complete the thread records what it staged, with the `staging_fingerprint` it used, and
`staging/E` takes those rows as they are (sync.stage.adopt_prestaged) instead of staging the
archive again.

Nothing here can change what is staged, only when:

- The rows are made by the same function from the same records, in archive page order, so
  they are the rows staging the archive gives (a test compares them, mode by mode).
- They are taken only when the fetch completed and `staging/E` decides the same schema and
  hash rule (the fingerprint): a change set whose schema drifted, or the first one of an
  entity without metadata, is staged from the archive as before.
- Anything that goes wrong here (a full queue for longer than PRESTAGE_WAIT_SECONDS, a locked
  file, an error) makes the thread give up and delete what it wrote; the fetch goes on, and
  `staging/E` stages the archive. A killed process leaves rows without a record of them:
  `staging/E` deletes them before it writes the change set, and staging retention once the
  entity has published a newer one. Recorded rows are taken only if all are still there.

Filtered entities and targeted refreshes (whose staging depends on ids resolved at the end of
the fetch) and a change-tracking read that had to start again are staged from the archive.
`DATAVERSE_STAGE_WHILE_FETCHING=false` turns this off.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
from contextlib import suppress

from dataverse_assets.archive.change_sets import ENTITY_DEFINITION, ChangeSetArchive
from dataverse_assets.config import EntityConfig
from dataverse_assets.modes import Mode
from dataverse_assets.store.backend import dialect_of
from dataverse_assets.store.db import connect_staging_writer, transaction
from dataverse_assets.store.schema import EntitySchema
from dataverse_assets.store.staging_store import (
    forget_prestaged,
    record_prestaged,
)
from dataverse_assets.store.tables import delete_staged_rows
from dataverse_assets.sync.fetch_plan import FetchRequest
from dataverse_assets.sync.stage import (
    STAGING_COUNTS,
    PageContext,
    StagingWriter,
    decide_schema,
    stage_records,
    staging_fingerprint,
)

STAGE_WHILE_FETCHING_ENV = "DATAVERSE_STAGE_WHILE_FETCHING"
# Pages waiting for the thread: the fetch is held back (not memory) when staging is slower.
PRESTAGE_QUEUE_PAGES = 2
# A page the thread has not taken by then (it waits for the staging file's write lock, held
# by a long write of another entity): it gives up, and the fetch goes on unhindered.
PRESTAGE_WAIT_SECONDS = 10.0
_END = None


def stage_while_fetching() -> bool:
    value = os.environ.get(STAGE_WHILE_FETCHING_ENV, "").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{STAGE_WHILE_FETCHING_ENV}={value!r}: expected true or false")


def _schema_now(archive: ChangeSetArchive, entity: EntityConfig,
                locked: EntitySchema | None, name_limit: int | None) -> EntitySchema | None:
    """The schema staging/E will most likely use: the locked one, or for a first change set
    the one its archived metadata decides (None without metadata: a first sync that infers
    its schema from records is staged from the archive)."""
    if locked is not None:
        return locked
    definition = archive.read_json(ENTITY_DEFINITION)
    if isinstance(definition, dict) and definition.get("Attributes"):
        return decide_schema(archive, entity.primary_key, name_limit)
    return None


class PageStager:
    """The thread that stages one change set's pages as its fetch archives them (see the
    module). `page` per archived page, then `finish` once the fetch is complete, or `abandon`.
    """

    def __init__(self, db_path: str, entity: EntityConfig, archive: ChangeSetArchive,
                 locked: EntitySchema | None) -> None:
        self.db_path, self.entity, self.archive, self.locked = db_path, entity, archive, locked
        self.queue: queue.Queue = queue.Queue(PRESTAGE_QUEUE_PAGES)
        self.given_up: str | None = None  # why, once it gave up
        self.recorded = False  # its rows were recorded for staging/E to take
        self.counts: dict[str, int] = dict.fromkeys(STAGING_COUNTS, 0)
        self.issues: list[dict] = []
        self._finishing = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"stage-while-fetching-{entity.name}")
        self._thread.start()

    @classmethod
    def for_request(cls, db_path: str, entity: EntityConfig, archive: ChangeSetArchive,
                    request: FetchRequest, locked: EntitySchema | None) -> PageStager | None:
        """A stager for this fetch, or None when its change set is staged from the archive."""
        if (not stage_while_fetching() or request.mode in (Mode.FILTERED, Mode.TARGETED)
                or request.id_scope is not None or request.expected_ids):
            return None
        return cls(db_path, entity, archive, locked)

    # -- the fetch's side ---------------------------------------------------------------------

    def page(self, number: int, meta: dict, records: list[dict]) -> None:
        """An archived page (its number, manifest entry and parsed records)."""
        if self.given_up is not None:
            return
        try:
            self.queue.put((number, meta, records), timeout=PRESTAGE_WAIT_SECONDS)
        except queue.Full:
            self.given_up = f"page {number} waited more than {PRESTAGE_WAIT_SECONDS:g} s"

    def finish(self) -> bool:
        """The fetch is complete: record the rows for staging/E. True when it did."""
        self._finishing = True
        self._stop()
        return self.recorded

    def abandon(self, reason: str = "the fetch did not complete") -> None:
        """The fetch failed or starts again: give up and delete what was written."""
        if self.given_up is None:
            self.given_up = reason
        self._stop()

    def _stop(self) -> None:
        while self._thread.is_alive():
            try:
                self.queue.put(_END, timeout=0.5)
                break
            except queue.Full:
                continue  # the thread drains the queue once it gave up, or stages on
        self._thread.join()

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        connection = writer = None
        try:
            # A write lock not had within PRESTAGE_WAIT_SECONDS: give up, not hold the fetch.
            connection, markers = connect_staging_writer(self.db_path, PRESTAGE_WAIT_SECONDS)
            context = None
            while (item := self.queue.get()) is not _END:
                if self.given_up is not None:
                    continue  # drain: the fetch must never wait for a thread that gave up
                number, meta, records = item
                if writer is None:
                    schema = _schema_now(self.archive, self.entity, self.locked,
                                         dialect_of(connection).max_identifier_bytes)
                    if schema is None:
                        self.given_up = "no schema before staging/E decides it"
                        continue
                    context = PageContext(
                        change_set=self.archive.change_set, pk=schema.primary_key,
                        names=tuple(schema.column_names),
                        hash_ignore_annotations=self.entity.hash_ignore_annotations,
                        scope_ids=None)
                    fingerprint = staging_fingerprint(schema,
                                                      self.entity.hash_ignore_annotations)
                    writer = StagingWriter(connection, self.entity.name,
                                           self.archive.change_set, schema, self.issues)
                    with transaction(connection, mirror=False, staging=True):
                        forget_prestaged(connection, self.entity.name,
                                         self.archive.change_set, schema=markers)
                        writer.start()
                rows, keys = stage_records(context, number, meta, records, self.counts,
                                           self.issues)
                with transaction(connection, mirror=False, staging=True):
                    writer.write(rows, keys)
            if self._finishing and self.given_up is None and writer is not None:
                with transaction(connection, mirror=False, staging=True):
                    writer.finish()
                    record_prestaged(connection, self.entity.name, self.archive.change_set,
                                     fingerprint, writer.rows, self.counts, self.issues,
                                     schema=markers)
                self.recorded = True
        except Exception as exc:  # noqa: BLE001 - staging/E stages the archive instead
            self.given_up = f"{type(exc).__name__}: {exc}"
            with suppress(queue.Empty):
                while self.queue.get(timeout=0.1) is not _END:
                    pass
        finally:
            if connection is not None:
                if not self.recorded and writer is not None:
                    self._delete_written(connection)
                connection.close()

    def _delete_written(self, connection: sqlite3.Connection) -> None:
        """What the thread wrote, deleted (best effort: staging/E deletes it anyway)."""
        with suppress(Exception), transaction(connection, mirror=False, staging=True):
            delete_staged_rows(connection, self.entity.name, self.archive.change_set)
