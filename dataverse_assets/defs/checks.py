"""Asset checks on canonical/E, and the column schema shown with each materialization.

Per change set, evaluated inside the canonical/E step right after the publish (declared with
`check_specs` on the asset, partitioned like it, so the UI shows a result per change set):
- `schema_drift`: what `_schema_drift` recorded for the change set(s) the step published.
  WARN for info (added columns, fields kept in json_response only, choice options added or
  relabelled) and warnings (options removed), ERROR for breaking (removed columns, type
  changes). Not blocking: the data keeps flowing by design.
- `primary_key`: the key column has no NULL or empty value and no two rows whose keys differ
  only in case (Dataverse GUIDs are case-insensitive; SQLite's PRIMARY KEY is not). ERROR and
  blocking: the step fails, so nothing downstream reads a table whose key is broken.
- `row_count`: canonical rows against the number of records the source listed, only where a
  change set knows it (a full snapshot, a change-tracking resync, a first full read, or a
  key-only scan of an unfiltered entity). Otherwise it passes with `reconciled: false` and
  says why: Dagster needs a result for every declared check. WARN, not blocking: a record
  created or deleted while a change set pages explains a difference, and the next
  reconciliation settles it.
- `mirror_matches_source`: what the change set's key-and-version scan found (fetch.Divergence),
  where it has one: records the mirror lacked, held at another version, or held though the
  source no longer lists them. Such divergence is repaired in the same change set (refetched by
  id, or deleted); the check fails (WARN) when there was any, so a source whose paging lost
  something shows. A modifiedon or filtered table learns of deletes only from this scan, so
  there its deletes are not divergence. Without a scan it passes with `reconciled: false`.

Per cadence group, its own op (`freshness_<group>`, also run by `check_freshness`):
- `freshness`: the last COMPLETE publish of each entity against the group's cron (UTC): after
  a tick plus the group's `freshness_grace_minutes`, a publish must have finished since that
  tick. WARN, not blocking (there is nothing to hold back; the sync itself is what is late).
"""

import sqlite3
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetCheckSpec,
    MetadataValue,
    PartitionsDefinition,
    PreviewWarning,
    TableColumn,
    TableColumnConstraints,
    TableSchema,
    multi_asset_check,
)
from dagster._utils.schedules import get_latest_completed_cron_tick

from dataverse_assets.config import EntitiesConfig, EntityConfig, GroupConfig
from dataverse_assets.defs.asset_keys import canonical_key
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.modes import SNAPSHOT_MODES, Mode, PublishStatus
from dataverse_assets.store.backend import is_postgres_address, postgres_database_name
from dataverse_assets.store.bookkeeping import (
    last_complete_publish,
    read_publish_state,
    read_sync_state,
    staged_row,
)
from dataverse_assets.store.db import quote_identifier, table_exists
from dataverse_assets.store.key_check import KeyFindings, find_key_problems, record_key_check
from dataverse_assets.store.readable import column_roles
from dataverse_assets.store.schema import (
    ADDED,
    BREAKING,
    DESELECTED,
    EXCLUDED,
    FILTER_CHANGED,
    REMOVED,
    TYPE_CHANGED,
    EntitySchema,
)
from dataverse_assets.store.schema_registry import load_locked_schema, schema_version
from dataverse_assets.store.tables import (
    SYNC_COLUMNS,
    canonical_row_count,
    staging_keys_table,
    staging_table,
)
from dataverse_assets.sync.drift import read_schema_checks
from dataverse_assets.sync.stage import count_staged

SCHEMA_DRIFT = "schema_drift"
PRIMARY_KEY = "primary_key"
ROW_COUNT = "row_count"
MIRROR_MATCHES_SOURCE = "mirror_matches_source"
FRESHNESS = "freshness"
FRESHNESS_JOB = "check_freshness"

_SYNC_COLUMN_DESCRIPTIONS = {
    "json_response": "the record exactly as the API returned it",
    "_content_hash": "hash of the record; unchanged hash, no write",
    "sync_time": "when this version was fetched",
    "valid_from": "modifiedon of this version (sync time without one)",
    "updated_at": "when the content last changed in the mirror",
    "_change_set": "the change set that wrote this version",
}


# -- per change set, inside canonical/E ---------------------------------------------------

def canonical_check_specs(entity: EntityConfig,
                          partitions_def: PartitionsDefinition) -> list[AssetCheckSpec]:
    """The checks canonical/E reports with every materialization, one result per change set."""
    key = canonical_key(entity.name)
    with warnings.catch_warnings():
        # Partitioned check specs are a Dagster preview; they give one result per change set.
        warnings.simplefilter("ignore", PreviewWarning)
        return [
            AssetCheckSpec(
                SCHEMA_DRIFT, asset=key, partitions_def=partitions_def,
                description="The change set's schema (metadata, else records) against the "
                "locked one: WARN for added columns, fields kept in json_response only and "
                "choice options added, relabelled or removed; ERROR for removed columns and "
                "type changes. Not blocking.",
            ),
            AssetCheckSpec(
                PRIMARY_KEY, asset=key, partitions_def=partitions_def, blocking=True,
                description="No NULL or empty key and no keys equal but for letter case. "
                "Blocking: a failure fails the step.",
            ),
            AssetCheckSpec(
                ROW_COUNT, asset=key, partitions_def=partitions_def,
                description="Canonical rows against the source's count, where the change set "
                "knows it (full snapshot, resync, first full read, key-only scan). Not "
                "blocking.",
            ),
            AssetCheckSpec(
                MIRROR_MATCHES_SOURCE, asset=key, partitions_def=partitions_def,
                description="Where the change set has a key-and-version scan: records the "
                "mirror lacked, held at another version, or held after the source dropped "
                "them (all repaired in the change set). WARN when there were any. Not "
                "blocking.",
            ),
        ]


def evaluate_canonical_checks(connection: sqlite3.Connection, entity: EntityConfig,
                              change_sets: list[str]) -> list[AssetCheckResult]:
    """Every per-change-set check after publishing `change_sets` (older first, the step's own
    change set last)."""
    schema = load_locked_schema(connection, entity.name)
    return [schema_drift_result(connection, entity.name, change_sets),
            primary_key_result(connection, entity.name, schema),
            row_count_result(connection, entity, change_sets[-1]),
            mirror_matches_source_result(connection, entity, change_sets[-1])]


def canonical_metadata(connection: sqlite3.Connection, entity: str, db_path: str) -> dict:
    """What a canonical materialization shows of its table, by Dagster's table conventions:
    the columns (each with its Dataverse type and what it is), the table's name in the mirror,
    the schema's version and where it was decided from."""
    schema = load_locked_schema(connection, entity)
    if schema is None:
        return {}
    return {"dagster/column_schema": column_schema(schema, column_roles(connection, entity)),
            "dagster/relation_identifier": relation_identifier(db_path, entity),
            "schema_version": schema_version(connection, entity),
            "schema_from": schema.decided_from}


def relation_identifier(db_path: str, table: str) -> str:
    """`<database>.main.<table>`: the database file's stem, SQLite's schema name, the table
    (Dagster's database.schema.table form, which links the same table across tools); for a
    PostgreSQL store `<database>.public.<table>`."""
    if is_postgres_address(db_path):
        return f"{postgres_database_name(db_path)}.public.{table}"
    return f"{Path(db_path).stem}.main.{table}"


def column_schema(schema: EntitySchema, roles: dict[str, str] | None = None) -> TableSchema:
    """The canonical table's columns for the UI: the locked schema (Dataverse's AttributeType,
    and what the attribute metadata says the column is), then the sync columns."""
    roles = roles or {}

    def describe(c) -> str:
        kind = (f"AttributeType {c.attribute_type}" if c.attribute_type
                else "type inferred from records" if c.type_known
                else "type unknown when locked (only nulls): TEXT")
        parts = [kind, roles.get(c.name), "primary key" if c.name == schema.primary_key else None]
        return "; ".join(p for p in parts if p)

    columns = [
        TableColumn(
            c.name, c.sqlite_type, description=describe(c),
            constraints=(TableColumnConstraints(nullable=False, unique=True)
                         if c.name == schema.primary_key else None),
        )
        for c in schema.columns
    ]
    columns += [
        TableColumn(name, declared.split()[0], description=_SYNC_COLUMN_DESCRIPTIONS.get(name),
                    constraints=TableColumnConstraints(nullable="NOT NULL" not in declared))
        for name, declared in SYNC_COLUMNS
    ]
    return TableSchema(columns=columns)


OPTION_KINDS = ("option_added", "option_relabelled", "option_removed")


def _finding(kind: str, f: dict, change_set: str) -> dict:
    if kind in OPTION_KINDS:
        return {"option": f["column_name"], "detail": f["detail"], "severity": f["severity"],
                "change_set": change_set, "action": f["action"]}
    if kind in (DESELECTED, FILTER_CHANGED):
        return {"column": f["column_name"], "detail": f["detail"], "change_set": change_set,
                "action": f["action"]}
    if kind == TYPE_CHANGED:
        return {"column": f["column_name"], "locked_type": f["locked_type"],
                "live_type": f["live_type"], "locked_attribute_type": f["locked_attribute_type"],
                "live_attribute_type": f["live_attribute_type"], "severity": f["severity"],
                "detail": f["detail"], "change_set": change_set}
    if kind == REMOVED:
        return {"column": f["column_name"], "type": f["locked_type"],
                "attribute_type": f["locked_attribute_type"], "change_set": change_set,
                "action": f["action"]}
    entry = {"column": f["column_name"], "type": f["live_type"],
             "attribute_type": f["live_attribute_type"], "change_set": change_set,
             "action": f["action"]}
    if kind == EXCLUDED:
        entry["reason"] = f["detail"]
    return entry


def schema_drift_result(connection: sqlite3.Connection, entity: str,
                        change_sets: list[str]) -> AssetCheckResult:
    compared = read_schema_checks(connection, entity, change_sets)
    by_kind: dict[str, list[dict]] = {ADDED: [], REMOVED: [], TYPE_CHANGED: [], EXCLUDED: [],
                                      DESELECTED: [], FILTER_CHANGED: [],
                                      **{kind: [] for kind in OPTION_KINDS}}
    breaking = 0
    for check in compared:
        for f in check.findings:
            by_kind[f["kind"]].append(_finding(f["kind"], f, check.change_set))
            breaking += f["severity"] == BREAKING
    total = sum(len(v) for v in by_kind.values())
    metadata = {kind: MetadataValue.json(entries) for kind, entries in by_kind.items()}
    metadata["change_sets"] = MetadataValue.json(change_sets)
    metadata["live_schema_from"] = ", ".join(sorted({c.live_from for c in compared})) or "none"
    metadata["outcome"] = ", ".join(f"{c.change_set}: {c.outcome}" for c in compared) or "none"
    if not compared:
        description = "Not compared: no schema comparison was recorded for this change set."
    elif not total:
        description = "The change set's schema matches the locked schema."
    else:
        parts = []
        for kind, label in ((REMOVED, "removed"), (TYPE_CHANGED, "type changed"),
                            (ADDED, "added"), (EXCLUDED, "kept in json_response only"),
                            (DESELECTED, "left out of select"),
                            (FILTER_CHANGED, "filter changed"),
                            ("option_removed", "options removed (warning)"),
                            ("option_added", "options added"),
                            ("option_relabelled", "options relabelled")):
            if by_kind[kind]:
                names = ", ".join(_describe(kind, e) for e in by_kind[kind])
                parts.append(f"{label}: {names}")
        description = f"{breaking} breaking, {total - breaking} info. " + "; ".join(parts)
    return AssetCheckResult(
        check_name=SCHEMA_DRIFT, passed=total == 0, metadata=metadata, description=description,
        severity=AssetCheckSeverity.ERROR if breaking else AssetCheckSeverity.WARN,
    )


def _describe(kind: str, entry: dict) -> str:
    if kind in OPTION_KINDS:
        return entry["detail"] or entry["option"]
    if kind == FILTER_CHANGED:
        return entry["detail"]
    if kind == DESELECTED:
        return entry["column"]
    if kind == TYPE_CHANGED:
        return f"{entry['column']} {entry['locked_type']} -> {entry['live_type']}"
    return f"{entry['column']} {entry['type'] or '(type unknown)'}"


def primary_key_result(connection: sqlite3.Connection, entity: str,
                       schema: EntitySchema | None) -> AssetCheckResult:
    """No NULL or empty key, and no two keys equal but for letter case (the reads and their
    scope: store.key_check)."""
    if schema is None or not table_exists(connection, entity):
        return AssetCheckResult(check_name=PRIMARY_KEY, passed=True,
                                description="No canonical table yet.",
                                metadata={"rows": 0})
    findings = find_key_problems(connection, entity, schema.primary_key)
    result = primary_key_verdict(schema.primary_key, findings)
    record_key_check(connection, entity, findings, result.passed)
    return result


def primary_key_verdict(primary_key: str, findings: KeyFindings) -> AssetCheckResult:
    """The check's result from what the read found."""
    passed = not findings.missing and not findings.duplicates
    description = (f"{primary_key!r} is unique and never null." if passed else
                   f"{findings.missing} rows without a key, {len(findings.duplicates)} keys "
                   "held by more than one row (compared case-insensitively).")
    return AssetCheckResult(
        check_name=PRIMARY_KEY, passed=passed, severity=AssetCheckSeverity.ERROR,
        description=description,
        metadata={"primary_key": primary_key, "null_or_empty_keys": findings.missing,
                  "duplicate_keys": len(findings.duplicates), "checked": findings.scope,
                  "duplicate_examples": MetadataValue.json(
                      [{"key": k, "rows": n} for k, n in findings.duplicates[:10]])},
    )


def source_count(connection: sqlite3.Connection, entity: EntityConfig,
                 change_set: str) -> tuple[int | None, str]:
    """How many records the source had, if this change set knows it, and how it knows."""
    staged = staged_row(connection, entity.name, change_set)
    if staged is None:
        return None, "the change set is not staged"
    mode, key_scan, upserts = staged["mode"], staged["reconciled"], staged["upserts"]
    published = read_publish_state(connection, entity.name, change_set)
    latest = read_sync_state(connection, entity.name)
    if published.get("status") != PublishStatus.COMPLETE:
        return None, "the change set is not published"
    if latest is None or latest.last_change_set != change_set:
        return None, ("newer change set "
                      f"{latest.last_change_set if latest else '?'} already published")
    staging = quote_identifier(staging_table(entity.name))
    records = (f"SELECT _pk FROM {staging} WHERE _change_set = :cs AND _op = 'upsert'")
    if mode in SNAPSHOT_MODES or (mode == Mode.MODIFIEDON
                                  and published["watermark_before"] is None):
        basis = {Mode.FULL: "full snapshot", Mode.MODIFIEDON: "first full read",
                 Mode.INITIAL: "first change-tracking read"}.get(mode, "change-tracking resync")
        # Counted when it was staged (a key is staged once per change set); a database
        # staged by an older version counts now.
        if upserts is None:
            upserts = count_staged(connection, entity.name, change_set, "upsert")
        return upserts, f"{basis}: distinct records the source returned"
    if key_scan and mode == Mode.MODIFIEDON:
        keys = quote_identifier(staging_keys_table(entity.name))
        count = connection.execute(
            f"SELECT count(*) FROM (SELECT _pk FROM {keys} WHERE _change_set = :cs"
            f" UNION {records}) AS listed", {"cs": change_set}).fetchone()[0]
        return count, "key-only scan: keys the source listed, plus records created after it"
    if mode == Mode.FILTERED:
        return None, "filtered entity: only linked records are mirrored, not the whole table"
    return None, (f"incremental change set ({mode}): it carries changes only, so the "
                  "source's total is not known")


def row_count_result(connection: sqlite3.Connection, entity: EntityConfig,
                     change_set: str) -> AssetCheckResult:
    expected, basis = source_count(connection, entity, change_set)
    rows = canonical_row_count(connection, entity.name)
    if expected is None:
        return AssetCheckResult(
            check_name=ROW_COUNT, passed=True, severity=AssetCheckSeverity.WARN,
            description=f"Not reconciled: {basis}.",
            metadata={"reconciled": False, "reason": basis, "canonical_count": rows},
        )
    passed = expected == rows
    return AssetCheckResult(
        check_name=ROW_COUNT, passed=passed, severity=AssetCheckSeverity.WARN,
        description=(f"{rows} rows, as the source listed ({basis})." if passed else
                     f"{rows} rows in canonical, the source listed {expected} ({basis})."),
        metadata={"reconciled": True, "basis": basis, "source_count": expected,
                  "canonical_count": rows, "difference": rows - expected},
    )


def divergence(connection: sqlite3.Connection, entity: str,
               change_set: str) -> dict[str, object] | None:
    """What the change set's key-and-version scan found, or None without one: scanned keys,
    missing and stale records (refetched), extra ones (deleted because the scan no longer
    listed them: plan deletes with no delete marker staged), and the mode."""
    staged = staged_row(connection, entity, change_set)
    if staged is None or not staged["reconciled"]:
        return None
    mode, scanned = staged["mode"], staged["reconcile_scanned"]
    missing, stale = staged["reconcile_missing"], staged["reconcile_stale"]
    extra = 0
    if table_exists(connection, "_publish_plan"):
        extra = connection.execute(
            "SELECT count(*) FROM _publish_plan p WHERE p.entity = ? AND p.change_set = ?"
            f" AND p.kind = 'delete' AND NOT EXISTS (SELECT 1 FROM"
            f" {quote_identifier(staging_table(entity))} s"
            "  WHERE s._change_set = p.change_set AND s._pk = p.pk)",
            (entity, change_set)).fetchone()[0]
    return {"mode": mode, "scanned": scanned or 0, "missing": missing or 0,
            "stale": stale or 0, "extra": extra}


def mirror_matches_source_result(connection: sqlite3.Connection, entity: EntityConfig,
                                 change_set: str) -> AssetCheckResult:
    found = divergence(connection, entity.name, change_set)
    if found is None:
        return AssetCheckResult(
            check_name=MIRROR_MATCHES_SOURCE, passed=True, severity=AssetCheckSeverity.WARN,
            description="Not reconciled in this change set: its key-and-version scan runs every "
            f"{entity.reconcile_every_hours:g} hours (reconcile_every_hours), or on demand with "
            "`dataverse-assets reconcile`; a full snapshot compares every record by itself.",
            metadata={"reconciled": False})
    missing, stale, extra = found["missing"], found["stale"], found["extra"]
    # A modifiedon or filtered table learns of deletes only from this scan: not divergence.
    deletes_expected = found["mode"] in (Mode.MODIFIEDON, Mode.FILTERED)
    diverged = missing + stale + (0 if deletes_expected else extra)
    parts = [f"{missing} missing", f"{stale} stale",
             f"{extra} extra" + (" (deletes, found this way by design)" if deletes_expected
                                 and extra else "")]
    description = (f"The mirror matched the source ({', '.join(parts)} among "
                   f"{found['scanned']:,} keys)." if not diverged else
                   f"The mirror had diverged from the source: {', '.join(parts)} among "
                   f"{found['scanned']:,} keys; repaired in this change set (refetched by id, "
                   "or deleted).")
    return AssetCheckResult(
        check_name=MIRROR_MATCHES_SOURCE, passed=not diverged, severity=AssetCheckSeverity.WARN,
        description=description,
        metadata={"reconciled": True, "scanned": found["scanned"], "missing": missing,
                  "stale": stale, "extra": extra, "repaired": missing + stale + extra})


# -- freshness, per cadence group ---------------------------------------------------------

@dataclass(frozen=True)
class Freshness:
    fresh: bool
    due_tick: datetime  # the latest cron tick whose grace period has passed
    last_publish: datetime | None


def freshness_status(cron: str, last_publish: datetime | None, now: datetime,
                     grace: timedelta) -> Freshness:
    """Fresh when a publish finished at or after the latest tick whose grace has passed."""
    due = get_latest_completed_cron_tick(cron, now - grace, "UTC")
    return Freshness(last_publish is not None and last_publish >= due, due, last_publish)


def freshness_result(connection: sqlite3.Connection, entity: str, group: str,
                     group_config: GroupConfig, now: datetime) -> AssetCheckResult:
    grace = timedelta(minutes=group_config.freshness_grace_minutes)
    status = freshness_status(group_config.cron, last_complete_publish(connection, entity),
                              now, grace)
    last = status.last_publish
    age = round((now - last).total_seconds() / 60, 1) if last else None
    if status.fresh:
        description = f"Published {age} minutes ago, after the {status.due_tick:%H:%M} tick."
    elif last is None:
        description = "Never published."
    else:
        description = (f"Last published {age} minutes ago; nothing since the "
                       f"{status.due_tick:%Y-%m-%d %H:%M} UTC tick of {group_config.cron!r}.")
    return AssetCheckResult(
        asset_key=canonical_key(entity), check_name=FRESHNESS, passed=status.fresh,
        severity=AssetCheckSeverity.WARN, description=description,
        metadata={"group": group, "cron": group_config.cron,
                  # Text, not a number: the UI plots numeric metadata over time, and a
                  # constant from the config is no series worth a chart.
                  "grace": f"{group_config.freshness_grace_minutes:g} minutes",
                  "due_tick": status.due_tick.isoformat(),
                  "last_complete_publish": last.isoformat() if last else "",
                  # Plotted over time: only a real age (no -1 for "never").
                  **({"age_minutes": age} if age is not None else {})},
    )


def build_freshness_check(group: str, group_config: GroupConfig,
                          entities: list[EntityConfig]) -> AssetChecksDefinition:
    """One op per cadence group checking every entity's canonical table."""
    specs = [
        AssetCheckSpec(FRESHNESS, asset=canonical_key(e.name),
                       description=f"A publish finished since the last {group!r} tick "
                       f"({group_config.cron}, UTC) plus "
                       f"{group_config.freshness_grace_minutes:g} minutes. Not blocking.")
        for e in entities
    ]

    @multi_asset_check(specs=specs, name=f"freshness_{group}", can_subset=True,
                       description=f"Freshness of the {group!r} group's canonical tables.")
    def freshness(context: AssetCheckExecutionContext,
                  store: MirrorStore) -> Iterator[AssetCheckResult]:
        now = datetime.now(UTC)
        selected = context.selected_asset_check_keys
        with store.connection() as connection:
            for entity in entities:
                if AssetCheckKey(canonical_key(entity.name), FRESHNESS) in selected:
                    yield freshness_result(connection, entity.name, group, group_config, now)

    return freshness


def build_freshness_checks(config: EntitiesConfig) -> list[AssetChecksDefinition]:
    return [build_freshness_check(group, group_config, config.entities_in_group(group))
            for group, group_config in config.groups.items() if config.entities_in_group(group)]
