"""Run priorities: entities marked `"priority": "high"` in the entities file get runs that
Dagster's run queue starts first.

The `dagster/priority` tag is read by the QueuedRunCoordinator (higher first, default 0) when
more runs are queued than `max_concurrent_runs` allows; see docs/operations.md. A run that
covers several entities takes the highest priority among them. Within an entity, older change
sets still publish first (canonical/E publishes them in order), whatever the run order.
"""

from collections.abc import Iterable

from dataverse_assets.config import EntitiesConfig, EntityConfig

PRIORITY_TAG = "dagster/priority"
RUN_PRIORITY = {"high": 10, "normal": 0, "low": -10}


def run_priority(entities: Iterable[EntityConfig]) -> int:
    """The run priority of a run covering these entities: the highest of theirs."""
    return max((RUN_PRIORITY[e.priority] for e in entities), default=RUN_PRIORITY["normal"])


def priority_tags(config: EntitiesConfig, entity_names: Iterable[str]) -> dict[str, str]:
    """`{"dagster/priority": "<n>"}` for a run of these entities (names not configured are
    ignored)."""
    configured = {e.name: e for e in config.entities}
    entities = [configured[name] for name in entity_names if name in configured]
    return {PRIORITY_TAG: str(run_priority(entities))}


def group_priority_tags(config: EntitiesConfig, group: str) -> dict[str, str]:
    """Tags of a run of the whole group (a schedule tick)."""
    return priority_tags(config, [e.name for e in config.entities_in_group(group)])
