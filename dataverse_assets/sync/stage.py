"""Staging: parse a change set's archived pages into typed rows plus the verbatim record.

Works from the archive alone (no source), so replaying an archived change set stages exactly
what the live fetch staged.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter

import orjson

from dataverse_assets.archive.change_sets import (
    ENTITY_DEFINITION,
    REQUEST,
    ChangeSetArchive,
    DamagedPage,
    page_records,
    read_page,
)
from dataverse_assets.archive.compacted import iter_compacted_bodies
from dataverse_assets.archive.storage import ArchiveStorage
from dataverse_assets.store import postgres_staging
from dataverse_assets.store.backend import POSTGRES, dialect_of
from dataverse_assets.store.bookkeeping import record_staged
from dataverse_assets.store.db import (
    quote_identifier,
    table_columns,
    table_exists,
    transaction,
    utc_now_iso,
)
from dataverse_assets.store.issues import record_issue, resolve_issues
from dataverse_assets.store.schema import (
    EntitySchema,
    OversizedInteger,
    infer_schema_from_records,
    json_bytes,
    only_selected,
    schema_from_metadata,
    to_sqlite_value,
)
from dataverse_assets.store.staging_store import (
    STAGING_SCHEMA,
    forget_prestaged,
    mark_staged_here,
    prestaged_exists,
    take_prestaged,
)
from dataverse_assets.store.tables import (
    delete_staged_rows,
    row_id_column,
    row_id_match,
    staging_keys_table,
    staging_table,
)
from dataverse_assets.sync.fetch_plan import OUTSIDE_FILTER
from dataverse_assets.sync.stage_workers import WorkerPool

STAGING_META_COLUMNS = ("_change_set", "_pk", "_op", "_content_hash", "_modifiedon")
STAGING_BATCH_ROWS = 2000
STAGING_COUNTS = ("records", "staged", "deleted", "out_of_scope", "without_key", "keys")
# Worker processes pay off from here on (each starts in ~0.1-1 s; a page of 5000 rows of
# 30 columns takes ~0.1 s to parse, hash and serialise).
PARALLEL_STAGING_MIN_PAGES = 20
STAGING_WORKERS_ENV = "DATAVERSE_STAGING_WORKERS"


def is_deleted_entity(record: dict) -> bool:
    """A change-tracking delete marker rather than a record."""
    context = record.get("@odata.context")
    return (isinstance(context, str) and context.endswith("$deletedEntity")) or (
        record.get("reason") == "deleted" and "id" in record and len(record) <= 3
    )


def content_hash(record: dict, ignore_annotations: bool = False) -> str:
    """A stable hash of the source record (key order does not matter); optionally without
    @odata.etag and annotations (every key with an '@')."""
    if ignore_annotations:
        record = {k: v for k, v in record.items() if "@" not in k}
    return hashlib.blake2b(json_bytes(record, sort_keys=True),
                           digest_size=16).hexdigest()


HASH_RULES = {False: "verbatim", True: "without annotations"}
_REHASH_BATCH = 5000


def align_canonical_hashes(connection: sqlite3.Connection, entity: str,
                           ignore_annotations: bool) -> int:
    """Make the canonical table's `_content_hash` follow the entity's hash rule before a plan
    compares it with staged hashes: once, when the rule is new to the table (a mirror made by
    a version that hashed annotations, or `hash_ignore_annotations` switched), every row is
    hashed again from its json_response. Without this, every record would look changed once
    and be written again. Returns the rows rehashed."""
    rule = HASH_RULES[ignore_annotations]
    connection.execute("CREATE TABLE IF NOT EXISTS _hash_rule (entity TEXT PRIMARY KEY,"
                       " rule TEXT NOT NULL, set_at TEXT NOT NULL)")
    row = connection.execute("SELECT rule FROM _hash_rule WHERE entity = ?",
                             (entity,)).fetchone()
    if row is not None and row[0] == rule:
        return 0
    table = quote_identifier(entity)
    rehashed = 0
    with transaction(connection):
        if table_exists(connection, entity):
            row_id = row_id_column(connection)
            cursor = connection.execute(f"SELECT {row_id}, json_response FROM {table}")
            while batch := cursor.fetchmany(_REHASH_BATCH):
                updates = [(content_hash(orjson.loads(body), ignore_annotations), rowid)
                           for rowid, body in batch]
                connection.executemany(
                    f"UPDATE {table} SET _content_hash = ? WHERE {row_id_match(connection)}",
                    updates)
                rehashed += len(updates)
        connection.execute(
            "INSERT INTO _hash_rule (entity, rule, set_at) VALUES (?, ?, ?)"
            " ON CONFLICT (entity) DO UPDATE SET rule = excluded.rule, set_at = excluded.set_at",
            (entity, rule, utc_now_iso()))
    return rehashed


def decide_schema(archive: ChangeSetArchive, primary_key_override: str | None,
                  name_limit: int | None = None) -> EntitySchema:
    """Schema for a first change set: from archived metadata, else from the first page
    (`name_limit`: the store's longest column name, Dialect.max_identifier_bytes)."""
    definition = archive.read_json(ENTITY_DEFINITION)
    request = archive.read_json(REQUEST) or {}
    if isinstance(definition, dict) and definition.get("Attributes"):
        # Only the columns the entity's `select` asked for (all without one).
        return only_selected(schema_from_metadata(archive.entity, definition,
                                                  primary_key_override, name_limit),
                             request.get("select"))
    override = primary_key_override or request.get("primary_key")
    sample: list[dict] = []
    for page, records in archive.iter_page_records():
        if page.get("shape", "collection") == "collection":
            sample.extend(records)
        if len(sample) >= 1000:
            break
    return infer_schema_from_records(archive.entity, sample, override, name_limit)


@dataclass
class StagedRecords:
    """The output of staging/E: rows produced lazily, written by the SQLite IO manager."""

    entity: str
    change_set: str
    schema: EntitySchema
    mode: str
    watermark_after: str | None
    delta_token_after: str | None
    source_timestamp: str | None
    reconciled: bool  # a key-only scan is part of this change set
    reconciled_at: str | None  # when this change set establishes deletes (fetch start)
    fetched_at: str | None  # when the fetch finished: the rows' sync_time
    batches: Iterator[tuple[list[tuple], list[str]]]
    counts: dict[str, int] = field(default_factory=dict)
    issues: list[dict] = field(default_factory=list)
    # What its key-and-version scan found diverging: scanned, missing, stale (fetch.Divergence).
    divergence: dict[str, int] = field(default_factory=dict)
    # staging_fingerprint of the rows (sync.prestage: rows staged during the fetch are taken
    # only with the same one); "" never takes them.
    fingerprint: str = ""
    adopted: bool = False  # its rows were staged while the fetch ran (sync.prestage)
    # Told the rows when they were taken as staged during the fetch (the batches never run).
    on_adopted: Callable[[int], None] | None = None


def _delete_row(change_set: str, key: str, names: list[str], marker: dict) -> tuple:
    return (change_set, key, "delete", None, None, *(None for _ in names),
            orjson.dumps(marker).decode())


def _report_oversized(issues: list[dict], key: str, names: list[str], values: tuple,
                      types: dict[str, str], context: str) -> None:
    for name, value in zip(names, values, strict=True):
        if type(value) is OversizedInteger and types.get(name) != "TEXT":
            issues.append({
                "record_id": key, "field": name,
                "problem": f"integer {value} does not fit SQLite's 64-bit INTEGER; the "
                           f"{types.get(name)} column holds an approximation, json_response "
                           "the exact value",
                "context": context})


@dataclass(frozen=True)
class PageContext:
    """What staging one page needs besides its body (picklable: stage workers get it)."""

    change_set: str
    pk: str
    names: tuple[str, ...]
    hash_ignore_annotations: bool
    scope_ids: frozenset[str] | None


def _values_of(names: tuple[str, ...]) -> Callable[[dict], tuple]:
    """A record's values for `names`, in order, as a tuple (None for a missing field): one
    C call (`itemgetter`) when every name is present, as in nearly every record."""
    if not names:
        return lambda record: ()
    if len(names) == 1:  # itemgetter of one name returns the value, not a tuple
        name = names[0]
        return lambda record: (record.get(name),)
    every = itemgetter(*names)

    def values(record: dict) -> tuple:
        try:
            return every(record)
        except KeyError:
            return tuple(map(record.get, names))

    return values


def _stage_page(context: PageContext, page_number: int, page: dict, body: bytes,
                counts: dict[str, int], issues: list[dict]) -> tuple[list[tuple], list[str]]:
    """One archived page as staging rows, or as keys (a key-only scan's page)."""
    records = page_records(body, page.get("shape", "collection"), page_number)
    return stage_records(context, page_number, page, records, counts, issues)


def stage_records(context: PageContext, page_number: int, page: dict, records: list[dict],
                  counts: dict[str, int], issues: list[dict]) -> tuple[list[tuple], list[str]]:
    """A page's parsed records as staging rows, or as keys (a key-only scan's page)."""
    pk, names, change_set = context.pk, context.names, context.change_set
    if page.get("kind") == "keys":
        counts["keys"] += len(records)
        return [], [str(r[pk]) for r in records if r.get(pk) is not None]
    values_of = _values_of(names)
    rows: list[tuple] = []
    for record in records:
        counts["records"] += 1
        # A delete marker has one of these two fields (is_deleted_entity decides).
        if ("@odata.context" in record or "reason" in record) and is_deleted_entity(record):
            # Change tracking reports deletes as {"id": ..., "reason": "deleted"}.
            rows.append(_delete_row(change_set, str(record["id"]), names, record))
            counts["deleted"] += 1
            continue
        key = record.get(pk)
        if key is None or key == "":
            counts["without_key"] += 1
            issues.append({"record_id": None, "field": pk,
                           "problem": f"record without primary key {pk!r}",
                           "context": f"page {page_number}"})
            continue
        key = str(key)
        if context.scope_ids is not None and key.lower() not in context.scope_ids:
            counts["out_of_scope"] += 1  # changed, but neither linked nor mirrored
            continue
        modified = record.get("modifiedon")
        # Values as parsed (SQLite binds booleans as 0/1); objects and lists are rare and
        # are turned into JSON text by _bindable_batch when the batch is written.
        rows.append((
            change_set, key, "upsert", content_hash(record, context.hash_ignore_annotations),
            modified if isinstance(modified, str) else None,
        ) + values_of(record) + (json_bytes(record).decode(),))
        counts["staged"] += 1
    return rows, []


def _page_meta(pages: list[dict], page_number: int) -> dict:
    """The manifest's entry for a page (kind, shape); {} for pages it does not list."""
    return pages[page_number - 1] if page_number <= len(pages) else {}


def _staged_bodies(context: PageContext, pages: list[dict], bodies: Iterator[bytes],
                   first_page: int, counts: dict[str, int],
                   issues: list[dict]) -> Iterator[tuple[list[tuple], list[str]]]:
    """Page bodies staged in this process, numbered from `first_page`."""
    for page_number, body in enumerate(bodies, start=first_page):
        yield _stage_page(context, page_number, _page_meta(pages, page_number), body, counts,
                          issues)


def _stage_page_file(context: PageContext, page_number: int, page: dict,
                     storage: ArchiveStorage, key: str
                     ) -> tuple[list[tuple], list[str], dict[str, int], list[dict]]:
    """A stage worker's task: read, unzip and stage one page file (`storage` is pickled to
    the worker, which opens its own connection to S3)."""
    counts: dict[str, int] = dict.fromkeys(STAGING_COUNTS, 0)
    issues: list[dict] = []
    rows, keys = _stage_page(context, page_number, page, read_page(storage, key, page_number),
                             counts, issues)
    return rows, keys, counts, issues


def staging_workers() -> int:
    """Processes that parse pages for a large change set: DATAVERSE_STAGING_WORKERS (default
    0: the step's own process stages). Opt-in because of memory: each worker peaks at ~115 MB
    (a 5000-row page parsed, its rows and their pickle), so two add ~230 MB to a run's ~310 MB
    for a full sync ~15-20% shorter and a rebuild 25-40% faster (docs/performance.md). More than 2
    do not help: the step's process, which unpickles and writes every row, is the limit."""
    configured = os.environ.get(STAGING_WORKERS_ENV, "").strip()
    if not configured:
        return 0
    try:
        return max(0, int(configured))
    except ValueError:
        raise ValueError(f"{STAGING_WORKERS_ENV}={configured!r}: expected a whole number "
                         "of processes (0 or 1: no worker processes)") from None


def _staged_pages_in_workers(
    archive: ChangeSetArchive, context: PageContext, pages: list[dict], workers: int,
    counts: dict[str, int], issues: list[dict],
) -> Iterator[tuple[list[tuple], list[str]]]:
    """Pages staged by worker processes (stage_workers), handed back in page order (later
    pages win for a key seen twice), a few pages ahead at most."""
    paths = archive.page_names()
    tasks = ((context, number, _page_meta(pages, number), archive.storage, archive.key(name))
             for number, name in enumerate(paths, start=1))
    with WorkerPool(_stage_page_file, workers) as pool:
        page_number = 1
        try:
            for rows, keys, page_counts, page_issues in pool.map(tasks):
                for name, value in page_counts.items():
                    counts[name] += value
                issues.extend(page_issues)
                page_number += 1
                yield rows, keys
        except FileNotFoundError:
            if not archive.is_compacted():
                raise
    if page_number <= len(paths):
        # Compacted while we read: the rest comes from the Parquet parts.
        yield from _staged_bodies(context, pages,
                                  iter_compacted_bodies(archive, first_page=page_number),
                                  page_number, counts, issues)


def _naming_damaged_pages(archive: ChangeSetArchive, staged_pages: Iterator[tuple]
                          ) -> Iterator[tuple]:
    """The staged pages; a damaged one is a CorruptArchiveError naming its file."""
    try:
        yield from staged_pages
    except DamagedPage as exc:
        raise archive.corrupt(archive.page_file(exc.number), exc.problem) from None


def iter_staged_batches(
    archive: ChangeSetArchive, schema: EntitySchema, counts: dict[str, int],
    issues: list[dict], *, hash_ignore_annotations: bool = False,
) -> Iterator[tuple[list[tuple], list[str]]]:
    """(rows, keys) a batch at a time. Rows are (meta columns..., schema columns...,
    json_response); keys come from key-only reconciliation scans.

    A change set of PARALLEL_STAGING_MIN_PAGES page files or more is parsed by worker
    processes (`staging_workers`), a few pages ahead; the rows are the same either way.
    """
    manifest = archive.manifest()
    request = archive.read_json(REQUEST) or {}
    scope = request.get("id_scope")
    context = PageContext(
        change_set=archive.change_set, pk=schema.primary_key, names=tuple(schema.column_names),
        hash_ignore_annotations=hash_ignore_annotations,
        scope_ids=frozenset(i.lower() for i in scope) if scope is not None else None)
    names = schema.column_names
    change_set = archive.change_set
    batch: list[tuple] = []
    keys: list[str] = []
    counts.update(dict.fromkeys(STAGING_COUNTS, 0))
    pages = manifest.get("pages", [])
    workers = staging_workers()
    if (workers > 1 and not archive.is_compacted()
            and len(archive.page_names()) >= PARALLEL_STAGING_MIN_PAGES):
        staged_pages = _staged_pages_in_workers(archive, context, pages, workers, counts,
                                                issues)
    else:
        staged_pages = _staged_bodies(context, pages, archive.iter_page_bodies(), 1, counts,
                                      issues)
    for rows, page_keys in _naming_damaged_pages(archive, staged_pages):
        batch.extend(rows)
        keys.extend(page_keys)
        if len(batch) >= STAGING_BATCH_ROWS or len(keys) >= STAGING_BATCH_ROWS * 10:
            yield batch, keys
            batch, keys = [], []
    for missing in manifest.get("missing", []):
        if missing.get("status") in (404, OUTSIDE_FILTER):
            # Named by a link (or a targeted refresh) but gone from the source, or outside
            # the entity's filter: defunct.
            reason = ("not found (404)" if missing.get("status") == 404
                      else "outside the entity's filter")
            batch.append(_delete_row(change_set, missing["id"], names,
                                     {"id": missing["id"], "reason": reason}))
            counts["deleted"] += 1
        else:
            # Anything else is not an answer: keep it visible; the id is asked for again next
            # change set because it is still linked and not mirrored.
            issues.append({"record_id": missing["id"], "field": None,
                           "problem": f"could not fetch linked record (status "
                                      f"{missing.get('status')})",
                           "context": missing.get("message")})
    if batch or keys:
        yield batch, keys


def _bindable_batch(batch: list[tuple], names: list[str], types: dict[str, str],
                    issues: list[dict], change_set: str) -> Iterator[tuple]:
    """The rows with every value bindable; integers beyond 64 bits become issue rows."""
    first = len(STAGING_META_COLUMNS)
    for row in batch:
        row = tuple(map(to_sqlite_value, row))
        values = row[first:first + len(names)]
        if OversizedInteger in map(type, values):
            _report_oversized(issues, row[1], names, values, types, f"change set {change_set}")
        yield row


def staging_fingerprint(schema: EntitySchema, hash_ignore_annotations: bool) -> str:
    """What a change set's staged rows depend on besides its archived pages: the schema's
    key, columns and types, and the hash rule. Rows staged with the same fingerprint from
    the same pages are the same rows (sync.prestage relies on it)."""
    return hashlib.blake2b(orjson.dumps([
        schema.primary_key, [[c.name, c.sqlite_type] for c in schema.columns],
        HASH_RULES[hash_ignore_annotations]]), digest_size=16).hexdigest()


def _staging_prefix(connection: sqlite3.Connection) -> str:
    """Where a new staging table goes: the attached staging file (a mirror connection), or
    the connection's own file (a connection to the staging file itself: sync.prestage)."""
    return f"{STAGING_SCHEMA}." if getattr(connection, "staging_path", "") else ""


class StagingWriter:
    """Writes one change set's rows into `_staging__E` and its key-scan keys into
    `_staging_keys__E`, inside the caller's transaction(s): `start` (tables, columns, and the
    change set's earlier rows deleted), `write` per batch, `finish` (a new table's key index).
    """

    def __init__(self, connection: sqlite3.Connection, entity: str, change_set: str,
                 schema: EntitySchema, issues: list[dict]) -> None:
        self.connection, self.change_set, self.issues = connection, change_set, issues
        self.entity = entity
        self.table = staging_table(entity)
        self.names = schema.column_names
        self.columns = [*STAGING_META_COLUMNS, *self.names, "json_response"]
        self.types = {c.name: c.sqlite_type for c in schema.columns}
        self.keys_table = quote_identifier(staging_keys_table(entity))
        self.postgres = dialect_of(connection) is POSTGRES
        self.new_table = False
        self.rows = 0
        # The change set's staged upserts (distinct keys), where the writer counts them as it
        # writes (PostgreSQL); None: count_staged counts them.
        self.upserts: int | None = None
        self._copy_types: list[int] | None = None
        self._plans: dict = {}  # postgres_staging.typed_rows's, kept from batch to batch
        # A record seen twice in one change set (it changed while we paged) keeps its last
        # version: later pages are newer.
        self.statement = (
            f"INSERT OR REPLACE INTO {quote_identifier(self.table)} "
            f"({', '.join(quote_identifier(c) for c in self.columns)}) "
            f"VALUES ({', '.join('?' for _ in self.columns)})")

    def start(self) -> None:
        connection, table, types = self.connection, self.table, self.types
        if self.postgres:
            self._start_postgres()
            return
        # A new table (an entity's first change set: its first sync, or a rebuild's) gets its
        # rows appended in page order and its (_change_set, _pk) key index built once, after
        # them: growing that index key by key in GUID order made staging a 1M-row first sync
        # ~17% slower (docs/performance.md). Later change sets go through the index.
        exists = table_exists(connection, table)
        # A table without its key index yet (a fetch that staged its first change set while
        # it ran and did not finish) is finished like a new one.
        self.new_table = not exists or not connection.execute(
            "SELECT 1 FROM pragma_index_list(?) WHERE \"unique\" = 1", (table,)).fetchone()
        if not exists:
            definitions = ", ".join(
                f"{quote_identifier(c)} {types.get(c, 'TEXT')}" for c in self.columns)
            connection.execute(f"CREATE TABLE {_staging_prefix(connection)}"
                               f"{quote_identifier(table)} ({definitions})")
        else:
            existing = set(table_columns(connection, table))
            for column in self.columns:
                if column not in existing:
                    connection.execute(
                        f"ALTER TABLE {quote_identifier(table)} ADD COLUMN "
                        f"{quote_identifier(column)} {types.get(column, 'TEXT')}")
        # Counting a change set's upserts (publish, the row-count check) reads this small
        # index, not the wide rows; entries are appended in rowid order, so it costs little.
        connection.execute(
            f"CREATE INDEX IF NOT EXISTS {_schema_of(connection, table)}"
            f"{quote_identifier(table + '__op')} ON {quote_identifier(table)} (_change_set, _op)")
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {_staging_prefix(connection)}{self.keys_table}"
            " (_change_set TEXT NOT NULL, _pk TEXT NOT NULL, PRIMARY KEY (_change_set, _pk))")
        delete_staged_rows(connection, self.entity, self.change_set)

    def _start_postgres(self) -> None:
        """As `start`, in PostgreSQL (store.postgres_staging): the key index is made with the
        table; the change set's rows are deleted, so its first batch goes in as it is."""
        connection, table = self.connection, self.table
        if not table_exists(connection, table):
            postgres_staging.create_staging_table(connection, table, self.columns, self.types)
        else:
            existing = set(table_columns(connection, table))
            for column in self.columns:
                if column not in existing:
                    postgres_staging.add_staging_column(connection, table, column,
                                                        self.types.get(column, "TEXT"))
        postgres_staging.create_indexes(connection, table, staging_key_index(table))
        postgres_staging.create_keys_table(connection, staging_keys_table(self.entity))
        self._copy_types = postgres_staging.copy_types(connection, table, self.columns,
                                                       self.types)
        delete_staged_rows(connection, self.entity, self.change_set)
        self.upserts = 0

    def _write_postgres(self, batch: list[tuple], keys: list[str]) -> None:
        if batch:
            self.upserts += postgres_staging.write_rows(
                self.connection, self.table, self.columns, self.change_set,
                postgres_staging.typed_rows(
                    batch, self.columns, self.types, len(STAGING_META_COLUMNS),
                    len(self.names), self.issues, self.change_set, self.entity,
                    self._plans),
                # Rows written before (an earlier batch) may hold a key of this one.
                replace=self.rows > 0, types=self._copy_types)
        if keys:
            postgres_staging.write_keys(self.connection, staging_keys_table(self.entity),
                                        self.change_set, keys)
        self.rows += len(batch)

    def write(self, batch: list[tuple], keys: list[str]) -> None:
        if self.postgres:
            self._write_postgres(batch, keys)
            return
        try:
            self.connection.executemany(self.statement, batch)
        except (sqlite3.ProgrammingError, OverflowError):
            # A value SQLite cannot bind (an object, a list, an integer beyond 64 bits): the
            # batch again, with every value as to_sqlite_value has it (INSERT OR REPLACE: rows
            # already written are written again).
            self.connection.executemany(self.statement, _bindable_batch(
                batch, self.names, self.types, self.issues, self.change_set))
        if keys:
            self.connection.executemany(
                f"INSERT OR IGNORE INTO {self.keys_table} (_change_set, _pk) VALUES (?, ?)",
                ((self.change_set, key) for key in keys))
        self.rows += len(batch)

    def finish(self) -> None:
        if self.new_table and not self.postgres:
            _create_key_index(self.connection, self.table)


def write_staged(connection: sqlite3.Connection, staged: StagedRecords) -> int:
    """Replace the change set's rows in the staging table, then record it staged.

    Two transactions: the rows (and the staging file's own marker) in the staging file, then
    the mirror's record of it (`_staged`, its issues, its publish PENDING), so a publish of
    another entity is not held up while rows are written. A crash between them leaves the
    rows unrecorded: the step runs again and replaces them. Rows a fetch already staged while
    its pages arrived (sync.prestage) are taken as they are when they are exactly these rows.
    """
    rows = adopt_prestaged(connection, staged)
    upserts = None
    if rows is None:
        with transaction(connection, mirror=False, staging=True):
            forget_prestaged(connection, staged.entity, staged.change_set)
            writer = StagingWriter(connection, staged.entity, staged.change_set,
                                   staged.schema, staged.issues)
            writer.start()
            for batch, keys in staged.batches:
                writer.write(batch, keys)
            writer.finish()
            rows, upserts = writer.rows, writer.upserts
            mark_staged_here(connection, staged.entity, staged.change_set, rows,
                             utc_now_iso())
    with transaction(connection):
        for issue in staged.issues:
            record_issue(connection, entity=staged.entity, change_set=staged.change_set, **issue)
        # A record this change set staged without its earlier problem is fine now.
        resolve_issues(connection, staged.entity, staged.change_set,
                       staging_table(staged.entity))
        # The marker that this change set is fully staged: publishing refuses without it, so
        # a full snapshot can never be "published" from an empty, never-staged change set.
        record_staged(
            connection, entity=staged.entity, change_set=staged.change_set, mode=staged.mode,
            rows=rows, upserts=upserts if upserts is not None else count_staged(
                connection, staged.entity, staged.change_set, "upsert"),
            watermark_after=staged.watermark_after, delta_token_after=staged.delta_token_after,
            reconciled=staged.reconciled, reconciled_at=staged.reconciled_at,
            fetched_at=staged.fetched_at, source_timestamp=staged.source_timestamp,
            divergence=staged.divergence)
    return rows


def adopt_prestaged(connection: sqlite3.Connection, staged: StagedRecords) -> int | None:
    """The rows a fetch staged as its pages arrived (sync.prestage), when they are exactly
    what staging the archive would write (the same fingerprint, the fetch complete): marked
    staged here, their counts and issues taken over. None otherwise (stage from the archive).
    """
    if not staged.fingerprint or not prestaged_exists(connection, staged.entity,
                                                      staged.change_set):
        return None
    with transaction(connection, mirror=False, staging=True):
        found = take_prestaged(connection, staged.entity, staged.change_set,
                               staged.fingerprint)
        if found is None:
            return None
        rows, counts, issues = found
        staged.counts.update(counts)
        staged.issues.extend(issues)
        mark_staged_here(connection, staged.entity, staged.change_set, rows, utc_now_iso())
    staged.adopted = True
    if staged.on_adopted is not None:
        staged.on_adopted(rows)
    return rows


def _schema_of(connection: sqlite3.Connection, table: str) -> str:
    """Where the table is, for naming an index of it (SQLite makes an index in its table's
    file, and wants that file named on the index): nothing for a table in the connection's
    own file, else `staging.`."""
    in_main = connection.execute("SELECT 1 FROM main.sqlite_master WHERE type = 'table'"
                                 " AND name = ?", (table,)).fetchone()
    return "" if in_main else _staging_prefix(connection)


def staging_key_index(table: str) -> str:
    """The unique (_change_set, _pk) index of a staging table made by this version (older
    tables have the same key as their PRIMARY KEY)."""
    return f"{table}__key"


def _create_key_index(connection: sqlite3.Connection, table: str) -> None:
    """The key index of a new staging table, built over its first change set's rows. A key
    staged twice (the record changed while we paged) keeps its last version, as INSERT OR
    REPLACE does through the index: rows went in in page order, so the highest rowid."""
    statement = (f"CREATE UNIQUE INDEX {_schema_of(connection, table)}"
                 f"{quote_identifier(staging_key_index(table))}"
                 f" ON {quote_identifier(table)} (_change_set, _pk)")
    try:
        connection.execute(statement)
    except sqlite3.IntegrityError:
        # (Every change set: rows a killed fetch staged may share the table.)
        connection.execute(
            f"DELETE FROM {quote_identifier(table)} WHERE rowid NOT IN"
            f" (SELECT max(rowid) FROM {quote_identifier(table)} GROUP BY _change_set, _pk)")
        connection.execute(statement)


def count_staged(connection: sqlite3.Connection, entity: str, change_set: str,
                 op: str | None = None) -> int:
    """Rows of a change set in the staging table (of one `_op`): distinct keys, since a key
    is staged once per change set. Reads only the (_change_set, _op) index."""
    table = quote_identifier(staging_table(entity))
    if op is None:
        return connection.execute(f"SELECT count(*) FROM {table} WHERE _change_set = ?",
                                  (change_set,)).fetchone()[0]
    return connection.execute(
        f"SELECT count(*) FROM {table} WHERE _change_set = ? AND _op = ?",
        (change_set, op)).fetchone()[0]


def count_staged_by_op(connection: sqlite3.Connection, entity: str,
                       change_set: str) -> dict[str, int]:
    """count_staged for every `_op` of a change set at once: one pass over its rows (a
    PostgreSQL table just loaded has no visibility map for an index-only count, so each
    count reads the rows)."""
    return dict(connection.execute(
        f"SELECT _op, count(*) FROM {quote_identifier(staging_table(entity))}"
        " WHERE _change_set = ? GROUP BY _op", (change_set,)).fetchall())


LOOKUP_TARGET_ANNOTATION = "@Microsoft.Dynamics.CRM.lookuplogicalname"


def column_values(connection: sqlite3.Connection, table: str, column: str, *,
                  change_set: str | None = None, lookup_target: str | None = None) -> set[str]:
    """Distinct non-null values of a column (of one change set, for staging tables).

    With `lookup_target`, only values whose lookuplogicalname annotation (kept in
    json_response) names that table: a Customer lookup can point at accounts or contacts.
    """
    if not table_exists(connection, table) or column not in table_columns(connection, table):
        return set()
    conditions = [f"{quote_identifier(column)} IS NOT NULL"]
    params: list[str] = []
    if change_set is not None:
        conditions.append("_change_set = ?")
        params.append(change_set)
    if lookup_target is not None:
        target = dialect_of(connection).json_text("json_response",
                                                  column + LOOKUP_TARGET_ANNOTATION)
        conditions.append(f"{target} = ?")
        params.append(lookup_target)
    return {
        str(row[0]) for row in connection.execute(
            f"SELECT DISTINCT {quote_identifier(column)} FROM {quote_identifier(table)}"
            f" WHERE {' AND '.join(conditions)}", params,
        )
    }
