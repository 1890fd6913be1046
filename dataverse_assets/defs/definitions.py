"""The Dagster definitions: assets from entities_config.json, resources from the environment.

dataverse_assets.definitions builds `defs` from them: what `dagster dev`, `dagster asset
materialize -m dataverse_assets` and the CLI load.
"""

from __future__ import annotations

from dagster import (
    AssetSelection,
    Definitions,
    EnvVar,
    ExecutorDefinition,
    define_asset_job,
    in_process_executor,
    multiprocess_executor,
)

from dataverse_assets.config import EntitiesConfig, Settings
from dataverse_assets.defs.alerts import AlertSettings, build_alert_sensors
from dataverse_assets.defs.assets import build_all_assets
from dataverse_assets.defs.checks import FRESHNESS_JOB, build_freshness_checks
from dataverse_assets.defs.io_managers import (
    ArchiveIOManager,
    CanonicalIOManager,
    SQLiteIOManager,
)
from dataverse_assets.defs.maintenance import build_maintenance_job
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.defs.schedules import build_schedules, sync_job_name
from dataverse_assets.defs.sensors import build_sensors
from dataverse_assets.errors import ConfigError
from dataverse_assets.source.base import DataverseSource
from dataverse_assets.source.fixture import FixtureSource
from dataverse_assets.source.live import LiveDataverseSource
from dataverse_assets.source.replay import ArchiveSource
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.store.tables import refuse_long_entity_names


def build_source(settings: Settings, config: EntitiesConfig) -> DataverseSource:
    """The source resource named by DATAVERSE_SOURCE (the simulator when no URL is set)."""
    if settings.source == "live":
        return LiveDataverseSource(
            url=settings.url or "",
            client_id=EnvVar("DATAVERSE_CLIENT_ID"),
            # EnvVar keeps the value out of the run config the UI displays.
            client_secret=EnvVar("DATAVERSE_CLIENT_SECRET"),
            tenant_id=settings.tenant_id,
            authority=settings.authority,
            max_concurrency=settings.max_concurrency,
            max_response_mb=settings.max_response_mb,
            response_deadline_seconds=settings.response_deadline_seconds,
            budget_dir=_budget_dir(settings),
        )
    if settings.source == "fixture":
        return FixtureSource(directory=str(settings.fixtures_dir))
    if settings.source == "archive":
        # Replays DATAVERSE_ARCHIVE_DIR into DATAVERSE_DB_PATH: raw/E reuses each archived
        # change set; nothing is fetched.
        return ArchiveSource(archive_dir=settings.archive_location,
                             s3_endpoint_url=settings.s3_endpoint_url,
                             s3_region=settings.s3_region)
    return SimulatorSource(
        entity_names=[e.name for e in config.entities], seed=settings.simulator_seed,
        base_url=settings.url, max_concurrency=settings.max_concurrency,
        max_response_mb=settings.max_response_mb,
        response_deadline_seconds=settings.response_deadline_seconds,
        budget_dir=_budget_dir(settings),
    )


def _budget_dir(settings: Settings) -> str | None:
    return str(settings.budget_dir) if settings.budget_dir else None


def build_definitions(settings: Settings, source: DataverseSource | None = None,
                      resources: dict | None = None,
                      alerts: AlertSettings | None = None) -> Definitions:
    """Definitions for given settings; tests pass their own paths and source, and may swap any
    resource (an IO manager of their own: `resources` win over the built ones). `alerts`:
    where the alert sensors send (none are defined without a channel)."""
    config = settings.entities
    refuse_long_entity_names(settings.store.address, [e.name for e in config.entities],
                             settings.entities_config_path)
    store = MirrorStore(db_path=settings.store.address, archive_dir=settings.archive_location,
                        s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region,
                        lock_wait_seconds=settings.lock_wait_seconds)
    jobs = [
        define_asset_job(
            sync_job_name(group),
            selection=AssetSelection.groups(group),
            description=f"Sync every entity of the {group!r} group for one change set.",
        )
        for group in config.groups
        if config.entities_in_group(group)
    ]
    # Freshness runs with each sync (after the publish) and on its own (schedule or UI).
    freshness_checks = build_freshness_checks(config)
    jobs.append(define_asset_job(
        FRESHNESS_JOB, selection=AssetSelection.checks(*freshness_checks),
        description="Freshness of every canonical table against its group's cron.",
    ))
    jobs.append(build_maintenance_job(config))
    return Definitions(
        # In one process, the run's entities fetch in threads; with a process per step,
        # Dagster's executor runs them in parallel itself.
        assets=build_all_assets(config, settings.parallel_entities
                                if settings.executor == "in_process" else 1),
        asset_checks=freshness_checks,
        jobs=jobs,
        schedules=build_schedules(config),
        sensors=[*build_sensors(config),
                 *build_alert_sensors(config, alerts or AlertSettings())],
        # Every job of the code location (the sync jobs, the asset job the UI and `dagster
        # asset materialize` use): steps in the run's own process unless DATAVERSE_EXECUTOR
        # says multiprocess or celery (see Settings.executor).
        executor=_executor(settings.executor),
        resources={
            "source": source or build_source(settings, config),
            "store": store,
            "archive_io_manager": ArchiveIOManager(store=store.location()),
            "sqlite_io_manager": SQLiteIOManager(store=store.location()),
            "canonical_io_manager": CanonicalIOManager(store=store.location()),
            **(resources or {}),
        },
    )


# The broker and result backend of the celery executor, read by the run and by every worker
# from the environment: a URL with a password never enters a run's stored config.
CELERY_BROKER_ENV = "DAGSTER_CELERY_BROKER_URL"
CELERY_BACKEND_ENV = "DAGSTER_CELERY_BACKEND_URL"


def _executor(kind: str) -> ExecutorDefinition:
    """The executor of every job for DATAVERSE_EXECUTOR."""
    if kind == "in_process":
        return in_process_executor
    if kind == "multiprocess":
        return multiprocess_executor
    try:
        from dagster_celery import celery_executor
    except ImportError:
        raise ConfigError("DATAVERSE_EXECUTOR=celery needs dagster-celery: pip install -e "
                          "'.[deploy]'") from None
    return celery_executor.configured(
        {"broker": {"env": CELERY_BROKER_ENV}, "backend": {"env": CELERY_BACKEND_ENV}},
        name="celery")
