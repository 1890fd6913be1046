"""`dataverse-assets`: the operations command line.

Every sync goes through Dagster (a change-set partition is registered and the group's job
runs against the persistent instance in DAGSTER_HOME), so the UI shows what the CLI did.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import textwrap
import threading
import time
from collections.abc import Iterable
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from dagster import AssetKey, DagsterInstance

from dataverse_assets.archive.change_sets import ChangeSetArchive
from dataverse_assets.archive.storage import storage_of
from dataverse_assets.config import PROJECT_ROOT, Settings, environment_variables, parse_store_url
from dataverse_assets.config import load_settings as load_environment_settings
from dataverse_assets.defs.checks import divergence
from dataverse_assets.defs.definitions import build_definitions, build_source
from dataverse_assets.defs.partitions import add_change_sets, register_change_set
from dataverse_assets.defs.schedules import sync_job_name
from dataverse_assets.defs.sensors import root_cause
from dataverse_assets.errors import (
    ArchiveError,
    ConfigError,
    EntityLockedError,
    InvalidNameError,
    RebuildError,
    StorageError,
    UnknownNameError,
)
from dataverse_assets.names import (
    check_change_set_key,
    check_column_name,
    check_entity_name,
    check_record_id,
    unknown_name,
)
from dataverse_assets.ops.doctor import doctor_passed, render_checks, run_doctor
from dataverse_assets.ops.plan_view import render_plan
from dataverse_assets.ops.purge import check_purgeable, purge_column
from dataverse_assets.ops.rebuild import archived_change_sets, rebuild, register_archived
from dataverse_assets.ops.recording import key_columns, record_fixtures
from dataverse_assets.ops.report import write_report
from dataverse_assets.ops.status import change_set_list, entity_status, next_run
from dataverse_assets.ops.terminal import SyncProgress, ago, print_table, until, wall_time_line
from dataverse_assets.store import dead_letters
from dataverse_assets.store.archive_retention import compact_archive
from dataverse_assets.store.bookkeeping import change_set_used, step_details
from dataverse_assets.store.choices import label_counts
from dataverse_assets.store.db import connect, view_names
from dataverse_assets.store.issues import list_issues
from dataverse_assets.store.lifecycle import store_exists
from dataverse_assets.store.locks import every_entity_lock
from dataverse_assets.store.maintenance import retain_bookkeeping, shrink_database
from dataverse_assets.store.mirror import Mirror
from dataverse_assets.store.readable import readable_view
from dataverse_assets.store.tables import refuse_long_entity_names
from dataverse_assets.sync.progress import (
    TERMINAL_INTERVAL_SECONDS,
    ProgressReporter,
    ProgressSink,
    ProgressUpdate,
    listening,
)

if TYPE_CHECKING:
    from dataverse_assets.simulator import DataverseSimulator


def _instance():
    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(PROJECT_ROOT / ".dagster_home")
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    settings_file = home / "dagster.yaml"
    if not settings_file.exists():
        # A project-local instance: no telemetry calls from a mirror that runs offline.
        settings_file.write_text("telemetry:\n  enabled: false\n")
    return DagsterInstance.get()


def _connection(settings):
    """The mirror's store (a SQLite file or a PostgreSQL database), closed when the block
    ends."""

    return closing(connect(settings.store.address))


def _unknown(kind: str, name: str, names: Iterable[str]) -> UnknownNameError:
    return UnknownNameError(unknown_name(kind, name, names))


def _configured_entity(config, name: str):
    """The entity's config, or an error naming it (with the closest configured name)."""
    check_entity_name(name)
    try:
        return config.entity(name)
    except KeyError:
        raise _unknown("entity", name, (e.name for e in config.entities)) from None


def _configured_group(config, name: str) -> str:
    """A group that has entities, or an error naming it (with the closest group)."""
    if name not in config.groups:
        raise _unknown("group", name, config.groups)
    return name


def _known_entity(settings, connection, name: str) -> str:
    """An entity configured or with change sets in the database (read-only commands show
    what the mirror holds, also of entities no longer configured)."""
    check_entity_name(name)
    names = {e.name for e in settings.entities.entities}
    names |= {entity for (entity,) in connection.execute(
        "SELECT DISTINCT entity FROM _publish_state")}
    if name not in names:
        raise _unknown("entity", name, names)
    return name


def new_change_set_key(instance, group: str, now: datetime | None = None,
                       settings=None) -> str:
    """Register a new change-set partition for a group; keys are sortable UTC timestamps.
    With `settings`, a key the mirror already used is skipped too: the archive or the
    database may hold change sets of another Dagster instance (a DAGSTER_HOME wiped or
    changed), and reusing one would replay it instead of syncing."""

    used = None
    if settings is not None:
        entities = [e.name for e in settings.entities.entities_in_group(group)]
        archive = storage_of(settings)

        def used(key: str) -> bool:
            if any(ChangeSetArchive(archive, entity, key).exists() for entity in entities):
                return True
            with _connection(settings) as connection:
                return change_set_used(connection, key, entities)

    return register_change_set(instance, group, now, used)


def _summary_rows(settings, change_set: str, entities: list[str],
                  progress: SyncProgress | None = None) -> list[dict]:
    """One row per entity: what was fetched and published, and the seconds of our own steps
    (fetch and publish from the step log, staging as the terminal measured it)."""
    with _connection(settings) as connection:
        rows = []
        for entity in entities:
            fetched = step_details(connection, entity, change_set, "raw")
            published = step_details(connection, entity, change_set, "canonical")
            staging = progress.step_seconds(entity) if progress is not None else 0.0
            rows.append({
                "entity": entity,
                "status": "ok" if published else "FAILED",
                "mode": fetched.get("mode", "-"),
                "fetched": fetched.get("records", 0),
                "created": published.get("created", 0),
                "updated": published.get("updated", 0),
                "deleted": published.get("deleted", 0),
                "unchanged": published.get("unchanged", 0),
                "stale": published.get("stale", 0),
                "pages": fetched.get("pages", 0),
                "seconds": round(fetched.get("seconds", 0) + staging
                                 + published.get("seconds", 0), 2),
            })
        return rows


def _warn_stale(rows: list[dict], change_set: str) -> None:
    """Stale records were older than the mirror's version and were not applied: say so."""
    for row in rows:
        if row.get("stale"):
            print(f"warning: {row['entity']}: {row['stale']} record(s) of change set "
                  f"{change_set} were older than the mirrored version and were not applied "
                  f"(stale); see `dataverse-assets plan show {row['entity']} {change_set}`",
                  file=sys.stderr)


def _in_process(settings):
    """The CLI runs a job in its own process (execute_in_process), whatever DATAVERSE_EXECUTOR
    says for Dagster's runs: its entities then fetch in parallel threads."""
    return settings.model_copy(update={"executor": "in_process"})


def cmd_sync(args: argparse.Namespace) -> int:
    settings = load_settings()
    config = settings.entities
    groups = ([_configured_group(config, g) for g in args.group] if args.group
              else [g for g in config.groups if config.entities_in_group(g)])
    instance = _instance()
    defs = build_definitions(_in_process(settings))
    print(f"source: {settings.source}; database: {settings.store.address}")
    failed = False
    for group in groups:
        key = new_change_set_key(instance, group, settings=settings)
        print(f"\n[{group}] change set {key}", flush=True)
        job = defs.resolve_job_def(sync_job_name(group))
        started = time.perf_counter()
        # Long phases show rows, rate and ETA; each entity gets a line when it is done.
        with SyncProgress() as progress, listening(progress):
            result = job.execute_in_process(
                instance=instance, partition_key=key, raise_on_error=False,
                # Every event is in the UI; the terminal gets the summary and real problems.
                run_config={"loggers": {"console": {"config": {"log_level": args.log_level}}}},
            )
        wall = time.perf_counter() - started
        entities = [e.name for e in config.entities_in_group(group)]
        rows = _summary_rows(settings, key, entities, progress)
        print_table(rows)
        print(wall_time_line(group, len(entities), wall, sum(r["seconds"] for r in rows)))
        _warn_stale(rows, key)
        if not result.success:
            failed = True
            _print_failures(result)
    _print_readable(settings, [e.name for g in groups for e in config.entities_in_group(g)])
    return 1 if failed else 0


def _print_readable(settings, entities: list[str]) -> None:
    """Where to read the mirror with labels: the readable views the sync keeps."""
    with _connection(settings) as connection:
        counts = label_counts(connection)
        present = view_names(connection)
    views = [e for e in entities if readable_view(e) in present]
    if not views:
        return
    labelled = [f"{e} ({counts[e][0]})" for e in views if e in counts]
    print(f"\nreadable views: {len(views)} (<entity>__readable: choice labels, lookup names and"
          f" tables); choice columns in {', '.join(labelled) or 'none'};"
          " see docs/reading-the-mirror.md")


def cmd_change_set_create(args: argparse.Namespace) -> int:
    settings = load_settings()
    group = _configured_group(settings.entities, args.group)
    print(new_change_set_key(_instance(), group, settings=settings))
    return 0


def cmd_change_set_list(args: argparse.Namespace) -> int:
    """Change sets and where their publish stands, newest first."""
    settings = load_settings(credentials=False)
    with _connection(settings) as connection:
        entity = _known_entity(settings, connection, args.entity) if args.entity else None
        rows = change_set_list(connection, entity, args.limit)
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    if not rows:
        print("no change sets" + (f" of {entity}" if entity else ""))
        return 0
    print_table([{**{k: v for k, v in row.items()
                     if k not in ("finished_age_seconds", "error")},
                  "published": ago(row["finished_age_seconds"])} for row in rows])
    for row in rows:
        if row["error"]:
            print(f"  {row['entity']} {row['change_set']} {row['status']}: {row['error']}",
                  file=sys.stderr)
    return 0


def cmd_plan_show(args: argparse.Namespace) -> int:
    settings = load_settings(credentials=False)
    check_change_set_key(args.change_set)
    connection = connect(settings.store.address)
    try:
        # The database's plans, also of entities no longer configured.
        _known_entity(settings, connection, args.entity)
        print(render_plan(connection, args.entity, args.change_set, args.max_rows))
    except LookupError as exc:
        print(f"{exc} in {settings.store.address}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    return 0


def _run_entities(settings, instance, group: str, key: str, entities: list[str],
                  op_config: dict[str, dict] | None = None, log_level: str = "WARNING"):
    """Materialize the three assets of the given entities for one change set, in-process."""


    add_change_sets(instance, group, [key])
    defs = build_definitions(_in_process(settings))
    job = defs.resolve_job_def(sync_job_name(group))
    selection = [AssetKey([layer, e]) for e in entities
                 for layer in ("raw", "staging", "canonical")]
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    if op_config:
        run_config["ops"] = {op: {"config": config} for op, config in op_config.items()}
    return job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False,
                                  asset_selection=selection, run_config=run_config)


# Dagster's message of an error repeats its class, qualified: `Type: package.module.Type: ...`.
_REPEATED_CLASS = re.compile(r"^(\w+): (?:[\w.]+\.)?\1: ")


def _print_failures(result) -> None:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data:
            message = _REPEATED_CLASS.sub(r"\1: ", root_cause(event.step_failure_data.error))
            print(f"  FAILED {event.step_key}: {message}", file=sys.stderr)


def cmd_refresh(args: argparse.Namespace) -> int:
    """Targeted refresh: exactly these records (and, with --with, the records pointing at
    them), as their own change set."""
    settings = load_settings()
    config = settings.entities
    entity = _configured_entity(config, args.entity)
    for record_id in args.id:  # refused before any run starts
        try:
            check_record_id(record_id)
        except InvalidNameError as exc:
            raise ConfigError(f"--id: {exc}") from None
    op_config = {f"raw__{entity.name}": {"ids": args.id}}
    entities = [entity.name]
    for spec in args.with_linked or []:
        other, _, column = spec.partition(":")
        if not column:
            raise ConfigError(f"--with {spec!r}: expected <configured entity>:<lookup column>")
        try:
            _configured_entity(config, other)
            check_column_name(column)  # it goes into the linked table's $filter
        except (ConfigError, InvalidNameError) as exc:
            raise ConfigError(f"--with {spec!r}: {exc}") from None
        if config.entity(other).group != entity.group:
            raise ConfigError(f"--with {spec!r}: {other} is not in group {entity.group!r}")
        op_config[f"raw__{other}"] = {"ids": args.id, "lookup_column": column}
        entities.append(other)
    instance = _instance()
    key = new_change_set_key(instance, entity.group, settings=settings)
    print(f"targeted refresh as change set {key} ({entity.group})", flush=True)
    with SyncProgress() as progress, listening(progress):
        result = _run_entities(settings, instance, entity.group, key, entities, op_config)
    rows = _summary_rows(settings, key, entities, progress)
    print_table(rows)
    _warn_stale(rows, key)
    if not result.success:
        _print_failures(result)
        return 1
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Compare the mirror with the source by key and version now, and repair what diverged,
    as a change set of its own per group."""

    settings = load_settings()
    config = settings.entities
    chosen = ([_configured_entity(config, args.entity)] if args.entity else config.entities)
    instance = _instance()
    failed = False
    for group in dict.fromkeys(e.group for e in chosen):
        entities = [e.name for e in chosen if e.group == group]
        key = new_change_set_key(instance, group, settings=settings)
        print(f"[{group}] reconcile as change set {key}", flush=True)
        with SyncProgress() as progress, listening(progress):
            result = _run_entities(settings, instance, group, key, entities,
                                   {f"raw__{name}": {"reconcile": True} for name in entities})
        rows = []
        with _connection(settings) as connection:
            for name in entities:
                found = divergence(connection, name, key)
                rows.append({"entity": name, **({"mode": "-", "scanned": "-", "missing": "-",
                                                 "stale": "-", "extra": "-"} if found is None
                                                else found)})
        print_table(rows)
        if not result.success:
            failed = True
            _print_failures(result)
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    settings = load_settings(credentials=False)
    connection = connect(settings.store.address)
    try:
        entity = _known_entity(settings, connection, args.entity) if args.entity else None
        rows = entity_status(connection, settings.entities)
    finally:
        connection.close()
    rows = [row for row in rows if entity is None or row["entity"] == entity]
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    groups = settings.entities.groups
    print_table([{
        "entity": row["entity"],
        "group": row["group"],
        "mode": row["mode"],
        "last_change_set": row["last_change_set"],
        "publish_status": row["publish_status"] or row["sync_status"],
        "published": ago(row["published_age_seconds"]),
        "next_run": until(next_run(groups[row["group"]].cron)) if row["group"] in groups
        else "-",
        "rows": row["rows"],
        "open_issues": row["open_issues"],
        "dead_letters": row["dead_letters"],
        "queued_retries": row["queued_retries"],
    } for row in rows])
    for row in rows:
        if row["publish_status"] == "FAILED" and row["last_error"]:
            print(f"  {row['entity']} {row['last_change_set']} FAILED: {row['last_error']}",
                  file=sys.stderr)
    return 0


def cmd_issues(args: argparse.Namespace) -> int:
    settings = load_settings(credentials=False)
    connection = connect(settings.store.address)
    try:
        if args.entity is not None:
            _known_entity(settings, connection, args.entity)
        issues = list_issues(connection, args.entity, args.limit, include_resolved=args.all)
    finally:
        connection.close()
    if args.json:
        print(orjson.dumps(issues, option=orjson.OPT_INDENT_2).decode())
    elif not issues:
        print("no issues" if args.all else "no open issues")
    for issue in [] if args.json else issues:
        seen = issue["change_set"] + (
            f"..{issue['last_change_set']}, {issue['occurrences']} change sets"
            if issue["occurrences"] > 1 else "")
        record = f" record {issue['record_id']}" if issue["record_id"] else ""
        field = f" field {issue['field']}" if issue["field"] else ""
        resolved = f" [resolved {issue['resolved_at']}]" if issue["resolved_at"] else ""
        print(f"#{issue['id']} {issue['entity']} ({seen}){record}{field}: {issue['problem']}"
              + (f" ({issue['context']})" if issue["context"] else "") + resolved)
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    # Only a requeue talks to the source; listing, showing and dropping read the database.
    settings = load_settings(credentials=args.dlq_command == "requeue")
    connection = connect(settings.store.address)
    try:
        if args.dlq_command == "list":
            letters = dead_letters.list_dead_letters(connection, include_closed=args.all)
            if args.json:
                print(orjson.dumps(letters, option=orjson.OPT_INDENT_2).decode())
            elif letters:
                print_table([{k: v for k, v in letter.items() if k != "reason"}
                              for letter in letters])
            else:
                print("no dead letters")
            return 0
        try:
            letter = dead_letters.get_dead_letter(connection, args.id)
        except LookupError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        if args.dlq_command == "show":
            print(orjson.dumps(letter, option=orjson.OPT_INDENT_2).decode())
            return 0
        if args.dlq_command == "drop":
            dead_letters.set_dead_letter_status(connection, args.id, "dropped")
            print(f"dropped dead letter {args.id} ({letter['entity']} {letter['change_set']})")
            return 0
        # requeue: publish the change set again now, through Dagster.
        check_change_set_key(letter["change_set"])
        dead_letters.set_dead_letter_status(connection, args.id, "requeued")
    finally:
        connection.close()
    entity = settings.entities.entity(letter["entity"])
    print(f"requeued {letter['entity']} change set {letter['change_set']}")
    result = _run_entities(settings, _instance(), entity.group, letter["change_set"],
                           [entity.name])
    if not result.success:
        _print_failures(result)
        connection = connect(settings.store.address)
        try:
            dead_letters.set_dead_letter_status(connection, args.id, "open")
        finally:
            connection.close()
        return 1
    print("published; the dead letter is resolved")
    return 0


def _row_counts(items: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        name, _, count = item.partition("=")
        try:
            counts[name.strip()] = int(count)
        except ValueError:
            raise ConfigError(
                f"--rows {item!r}: expected ENTITY=COUNT, e.g. accounts=1000000") from None
    return counts


def build_simulator(args: argparse.Namespace) -> DataverseSimulator:
    """The simulator `dataverse-assets simulator` serves, as its flags describe it."""
    from dataverse_assets.simulator import (
        DataverseSimulator,
        FaultPlan,
        LatencyModel,
        ServiceProtectionLimits,
    )

    settings = load_settings()
    row_counts = _row_counts(args.rows or [])
    names = [e.name for e in settings.entities.entities]
    names += [name for name in row_counts if name not in names]
    simulator = DataverseSimulator(names, seed=args.seed, row_counts=row_counts,
                                   paging=args.paging,
                                   delta_token_moment=args.delta_token_moment)
    if args.limits == "dataverse" or args.realistic:
        simulator.limits = ServiceProtectionLimits.dataverse()
    if args.realistic:
        simulator.latency = LatencyModel.dataverse(seed=args.seed)
    if args.faults:
        try:
            simulator.fault_plan = FaultPlan.parse(args.faults)
        except ValueError as exc:
            raise ConfigError(f"--faults: {exc}") from None
    return simulator


def cmd_simulator(args: argparse.Namespace) -> int:
    from dataverse_assets.simulator import serve_on_loopback

    simulator = build_simulator(args)
    with serve_on_loopback(simulator, port=args.port, control=args.control) as url:
        print(f"Dataverse simulator on {url} (DATAVERSE_URL={url} DATAVERSE_SOURCE=simulator)",
              flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


def _print_progress(update: ProgressUpdate) -> None:
    print(f"  {update.line()}", file=sys.stderr, flush=True)


# -- diagnostics: doctor, fixtures record, report -------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    checks = run_doctor(only_entities=args.entity)
    if args.json:
        print(orjson.dumps({"ok": doctor_passed(checks),
                            "checks": [c.as_dict() for c in checks]},
                           option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_checks(checks))
    return 0 if doctor_passed(checks) else 1


def cmd_fixtures_record(args: argparse.Namespace) -> int:
    settings = load_settings()
    config = settings.entities
    for name in args.entity or []:
        _configured_entity(config, name)
    # Resolved here (EnvVar fields are read from the environment), never printed.
    source = build_source(settings, config).process_config_and_initialize()
    if args.pages < 1 or not 1 <= (args.page_size or 1) <= 5000:
        raise ConfigError("--pages must be at least 1 and --page-size between 1 and 5000")
    out = Path(args.out)
    recorded = asyncio.run(record_fixtures(
        source, config, out, entities=args.entity, max_pages=args.pages,
        page_size=args.page_size, scrub=args.scrub or (),
        salt=args.salt.encode() if args.salt else None))
    for entity in recorded:
        extra = f", {entity.single_records} single records" if entity.single_records else ""
        more = (f" (stopped after {args.pages} page(s) per query)"
                if entity.truncated_queries else "")
        print(f"{entity.entity}: {entity.pages} pages, {entity.records} records{extra}, "
              f"mode {entity.mode}{', metadata' if entity.metadata else ''}{more}")
    keys = sorted(set(args.scrub or ()) & key_columns(config, {}))
    if keys:
        print(f"note: scrubbed key columns {keys}: scrub every column that names the same "
              "records too (lookups, junction ids), or links will not match", file=sys.stderr)
    print(f"wrote {out}; replay with DATAVERSE_SOURCE=fixture DATAVERSE_FIXTURES_DIR={out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    settings = load_settings(credentials=False)
    connection = connect(settings.store.address)
    try:
        report = write_report(connection, settings.entities, Path(args.out),
                              database=settings.store.address)
    finally:
        connection.close()
    states = ", ".join(f"{e.entity} {e.state}" for e in report.entities)
    print(f"wrote {args.out}: {len(report.points)} change sets; {states}")
    return 0


# -- the archive: rebuild, compact, archived keys as partitions ------------------------------

def _rebuild_target(into: str) -> str:
    """`rebuild --into`'s store address: a SQLite path, or a store URL (parsed as
    DATAVERSE_STORE_URL is: a URL with a password is refused, without echoing it)."""
    if "://" not in into and not into.startswith("sqlite:"):
        return into
    try:
        target = parse_store_url(into)
    except ValueError as exc:
        raise ConfigError(f"--into: {exc}") from None
    return target.address


def cmd_rebuild(args: argparse.Namespace) -> int:
    settings = load_settings()
    into = _rebuild_target(args.into)
    print(f"rebuilding {into} from {settings.archive_location}")
    try:
        report = rebuild(
            settings.entities, storage_of(settings), into, force=args.force,
            live_db_path=settings.store.address,
            on_entity=lambda e: print(
                f"  {e.entity}: {e.change_sets} change sets, {e.rows:,} rows, "
                f"{e.seconds:.2f} s", flush=True),
            # A long entity shows records replayed, rows/s and ETA every few seconds.
            progress_for=lambda entity: ProgressReporter(entity, "rebuild", [ProgressSink(
                _print_progress, TERMINAL_INTERVAL_SECONDS, final_only_after_progress=True)]),
            skip_corrupt=args.skip_corrupt,
        )
    except RebuildError as exc:
        print(f"rebuild: {exc}", file=sys.stderr)
        return 1
    print()
    print_table(report.rows_table())
    print(report.lines()[-1])
    for skipped in report.skipped:
        print(f"skipped {skipped.entity} {skipped.change_set} (damaged, --skip-corrupt): "
              f"{skipped.reason}", file=sys.stderr)
    if report.skipped:
        print(f"warning: {len(report.skipped)} change set(s) left out: {into} holds "
              "everything else; it differs from the mirror where they made changes",
              file=sys.stderr)
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    settings = load_settings()
    report = compact_archive(
        storage_of(settings), settings.entities, db_path=settings.store.address,
        older_than_days=args.older_than_days, retention=not args.no_retention,
        dry_run=args.dry_run,
    )
    print_table(report.rows())
    for decision in report.deleted:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"  {verb} {decision.entity} {decision.change_set}: {decision.reason}")
    for prune in report.staging_pruned:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"  {verb} the {prune.rows:,} staged rows of {prune.entity} {prune.change_set}"
              " (published; staging retention)")
    for note in report.notes:
        print(f"  {note}", file=sys.stderr)
    before, after = report.bytes_before, report.bytes_after
    print(f"archive {settings.archive_location}: {before:,} bytes -> {after:,} bytes"
          + (f" ({after / before:.0%})" if before else "")
          + (" (dry run: nothing changed)" if args.dry_run else ""))
    if args.no_retention or not store_exists(settings.store.address):
        return 0  # no mirror yet: nothing to retain or shrink (and none is made)

    with _connection(settings) as connection:
        deleted = retain_bookkeeping(connection, settings.entities, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for table, rows in deleted.items():
        if rows:
            print(f"  {verb} {rows:,} rows of {table} (retention: maintenance settings)")
    if not args.dry_run and settings.entities.maintenance.shrink_file:
        address = settings.store.address
        shrink = shrink_database(address, exclusive=lambda: every_entity_lock(
            address, [e.name for e in settings.entities.entities],
            owner=f"dataverse-assets compact ({os.getpid()})", purpose="maintenance",
            wait_seconds=settings.lock_wait_seconds))
        if shrink.vacuumed:
            print(f"database {address}: {shrink.bytes_before:,} bytes -> "
                  f"{shrink.bytes_after:,} bytes (vacuumed and analyzed)")
        else:
            print(f"database {address}: {shrink.bytes_before:,} bytes -> "
                  f"{shrink.bytes_after:,} bytes ({shrink.pages_freed:,} free pages given back"
                  + (", converted to incremental vacuum" if shrink.converted else "") + ")")
            print(f"staging file: {shrink.staging_bytes_before:,} bytes -> "
                  f"{shrink.staging_bytes_after:,} bytes")
        for warning in shrink.warnings():
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_register_archived(args: argparse.Namespace) -> int:
    settings = load_settings()
    config = settings.entities
    _configured_group(config, args.group)
    archived = archived_change_sets(config, storage_of(settings), args.group)
    register_archived(_instance(), args.group, list(archived))
    group_entities = {e.name for e in config.entities_in_group(args.group)}
    for key, entities in archived.items():
        print(key)
        if set(entities) != group_entities:
            print(f"  {key} archives only {', '.join(entities)}: materialize those assets",
                  file=sys.stderr)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    settings = load_settings()
    entity = _configured_entity(settings.entities, args.entity)
    check_purgeable(entity, args.column)
    if not args.yes:
        print(f"would erase {args.column!r} of {entity.name} from the mirror "
              f"({settings.store.address}:"
              f" {entity.name}, its history and staging, the change log) and from every "
              f"archived change set in {settings.archive_location}; this cannot be undone. Run "
              "again with --yes to do it.")
        return 0
    mirror = Mirror.of(settings)
    with mirror.entity_lock(entity.name, owner=f"dataverse-assets purge ({os.getpid()})",
                            purpose="purge"):
        result = purge_column(mirror, entity, args.column)
    for table, rows in result.rows.items():
        print(f"  {table}: {rows:,} rows had it; now NULL, json_response without it")
    print(f"  change log: {result.change_log_rows:,} rows; issues: {result.issues:,}")
    print(f"  archive: {result.archive_pages:,} pages of {result.change_sets:,} change sets "
          "rewritten")
    print(f"purged {args.column!r} from {entity.name}")
    return 0


# -- the command line: every command and option says what it does, its default, an example --

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs keep their lines (examples, the variables); an option with a default that is
    not stated in its help gets `(default: ...)`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: {default})"


def _environment_epilog() -> str:
    """Every variable the settings read (from the settings model), and DAGSTER_HOME."""
    variables = [(variable, what + ("" if default == "-" else f" (default: {default})"))
                 for variable, what, default in environment_variables()]
    variables.append(("DAGSTER_HOME", "The Dagster instance the CLI's runs go to "
                      "(default: .dagster_home)"))
    lines = ["environment variables (also read from .env in the project root):"]
    for variable, what in variables:
        lines.append(f"  {variable}")
        lines.extend(textwrap.wrap(what, width=92, initial_indent="      ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


def _command(commands, name: str, summary: str, examples: list[str],
             details: str = "") -> argparse.ArgumentParser:
    """A subcommand with its one-line help, a description and examples."""
    return commands.add_parser(
        name, help=summary,
        description=textwrap.fill(summary, 92) + (f"\n\n{textwrap.fill(details, 92)}"
                                                  if details else ""),
        formatter_class=_HelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {example}" for example in examples))


def _subcommands(parser: argparse.ArgumentParser, dest: str):
    return parser.add_subparsers(dest=dest, required=True, metavar="COMMAND")


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print JSON for machines instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dataverse-assets", description=__doc__, formatter_class=_HelpFormatter,
        epilog=_environment_epilog() + "\n\nexamples:\n  dataverse-assets sync\n"
        "  dataverse-assets status\n  dataverse-assets sync --help")
    commands = _subcommands(parser, "command")
    _add_sync_commands(commands)
    _add_read_commands(commands)
    _add_diagnostics_commands(commands)
    _add_archive_commands(commands)
    return parser


def _add_sync_commands(commands) -> None:
    sync = _command(commands, "sync", "sync every entity (or a group) through Dagster",
                    ["dataverse-assets sync", "dataverse-assets sync --group hourly"],
                    "Each group gets a new change set; progress goes to stderr, the summary "
                    "(with the wall time and Dagster's overhead) to stdout.")
    sync.add_argument("--group", action="append", metavar="GROUP",
                      help="only this cadence group (repeatable; default: every group with "
                      "entities)")
    sync.add_argument("--log-level", default="WARNING",
                      choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                      help="Dagster's console log level")
    sync.set_defaults(handler=cmd_sync)

    refresh = _command(
        commands, "refresh", "targeted refresh of records by id, as their own change set",
        ["dataverse-assets refresh accounts --id 5b3f2c1e-0000-4000-8000-000000000001",
         "dataverse-assets refresh accounts --id <guid> --with contacts:_parentcustomerid_value"])
    refresh.add_argument("entity", help="a configured entity, e.g. accounts")
    refresh.add_argument("--id", action="append", required=True, metavar="GUID",
                         help="primary key (repeatable; required)")
    refresh.add_argument("--with", dest="with_linked", action="append",
                         metavar="ENTITY:LOOKUP_COLUMN",
                         help="also refresh the records of ENTITY whose LOOKUP_COLUMN names "
                              "the ids, e.g. contacts:_parentcustomerid_value (default: none)")
    refresh.set_defaults(handler=cmd_refresh)

    reconcile = _command(
        commands, "reconcile", "compare the mirror with the source by key and version now; "
        "missing and stale records are fetched again, extra ones deleted",
        ["dataverse-assets reconcile", "dataverse-assets reconcile accounts"])
    reconcile.add_argument("entity", nargs="?",
                           help="only this entity (default: every configured one)")
    reconcile.set_defaults(handler=cmd_reconcile)

    change_set = _command(commands, "change-set", "change sets: list them, register keys",
                          ["dataverse-assets change-set list accounts",
                           "dataverse-assets change-set create --group hourly"])
    change_set_commands = _subcommands(change_set, "change_set_command")
    listing = _command(change_set_commands, "list",
                       "change sets with their publish state, newest first (read-only)",
                       ["dataverse-assets change-set list",
                        "dataverse-assets change-set list accounts --limit 10"])
    listing.add_argument("entity", nargs="?", help="only this entity (default: every entity)")
    listing.add_argument("--limit", type=int, default=50, help="change sets shown")
    _json_option(listing)
    listing.set_defaults(handler=cmd_change_set_list)
    create = _command(change_set_commands, "create",
                      "register a new change-set key for a group (prints it)",
                      ["dataverse-assets change-set create --group hourly"])
    create.add_argument("--group", required=True, help="a cadence group (required)")
    create.set_defaults(handler=cmd_change_set_create)
    archived = _command(
        change_set_commands, "register-archived",
        "register the archived change sets of a group as partitions; prints the keys, "
        "oldest first", ["dataverse-assets change-set register-archived --group hourly"])
    archived.add_argument("--group", required=True, help="a cadence group (required)")
    archived.set_defaults(handler=cmd_register_archived)


def _add_read_commands(commands) -> None:
    """Commands that only read the database: they need no credentials."""
    status = _command(
        commands, "status", "per-entity status: last change set, published when, next "
        "scheduled run, rows, issues, dead letters (read-only)",
        ["dataverse-assets status", "dataverse-assets status accounts --json"])
    status.add_argument("entity", nargs="?", help="only this entity (default: every one)")
    _json_option(status)
    status.set_defaults(handler=cmd_status)

    issues = _command(
        commands, "issues", "records that could not be staged or fetched (open ones: a record "
        "that stages cleanly later resolves its issues) (read-only)",
        ["dataverse-assets issues", "dataverse-assets issues --entity contacts --all"])
    issues.add_argument("--entity", help="only this entity (default: every entity)")
    issues.add_argument("--all", action="store_true",
                        help="include resolved issues (default: open ones only)")
    issues.add_argument("--limit", type=int, default=100, help="issues shown")
    _json_option(issues)
    issues.set_defaults(handler=cmd_issues)

    dlq = _command(commands, "dlq", "dead letters: change sets that failed every retry",
                   ["dataverse-assets dlq list", "dataverse-assets dlq requeue 3"])
    dlq_commands = _subcommands(dlq, "dlq_command")
    dlq_list = _command(dlq_commands, "list", "list open dead letters (read-only)",
                        ["dataverse-assets dlq list", "dataverse-assets dlq list --all --json"])
    dlq_list.add_argument("--all", action="store_true",
                          help="include resolved and dropped ones (default: open ones only)")
    _json_option(dlq_list)
    for name, summary in (
            ("show", "print one dead letter with its reason and retry history (read-only)"),
            ("requeue", "publish its change set again now, through Dagster"),
            ("drop", "give up on it: mark it dropped")):
        command = _command(dlq_commands, name, summary, [f"dataverse-assets dlq {name} 3"])
        command.add_argument("id", type=int, help="the dead letter's id (see dlq list)")
    dlq.set_defaults(handler=cmd_dlq)

    plan = _command(commands, "plan", "publish plans",
                    ["dataverse-assets plan show accounts 20261122T101500Z"])
    plan_commands = _subcommands(plan, "plan_command")
    show = _command(plan_commands, "show", "print the plan of a change set: counts, then rows "
                    "by kind with the changed fields (read-only)",
                    ["dataverse-assets plan show accounts 20261122T101500Z --max-rows 10"])
    show.add_argument("entity", help="the entity, e.g. accounts")
    show.add_argument("change_set", help="the change-set key, e.g. 20261122T101500Z")
    show.add_argument("--max-rows", type=int, default=50, help="rows shown per kind")
    show.set_defaults(handler=cmd_plan_show)

    report = _command(commands, "report", "write a self-contained HTML status page "
                      "(read-only)", ["dataverse-assets report --out status.html"])
    report.add_argument("--out", default="status.html", help="the HTML file to write")
    report.set_defaults(handler=cmd_report)


def _add_diagnostics_commands(commands) -> None:
    simulator = _command(
        commands, "simulator", "serve the Dataverse simulator on loopback",
        ["dataverse-assets simulator --port 8765",
         "dataverse-assets simulator --rows accounts=1000000 --limits dataverse",
         "dataverse-assets simulator --realistic"])
    simulator.add_argument("--port", type=int, default=8765, help="the port; 0 picks a free one")
    simulator.add_argument("--seed", type=int, default=42, help="seed of the generated org")
    simulator.add_argument("--rows", action="append", metavar="ENTITY=COUNT",
                           help="table size (repeatable; default: the simulator's sizes); "
                           "tables over 100,000 rows are generated on demand, e.g. "
                           "--rows accounts=1000000")
    simulator.add_argument("--control", action="store_true",
                           help="serve /_simulator/stats and /_simulator/mutate (benchmarks)")
    simulator.add_argument("--limits", choices=("off", "dataverse"), default="off",
                           help="service protection limits: off, or Dataverse's per-user "
                           "6000 requests / 1200 s / 52 concurrent per 300 s")
    simulator.add_argument("--realistic", action="store_true",
                           help="serve at a real org's pace: ~1 s per 5,000-row page "
                                "(LatencyModel.dataverse()) and Dataverse's service protection "
                                "limits (implies --limits dataverse)")
    simulator.add_argument("--paging", choices=("cookie", "page_number"), default="cookie",
                           help="page_number: legacy paging, each page sliced from the result "
                           "as it is then (an edit between pages skips or repeats a row)")
    simulator.add_argument("--delta-token-moment", choices=("first_page", "last_page"),
                           default="first_page",
                           help="last_page: a read's delta token marks its last page, so an "
                           "edit of a row already served is in no delta")
    simulator.add_argument("--faults", metavar="SCENARIO",
                           help="seeded random faults (default: none), e.g. "
                           "'seed=1,server_error=0.02,reset=0.01,slow=0.05,malformed=0.01'")
    simulator.set_defaults(handler=cmd_simulator)

    doctor = _command(commands, "doctor",
                      "read-only checks of the configuration against the org",
                      ["dataverse-assets doctor", "dataverse-assets doctor --entity accounts"])
    doctor.add_argument("--entity", action="append",
                        help="only this entity (repeatable; default: every one)")
    _json_option(doctor)
    doctor.set_defaults(handler=cmd_doctor)

    fixtures = _command(commands, "fixtures", "recorded responses for the fixture source",
                        ["dataverse-assets fixtures record --out fixtures/"])
    fixtures_commands = _subcommands(fixtures, "fixtures_command")
    record = _command(
        fixtures_commands, "record", "record a page or two of each entity, its metadata and "
        "the records filtered entities ask for, into DIR",
        ["dataverse-assets fixtures record --out fixtures/ --entity accounts --scrub "
         "emailaddress1"])
    record.add_argument("--out", required=True, metavar="DIR",
                        help="the directory to write (required)")
    record.add_argument("--entity", action="append",
                        help="only this entity (repeatable; linking tables of filtered "
                        "entities are added; default: every one)")
    record.add_argument("--pages", type=int, default=2, help="pages per query")
    record.add_argument("--page-size", type=int,
                        help="rows per page (default: the entity's configured page size)")
    record.add_argument("--scrub", action="append", metavar="COLUMN",
                        help="replace this column's values with stable fakes (repeatable; "
                        "default: none)")
    record.add_argument("--salt", help="makes the fakes reproducible across recordings "
                        "(default: random per recording)")
    record.set_defaults(handler=cmd_fixtures_record)


def _add_archive_commands(commands) -> None:
    purge = _command(
        commands, "purge", "erase a column the entity no longer selects from the mirror, its "
        "history, staging, change log and archive (personal data)",
        ["dataverse-assets purge --entity contacts --column emailaddress1",
         "dataverse-assets purge --entity contacts --column emailaddress1 --yes"])
    purge.add_argument("--entity", required=True, help="a configured entity (required)")
    purge.add_argument("--column", required=True,
                       help="the column (logical name) to erase (required)")
    purge.add_argument("--yes", action="store_true",
                       help="do it (default: only say what would be erased)")
    purge.set_defaults(handler=cmd_purge)
    rebuild = _command(
        commands, "rebuild", "replay every archived change set into a new database",
        ["dataverse-assets rebuild --into /tmp/rebuilt.db",
         "dataverse-assets rebuild --into postgresql://mirror@dbhost/rebuilt"])
    rebuild.add_argument("--into", required=True,
                         help="the new database: a SQLite file, or the URL of an empty "
                         "PostgreSQL database (postgresql://user@host:5432/database, no "
                         "password) (required)")
    rebuild.add_argument("--force", action="store_true",
                         help="replace an existing file, or drop the tables and views a "
                         "PostgreSQL database holds (default: refuse)")
    rebuild.add_argument("--skip-corrupt", action="store_true",
                         help="leave out change sets with a damaged archive file (reported) "
                         "instead of stopping at the first (default: stop)")
    rebuild.set_defaults(handler=cmd_rebuild)
    compact = _command(
        commands, "compact", "what the maintenance job does: merge old page files into "
        "Parquet, apply the archive, staging and bookkeeping retention, shrink the database "
        "file", ["dataverse-assets compact --dry-run",
                 "dataverse-assets compact --older-than-days 7"])
    compact.add_argument("--older-than-days", type=float,
                         help="compact change sets fetched longer ago than this "
                         "(default: archive.compact_after_days of the entities file)")
    compact.add_argument("--no-retention", action="store_true",
                         help="delete nothing (default: apply the retention rules)")
    compact.add_argument("--dry-run", action="store_true",
                         help="report only (default: do it)")
    compact.set_defaults(handler=cmd_compact)


def load_settings(*args, **kwargs) -> Settings:
    """config.load_settings, refusing a store that cannot be used yet (a PostgreSQL one while
    it is unfinished: every command would otherwise read and write SQLite behind its back)."""
    settings = load_environment_settings(*args, **kwargs)
    refuse_long_entity_names(settings.store.address,
                             [e.name for e in settings.entities.entities],
                             settings.entities_config_path)
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UnknownNameError as exc:  # a typo on the command line, not in the configuration
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except InvalidNameError as exc:  # a key, name or id typed on the command line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StorageError, ArchiveError) as exc:  # the database or archive cannot be used
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except EntityLockedError as exc:  # a run holds the entity longer than the command waits
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
