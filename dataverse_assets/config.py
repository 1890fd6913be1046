"""Configuration: the entities file (pydantic-validated) and settings from the environment.

A bad entities file stops everything before any request is sent, with a one-line message that
names the entity and the field, so the fix is obvious.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from dagster._utils.schedules import get_latest_completed_cron_tick, is_valid_cron_string
from dotenv import load_dotenv
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from dataverse_assets.errors import ConfigError
from dataverse_assets.names import ENTITY_NAME_PATTERN, GROUP_NAME_PATTERN, check_column_name

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENTITIES_CONFIG = PROJECT_ROOT / "entities_config.json"
# Pages one read may take: 500 million records at 5000 a page, beyond any Dataverse table a
# mirror like this serves; a server paging without end stops here at the latest.
DEFAULT_MAX_PAGES = 100_000

# The name formats (entity set, group, column) are names.py's; $orderby lists are only here.
ORDERBY_PATTERN = re.compile(
    r"^\s*[A-Za-z_][A-Za-z0-9_]*(\s+(asc|desc))?\s*(,\s*[A-Za-z_][A-Za-z0-9_]*(\s+(asc|desc))?\s*)*$"
)


# The mirror names tables and indexes `<entity>__<suffix>` (store.tables: history_table,
# secondary_indexes; the `__readable` views to come). SQLite keeps tables and indexes in one
# namespace and ignores case, so no entity may be named like one of them. PostgreSQL names a
# table's primary key index `<table>_pkey` in the same namespace (an entity `teams_pkey` would
# find it taken by `teams`' index): refused on both stores, so a config means the same on each.
RESERVED_NAME_SUFFIXES = ("__history", "__readable", "__pk", "__pk_nocase", "__modifiedon",
                          "__createdon", "_pkey")


def ranged(default: Any, low: float, high: float, description: str) -> Any:
    """A numeric field validated to [low, high], with that range in its description (so the
    reference generated from the descriptions states what validation enforces)."""
    return Field(default, ge=low, le=high,
                 description=f"{description} Range: {low:,} to {high:,}.")


def _odata_column(value: str | None) -> str | None:
    """Column names go into OData queries ($select, $filter, $orderby) unquoted."""
    return None if value is None else check_column_name(value)


class _EntitiesFileModel(BaseModel):
    # JSON types as written: true is not 1, "5" is not 5, 2.5 is not an integer, and NaN or
    # Infinity (which Python's json module reads) is not a number.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class LinkSource(_EntitiesFileModel):
    """Where a filtered entity's ids come from: a column of another configured entity."""

    entity: str = Field(description="Entity set name of the linking table.")
    column: str = Field(description="Column of the linking table holding this entity's ids, "
                        "e.g. a junction column or a lookup such as _parentcustomerid_value.")
    lookup_target: str | None = Field(
        None, description="For polymorphic lookups (Customer, Owner): only values whose "
        "lookuplogicalname annotation names this table (e.g. 'account'); the linking table is "
        "then fetched with annotations.",
    )

    @field_validator("column")
    @classmethod
    def _column_is_a_name(cls, value: str) -> str:
        return _odata_column(value)


class GroupConfig(_EntitiesFileModel):
    """A cadence group: the entities in it are synced together on one schedule."""

    cron: str = Field(description="When the group's schedule syncs it: a cron expression "
                      "(UTC) that fires, e.g. '0 * * * *'.")
    description: str = Field("", description="Shown in the Dagster UI.")
    # A year and a day: even a yearly cron gets a whole period of grace.
    freshness_grace_minutes: float = ranged(
        30.0, 0, 527_040, "How long after a cron tick the group's publish may take "
        "before the freshness check warns (minutes).",
    )

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, value: str) -> str:
        return _firing_cron(value)


def _firing_cron(value: str) -> str:
    if not is_valid_cron_string(value):
        raise ValueError(f"{value!r} is not a valid cron expression (e.g. '0 * * * *')")
    try:  # '0 0 31 4 *' parses, but schedules and freshness checks find no tick
        get_latest_completed_cron_tick(value, datetime.now(UTC), "UTC")
    except ValueError:
        raise ValueError(f"{value!r} never fires: no date matches it") from None
    return value


IncrementalMode = Literal["auto", "modifiedon", "change_tracking", "full"]
SchemaEvolution = Literal["freeze", "evolve"]
Priority = Literal["high", "normal", "low"]


class LabelsConfig(_EntitiesFileModel):
    """The language of the choice labels in each entity's readable view (E__readable)."""

    # Windows language ids (LCIDs) run to 0xFFFF.
    language_code: int | None = ranged(
        None, 1, 65_535, "The language of the labels, as a Dataverse language code (1033 "
        "English, 1031 German, 1036 French, ...); null: the org's base language.")


class EntityConfig(_EntitiesFileModel):
    """One Dataverse table to mirror."""

    name: str = Field(description="Entity set name (the plural used in API URLs). Not "
                      "starting with `sqlite_` or ending in `__history`, `__readable`, `__pk`, "
                      "`__pk_nocase`, `__modifiedon` or `__createdon` (any case).")
    description: str = Field("", description="The assets' description in the Dagster UI.")
    group: str = Field(description="The cadence group (a key of `groups`) it is synced with.")
    filtered: bool = Field(
        False, description="Fetched by the ids that linked tables name, not in full."
    )
    primary_key: str | None = Field(
        None, description="The key column; null: the metadata's PrimaryIdAttribute, else "
        "`<name>id`, singular + `id`, the shortest `*id` column not starting with `_`, the "
        "first column.")
    orderby: str | None = Field(
        None, description="An OData $orderby list for full reads, e.g. 'name asc,accountid "
        "asc'.")
    incremental: IncrementalMode = Field(
        "auto", description="How changes are fetched: change_tracking (delta links), "
        "modifiedon (a watermark), full (the whole table every change set); auto decides "
        "from the table's metadata.")
    linked_from: list[LinkSource] = Field(
        default_factory=list, description="Filtered entities only: the columns of other "
        "entities (same group, not filtered) that name this entity's ids.")
    # Dataverse returns at most 5000 rows a page, whatever is asked.
    page_size: int = ranged(5000, 1, 5000, "Rows asked for per page (odata.maxpagesize).")
    # Ten million pages of 5000 is 50 billion rows: past any table, and still a bound on a
    # server that pages without end.
    max_pages: int = ranged(
        DEFAULT_MAX_PAGES, 1, 10_000_000,
        "A read (one step of a change set) that goes past this many pages stops with an error "
        "instead of following a server that pages without end; raise it for a table of more "
        "than max_pages x page_size records.",
    )
    # Dataverse serves at most 52 concurrent requests per user.
    parallel_ranges: int = ranged(
        0, 0, 52,
        "Large reads (full snapshots, a modifiedon first sync) are split into this "
        "many primary-key ranges paged in parallel, within the application user's request "
        "budget. 0 (auto): counted first, then one range per 10,000 records, at most 8 "
        "(a read of fewer than 20,000 stays one stream); 1: never split.",
    )
    hash_ignore_annotations: bool = Field(
        True, description="Leave @odata.etag and annotations out of the content hash, so a "
        "record whose only change is its etag or a formatted value (a relabelled option, a "
        "renamed lookup target) is 'unchanged'. false: any difference is an update.",
    )
    # Bound into SQL as a 64-bit integer; 100 million is past any one Dataverse change set,
    # so the top of the range means "never chunk".
    publish_chunk_rows: int = ranged(
        50_000, 1, 100_000_000, "Change sets larger than this publish in resumable chunks.",
    )
    # A year: longer is the same as never (0); hours past ~2.4e10 would overflow timedelta.
    reconcile_every_hours: float = ranged(
        24.0, 0, 8_760,
        "How often a change set starts with a key-and-version scan that repairs records the "
        "mirror lacks, holds an outdated version of, or holds after the source deleted them "
        "(every mode but full, whose every change set is a snapshot; hours; 0 = never).",
    )
    schema_evolution: SchemaEvolution = Field(
        "freeze", description="freeze: the first change set's columns stay the table's columns "
        "(new fields live in json_response); evolve: new columns are added and filled from "
        "json_response. Drift is reported either way.",
    )
    labels: LabelsConfig | None = Field(
        None, description="This entity's label language (default: the file's `labels`).")
    select: list[str] | None = Field(
        None, min_length=1, max_length=2000,
        description="The columns to mirror (logical names; a lookup by its name or its "
        "`_<name>_value` column). The primary key, modifiedon and versionnumber always come. "
        "null: every column. Checked against the table's metadata before anything is fetched.")
    filter: str | None = Field(
        None, min_length=1, max_length=4000,
        description="An OData row filter ($filter) for an entity fetched in full, e.g. "
        "'statecode eq 0': records outside it are not mirrored (and leave the mirror when "
        "they drop out of it). Not with change tracking, which takes no $filter.")
    priority: Priority = Field(
        "normal", description="Runs for high-priority entities carry a higher Dagster run "
        "priority (dagster/priority), so under a run-queue limit they start first.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, value: str) -> str:
        if not ENTITY_NAME_PATTERN.match(value):
            raise ValueError(
                "must be a Dataverse entity set name: a letter, then letters, digits or "
                "underscores (at most 128)"
            )
        folded = value.lower()
        if folded.startswith("sqlite_"):
            raise ValueError("names starting with 'sqlite_' are reserved for SQLite's own tables")
        suffix = next((s for s in RESERVED_NAME_SUFFIXES if folded.endswith(s)), None)
        if suffix:
            raise ValueError(f"names ending in {suffix!r} are reserved for the tables, views "
                             "and indexes the mirror makes for each entity (E__history, "
                             "E__readable, E__pk_nocase, PostgreSQL's E_pkey, ...)")
        return value

    @field_validator("primary_key")
    @classmethod
    def _primary_key_is_a_name(cls, value: str | None) -> str | None:
        return _odata_column(value)

    @field_validator("orderby")
    @classmethod
    def _orderby_is_a_column_list(cls, value: str | None) -> str | None:
        if value is not None and not ORDERBY_PATTERN.match(value):
            raise ValueError(
                f"{value!r} is not an OData $orderby list (e.g. 'modifiedon asc,accountid asc')"
            )
        return value

    @field_validator("select")
    @classmethod
    def _select_is_a_column_list(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        seen: set[str] = set()
        for name in value:
            check_column_name(name)
            if name.lower() in seen:
                raise ValueError(f"{name!r} is listed twice")
            seen.add(name.lower())
        return value

    @field_validator("filter")
    @classmethod
    def _filter_is_one_expression(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("is empty; leave it out to mirror every record")
        if any(ord(c) < 32 for c in value):
            raise ValueError("holds a control character (a line break?); write it on one line")
        return value

    @model_validator(mode="after")
    def _filtered_needs_links(self) -> EntityConfig:
        if self.filtered and not self.linked_from:
            raise ValueError("a filtered entity needs 'linked_from' (which tables name its ids)")
        if self.linked_from and not self.filtered:
            raise ValueError("'linked_from' only applies to filtered entities: set filtered")
        if self.filter is not None and self.filtered:
            raise ValueError("'filter' is for entities fetched in full; a filtered entity is "
                             "fetched by the ids its linking tables name")
        if self.filter is not None and self.incremental == "change_tracking":
            raise ValueError("'filter' does not go with incremental 'change_tracking' (Dataverse "
                             "takes no $filter on change tracking); use 'modifiedon' or 'auto'")
        return self


class ArchiveConfig(_EntitiesFileModel):
    """The raw archive's compaction and retention (`dataverse-assets compact`)."""

    # A century: `now - timedelta(days=...)` must stay after year 1 (~739,000 days back).
    compact_after_days: float | None = ranged(
        7.0, 0, 36_500, "Change sets fetched longer ago than this are merged into zstd "
        "Parquet (days; null: never).",
    )
    retention_days: float | None = ranged(
        None, 0, 36_500, "Change sets older than this may be deleted, never one a "
        "rebuild needs (days; null: keep everything).",
    )
    retention_mode: Literal["lossless", "rebase"] = Field(
        "lossless", description="lossless: delete only change sets published as no-ops, so a "
        "rebuild still equals the mirror, history included; rebase: also everything before "
        "the newest old snapshot (history before it is given up).",
    )
    # zstd's own levels, as DuckDB's COMPRESSION_LEVEL takes them.
    zstd_level: int = ranged(9, 1, 22, "zstd level of the compacted Parquet files.")
    # A million: a century of hourly change sets.
    staging_keep_change_sets: int | None = ranged(
        24, 1, 1_000_000, "compact deletes the staged rows of older published change "
        "sets, keeping each entity's newest this many (null: keep every staged row).",
    )


class MaintenanceConfig(_EntitiesFileModel):
    """The `maintenance` job (compaction, retention, shrinking the file): when it runs, and how
    long the bookkeeping that grows with every change set is kept."""

    cron: str | None = Field(
        "0 3 * * *", description="When the maintenance job runs (UTC; null: no schedule, run "
        "it by hand with `dataverse-assets compact` or from the UI).",
    )
    # Days: as the archive's (a century at most: `now - timedelta` stays after year 1).
    publish_plan_days: float | None = ranged(
        30.0, 0, 36_500, "Plan rows (`_publish_plan`, what `plan show` lists) of change sets "
        "published longer ago than this are deleted; the counts in `_publish_state` stay "
        "(days; null: keep).",
    )
    change_history_days: float | None = ranged(
        90.0, 0, 36_500, "`_change_history` rows (which record changed how, in which change "
        "set) older than this are deleted (days; null: keep).",
    )
    sync_log_days: float | None = ranged(
        30.0, 0, 36_500, "`_sync_log` rows older than this are deleted (days; null: keep).")
    resolved_issues_days: float | None = ranged(
        30.0, 0, 36_500, "Issues resolved longer ago than this are deleted; open ones stay "
        "(days; null: keep).",
    )
    closed_dead_letters_days: float | None = ranged(
        90.0, 0, 36_500, "Dead letters resolved or dropped longer ago than this are deleted; "
        "open ones stay (days; null: keep).",
    )
    history_days: float | None = ranged(
        None, 0, 36_500, "Versions in `E__history` superseded longer ago than this are "
        "deleted (days; null, the default: history keeps everything).",
    )
    shrink_file: bool = Field(
        True, description="Give the space retention freed back to the file system "
        "(incremental vacuum, a few megabytes per transaction, so a sync never waits long); "
        "in a PostgreSQL store, VACUUM (ANALYZE) the database.",
    )

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, value: str | None) -> str | None:
        return None if value is None else _firing_cron(value)


class EntitiesConfig(_EntitiesFileModel):
    """The whole entities file: cadence groups and the entities in them."""

    groups: dict[str, GroupConfig] = Field(
        min_length=1, description="Cadence groups by name (lowercase letters, digits, "
        "underscores).")
    entities: list[EntityConfig] = Field(min_length=1, description="The tables to mirror.")
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig,
                                   description="Archive compaction and retention.")
    maintenance: MaintenanceConfig = Field(
        default_factory=MaintenanceConfig,
        description="The maintenance job's schedule and bookkeeping retention.")
    labels: LabelsConfig = Field(
        default_factory=LabelsConfig,
        description="The label language of every readable view (an entity's own wins).")

    @field_validator("groups")
    @classmethod
    def _group_names(cls, groups: dict[str, GroupConfig]) -> dict[str, GroupConfig]:
        for name in groups:
            if not GROUP_NAME_PATTERN.match(name):
                raise ValueError(
                    f"group name {name!r} must be lowercase letters, digits or underscores"
                )
        return groups

    @model_validator(mode="after")
    def _cross_references(self) -> EntitiesConfig:
        seen: dict[str, str] = {}
        for entity in self.entities:
            # SQLite table names (and archive folders on some file systems) ignore case.
            folded = entity.name.lower()
            if folded in seen:
                twice = ("is listed twice" if seen[folded] == entity.name else
                         f"and {seen[folded]!r} differ only in letter case; SQLite table "
                         "names ignore case, so they would share one table")
                raise ValueError(f"entity {entity.name!r} {twice}")
            seen[folded] = entity.name
        by_name = {e.name: e for e in self.entities}
        for entity in self.entities:
            if entity.labels is None:
                entity.labels = self.labels
            if entity.group not in self.groups:
                raise ValueError(
                    f"entity {entity.name!r}, field 'group': {entity.group!r} is not one of "
                    f"the groups {sorted(self.groups)}"
                )
            for link in entity.linked_from:
                source = by_name.get(link.entity)
                if source is None:
                    raise ValueError(
                        f"entity {entity.name!r}, field 'linked_from': {link.entity!r} is not "
                        "a configured entity"
                    )
                if source.filtered:
                    raise ValueError(
                        f"entity {entity.name!r}, field 'linked_from': {link.entity!r} is "
                        "itself filtered; link from tables that are fetched in full"
                    )
                if source.group != entity.group:
                    # Change sets are partitioned per group; a link across groups would tie
                    # two partition sets together.
                    raise ValueError(
                        f"entity {entity.name!r}, field 'linked_from': {link.entity!r} is in "
                        f"group {source.group!r}, not {entity.group!r}; put both in one group"
                    )
        return self

    def entity(self, name: str) -> EntityConfig:
        for entity in self.entities:
            if entity.name == name:
                return entity
        raise KeyError(name)

    def entities_in_group(self, group: str) -> list[EntityConfig]:
        return [e for e in self.entities if e.group == group]


def _describe_location(raw: object, loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic error location into words: entity 'x' (entities[3]), field 'y'."""
    if len(loc) >= 2 and loc[0] == "entities" and isinstance(loc[1], int):
        name = None
        if isinstance(raw, dict):
            entities = raw.get("entities")
            if isinstance(entities, list) and loc[1] < len(entities):
                item = entities[loc[1]]
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    name = item["name"]
        where = f"entity {name!r} (entities[{loc[1]}])" if name else f"entities[{loc[1]}]"
        rest = [str(part) for part in loc[2:]]
        return f"{where}, field {'.'.join(rest)!r}" if rest else where
    if len(loc) >= 2 and loc[0] == "groups":
        rest = [str(part) for part in loc[2:]]
        where = f"group {loc[1]!r}"
        return f"{where}, field {'.'.join(rest)!r}" if rest else where
    return f"field {'.'.join(str(p) for p in loc)!r}" if loc else "top level"


def _number_message(error: Mapping[str, Any]) -> str | None:
    """Plain words for a value that is not the number a field takes."""
    if error["type"] not in ("int_type", "float_type", "finite_number"):
        return None
    value = error.get("input")
    if isinstance(value, bool):
        return "true and false are not numbers"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN and Infinity are not numbers"
    if isinstance(value, float) and error["type"] == "int_type":
        return "must be a whole number written as one (5000, not 5000.0 or 5e3)"
    return None


def parse_entities_config(raw: object, source: str = "entities config") -> EntitiesConfig:
    """Validate already-parsed JSON; raise ConfigError naming the entity and field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the file must hold a JSON object with 'groups' and "
                          f"'entities', not {type(raw).__name__}")
    try:
        return EntitiesConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = _number_message(first) or first["msg"].removeprefix("Value error, ")
        location = _describe_location(raw, tuple(first["loc"]))
        if first["type"] == "extra_forbidden":
            message = "unknown field (check the spelling)"
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{source}: {location}: {message}{more}") from None


class _RepeatedKeys(dict):
    """A JSON object that had a key twice (json.loads would silently keep the last value)."""

    def __init__(self, pairs: dict[str, object], repeated: str) -> None:
        super().__init__(pairs)
        self.repeated = repeated


def _json_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    seen: set[str] = set()
    repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
    return _RepeatedKeys(value, repeated)


def _first_repeated_key(raw: object) -> tuple[tuple[int | str, ...], str] | None:
    """Where the first object with a repeated key is (a pydantic-style location), and the key."""
    pending: list[tuple[tuple[int | str, ...], object]] = [((), raw)]
    while pending:
        loc, value = pending.pop()
        if isinstance(value, _RepeatedKeys):
            return loc, value.repeated
        children = (value.items() if isinstance(value, dict)
                    else enumerate(value) if isinstance(value, list) else ())
        pending.extend(reversed([((*loc, key), item) for key, item in children]))
    return None


def load_entities_config(path: str | os.PathLike[str]) -> EntitiesConfig:
    """Read and validate the entities file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: entities config not found (set DATAVERSE_ENTITIES_CONFIG to its path)"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON: the file is not UTF-8 text (byte {exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: entities config cannot be read ({exc.strerror or type(exc).__name__}; "
            "set DATAVERSE_ENTITIES_CONFIG to the JSON file)"
        ) from None
    try:
        raw = json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON: nested too deeply") from None
    repeated = _first_repeated_key(raw)
    if repeated is not None:
        loc, key = repeated
        raise ConfigError(f"{path}: {_describe_location(raw, loc)}: key {key!r} is given twice "
                          "(only one value can count; remove the other)")
    return parse_entities_config(raw, source=str(path))


SourceKind = Literal["live", "archive", "fixture", "simulator"]
ExecutorKind = Literal["in_process", "multiprocess", "celery"]


# Client secrets are redacted from every message by value; a very short one would redact
# ordinary text everywhere, and no app registration issues one (Entra's are ~40 characters).
MIN_SECRET_LENGTH = 8
INSECURE_HTTP_VARIABLE = "DATAVERSE_ALLOW_INSECURE_HTTP"


def is_loopback_host(host: str | None) -> bool:
    """localhost, 127.0.0.0/8 or ::1: traffic that never leaves the machine."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _insecure_url_problem(variable: str, url: str, allow_http: bool) -> str | None:
    """Why a live endpoint URL cannot be used, or None. The URL is not echoed: it may carry
    user:password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return f"{variable}: not a URL (e.g. https://contoso.crm.dynamics.com)"
    if parts.scheme not in ("https", "http") or not host:
        return (f"{variable}: must be an https:// URL with a host "
                "(e.g. https://contoso.crm.dynamics.com)")
    if parts.scheme == "http" and not allow_http and not is_loopback_host(host):
        return (f"{variable}: plain http:// to a host other than this machine sends the "
                "client secret or access tokens unencrypted; use https://, or set "
                f"{INSECURE_HTTP_VARIABLE}=true if that network is trusted")
    return None


# S3's bucket naming rules (general purpose buckets): 3-63 lowercase letters, digits, dots
# and hyphens, a letter or digit at each end, no "..", not an IP address.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def split_archive_url(url: str) -> tuple[str, str, str]:
    """("s3", bucket, prefix) or ("file", folder, "") of an archive URL that
    `archive_url_problem` accepted."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        return "s3", parts.netloc, parts.path.strip("/")
    return "file", parts.path, ""


def archive_url_problem(url: str) -> str | None:
    """Why DATAVERSE_ARCHIVE_URL cannot be used, or None. A folder path (no scheme) is fine.
    The value is not echoed: it may carry user:password."""
    if "://" not in url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a URL; write s3://bucket/prefix or a folder path"
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            return ("a file:// URL names a folder on this machine: file:///absolute/path "
                    "(or write the path itself)")
        return None
    if parts.scheme != "s3":
        return (f"scheme {parts.scheme}:// is not supported; write s3://bucket/prefix for "
                "object storage or a folder path")
    if "@" in parts.netloc or parts.query or parts.fragment:
        return ("credentials, ?query or #fragment do not belong in the URL; write "
                "s3://bucket/prefix and give credentials as AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    bucket = parts.netloc
    if not bucket:
        return "no bucket; write s3://bucket/prefix"
    if (not _BUCKET.fullmatch(bucket) or ".." in bucket or bucket.startswith("xn--")
            or _is_ip_address(bucket)):
        return ("the bucket name is not one S3 accepts (3-63 lowercase letters, digits, "
                "dots and hyphens, starting and ending with a letter or digit, not an IP "
                "address); write s3://bucket/prefix")
    segments = parts.path.strip("/").split("/") if parts.path.strip("/") else []
    if any(s in ("", ".", "..") for s in segments) or "\\" in parts.path:
        return "the prefix has an empty, '.' or '..' segment; write s3://bucket/a/b"
    return None


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _s3_endpoint_problem(url: str, allow_http: bool) -> str | None:
    """Why DATAVERSE_S3_ENDPOINT_URL cannot be used, or None (the value is not echoed)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "DATAVERSE_S3_ENDPOINT_URL: not a URL (e.g. https://minio.example.com:9000)"
    if parts.scheme not in ("https", "http") or not host or "@" in parts.netloc:
        return ("DATAVERSE_S3_ENDPOINT_URL: must be an https:// URL with a host and no "
                "user:password (e.g. https://minio.example.com:9000)")
    if parts.scheme == "http" and not allow_http and not is_loopback_host(host):
        return ("DATAVERSE_S3_ENDPOINT_URL: plain http:// to a host other than this machine "
                "sends the archive (every response of the org) unencrypted; use https://, or "
                f"set {INSECURE_HTTP_VARIABLE}=true if that network is trusted")
    return None


STORE_URL_VARIABLE = "DATAVERSE_STORE_URL"
STORE_URL_FORMS = "sqlite:///path/to/mirror.db or postgresql://user@host:5432/database"


@dataclass(frozen=True)
class StoreUrl:
    """Where the mirror lives (DATAVERSE_STORE_URL, parsed): a SQLite file, or a PostgreSQL
    database named by a libpq URL that carries no password."""

    kind: Literal["sqlite", "postgresql"]
    url: str
    path: Path | None = None  # SQLite's file

    @property
    def address(self) -> str:
        """What the store layer opens (store.db.connect): the file's path or the URL."""
        return str(self.path) if self.path is not None else self.url


def parse_store_url(text: str) -> StoreUrl:
    """Parse and check a store URL. Messages never echo the URL: it may carry a password."""
    if text.startswith("sqlite:"):
        if not text.startswith("sqlite:///"):
            raise ValueError("a sqlite URL names a file and no host: sqlite:///relative/path.db "
                             "or sqlite:////absolute/path.db")
        rest = text.removeprefix("sqlite:///")
        if not rest or rest.endswith("/"):
            raise ValueError("the sqlite URL names no file (e.g. sqlite:///data/dataverse.db)")
        if "?" in rest or "#" in rest:
            raise ValueError("a sqlite URL takes no ?parameters or #fragment")
        return StoreUrl("sqlite", text, Path(rest))
    scheme = text.partition("://")[0].lower()
    if scheme not in ("postgresql", "postgres") or "://" not in text:
        raise ValueError(f"must be {STORE_URL_FORMS}")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise ValueError(f"not a valid URL; write {STORE_URL_FORMS}") from None
    userinfo = parts.netloc.rpartition("@")[0]
    if ":" in userinfo or "password" in parse_qs(parts.query):
        # The URL is shown in logs, run metadata and status: a password in it would be too.
        raise ValueError("the URL embeds a password; remove it and give the password in "
                         "PGPASSWORD (or ~/.pgpass), which is never logged")
    if not parts.path.strip("/"):
        raise ValueError("the URL names no database (postgresql://user@host:5432/database)")
    if parts.fragment:
        raise ValueError("a postgresql URL takes no #fragment")
    return StoreUrl("postgresql", text)


class Settings(BaseModel):
    """Endpoints, secrets and paths, from the environment (and `.env`)."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    url: str | None = Field(
        None, description="The org's URL, e.g. https://contoso.crm.dynamics.com. Unset: the "
        "embedded simulator serves the data.")
    client_id: str | None = Field(
        None, description="The app registration's Application (client) ID (client "
        "credentials). Required for the live source.")
    client_secret: SecretStr | None = Field(
        None, description="The app registration's client secret value (at least 8 "
        "characters; never printed). Required for the live source.")
    tenant_id: str | None = Field(
        None, description="The Directory (tenant) ID. Unset: discovered from the org's 401 "
        "challenge.")
    authority: str = Field("https://login.microsoftonline.com",
                           description="The OAuth token authority.")
    allow_insecure_http: bool = Field(
        False, description="Allow a live DATAVERSE_URL or DATAVERSE_AUTHORITY over plain "
        "http:// to a host other than loopback (secrets then cross the network unencrypted).",
    )
    db_path: Path = Field(PROJECT_ROOT / "data" / "dataverse.db",
                          description="The SQLite mirror (when DATAVERSE_STORE_URL is unset).")
    store_url: str | None = Field(
        None, description="Where the mirror lives: sqlite:///path/to/mirror.db (SQLite; wins "
        "over DATAVERSE_DB_PATH) or postgresql://user@host:5432/database (PostgreSQL: several "
        "machines, several runs writing at once; docs/store-backends.md). A URL with a password "
        "is refused: give it in PGPASSWORD or ~/.pgpass. Unset: SQLite at DATAVERSE_DB_PATH.")
    archive_dir: Path = Field(PROJECT_ROOT / "data" / "archive",
                              description="The raw archive of every response, as a folder on "
                              "this machine (see DATAVERSE_ARCHIVE_URL for object storage).")
    archive_url: str | None = Field(
        None, description="Where the archive lives: a folder (a path, or file:///path: the "
        "same as DATAVERSE_ARCHIVE_DIR) or s3://bucket/prefix on any S3-compatible object "
        "store (credentials from AWS's standard chain: AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; never in this URL). Unset: "
        "DATAVERSE_ARCHIVE_DIR.")
    s3_endpoint_url: str | None = Field(
        None, description="The S3 API endpoint of a store other than AWS (MinIO, Ceph, a "
        "test server), e.g. https://minio.example.com:9000; http:// only to this machine. "
        "Unset: AWS's own endpoint for the region.")
    s3_region: str | None = Field(
        None, description="The bucket's region (e.g. eu-west-1). Unset: boto3's own "
        "(AWS_REGION, AWS_DEFAULT_REGION or ~/.aws/config).")
    fixtures_dir: Path | None = Field(
        None, description="Saved pages for the fixture source (`<dir>/<entity>/page-*.json`); "
        "required with DATAVERSE_SOURCE=fixture.")
    source: SourceKind = Field(
        "simulator", description="Where change sets come from: live, simulator, fixture, or "
        "archive (replay only). Unset: live when DATAVERSE_URL is set, else simulator; "
        "simulator with DATAVERSE_URL set talks to a simulator served on that URL.")
    entities_config_path: Path = Field(DEFAULT_ENTITIES_CONFIG,
                                       description="The entities file.")
    simulator_seed: int = ranged(42, 0, 2**32 - 1, "Seed of the simulator's generated org.")
    # Dataverse serves at most 52 concurrent requests per user.
    max_concurrency: int = ranged(
        8, 1, 52, "Requests in flight at once per application user, shared by every step, run "
        "and process on this machine that uses the same org and client id (Dataverse allows "
        "52 per application user; a lower x-ms-dop-hint from the org lowers it).")
    budget_dir: Path | None = Field(
        None, description="Where the shared request budget of each application user lives "
        "(requests in flight, Retry-After pauses): one folder per org and client id. Unset: "
        "the machine's temporary folder, so every project on this machine shares it.")
    # Below ~10 KB not even a metadata response fits; 16 GB is past any memory meant for one
    # response.
    max_response_mb: float = ranged(
        512.0, 0.01, 16_384, "A response body larger than this (MB) is refused as it streams in, "
        "never held in memory whole.")
    # A day: a response slower than that is a hung server; `inf` would wait forever.
    response_deadline_seconds: float = ranged(
        300.0, 0.1, 86_400, "Longest time for one whole response (headers and body); a "
        "slower one is a timeout, retried under the retry policy.")
    # A day: past it a waiting run is a hung run; `inf` or NaN would wait forever.
    lock_wait_seconds: float = ranged(
        600.0, 0, 86_400, "How long a step waits for another run's lock on the same entity.")
    parallel_entities: int = ranged(
        4, 1, 32, "Entities of a run fetched at the same time (in threads of the run's "
        "process; their requests share DATAVERSE_MAX_CONCURRENCY). 1: one after another.")
    # How runs launched by Dagster (UI, `dagster asset materialize`, schedules, sensors)
    # execute their steps. In one process by default: a process per step costs ~2 s of
    # imports each (the hourly group: 49.5 s instead of 8.5 s). The CLI always runs in-process.
    executor: ExecutorKind = Field(
        "in_process", description="How runs launched by Dagster (UI, dagster asset "
        "materialize, schedules, sensors) execute their steps: in_process (one after another "
        "in the run's process), multiprocess (Dagster's executor: a process per step, in "
        "parallel; its launchpad config applies) or celery (dagster-celery: each step a task "
        "on the broker of DAGSTER_CELERY_BROKER_URL, run by whichever worker takes it, on "
        "this machine or another; needs the '.[deploy]' extra and a shared Dagster instance, "
        "see deploy/). The CLI always runs in-process.")

    @field_validator("url", "authority")
    @classmethod
    def _has_a_scheme(cls, value: str | None) -> str | None:
        # `contoso.crm.dynamics.com` would be read as a relative path and fail far later.
        if value is not None and "://" not in value:
            # Echoed only when it cannot carry user:password.
            shown = f"{value!r} " if "@" not in value else ""
            fix = f"https://{value}" if "@" not in value else "https://<host>"
            raise ValueError(f"{shown}has no scheme; write {fix}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_archive(cls, values: Any) -> Any:
        # DATAVERSE_ARCHIVE_URL naming a folder is that folder: archive_dir is set from it,
        # so code reading archive_dir finds the same archive. Both set and different: which
        # one was meant is not ours to guess.
        if not isinstance(values, dict) or not values.get("archive_url"):
            return values
        url = str(values["archive_url"])
        if archive_url_problem(url):
            return values  # the field's own check says what is wrong
        scheme, where, _ = split_archive_url(url) if "://" in url else ("file", url, "")
        given = values.get("archive_dir")
        if scheme == "file":
            folder = Path(where)
            if given not in (None, "") and Path(given).resolve() != folder.resolve():
                raise ValueError("DATAVERSE_ARCHIVE_URL and DATAVERSE_ARCHIVE_DIR name "
                                 "different folders; set only one of them")
            return {**values, "archive_dir": folder}
        if given not in (None, ""):
            raise ValueError("DATAVERSE_ARCHIVE_URL (s3://) and DATAVERSE_ARCHIVE_DIR are both "
                             "set and name different archives; unset DATAVERSE_ARCHIVE_DIR")
        return values

    @field_validator("archive_url")
    @classmethod
    def _archive_url_is_usable(cls, value: str | None) -> str | None:
        if value is not None:
            problem = archive_url_problem(value)
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="before")
    @classmethod
    def _sqlite_store_url_sets_the_path(cls, values: Any) -> Any:
        # One place says where the SQLite file is: db_path, also when the URL names it.
        if isinstance(values, dict) and isinstance(values.get("store_url"), str):
            try:
                store = parse_store_url(values["store_url"])
            except ValueError:
                return values  # _store_url_parses says what is wrong, naming the variable
            if store.path is not None:
                given = values.get("db_path")
                if given is not None and Path(given) != store.path:
                    raise ValueError(f"{STORE_URL_VARIABLE} and DATAVERSE_DB_PATH name "
                                     "different SQLite files; set only one of them")
                values = {**values, "db_path": store.path}
        return values

    @field_validator("store_url")
    @classmethod
    def _store_url_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_store_url(value)
        return value

    @cached_property
    def store(self) -> StoreUrl:
        """The mirror's store: DATAVERSE_STORE_URL parsed, else SQLite at db_path."""
        if self.store_url is None:
            return StoreUrl("sqlite", f"sqlite:///{self.db_path}", self.db_path)
        store = parse_store_url(self.store_url)
        return StoreUrl("sqlite", store.url, self.db_path) if store.kind == "sqlite" else store

    @field_validator("client_secret")
    @classmethod
    def _secret_is_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(f"shorter than {MIN_SECRET_LENGTH} characters; copy the whole "
                             "client secret value from the app registration")
        return value

    @model_validator(mode="after")
    def _live_endpoints_are_encrypted(self) -> Settings:
        # Only a live source sends a secret; the simulator's credentials are public.
        if self.source == "live":
            for variable, url in (("DATAVERSE_URL", self.url),
                                  ("DATAVERSE_AUTHORITY", self.authority)):
                problem = url and _insecure_url_problem(variable, url, self.allow_insecure_http)
                if problem:
                    raise ValueError(problem)
        if self.s3_endpoint_url:
            problem = _s3_endpoint_problem(self.s3_endpoint_url, self.allow_insecure_http)
            if problem:
                raise ValueError(problem)
        return self

    @property
    def archive_is_s3(self) -> bool:
        return bool(self.archive_url) and self.archive_url.startswith("s3://")

    @property
    def archive_location(self) -> str:
        """The archive: s3://bucket/prefix, or its folder (archive.storage opens either)."""
        return self.archive_url.rstrip("/") if self.archive_is_s3 else str(self.archive_dir)

    @cached_property
    def entities(self) -> EntitiesConfig:
        return load_entities_config(self.entities_config_path)


_ENV_FIELDS = {
    "DATAVERSE_URL": "url",
    "DATAVERSE_CLIENT_ID": "client_id",
    "DATAVERSE_CLIENT_SECRET": "client_secret",
    "DATAVERSE_TENANT_ID": "tenant_id",
    "DATAVERSE_AUTHORITY": "authority",
    INSECURE_HTTP_VARIABLE: "allow_insecure_http",
    "DATAVERSE_DB_PATH": "db_path",
    STORE_URL_VARIABLE: "store_url",
    "DATAVERSE_ARCHIVE_DIR": "archive_dir",
    "DATAVERSE_ARCHIVE_URL": "archive_url",
    "DATAVERSE_S3_ENDPOINT_URL": "s3_endpoint_url",
    "DATAVERSE_S3_REGION": "s3_region",
    "DATAVERSE_FIXTURES_DIR": "fixtures_dir",
    "DATAVERSE_SOURCE": "source",
    "DATAVERSE_ENTITIES_CONFIG": "entities_config_path",
    "DATAVERSE_SIMULATOR_SEED": "simulator_seed",
    "DATAVERSE_MAX_CONCURRENCY": "max_concurrency",
    "DATAVERSE_BUDGET_DIR": "budget_dir",
    "DATAVERSE_MAX_RESPONSE_MB": "max_response_mb",
    "DATAVERSE_RESPONSE_DEADLINE_SECONDS": "response_deadline_seconds",
    "DATAVERSE_LOCK_WAIT_SECONDS": "lock_wait_seconds",
    "DATAVERSE_EXECUTOR": "executor",
    "DATAVERSE_PARALLEL_ENTITIES": "parallel_entities",
}


def environment_variables() -> list[tuple[str, str, str]]:
    """(variable, what it sets, its default) for every variable the settings read, from the
    model's own fields: the CLI's help lists them."""
    variables = []
    for variable, name in _ENV_FIELDS.items():
        field = Settings.model_fields[name]
        default = field.default
        if isinstance(default, Path) and default.is_relative_to(PROJECT_ROOT):
            default = default.relative_to(PROJECT_ROOT)
        variables.append((variable, field.description or "",
                          "-" if default is None else str(default).lower()
                          if isinstance(default, bool) else str(default)))
    return variables


def load_settings(environ: Mapping[str, str] | None = None, *, dotenv: bool = True,
                  credentials: bool = True) -> Settings:
    """Settings from `environ` (default: os.environ, after loading `.env` without overriding).

    `credentials=False` for commands that only read the mirror (status, issues, plans...):
    a live source's client id and secret are then not required.
    """
    if environ is None:
        if dotenv:
            load_dotenv(PROJECT_ROOT / ".env", override=False)
        environ = os.environ
    values: dict[str, object] = {}
    for variable, field in _ENV_FIELDS.items():
        value = environ.get(variable)
        if value not in (None, ""):
            values[field] = value
    if "source" not in values:
        # With no URL the embedded simulator serves, so a fresh clone works without secrets.
        values["source"] = "live" if values.get("url") else "simulator"
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        # Never echo the value: it may be a secret.
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a check across variables names them itself
            raise ConfigError(message) from None
        field = str(first["loc"][0])
        variable = next((k for k, v in _ENV_FIELDS.items() if v == field), field)
        raise ConfigError(f"{variable}: {message}") from None
    if settings.source == "live" and credentials:
        missing = [
            name
            for name, value in (
                ("DATAVERSE_URL", settings.url),
                ("DATAVERSE_CLIENT_ID", settings.client_id),
                ("DATAVERSE_CLIENT_SECRET", settings.client_secret),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"DATAVERSE_SOURCE=live needs {', '.join(missing)} to be set")
    if settings.source == "fixture" and settings.fixtures_dir is None:
        raise ConfigError("DATAVERSE_SOURCE=fixture needs DATAVERSE_FIXTURES_DIR to be set")
    return settings
