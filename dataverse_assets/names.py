"""The names users and servers hand us, and the one check of each: change-set keys, entity,
group and column names, record ids.

Each of these strings ends up as a folder in the archive, a table name, a partition of Dagster
or a term of an OData `$filter`. A key of `../..` once made a fetch delete the folder above the
archive, and a column of `statecode eq 0 or x` rewrote a filter, so nothing takes one of them
unchecked: each is matched against its documented format here, and a bad one is an
`InvalidNameError` whose one line names the value and the format expected. Imports nothing of
ours: every layer may use it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from datetime import UTC, datetime

from dataverse_assets.errors import InvalidNameError

# Change sets are the partitions: UTC timestamps to the second. Every key has this fixed width,
# so their text order is their time order; `change_set_order` sorts by the time regardless.
KEY_FORMAT = "%Y%m%dT%H%M%SZ"
KEY_EXAMPLE = "20261122T101500Z"
KEY_DESCRIPTION = f"a UTC time as YYYYMMDDTHHMMSSZ, e.g. {KEY_EXAMPLE}"
_KEY_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")
# The same shape as a SQLite GLOB, for queries over change sets stored by older versions.
KEY_GLOB = "[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]T[0-9][0-9][0-9][0-9][0-9][0-9]Z"

# Entity set names become SQL table names and archive folder names: kept to what Dataverse
# itself allows (letters, digits, underscores) so neither can be abused.
ENTITY_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")
GROUP_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# Column names that go into OData queries ($select, $filter, $orderby), where they cannot be
# quoted: Dataverse logical names (letters, digits, underscores; lookups as _name_value).
# Anything else would change the query, so it is refused.
ODATA_COLUMN_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
GUID_PATTERN = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_change_set_key(value: object) -> bool:
    """Whether `value` is a change-set key: the format, and a real moment."""
    if not isinstance(value, str) or not _KEY_PATTERN.match(value):
        return False
    try:
        datetime.strptime(value, KEY_FORMAT)
    except ValueError:  # 20261399T250000Z has the shape but is no time
        return False
    return True


def check_change_set_key(value: object) -> str:
    """The key itself, or InvalidNameError naming it and the format."""
    if not is_change_set_key(value):
        raise InvalidNameError(
            f"change set key {_shown(value)} is not a change-set key: expected "
            f"{KEY_DESCRIPTION}. Create one with `dataverse-assets change-set create --group "
            "GROUP` (the Dagster UI's 'Add a partition' takes the same format)")
    return value  # type: ignore[return-value]


def change_set_key(moment: datetime) -> str:
    """The key of a moment (seconds; naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime(KEY_FORMAT)


def change_set_time(key: str) -> datetime:
    """The UTC moment a change-set key encodes (InvalidNameError for anything else)."""
    return datetime.strptime(check_change_set_key(key), KEY_FORMAT).replace(tzinfo=UTC)


def change_set_order(key: str) -> tuple[int, datetime | str]:
    """Sort key of a change set: by the time it encodes. A key that is not one (stored by a
    version that did not check keys) sorts before every real one, so it is never 'newer' than
    a real change set."""
    if is_change_set_key(key):
        return (1, change_set_time(key))
    return (0, key)


def _matching(value: object, pattern: re.Pattern[str], refusal: str) -> str:
    """`value` if it is text of the pattern's form, else InvalidNameError (`refusal` with
    `{value}` in it says what was expected)."""
    if not isinstance(value, str) or not pattern.match(value):
        raise InvalidNameError(refusal.format(value=_shown(value)))
    return value


def check_entity_name(value: object) -> str:
    return _matching(value, ENTITY_NAME_PATTERN,
                     "entity {value} is not an entity set name: a letter, then letters, "
                     "digits or underscores (at most 128), e.g. 'accounts'")


def check_group_name(value: object) -> str:
    return _matching(value, GROUP_NAME_PATTERN,
                     "group {value} is not a group name: lowercase letters, digits or "
                     "underscores, starting with a letter, e.g. 'hourly'")


def check_column_name(value: object) -> str:
    return _matching(value, ODATA_COLUMN_PATTERN,
                     "{value} is not a Dataverse column name (letters, digits and "
                     "underscores, e.g. 'accountid' or '_parentcustomerid_value')")


def is_guid(value: object) -> bool:
    return isinstance(value, str) and bool(GUID_PATTERN.match(value))


def check_record_id(value: object) -> str:
    return _matching(value, GUID_PATTERN,
                     "record id {value} is not a GUID: Dataverse primary keys look like "
                     "00000000-0000-0000-0000-000000000000")


def unknown_name(kind: str, name: str, names: Iterable[str]) -> str:
    """`unknown entity 'acounts'; did you mean 'accounts'?`, or the names there are when none
    is close: the one message for a name that is not configured."""
    known = sorted(set(names))
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = (f"; did you mean {close[0]!r}?" if close
            else f"; the {kind}s are {', '.join(known) or 'none'}")
    return f"unknown {kind} {name!r}{hint}"
