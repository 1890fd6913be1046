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
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from dataverse_assets.errors import ArchiveError

if TYPE_CHECKING:  # change_sets reads compacted change sets through this module
    from dataverse_assets.archive.change_sets import ChangeSetArchive

PART_BYTES = 128 * 1024 * 1024


def _duckdb() -> duckdb.DuckDBPyConnection:
    # One thread: parts are written and read in page order, and memory stays one part.
    return duckdb.connect(config={"threads": 1})


def folder_bytes(path: Path) -> int:
    """Bytes of the files under a folder (what the archive occupies)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def iter_compacted_bodies(archive: ChangeSetArchive, first_page: int = 1) -> Iterator[bytes]:
    """The page bodies of a compacted change set, in order, one part in memory at a time."""
    expected = first_page
    with _duckdb() as connection:
        for part in archive.compacted_parts():
            try:
                connection.execute(
                    "SELECT page_number, body FROM read_parquet(?) WHERE page_number >= ?",
                    [str(part), first_page])
            except duckdb.Error as exc:
                raise archive.corrupt(part.name, f"cannot be read ({exc})") from None
            while rows := _next_rows(connection, archive, part):
                for number, body in rows:
                    if number != expected:
                        raise ArchiveError(
                            f"{archive.entity}: change set {archive.change_set}: {part.name} "
                            f"has page {number} where page {expected} belongs")
                    expected += 1
                    yield body


def _next_rows(connection: duckdb.DuckDBPyConnection, archive: ChangeSetArchive,
               part: Path) -> list[tuple]:
    try:
        return connection.fetchmany(16)
    except duckdb.Error as exc:  # a part damaged past its footer
        raise archive.corrupt(part.name, f"cannot be read ({exc})") from None


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
                 digests: dict[int, str]) -> None:
    found = dict(connection.execute(
        "SELECT page_number, md5(body) FROM read_parquet(?)", [str(path)]).fetchall())
    if found != digests:
        raise ArchiveError(f"{path}: the compacted pages do not match the page files; "
                           "the page files are kept")


def _remove_parts(archive: ChangeSetArchive) -> None:
    for stray in archive.path.glob("pages-*.parquet*"):
        stray.unlink()


def compact_change_set(archive: ChangeSetArchive, *, zstd_level: int = 9,
                       part_bytes: int = PART_BYTES) -> CompactedChangeSet | None:
    """Merge a complete change set's page files into checked Parquet parts, then delete the
    page files. None when there is nothing to do (no pages, or compacted already)."""
    manifest = archive.manifest()
    archive.checked_path()  # it writes parts there and deletes page files
    if archive.is_compacted():
        for leftover in archive.page_paths():  # a run that stopped before deleting them
            leftover.unlink()
        return None
    _remove_parts(archive)  # from a run that stopped before every part was in place
    paths = archive.page_paths()
    if not paths:
        return None
    pages = manifest.get("pages", [])
    if [p.name for p in paths] != [f"page-{n:05d}.json.gz" for n in range(1, len(paths) + 1)] \
            or len(pages) != len(paths):
        raise ArchiveError(f"{archive.entity}: change set {archive.change_set} has "
                           f"{len(paths)} page files but its manifest lists {len(pages)}; "
                           "not compacted")
    bytes_before = sum(p.stat().st_size for p in paths)
    written: list[Path] = []
    with _duckdb() as connection:
        rows: list[tuple] = []
        digests: dict[int, str] = {}
        body_bytes = 0
        for number, path in enumerate(paths, start=1):
            with gzip.open(path, "rb") as handle:
                body = handle.read()
            page = pages[number - 1]
            rows.append((number, page.get("kind"), page.get("shape", "collection"), body))
            digests[number] = hashlib.md5(body).hexdigest()
            body_bytes += len(body)
            if body_bytes >= part_bytes or number == len(paths):
                part = archive.path / f"pages-{len(written) + 1:04d}.parquet.tmp"
                _write_part(connection, rows, part, zstd_level)
                _verify_part(connection, part, digests)
                written.append(part)
                rows, digests, body_bytes = [], {}, 0
    bytes_after = sum(p.stat().st_size for p in written)
    if bytes_after >= bytes_before:
        # Parquet's footer (~1.5 KB) outweighs a tiny change set: it stays as it is.
        _remove_parts(archive)
        return CompactedChangeSet(archive.entity, archive.change_set, len(paths),
                                  bytes_before, bytes_before, kept_pages=True)
    for number, part in enumerate(written, start=1):
        part.replace(archive.path / f"pages-{number:04d}-of-{len(written):04d}.parquet")
    for path in paths:  # the parts are complete and checked: the Parquet form is the archive
        path.unlink()
    return CompactedChangeSet(archive.entity, archive.change_set, len(paths), bytes_before,
                              bytes_after)


# A page body and its shape ("collection" or "record") -> the new body, or None: unchanged.
PageRewrite = Callable[[bytes, str], "bytes | None"]


def rewrite_pages(archive: ChangeSetArchive, rewrite: PageRewrite, *,
                  zstd_level: int = 9) -> int:
    """Rewrite a complete change set's page bodies (erasing data, `dataverse-assets purge`), in
    whichever form it is in; returns the pages changed. Each page file is replaced atomically;
    a compacted part is written under a temporary name, read back (md5 of every body) and
    only then renamed over the old one, so a crash leaves each part either old or new."""
    manifest = archive.manifest()
    archive.checked_path()
    shapes = [page.get("shape", "collection") for page in manifest.get("pages", [])]
    changed = 0
    if not archive.is_compacted():
        for number, path in enumerate(archive.page_paths(), start=1):
            with gzip.open(path, "rb") as handle:
                body = handle.read()
            new = rewrite(body, shapes[number - 1] if number <= len(shapes) else "collection")
            if new is not None and new != body:
                archive.replace_page(number, new)
                changed += 1
        return changed
    with _duckdb() as connection:
        for part in archive.compacted_parts():
            rows = connection.execute(
                "SELECT page_number, kind, shape, body FROM read_parquet(?)"
                " ORDER BY page_number", [str(part)]).fetchall()
            new_rows, digests, part_changed = [], {}, 0
            for number, kind, shape, body in rows:
                new = rewrite(bytes(body), shape or "collection")
                if new is not None and new != bytes(body):
                    body, part_changed = new, part_changed + 1
                new_rows.append((number, kind, shape, bytes(body)))
                digests[number] = hashlib.md5(bytes(body)).hexdigest()
            if not part_changed:
                continue
            tmp = part.with_name(part.name + ".tmp")
            _write_part(connection, new_rows, tmp, zstd_level)
            _verify_part(connection, tmp, digests)
            tmp.replace(part)
            changed += part_changed
    return changed


def delete_change_set(archive: ChangeSetArchive) -> int:
    """Remove a change set from the archive (manifest first: never a half-complete one)."""
    path = archive.checked_path()
    size = folder_bytes(path)
    archive.manifest_path.unlink()
    shutil.rmtree(path)
    return size


