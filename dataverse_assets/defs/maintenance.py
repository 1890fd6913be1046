"""The `maintenance` job: archive compaction and retention (with staging retention), then
bookkeeping retention, then giving the freed space back (a SQLite file's free pages to the file
system; a PostgreSQL database is vacuumed), on the entities file's `maintenance.cron` (03:00
UTC daily by default; null: no schedule). What each step did (change sets compacted, rows
deleted, bytes freed) is its output metadata, on the run's page in the UI, under names that say
what was measured (store.maintenance.Shrink.metadata). `dataverse-assets compact` runs the same
steps from the command line.
"""

from dagster import (
    DefaultScheduleStatus,
    In,
    JobDefinition,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Out,
    Output,
    ScheduleDefinition,
    job,
    op,
)

from dataverse_assets.config import EntitiesConfig
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.store.archive_retention import compact_archive
from dataverse_assets.store.locks import every_entity_lock
from dataverse_assets.store.maintenance import retain_bookkeeping, shrink_database

MAINTENANCE_JOB = "maintenance"


def build_maintenance_job(config: EntitiesConfig) -> JobDefinition:
    policy = config.maintenance

    @op(out=Out(Nothing), description="Compacts old change sets into Parquet, applies archive "
        "retention and deletes the staged rows of old published change sets.")
    def compact_archive_and_staging(context: OpExecutionContext, store: MirrorStore):
        report = compact_archive(store.archive_storage(), config, db_path=store.db_path)
        for note in report.notes:
            context.log.warning(note)
        yield Output(None, metadata={
            "change_sets_compacted": len(report.compacted),
            "change_sets_deleted": len(report.deleted),
            "staged_rows_pruned": sum(p.rows for p in report.staging_pruned),
            "archive_bytes_before": report.bytes_before,
            "archive_bytes_after": report.bytes_after,
            "bytes_freed": max(0, report.bytes_before - report.bytes_after),
        })

    @op(ins={"after": In(Nothing)}, out=Out(Nothing),
        description="Deletes bookkeeping rows past their retention (maintenance settings).")
    def retain_bookkeeping_rows(context: OpExecutionContext, store: MirrorStore):
        with store.connection() as connection:
            deleted = retain_bookkeeping(connection, config)
        yield Output(None, metadata={
            "rows_deleted": sum(deleted.values()),
            "by_table": MetadataValue.json(deleted),
        })

    @op(ins={"after": In(Nothing)}, out=Out(Nothing),
        description="Gives the space freed by retention back: a SQLite file's free pages to "
        "the file system (incremental vacuum, a few megabytes per transaction); a PostgreSQL "
        "database is vacuumed (VACUUM (ANALYZE)).")
    def shrink_mirror_file(context: OpExecutionContext, store: MirrorStore):
        if not policy.shrink_file:
            yield Output(None, metadata={"skipped": "maintenance.shrink_file is false"})
            return
        shrink = shrink_database(store.db_path, exclusive=lambda: every_entity_lock(
            store.db_path, [e.name for e in config.entities], owner=context.run.run_id,
            purpose="maintenance", wait_seconds=store.lock_wait_seconds,
            warn=context.log.warning))
        if shrink.converted:
            context.log.info("converted the database to incremental vacuum (one VACUUM)")
        for warning in shrink.warnings():
            context.log.warning(warning)
        yield Output(None, metadata=shrink.metadata())

    @job(name=MAINTENANCE_JOB, description="Compaction and retention of the archive and "
         "staging, bookkeeping retention, and shrinking the mirror store.")
    def maintenance():
        shrink_mirror_file(retain_bookkeeping_rows(compact_archive_and_staging()))

    return maintenance


def build_maintenance_schedule(config: EntitiesConfig) -> ScheduleDefinition | None:
    """On `maintenance.cron`, running by default (it touches nothing at the source); None when
    the cron is null."""
    cron = config.maintenance.cron
    if cron is None:
        return None
    return ScheduleDefinition(
        name="maintenance_schedule", cron_schedule=cron, job_name=MAINTENANCE_JOB,
        execution_timezone="UTC", default_status=DefaultScheduleStatus.RUNNING,
        description=f"Runs the maintenance job ({cron}, UTC): compaction, retention and "
        "shrinking the file, so nothing grows without bound.",
    )
