"""Change sets are the partitions: one dynamic partition set per cadence group, keyed by UTC
timestamps to the second (`names.KEY_FORMAT`, e.g. 20261122T101500Z).

Every key registered by this project (the CLI, sensors, schedules) goes through
`add_change_sets` or `add_change_sets_request`, which refuse anything else; a key added by hand
(the UI's "Add a partition", `add_dynamic_partitions`) is checked again by every step that uses
it (`raw/E` first), so a bad one fails before it touches the archive or the mirror.
"""

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from dagster import AddDynamicPartitionsRequest, DagsterInstance, DynamicPartitionsDefinition

from dataverse_assets.names import (
    KEY_DESCRIPTION,
    change_set_key,
    check_change_set_key,
    check_group_name,
)

# Dagster's dynamic partitions carry no description of their own (the UI rebuilds the
# definition from a snapshot): every partitioned asset's description says this instead.
PARTITION_NOTE = (
    f"Partitioned by change set: each key is {KEY_DESCRIPTION}; register one with "
    "`dataverse-assets change-set create --group GROUP`. Any other key is refused."
)


def change_sets_partitions(group: str) -> DynamicPartitionsDefinition:
    return DynamicPartitionsDefinition(name=f"change_sets_{check_group_name(group)}")


def add_change_sets(instance: DagsterInstance, group: str, keys: Sequence[str]) -> list[str]:
    """Register keys (checked first) that the group does not have yet; returns those added."""
    name = change_sets_partitions(group).name
    new = [key for key in map(check_change_set_key, keys)
           if not instance.has_dynamic_partition(name, key)]
    if new:
        instance.add_dynamic_partitions(name, new)
    return new


def add_change_sets_request(group: str, keys: Sequence[str]) -> AddDynamicPartitionsRequest:
    """A sensor's request to register keys (checked first)."""
    return change_sets_partitions(group).build_add_request(
        [check_change_set_key(key) for key in keys])


def register_change_set(instance: DagsterInstance, group: str,
                        now: datetime | None = None,
                        used: Callable[[str], bool] | None = None) -> str:
    """Register a new change-set key for a group (one second later if that one is taken: by
    this instance, or by `used`, e.g. the archive of a mirror another instance synced)."""
    partitions_name = change_sets_partitions(group).name
    moment = (now or datetime.now(UTC)).replace(microsecond=0)
    while (instance.has_dynamic_partition(partitions_name, change_set_key(moment))
           or (used is not None and used(change_set_key(moment)))):
        moment += timedelta(seconds=1)
    key = change_set_key(moment)
    add_change_sets(instance, group, [key])
    return key
