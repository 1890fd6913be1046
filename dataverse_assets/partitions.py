"""Change sets are the partitions: one dynamic partition set per cadence group, keyed by
sortable UTC timestamps (e.g. 20261122T101500Z)."""

from datetime import UTC, datetime, timedelta

from dagster import DagsterInstance, DynamicPartitionsDefinition

KEY_FORMAT = "%Y%m%dT%H%M%SZ"


def change_sets_partitions(group: str) -> DynamicPartitionsDefinition:
    return DynamicPartitionsDefinition(name=f"change_sets_{group}")


def change_set_key(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(KEY_FORMAT)


def register_change_set(instance: DagsterInstance, group: str,
                        now: datetime | None = None) -> str:
    """Register a new change-set key for a group (one second later if that one is taken)."""
    partitions_name = change_sets_partitions(group).name
    moment = (now or datetime.now(UTC)).replace(microsecond=0)
    while instance.has_dynamic_partition(partitions_name, change_set_key(moment)):
        moment += timedelta(seconds=1)
    key = change_set_key(moment)
    instance.add_dynamic_partitions(partitions_name, [key])
    return key
