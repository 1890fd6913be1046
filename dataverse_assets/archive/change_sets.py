"""The raw archive: every response body verbatim, per entity and change set, with a manifest.

Layout: `<archive>/<entity>/<change_set>/page-00001.json.gz ... manifest.json`, in a folder or
under an S3 prefix (archive.storage). A change set is complete once its manifest is written
(atomically, last); a folder without one is a fetch that died and is started over.

`dataverse-assets compact` later merges the page files of old change sets into zstd Parquet
(archive.compacted: `pages-0001-of-0001.parquet`: page_number, kind, shape, body, the bodies
byte for byte); `iter_page_bodies()` reads either form.
"""

from __future__ import annotations

import fnmatch
import gzip
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
from isal import igzip, isal_zlib

from dataverse_assets.archive.compacted import iter_compacted_bodies
from dataverse_assets.archive.storage import ArchiveStorage, LocalStorage, open_storage
from dataverse_assets.errors import ArchiveError, ArchivePathError, CorruptArchiveError
from dataverse_assets.names import (
    change_set_order,
    check_change_set_key,
    check_entity_name,
    is_change_set_key,
)

MANIFEST = "manifest.json"
REQUEST = "request.json"
ENTITY_DEFINITION = "entity_definition.json"
# The attribute metadata responses (choices, lookup targets, date behaviours), verbatim.
ATTRIBUTE_METADATA = "attribute_metadata.json"
COMPACTED_PARTS = "pages-*-of-*.parquet"
PAGE_FILES = "page-*.json.gz"


class DamagedPage(ValueError):
    """Page `number` cannot be used; `problem` says why. Whoever knows the change set turns it
    into a CorruptArchiveError (it crosses from staging worker processes, so it pickles)."""

    def __init__(self, number: int, problem: str) -> None:
        super().__init__(number, problem)
        self.number = number
        self.problem = problem


# What reading a damaged gzip file raises (a missing file is not damage: FileNotFoundError
# passes, a compaction may have replaced the page files meanwhile).
_DAMAGED_GZIP = (gzip.BadGzipFile, EOFError, zlib.error, isal_zlib.error)


def gzip_page(body: bytes) -> bytes:
    """A page body as a gzip file, level 1, no timestamp: written by ISA-L (`isal`), standard
    gzip that any reader takes, ~4x faster than the standard library's zlib at its own level 1
    and a little smaller (docs/performance.md)."""
    return igzip.compress(body, compresslevel=1, mtime=0)


class ChangeSetArchive:
    """One entity's change set in the archive (a local folder or S3: archive.storage)."""

    def __init__(self, root: ArchiveStorage | str | os.PathLike[str], entity: str,
                 change_set: str) -> None:
        # Both become key segments: `../..` as a key once made a fetch delete the folder
        # above the archive. Only the documented formats are taken.
        self.storage = open_storage(root)
        self.entity = check_entity_name(entity)
        self.change_set = check_change_set_key(change_set)
        self.folder = f"{self.entity}/{self.change_set}"

    def key(self, name: str) -> str:
        """The storage key of one of the change set's files."""
        return f"{self.folder}/{name}"

    @property
    def location(self) -> str:
        """Where the change set is, for messages and the UI: its folder or s3:// URL."""
        return self.storage.describe(self.folder)

    @property
    def path(self) -> Path:
        """The change set's folder, in a local archive only (tests and benchmarks look into
        it; the code goes through the storage)."""
        if not isinstance(self.storage, LocalStorage):
            raise ArchiveError(f"{self.location} is not a folder on this machine")
        return self.storage.path(self.folder)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def check_inside(self) -> None:
        """Refuse to write or delete when the folder would resolve outside the archive root
        (a symlinked entity or change-set folder could point anywhere): called before any
        write or delete."""
        problem = self.storage.outside_root(self.folder)
        if problem:
            raise ArchivePathError(
                f"{self.entity}: change set {self.change_set}: {problem}; refusing to write "
                "or delete there. Replace the link with a real folder")

    def checked_path(self) -> Path:
        """The local folder, after check_inside (tests)."""
        self.check_inside()
        return self.path.resolve()

    def is_complete(self) -> bool:
        return self.storage.exists(self.key(MANIFEST))

    def exists(self) -> bool:
        """Anything of the change set is stored (complete or not)."""
        return self.storage.holds_anything(self.folder)

    def start(self) -> None:
        """Begin writing: a partial folder from a failed fetch is discarded."""
        self.check_inside()
        self.storage.clear(self.folder, keep_folder=True)

    def write_page(self, number: int, body: bytes) -> int:
        """Store one response body verbatim (gzip level 1: cheap, ~8x smaller). Returns bytes.
        Not fsynced: until the manifest (which is) exists, no page of it is read."""
        data = gzip_page(body)
        self.storage.put(self.key(page_name(number)), data, durable=False)
        return len(data)

    def replace_page(self, number: int, body: bytes) -> int:
        """Replace an archived page's body (a purge erasing data), atomically."""
        data = gzip_page(body)
        self.storage.put(self.key(page_name(number)), data)
        return len(data)

    def write_json(self, name: str, value: object) -> None:
        self.storage.put(self.key(name), orjson.dumps(value, option=orjson.OPT_INDENT_2))

    def read_json(self, name: str) -> object | None:
        try:
            return orjson.loads(self.storage.get(self.key(name)))
        except FileNotFoundError:
            return None

    def finish(self, manifest: dict) -> None:
        """Write the manifest, last and atomically: the change set is complete from now."""
        self.storage.put(self.key(MANIFEST), orjson.dumps(manifest, option=orjson.OPT_INDENT_2))

    def manifest(self) -> dict:
        try:
            data = self.storage.get(self.key(MANIFEST))
        except FileNotFoundError:
            raise ArchiveError(
                f"{self.entity}: change set {self.change_set} has no complete archive at "
                f"{self.location}; materialize raw/{self.entity} for it first"
            ) from None
        try:
            manifest = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise self.corrupt(MANIFEST, f"is not valid JSON ({exc})") from None
        if not (isinstance(manifest, dict) and isinstance(manifest.get("mode"), str)
                and isinstance(manifest.get("summary"), dict)
                and isinstance(manifest.get("pages", []), list)):
            raise self.corrupt(MANIFEST, "is not a change-set manifest (its mode, summary or "
                               "pages are missing or of the wrong type)")
        return manifest

    def corrupt(self, file: str, problem: str) -> CorruptArchiveError:
        """The error for a damaged file of this change set (one line: entity, change set,
        file, what is wrong, what to do)."""
        problem = " ".join(problem.split())  # one line, whatever the reader said
        return CorruptArchiveError(
            f"{self.entity}: change set {self.change_set}: {self.storage.describe(self.key(file))}"
            f" {problem}; restore the file from a backup, or leave the change set out "
            "(`dataverse-assets rebuild --skip-corrupt` replays the others and reports it)")

    def iter_page_records(self) -> Iterator[tuple[dict, list[dict]]]:
        """(the manifest's entry for the page, its records) for each page, in order."""
        pages = self.manifest().get("pages", [])
        for number, body in enumerate(self.iter_page_bodies(), start=1):
            page = pages[number - 1] if number <= len(pages) else {}
            try:
                records = page_records(body, page.get("shape", "collection"), number)
            except DamagedPage as exc:
                raise self.corrupt(self.page_file(number), exc.problem) from None
            yield page, records

    def page_file(self, number: int) -> str:
        """The name of the file that holds page `number` (a page file, or a Parquet part)."""
        if not self.is_compacted():
            return page_name(number)
        parts = self.compacted_parts()
        return f"{parts[0]}..{parts[-1]} (page {number})"

    def page_names(self) -> list[str]:
        """The change set's page files, in page order."""
        return fnmatch.filter(self.storage.names(self.folder), PAGE_FILES)

    def page_paths(self) -> list[Path]:
        """The page files of a local archive (tests and benchmarks)."""
        return [self.path / name for name in self.page_names()]

    def compacted_parts(self) -> list[str]:
        """The names of the Parquet parts of a compacted change set, in order; [] unless
        every part is there (parts are put in place only after all of them were written
        and checked)."""
        parts = fnmatch.filter(self.storage.names(self.folder), COMPACTED_PARTS)
        expected = parts[-1].removesuffix(".parquet").rpartition("-of-")[2] if parts else None
        if not parts or parts != [
            f"pages-{n:04d}-of-{expected}.parquet" for n in range(1, len(parts) + 1)
        ] or not expected.isdigit() or int(expected) != len(parts):
            return []
        return parts

    def is_compacted(self) -> bool:
        return bool(self.compacted_parts())

    def iter_page_bodies(self) -> Iterator[bytes]:
        """Page bodies in order, one at a time (never the whole change set in memory), from the
        page files or, once compacted, from the Parquet parts (DuckDB)."""
        read = 0
        if not self.is_compacted():
            paths = self.page_names()
            # The next page is read and unzipped on a thread (zlib releases the GIL) while the
            # caller parses this one: two bodies in memory at most.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-read") as pool:
                ahead = (pool.submit(read_page, self.storage, self.key(paths[0]), 1)
                         if paths else None)
                for number in range(len(paths)):
                    try:
                        body = ahead.result()
                    except FileNotFoundError:
                        if not self.is_compacted():
                            raise
                        break  # compacted while we read: go on from the Parquet parts
                    except DamagedPage as exc:
                        raise self.corrupt(paths[number], exc.problem) from None
                    ahead = (pool.submit(read_page, self.storage, self.key(paths[number + 1]),
                                         number + 2)
                             if number + 1 < len(paths) else None)
                    read += 1
                    yield body
                else:
                    if paths or not self.is_compacted():
                        return
        yield from iter_compacted_bodies(self, first_page=read + 1)


def page_name(number: int) -> str:
    return f"page-{number:05d}.json.gz"


def gunzip_page(data: bytes, number: int) -> bytes:
    """A page file's content unzipped (ISA-L: about twice as fast as zlib; any gzip file);
    DamagedPage when it is damaged."""
    try:
        return igzip.decompress(data)
    except _DAMAGED_GZIP as exc:
        raise DamagedPage(number, f"cannot be read ({type(exc).__name__}: {exc})") from None


def read_page(storage: ArchiveStorage, key: str, number: int) -> bytes:
    """A page file's body; DamagedPage when the file is damaged (a missing file raises
    FileNotFoundError: compaction may have replaced it)."""
    return gunzip_page(storage.get(key), number)


def page_records(body: bytes, shape: str, number: int) -> list[dict]:
    """The records of one archived page: an OData page's `value`, or one record (shape
    "record"); DamagedPage when the body is neither."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DamagedPage(number, f"is not valid JSON ({exc})") from None
    records = [payload] if shape == "record" else (
        payload.get("value") if isinstance(payload, dict) else None)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DamagedPage(number, "is not an OData page (no 'value' list of record objects)")
    return records


def list_change_sets(root: ArchiveStorage | str | os.PathLike[str], entity: str) -> list[str]:
    """Complete change sets of an entity, oldest first (by the time their keys encode).
    A folder whose name is not a change-set key is not a change set: it is left alone, and
    so is one without a manifest (a fetch that died: the next fetch of that key restarts it)."""
    folders = open_storage(root).folders_holding(check_entity_name(entity), MANIFEST)
    return sorted((name for name in folders if is_change_set_key(name)), key=change_set_order)
