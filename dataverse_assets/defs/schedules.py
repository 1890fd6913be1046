"""One schedule per cadence group, from entities_config.json.

Plain schedules cannot request dynamic partitions, so each tick registers its change-set key
(derived from the scheduled time, so a re-evaluated tick reuses it) and requests the group's
job for that partition.
"""

from dagster import RunRequest, ScheduleDefinition, ScheduleEvaluationContext, schedule

from dataverse_assets.config import EntitiesConfig
from dataverse_assets.defs.checks import FRESHNESS_JOB
from dataverse_assets.defs.maintenance import build_maintenance_schedule
from dataverse_assets.defs.partitions import add_change_sets
from dataverse_assets.defs.priorities import group_priority_tags
from dataverse_assets.names import change_set_key


def sync_job_name(group: str) -> str:
    return f"sync_{group}"


def build_schedules(config: EntitiesConfig) -> list[ScheduleDefinition]:
    schedules = [ScheduleDefinition(
        name="freshness_schedule", cron_schedule="*/15 * * * *", job_name=FRESHNESS_JOB,
        execution_timezone="UTC",
        description="Evaluates every group's freshness check, so a late group shows up "
                    "even when no sync runs.",
    )]
    for group, group_config in config.groups.items():
        if not config.entities_in_group(group):
            continue
        schedules.append(_group_schedule(group, group_config.cron,
                                         group_priority_tags(config, group)))
    maintenance = build_maintenance_schedule(config)
    return schedules if maintenance is None else [*schedules, maintenance]


def _group_schedule(group: str, cron: str,
                    priority: dict[str, str] | None = None) -> ScheduleDefinition:
    @schedule(
        name=f"{group}_schedule",
        cron_schedule=cron,
        job_name=sync_job_name(group),
        execution_timezone="UTC",
        description=f"Sync the {group!r} group on its cadence ({cron}), one change set a tick.",
    )
    def _schedule(context: ScheduleEvaluationContext) -> RunRequest:
        key = change_set_key(context.scheduled_execution_time)
        add_change_sets(context.instance, group, [key])
        return RunRequest(
            run_key=f"{group}:{key}", partition_key=key,
            tags={"dataverse/change_set": key, "dataverse/trigger": "schedule",
                  **(priority or {})},
        )

    return _schedule
