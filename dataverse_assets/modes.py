"""The words the mirror's state is written in, as named constants: how a change set was fetched
(`Mode`), where its publish stands (`PublishStatus`), where an entity's sync stands
(`SyncStatus`). They are `StrEnum`s, so they equal the strings stored in the database, the
archive's manifests and Dagster's metadata; values written out are plain strings (`str(...)`),
since Dagster's serialiser takes no enums.
"""

from enum import StrEnum


class Mode(StrEnum):
    """How a change set was fetched (`manifest.json`, `_staged.mode`, `_sync_state.mode`)."""

    CHANGE_TRACKING = "change_tracking"  # a delta link followed
    INITIAL = "initial"  # the first track-changes read of a table that never had a delta token
    CHANGE_TRACKING_RESYNC = "change_tracking_resync"  # that read again: the delta token expired
    MODIFIEDON = "modifiedon"  # modifiedon ge the watermark
    FULL = "full"  # the whole table
    FILTERED = "filtered"  # only the records other tables link to
    TARGETED = "targeted"  # given records by id (a targeted refresh)


# Change sets that hold the whole table: what they do not list is gone.
SNAPSHOT_MODES = (Mode.FULL, Mode.INITIAL, Mode.CHANGE_TRACKING_RESYNC)
# Change sets that read the table with change tracking on (they end with a delta link).
TRACKING_READ_MODES = (Mode.CHANGE_TRACKING, Mode.INITIAL, Mode.CHANGE_TRACKING_RESYNC)


class PublishStatus(StrEnum):
    """Where a change set's publish stands (`_publish_state.status`)."""

    PENDING = "PENDING"  # staged, not yet published: a resting state
    PLANNING = "PLANNING"
    PLAN_COMPLETE = "PLAN_COMPLETE"
    EXECUTING = "EXECUTING"
    RETRYING = "RETRYING"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"


# A publish passes through these on its way to COMPLETE or FAILED.
PUBLISHING_STATUSES = (PublishStatus.PLANNING, PublishStatus.PLAN_COMPLETE,
                       PublishStatus.EXECUTING, PublishStatus.RETRYING)


class SyncStatus(StrEnum):
    """Where an entity's sync stands (`_sync_state.status`)."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
