"""Where the archive's files are kept: a folder on this machine (`LocalStorage`, the default) or
a bucket of any S3-compatible object store (`S3Storage`, `DATAVERSE_ARCHIVE_URL=s3://...`).

Both hold the same layout under the same keys, relative POSIX paths such as
`accounts/20261122T101500Z/page-00001.json.gz`; change_sets and compacted say what the files
are, this module only how they are stored. The operations are the few the archive needs: put,
get, exists, list, delete a folder, and, for the Parquet parts DuckDB writes and reads, a local
file for a key (`local_copy`), a scratch folder (`scratch`) and `put_file`.

Crash safety, which the archive's rules rest on (a change set is complete once its manifest
exists; a compacted change set counts only once every part `pages-i-of-n` is there):
- locally, a durable put writes a temporary file, fsyncs it and renames it over the key; page
  files are written directly (a page without its manifest is never read), as they always were;
  `put_file` is a rename within the change set's folder;
- on S3, every PutObject (and a multipart upload, on completion) is atomic: a reader sees the
  whole old object, the whole new one, or none. So a manifest put last still makes a change set
  complete at once, and a compaction part uploaded under its final name is whole; the
  all-parts-present rule covers a crash between parts as it does locally. Object stores have no
  rename, so there is no temporary key: the part was verified in its local file before upload.

Credentials never pass through here: boto3 finds them itself (AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role...). Error messages are built from the
bucket, the prefix, the endpoint and S3's error code, never from what boto3 was given.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from dataverse_assets.config import archive_url_problem, split_archive_url
from dataverse_assets.errors import ArchiveError

if TYPE_CHECKING:
    from dataverse_assets.config import Settings


class ArchiveStorage(ABC):
    """The archive's files by key (see the module). Picklable: staging worker processes get a
    copy and open their own connection."""

    location: str  # the folder or s3://bucket/prefix, for messages (never a secret)

    @abstractmethod
    def put(self, key: str, data: bytes, *, durable: bool = True) -> None:
        """Store `data` under `key`, replacing it whole (a reader never sees half of it).
        `durable=False` (page files): locally, written without fsync or rename."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The content of `key`; FileNotFoundError when there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def sizes(self, prefix: str) -> dict[str, int]:
        """Every key under the folder `prefix` ("entity/" or "entity/change_set/"), at any
        depth, with its size in bytes."""

    @abstractmethod
    def names(self, folder: str) -> list[str]:
        """The names of the files directly in `folder`, sorted."""

    @abstractmethod
    def folders_holding(self, folder: str, name: str) -> list[str]:
        """The names of the sub-folders of `folder` that hold a file `name` (a change set's
        manifest), unsorted."""

    @abstractmethod
    def holds_anything(self, folder: str) -> bool:
        """Whether anything at all is stored under `folder`."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key` (none: nothing to do)."""

    @abstractmethod
    def clear(self, folder: str, *, keep_folder: bool) -> None:
        """Remove everything under `folder`; locally the folder itself stays if `keep_folder`
        (empty) and is made if missing."""

    @abstractmethod
    def outside_root(self, folder: str) -> str | None:
        """Why writing or deleting under `folder` would leave the archive, or None."""

    @abstractmethod
    def describe(self, key: str) -> str:
        """Where `key` is, for a message: a path, or s3://bucket/key."""

    @abstractmethod
    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """A local file with the content of `key` for as long as the block runs (locally the
        file itself; from S3 a download, streamed to a temporary file, deleted after)."""

    @abstractmethod
    @contextmanager
    def scratch(self, folder: str) -> Iterator[Path]:
        """A local folder to write files in before `put_file` stores them under `folder`
        (locally `folder` itself, so `put_file` is a rename; for S3 a temporary folder)."""

    @abstractmethod
    def put_file(self, path: Path, key: str) -> None:
        """Store the local file `path` (written in `scratch`) under `key`, replacing it whole."""


class LocalStorage(ArchiveStorage):
    """The archive as a folder on this machine: today's files, byte for byte."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({self.location!r})"

    def path(self, key: str) -> Path:
        return self.root / key

    def put(self, key: str, data: bytes, *, durable: bool = True) -> None:
        path = self.path(key)
        if not durable:
            path.write_bytes(data)
            return
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def sizes(self, prefix: str) -> dict[str, int]:
        folder = self.path(prefix)
        return {p.relative_to(self.root).as_posix(): p.stat().st_size
                for p in folder.rglob("*") if p.is_file()}

    def names(self, folder: str) -> list[str]:
        path = self.path(folder)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def folders_holding(self, folder: str, name: str) -> list[str]:
        path = self.path(folder)
        if not path.exists():
            return []
        return [p.name for p in path.iterdir() if (p / name).exists()]

    def holds_anything(self, folder: str) -> bool:
        return self.path(folder).exists()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def clear(self, folder: str, *, keep_folder: bool) -> None:
        path = self.path(folder)
        if path.exists():
            shutil.rmtree(path)
        if keep_folder:
            path.mkdir(parents=True)

    def outside_root(self, folder: str) -> str | None:
        # A symlinked entity or change-set folder could point anywhere.
        root = self.root.resolve()
        path = self.path(folder)
        resolved = path.resolve()
        if resolved != root / folder.strip("/"):
            return (f"its archive folder {path} resolves to {resolved}, outside the archive "
                    f"root {root} (a symbolic link?)")
        return None

    def describe(self, key: str) -> str:
        return str(self.path(key))

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        yield self.path(key)

    @contextmanager
    def scratch(self, folder: str) -> Iterator[Path]:
        yield self.path(folder)

    def put_file(self, path: Path, key: str) -> None:
        path.replace(self.path(key))


# Clients per process, endpoint, region and credentials in the environment (a boto3 client
# costs ~50 ms to make and is thread-safe once made; a changed AWS_* variable must not keep
# using the credentials of the old one). The key holds a digest, never a credential.
_CLIENTS: dict[tuple, object] = {}
_CLIENTS_LOCK = threading.Lock()
_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                         "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
# S3 DeleteObjects takes at most 1,000 keys.
_DELETE_BATCH = 1000


def _s3_client(endpoint_url: str | None, region: str | None):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ArchiveError("DATAVERSE_ARCHIVE_URL=s3://... needs boto3: pip install -e "
                           "'.[deploy]'") from None
    environment = hashlib.sha256("\0".join(
        os.environ.get(name, "") for name in _CREDENTIAL_VARIABLES).encode()).hexdigest()
    key = (os.getpid(), endpoint_url, region, environment)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            config = Config(
                connect_timeout=10, read_timeout=60,
                retries={"mode": "standard", "max_attempts": 4},
                # An endpoint of our own (MinIO, moto, Ceph...) rarely serves
                # bucket.host names; AWS itself takes either.
                s3={"addressing_style": "path"} if endpoint_url else None)
            # A session of its own: boto3's default session is not thread-safe.
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config)
            _CLIENTS[key] = client
        return client


class S3Storage(ArchiveStorage):
    """The archive as objects under `s3://bucket/prefix` of any S3-compatible store."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def __repr__(self) -> str:
        return f"S3Storage({self.location!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def client(self):
        return _s3_client(self.endpoint_url, self.region)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    @contextmanager
    def _errors(self, doing: str, missing: str | None = None) -> Iterator[None]:
        """S3's failures as one ArchiveError line naming the bucket and the endpoint (and
        S3's error code), never a credential; with `missing`, a key that is not there is
        FileNotFoundError."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )

        where = (f"archive {self.location} (endpoint "
                 f"{self.endpoint_url or 'AWS, region ' + (self.region or 'from AWS config')})")
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if missing is not None and (code in ("NoSuchKey", "404", "NotFound")
                                        or status == 404) and code != "NoSuchBucket":
                raise FileNotFoundError(self.describe(missing)) from None
            raise ArchiveError(f"{where}: {doing} failed: {_explain(code, status)}") from None
        except (NoCredentialsError, PartialCredentialsError):
            raise ArchiveError(
                f"{where}: {doing} failed: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment") from None
        except (EndpointConnectionError, BotoConnectionError):
            raise ArchiveError(
                f"{where}: {doing} failed: the endpoint cannot be reached; check "
                "DATAVERSE_S3_ENDPOINT_URL and that the store is up") from None
        except BotoCoreError as exc:
            raise ArchiveError(f"{where}: {doing} failed: {type(exc).__name__}") from None

    def put(self, key: str, data: bytes, *, durable: bool = True) -> None:
        with self._errors(f"writing {key}"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        with self._errors(f"reading {key}", missing=key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            with self._errors(f"looking for {key}", missing=key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except FileNotFoundError:
            return False
        return True

    def _list(self, folder: str, delimiter: bool = False) -> Iterator[dict]:
        prefix = self._key(folder.strip("/")) + "/" if folder.strip("/") else (
            f"{self.prefix}/" if self.prefix else "")
        with self._errors(f"listing {folder or '/'}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, **({"Delimiter": "/"} if delimiter else {}))
            for page in pages:
                yield from page.get("Contents", [])

    def sizes(self, prefix: str) -> dict[str, int]:
        return {self._relative(item["Key"]): item["Size"] for item in self._list(prefix)}

    def names(self, folder: str) -> list[str]:
        return sorted(item["Key"].rpartition("/")[2]
                      for item in self._list(folder, delimiter=True))

    def folders_holding(self, folder: str, name: str) -> list[str]:
        # One listing of the folder (1,000 keys a request) instead of a request per
        # sub-folder: a compacted change set is a few keys, a page-file one a few per page.
        base = folder.strip("/") + "/"
        found = []
        for item in self._list(folder):
            child, _, rest = self._relative(item["Key"])[len(base):].partition("/")
            if rest == name:
                found.append(child)
        return found

    def holds_anything(self, folder: str) -> bool:
        prefix = self._key(folder.strip("/")) + "/"
        with self._errors(f"listing {folder}"):
            return bool(self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=prefix, MaxKeys=1).get("KeyCount"))

    def delete(self, key: str) -> None:
        with self._errors(f"deleting {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def clear(self, folder: str, *, keep_folder: bool) -> None:
        keys = [self._key(k) for k in self.sizes(folder)]
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start:start + _DELETE_BATCH]
            with self._errors(f"deleting {folder}"):
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in batch], "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise ArchiveError(
                    f"archive {self.location}: deleting {folder} failed for "
                    f"{len(answer['Errors'])} object(s), e.g. {self._relative(first['Key'])}: "
                    f"{_explain(str(first.get('Code', '')), None)}")

    def outside_root(self, folder: str) -> str | None:
        return None  # keys are names, not links: nothing resolves elsewhere

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        handle, name = tempfile.mkstemp(prefix="archive-", suffix="-" + key.rpartition("/")[2])
        try:
            with open(handle, "wb") as target, self._errors(f"reading {key}", missing=key):
                # Streamed to disk in chunks: a part is never in memory whole.
                self.client.download_fileobj(self.bucket, self._key(key), target)
            yield Path(name)
        finally:
            os.unlink(name)

    @contextmanager
    def scratch(self, folder: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="archive-") as path:
            yield Path(path)

    def put_file(self, path: Path, key: str) -> None:
        with self._errors(f"writing {key}"):
            # A multipart upload past 8 MB, checksummed by boto3; visible only once complete.
            self.client.upload_file(str(path), self.bucket, self._key(key))


def _explain(code: str, status: int | None) -> str:
    if code in ("NoSuchBucket",):
        return "the bucket does not exist; create it, or fix the bucket in DATAVERSE_ARCHIVE_URL"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                "ExpiredToken", "InvalidClientTokenId"):
        return (f"the store refused the credentials ({code}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if code in ("AccessDenied", "403", "AllAccessDisabled") or status == 403:
        # A HEAD's 403 has no body to say which: wrong credentials or too few rights.
        return (f"the store refused the request ({'HTTP 403' if code in ('', '403') else code})"
                "; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and "
                "that they may read and write this bucket and prefix")
    return f"{code or 'error'}" + (f" (HTTP {status})" if status else "")


def open_storage(location: ArchiveStorage | str | os.PathLike[str], *,
                 endpoint_url: str | None = None, region: str | None = None) -> ArchiveStorage:
    """The storage of an archive location: a storage as it is, `s3://bucket/prefix`, a
    `file://` URL or a folder path."""
    if isinstance(location, ArchiveStorage):
        return location
    text = os.fspath(location)
    if isinstance(text, str) and "://" in text:
        problem = archive_url_problem(text)
        if problem:
            raise ArchiveError(f"archive location: {problem}")
        scheme, where, prefix = split_archive_url(text)
        if scheme == "s3":
            return S3Storage(where, prefix, endpoint_url=endpoint_url, region=region)
        return LocalStorage(where)
    return LocalStorage(text)


def storage_of(settings: Settings) -> ArchiveStorage:
    """The archive of these settings (DATAVERSE_ARCHIVE_URL or DATAVERSE_ARCHIVE_DIR)."""
    return open_storage(settings.archive_location, endpoint_url=settings.s3_endpoint_url,
                        region=settings.s3_region)
