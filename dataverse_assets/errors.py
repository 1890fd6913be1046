"""Every error this project raises on purpose, under one root, grouped by where it comes from.

Catch `DataverseAssetsError` for "something this tool refused or could not do, and said why":
each message is one line naming what is wrong and what to do. Several also derive from the
built-in exception they have always been (ValueError, LookupError, RuntimeError), so code that
caught those still does. Messages from the source pass through the one redactor.
"""

from __future__ import annotations

from dataverse_assets.redaction import redact


class DataverseAssetsError(Exception):
    """The root: a refusal or failure of this project, with a message that says what to do."""


# -- configuration and input -------------------------------------------------------------------

class ConfigError(DataverseAssetsError, ValueError):
    """The configuration cannot be used; the message says what to fix."""


class UnknownNameError(ConfigError):
    """An entity or group named on the command line that is not configured (the message
    offers the closest name)."""


class InvalidNameError(DataverseAssetsError, ValueError):
    """A key, name or id that does not have its documented format; nothing was touched."""


class FetchConfigError(DataverseAssetsError, ValueError):
    """The entity's configuration asks for something this table cannot do."""


# -- the source: Dataverse, its authority, the archive source ----------------------------------

class AuthenticationError(DataverseAssetsError):
    """Dataverse or the authority refused our credentials; the message says what to check
    (and holds no secret: it is redacted here, whoever builds it)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class DataverseError(DataverseAssetsError):
    """A request to Dataverse failed for good; the message names entity, URL and status (and
    holds no secret: it is redacted here, whoever builds it)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class DataverseRequestError(DataverseError):
    """A request Dataverse answered with an error (`status`, and its error `code` if any)."""

    def __init__(
        self, message: str, *, status: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class UnreachableError(DataverseRequestError):
    """The org or the authority could not be reached: DNS, TLS or the connection, and why
    (source/network.py); no response came."""


class ResponseTooLargeError(DataverseRequestError):
    """A response body over the client's size limit; not retried (it would be as large)."""


class UnknownEntityError(DataverseRequestError):
    """The configured entity set does not exist in the org."""


class PagingError(DataverseError):
    """The server's paging links cannot be followed safely, or make no progress."""


class ChangeSetNotArchivedError(DataverseAssetsError, LookupError):
    """The archive source was asked for a change set the archive does not hold."""


# -- the archive -------------------------------------------------------------------------------

class ArchiveError(DataverseAssetsError):
    """The archive is missing something a step needs; the message says which change set."""


class ArchivePathError(ArchiveError):
    """A change set's folder would not be inside the archive root; nothing was touched."""


class CorruptArchiveError(ArchiveError):
    """A file of an archived change set cannot be read (a bad gzip CRC, a truncated file, a
    body that is not an OData page, a broken manifest); the message names the entity, the
    change set and the file."""


# -- the store ---------------------------------------------------------------------------------

class StorageError(DataverseAssetsError):
    """The mirror database cannot be used (disk full, read-only, corrupt, locked); the message
    says which, where, what state the data is in and what to do."""


class EntityLockedError(DataverseAssetsError, RuntimeError):
    """Another run holds the entity's lock and did not release it in time."""


class NotStagedError(DataverseAssetsError):
    """A step needs a staged change set that does not exist."""


class StagingPrunedError(DataverseAssetsError, RuntimeError):
    """The staged rows a step needs were deleted by staging retention."""


# -- syncing and publishing --------------------------------------------------------------------

class PlanValidationError(DataverseAssetsError):
    """The plan does not add up; nothing was written."""


class StageWorkerError(DataverseAssetsError, RuntimeError):
    """A staging worker process failed or died."""


class InjectedFault(DataverseAssetsError, RuntimeError):
    """Raised at a fault point a test armed (sync.faults)."""


# -- operations --------------------------------------------------------------------------------

class RebuildError(DataverseAssetsError):
    """The rebuild cannot start or go on; the message says what to change."""
