"""A change set's compacted form: its page files merged into zstd Parquet written by DuckDB
(`pages-0001-of-0001.parquet`: page_number, kind, shape, body, the bodies byte for byte), and
read back page by page. Which change sets are compacted and when is store.archive_retention's.

A change set with more than PART_BYTES of bodies is split into parts of at most that, so
neither writing nor reading holds more than one part: DuckDB moves whole vectors of up to
2,048 rows, and with multi-megabyte bodies one vector is a whole change set. Each part is
written under a temporary name and read back page by page (md5) before the parts are renamed
into place; only then are the page files deleted, so a crash leaves either the page files or a
checked compacted change set. A change set whose Parquet would not be smaller (a page or two of
a few hundred bytes: Parquet's footer is ~1.5 KB) keeps its page files.

On S3 (archive.storage) the parts are written and checked in a local temporary folder, then
uploaded under their final names, one atomic upload each; a crash between two uploads leaves
an incomplete set of parts, which readers ignore (every `-of-n` part must be there) and the
next compaction deletes, while the page files are still there. Reading a part downloads it to
a temporary file first (DuckDB's httpfs would fetch an extension from the network): one part on
local disk at a time.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
from isal import igzip

from dataverse_assets.errors import ArchiveError

if TYPE_CHECKING:  # change_sets reads compacted change sets through this module
    from dataverse_assets.archive.change_sets import ChangeSetArchive

PART_BYTES = 128 * 1024 * 1024
MANIFEST_NAME = "manifest.json"  # change_sets.MANIFEST (which imports this module)


def _duckdb() -> duckdb.DuckDBPyConnection:
    # One thread: parts are written and read in page order, and memory stays one part.
    return duckdb.connect(config={"threads": 1})


def iter_compacted_bodies(archive: ChangeSetArchive, first_page: int = 1) -> Iterator[bytes]:
    """The page bodies of a compacted change set, in order, one part in memory at a time."""
    expected = first_page
    with _duckdb() as connection:
        for part in archive.compacted_parts():
            with archive.storage.local_copy(archive.key(part)) as path:
                try:
                    connection.execute(
                        "SELECT page_number, body FROM read_parquet(?) WHERE page_number >= ?",
                        [str(path), first_page])
                except duckdb.Error as exc:
                    raise archive.corrupt(part, f"cannot be read ({exc})") from None
                while rows := _next_rows(connection, archive, part):
                    for number, body in rows:
                        if number != expected:
                            raise ArchiveError(
                                f"{archive.entity}: change set {archive.change_set}: {part} "
                                f"has page {number} where page {expected} belongs")
                        expected += 1
                        yield body


def _next_rows(connection: duckdb.DuckDBPyConnection, archive: ChangeSetArchive,
               part: str) -> list[tuple]:
    try:
        return connection.fetchmany(16)
    except duckdb.Error as exc:  # a part damaged past its footer
        raise archive.corrupt(part, f"cannot be read ({exc})") from None


@dataclass
class CompactedChangeSet:
    entity: str
    change_set: str
    pages: int
    bytes_before: int
    bytes_after: int
    kept_pages: bool = False  # Parquet was not smaller: the page files stay


def _write_part(connection: duckdb.DuckDBPyConnection, rows: list[tuple], path: Path,
                zstd_level: int) -> None:
    connection.execute("CREATE OR REPLACE TABLE part (page_number INTEGER, kind VARCHAR,"
                       " shape VARCHAR, body BLOB)")
    appender = connection.appender("part")
    appender.append_rows(rows)
    appender.flush()
    # One thread and insertion order kept: the rows reach the file in page order. COPY takes
    # no parameter for its path: a literal, quotes doubled.
    target = str(path).replace("'", "''")
    connection.execute(f"COPY part TO '{target}' (FORMAT parquet, COMPRESSION zstd,"
                       f" COMPRESSION_LEVEL {int(zstd_level)})")
    connection.execute("DROP TABLE part")


def _verify_part(connection: duckdb.DuckDBPyConnection, path: Path,
                 digests: dict[int, str], archive: ChangeSetArchive) -> None:
    found = dict(connection.execute(
        "SELECT page_number, md5(body) FROM read_parquet(?)", [str(path)]).fetchall())
    if found != digests:
        raise ArchiveError(f"{archive.storage.describe(archive.key(path.name))}: the compacted "
                           "pages do not match the page files; the page files are kept")


def _remove_parts(archive: ChangeSetArchive) -> None:
    for stray in fnmatch.filter(archive.storage.names(archive.folder), "pages-*.parquet*"):
        archive.storage.delete(archive.key(stray))


def compact_change_set(archive: ChangeSetArchive, *, zstd_level: int = 9,
                       part_bytes: int = PART_BYTES) -> CompactedChangeSet | None:
    """Merge a complete change set's page files into checked Parquet parts, then delete the
    page files. None when there is nothing to do (no pages, or compacted already)."""
    manifest = archive.manifest()
    archive.check_inside()  # it writes parts there and deletes page files
    storage = archive.storage
    if archive.is_compacted():
        for leftover in archive.page_names():  # a run that stopped before deleting them
            storage.delete(archive.key(leftover))
        return None
    _remove_parts(archive)  # from a run that stopped before every part was in place
    names = archive.page_names()
    if not names:
        return None
    pages = manifest.get("pages", [])
    if names != [f"page-{n:05d}.json.gz" for n in range(1, len(names) + 1)] \
            or len(pages) != len(names):
        raise ArchiveError(f"{archive.entity}: change set {archive.change_set} has "
                           f"{len(names)} page files but its manifest lists {len(pages)}; "
                           "not compacted")
    sizes = storage.sizes(archive.folder)
    bytes_before = sum(sizes[archive.key(name)] for name in names)
    with storage.scratch(archive.folder) as scratch, _duckdb() as connection:
        written: list[Path] = []
        rows: list[tuple] = []
        digests: dict[int, str] = {}
        body_bytes = 0
        for number, name in enumerate(names, start=1):
            body = igzip.decompress(storage.get(archive.key(name)))
            page = pages[number - 1]
            rows.append((number, page.get("kind"), page.get("shape", "collection"), body))
            digests[number] = hashlib.md5(body).hexdigest()
            body_bytes += len(body)
            if body_bytes >= part_bytes or number == len(names):
                part = scratch / f"pages-{len(written) + 1:04d}.parquet.tmp"
                _write_part(connection, rows, part, zstd_level)
                _verify_part(connection, part, digests, archive)
                written.append(part)
                rows, digests, body_bytes = [], {}, 0
        bytes_after = sum(p.stat().st_size for p in written)
        if bytes_after >= bytes_before:
            # Parquet's footer (~1.5 KB) outweighs a tiny change set: it stays as it is.
            for part in written:
                part.unlink()
            return CompactedChangeSet(archive.entity, archive.change_set, len(names),
                                      bytes_before, bytes_before, kept_pages=True)
        for number, part in enumerate(written, start=1):
            storage.put_file(part, archive.key(
                f"pages-{number:04d}-of-{len(written):04d}.parquet"))
    for name in names:  # the parts are complete and checked: the Parquet form is the archive
        storage.delete(archive.key(name))
    return CompactedChangeSet(archive.entity, archive.change_set, len(names), bytes_before,
                              bytes_after)


# A page body and its shape ("collection" or "record") -> the new body, or None: unchanged.
PageRewrite = Callable[[bytes, str], "bytes | None"]


def rewrite_pages(archive: ChangeSetArchive, rewrite: PageRewrite, *,
                  zstd_level: int = 9) -> int:
    """Rewrite a complete change set's page bodies (erasing data, `dataverse-assets purge`), in
    whichever form it is in; returns the pages changed. Each page file is replaced atomically;
    a compacted part is written under a temporary name, read back (md5 of every body) and
    only then put over the old one, so a crash leaves each part either old or new."""
    manifest = archive.manifest()
    archive.check_inside()
    storage = archive.storage
    shapes = [page.get("shape", "collection") for page in manifest.get("pages", [])]
    changed = 0
    if not archive.is_compacted():
        for number, name in enumerate(archive.page_names(), start=1):
            body = igzip.decompress(storage.get(archive.key(name)))
            new = rewrite(body, shapes[number - 1] if number <= len(shapes) else "collection")
            if new is not None and new != body:
                archive.replace_page(number, new)
                changed += 1
        return changed
    with _duckdb() as connection:
        for part in archive.compacted_parts():
            with storage.local_copy(archive.key(part)) as path:
                rows = connection.execute(
                    "SELECT page_number, kind, shape, body FROM read_parquet(?)"
                    " ORDER BY page_number", [str(path)]).fetchall()
            new_rows, digests, part_changed = [], {}, 0
            for number, kind, shape, body in rows:
                new = rewrite(bytes(body), shape or "collection")
                if new is not None and new != bytes(body):
                    body, part_changed = new, part_changed + 1
                new_rows.append((number, kind, shape, bytes(body)))
                digests[number] = hashlib.md5(bytes(body)).hexdigest()
            if not part_changed:
                continue
            with storage.scratch(archive.folder) as scratch:
                tmp = scratch / (part + ".tmp")
                _write_part(connection, new_rows, tmp, zstd_level)
                _verify_part(connection, tmp, digests, archive)
                storage.put_file(tmp, archive.key(part))
            changed += part_changed
    return changed


def delete_change_set(archive: ChangeSetArchive) -> int:
    """Remove a change set from the archive (manifest first: never a half-complete one).
    Returns the bytes it occupied."""
    archive.check_inside()
    size = sum(archive.storage.sizes(archive.folder).values())
    archive.storage.delete(archive.key(MANIFEST_NAME))
    archive.storage.clear(archive.folder, keep_folder=False)
    return size
