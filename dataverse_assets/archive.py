"""The raw archive: every response body verbatim, per entity and change set, with a manifest.

Layout: `<archive>/<entity>/<change_set>/page-00001.json.gz ... manifest.json`. A change set is
complete once its manifest is written (atomically, last); a folder without one is a fetch that
died and is started over.

`dataverse-assets compact` (compaction.py) later merges the page files of old change sets into
zstd Parquet (`pages-0001-of-0001.parquet`: page_number, kind, shape, body, the bodies byte for
byte); `iter_page_bodies()` reads either form.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

MANIFEST = "manifest.json"
REQUEST = "request.json"
ENTITY_DEFINITION = "entity_definition.json"
COMPACTED_PARTS = "pages-*-of-*.parquet"


class ArchiveError(Exception):
    """The archive is missing something a step needs; the message says which change set."""


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ChangeSetArchive:
    """One entity's change set in the archive."""

    def __init__(self, root: str | os.PathLike[str], entity: str, change_set: str) -> None:
        self.root = Path(root)
        self.entity = entity
        self.change_set = change_set
        self.path = self.root / entity / change_set

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def is_complete(self) -> bool:
        return self.manifest_path.exists()

    def start(self) -> None:
        """Begin writing: a partial folder from a failed fetch is discarded."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def write_page(self, number: int, body: bytes) -> int:
        """Store one response body verbatim (gzip level 1: cheap, ~8x smaller). Returns bytes."""
        data = gzip.compress(body, compresslevel=1, mtime=0)
        (self.path / f"page-{number:05d}.json.gz").write_bytes(data)
        return len(data)

    def write_json(self, name: str, value: object) -> None:
        _write_atomically(self.path / name, orjson.dumps(value, option=orjson.OPT_INDENT_2))

    def read_json(self, name: str) -> object | None:
        path = self.path / name
        if not path.exists():
            return None
        return orjson.loads(path.read_bytes())

    def finish(self, manifest: dict) -> None:
        _write_atomically(self.manifest_path, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))

    def manifest(self) -> dict:
        if not self.is_complete():
            raise ArchiveError(
                f"{self.entity}: change set {self.change_set} has no complete archive at "
                f"{self.path}; materialize raw/{self.entity} for it first"
            )
        return orjson.loads(self.manifest_path.read_bytes())

    def page_paths(self) -> list[Path]:
        return sorted(self.path.glob("page-*.json.gz"))

    def compacted_parts(self) -> list[Path]:
        """The Parquet parts of a compacted change set, in order; [] unless every part is
        there (parts are renamed into place only after all of them were written and checked)."""
        parts = sorted(self.path.glob(COMPACTED_PARTS))
        expected = parts[-1].stem.rpartition("-of-")[2] if parts else None
        if not parts or [p.name for p in parts] != [
            f"pages-{n:04d}-of-{expected}.parquet" for n in range(1, len(parts) + 1)
        ] or int(expected) != len(parts):
            return []
        return parts

    def is_compacted(self) -> bool:
        return bool(self.compacted_parts())

    def iter_page_bodies(self) -> Iterator[bytes]:
        """Page bodies in order, one at a time (never the whole change set in memory), from the
        page files or, once compacted, from the Parquet parts (DuckDB)."""
        read = 0
        if not self.is_compacted():
            paths = self.page_paths()
            # The next page is read and unzipped on a thread (zlib releases the GIL) while the
            # caller parses this one: two bodies in memory at most.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-read") as pool:
                ahead = pool.submit(read_gzip, paths[0]) if paths else None
                for number in range(len(paths)):
                    try:
                        body = ahead.result()
                    except FileNotFoundError:
                        if not self.is_compacted():
                            raise
                        break  # compacted while we read: go on from the Parquet parts
                    ahead = (pool.submit(read_gzip, paths[number + 1])
                             if number + 1 < len(paths) else None)
                    read += 1
                    yield body
                else:
                    if paths or not self.is_compacted():
                        return
        from dataverse_assets.compaction import iter_compacted_bodies

        yield from iter_compacted_bodies(self, first_page=read + 1)


def read_gzip(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


def list_change_sets(root: str | os.PathLike[str], entity: str) -> list[str]:
    """Complete change sets of an entity, oldest first (keys sort chronologically)."""
    folder = Path(root) / entity
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / MANIFEST).exists())
