"""`dataverse-assets`: the operations command line.

Every sync goes through Dagster (a change-set partition is registered and the group's job
runs against the persistent instance in DAGSTER_HOME), so the UI shows what the CLI did.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from dataverse_assets.config import PROJECT_ROOT, ConfigError, load_settings


def _instance():
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(PROJECT_ROOT / ".dagster_home")
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    settings_file = home / "dagster.yaml"
    if not settings_file.exists():
        # A project-local instance: no telemetry calls from a mirror that runs offline.
        settings_file.write_text("telemetry:\n  enabled: false\n")
    return DagsterInstance.get()


def new_change_set_key(instance, group: str, now: datetime | None = None) -> str:
    """Register a new change-set partition for a group; keys are sortable UTC timestamps."""
    from dataverse_assets.assets import change_sets_partitions

    partitions_name = change_sets_partitions(group).name
    moment = (now or datetime.now(UTC)).replace(microsecond=0)
    key = moment.strftime("%Y%m%dT%H%M%SZ")
    while instance.has_dynamic_partition(partitions_name, key):
        moment += timedelta(seconds=1)
        key = moment.strftime("%Y%m%dT%H%M%SZ")
    instance.add_dynamic_partitions(partitions_name, [key])
    return key


def _summary_rows(settings, change_set: str, entities: list[str]) -> list[dict]:
    from dataverse_assets.store import connect

    connection = connect(settings.db_path)
    try:
        rows = []
        for entity in entities:
            raw = connection.execute(
                "SELECT details FROM _sync_log WHERE entity=? AND change_set=? AND layer='raw'"
                " ORDER BY id DESC LIMIT 1", (entity, change_set)).fetchone()
            canonical = connection.execute(
                "SELECT details FROM _sync_log WHERE entity=? AND change_set=? AND"
                " layer='canonical' ORDER BY id DESC LIMIT 1", (entity, change_set)).fetchone()
            fetched = orjson.loads(raw[0]) if raw else {}
            published = orjson.loads(canonical[0]) if canonical else {}
            rows.append({
                "entity": entity,
                "status": "ok" if canonical else "FAILED",
                "mode": fetched.get("mode", "-"),
                "fetched": fetched.get("records", 0),
                "created": published.get("created", 0),
                "updated": published.get("updated", 0),
                "deleted": published.get("deleted", 0),
                "unchanged": published.get("unchanged", 0),
                "pages": fetched.get("pages", 0),
                "seconds": round(fetched.get("seconds", 0) + published.get("seconds", 0), 2),
            })
        return rows
    finally:
        connection.close()


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(str(r[h])) for r in rows)) for h in headers}
    print("  ".join(h.ljust(widths[h]) for h in headers))
    for row in rows:
        print("  ".join(str(row[h]).rjust(widths[h]) if isinstance(row[h], int | float)
                        else str(row[h]).ljust(widths[h]) for h in headers))


def cmd_sync(args: argparse.Namespace) -> int:
    from dataverse_assets.definitions import build_definitions, sync_job_name

    settings = load_settings()
    config = settings.entities
    groups = args.group or [g for g in config.groups if config.entities_in_group(g)]
    unknown = [g for g in groups if g not in config.groups]
    if unknown:
        raise ConfigError(f"unknown group(s) {unknown}; the groups are {sorted(config.groups)}")
    instance = _instance()
    defs = build_definitions(settings)
    print(f"source: {settings.source}; database: {settings.db_path}")
    failed = False
    for group in groups:
        key = new_change_set_key(instance, group)
        print(f"\n[{group}] change set {key}")
        job = defs.resolve_job_def(sync_job_name(group))
        result = job.execute_in_process(
            instance=instance, partition_key=key, raise_on_error=False,
            # Every event is in the UI; the terminal gets the summary and real problems.
            run_config={"loggers": {"console": {"config": {"log_level": args.log_level}}}},
        )
        entities = [e.name for e in config.entities_in_group(group)]
        _print_table(_summary_rows(settings, key, entities))
        if not result.success:
            failed = True
            for event in result.all_events:
                if event.is_step_failure and event.step_failure_data:
                    error = event.step_failure_data.error
                    message = error.message.strip() if error else "unknown error"
                    print(f"  FAILED {event.step_key}: {message.splitlines()[-1]}",
                          file=sys.stderr)
    return 1 if failed else 0


def cmd_change_set_create(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.group not in settings.entities.groups:
        raise ConfigError(
            f"unknown group {args.group!r}; the groups are {sorted(settings.entities.groups)}"
        )
    print(new_change_set_key(_instance(), args.group))
    return 0


def cmd_plan_show(args: argparse.Namespace) -> int:
    from dataverse_assets.publish import render_plan
    from dataverse_assets.store import connect

    settings = load_settings()
    connection = connect(settings.db_path)
    try:
        print(render_plan(connection, args.entity, args.change_set, args.max_rows))
    except LookupError as exc:
        print(f"{exc} in {settings.db_path}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    return 0


def cmd_simulator(args: argparse.Namespace) -> int:
    import threading

    from dataverse_assets.simulator import DataverseSimulator, serve_on_loopback

    settings = load_settings()
    simulator = DataverseSimulator([e.name for e in settings.entities.entities],
                                   seed=args.seed)
    with serve_on_loopback(simulator, port=args.port) as url:
        print(f"Dataverse simulator on {url} (DATAVERSE_URL={url} DATAVERSE_SOURCE=simulator)")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataverse-assets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="sync every entity (or a group) through Dagster")
    sync.add_argument("--group", action="append", help="only this cadence group (repeatable)")
    sync.add_argument("--log-level", default="WARNING", help="Dagster console log level")
    sync.set_defaults(handler=cmd_sync)
    change_set = commands.add_parser("change-set", help="manage change-set partitions")
    change_set_commands = change_set.add_subparsers(dest="change_set_command", required=True)
    create = change_set_commands.add_parser("create", help="register a new change set key")
    create.add_argument("--group", required=True)
    create.set_defaults(handler=cmd_change_set_create)
    plan = commands.add_parser("plan", help="publish plans")
    plan_commands = plan.add_subparsers(dest="plan_command", required=True)
    show = plan_commands.add_parser("show", help="print the plan of a change set")
    show.add_argument("entity")
    show.add_argument("change_set")
    show.add_argument("--max-rows", type=int, default=50, help="rows shown per kind")
    show.set_defaults(handler=cmd_plan_show)
    simulator = commands.add_parser("simulator", help="serve the Dataverse simulator")
    simulator.add_argument("--port", type=int, default=8765)
    simulator.add_argument("--seed", type=int, default=42)
    simulator.set_defaults(handler=cmd_simulator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
