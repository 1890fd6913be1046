"""Deciding what one change set of one entity asks the source for: the mode, the queries, the
steps. Pure functions, no I/O (sync.fetch runs the plan; the module docstring there lists the
modes)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from dataverse_assets.config import DEFAULT_MAX_PAGES, EntityConfig
from dataverse_assets.errors import (
    FetchConfigError,
    InvalidNameError,
)
from dataverse_assets.modes import Mode
from dataverse_assets.names import check_column_name, is_guid
from dataverse_assets.source.query import (
    PageQuery,
    id_filter_batches,
    modified_since_filter,
    parse_datetime,
)
from dataverse_assets.store.schema import LOOKUP_TYPES, attribute_type_of, detect_primary_key


def attribute_names(definition: dict | None) -> set[str]:
    if not definition:
        return set()
    return {a.get("LogicalName") for a in definition.get("Attributes", []) if a.get("LogicalName")}


def choose_mode(entity: EntityConfig, definition: dict | None) -> str:
    """The incremental mode for an entity, from its config and (for auto) its metadata."""
    tracked = bool(definition and definition.get("ChangeTrackingEnabled"))
    has_modifiedon = "modifiedon" in attribute_names(definition)
    if entity.incremental == "change_tracking":
        if definition is not None and not tracked:
            raise FetchConfigError(
                f"{entity.name}: incremental 'change_tracking' but the table is not enabled "
                "for change tracking; enable it in Dataverse or use 'auto'"
            )
        return Mode.CHANGE_TRACKING
    if entity.incremental == "modifiedon":
        if definition is not None and not has_modifiedon:
            raise FetchConfigError(
                f"{entity.name}: incremental 'modifiedon' but the table has no modifiedon "
                "column; use 'full'"
            )
        return Mode.MODIFIEDON
    if entity.incremental == "full":
        return Mode.FULL
    if tracked and entity.filter is None:  # change tracking takes no $filter
        return Mode.CHANGE_TRACKING
    if has_modifiedon:
        return Mode.MODIFIEDON
    return Mode.FULL  # without metadata we cannot know there is a modifiedon


def primary_key_for(entity: EntityConfig, definition: dict | None) -> str:
    pk, _ = detect_primary_key(
        entity.name, sorted(attribute_names(definition)), entity.primary_key,
        (definition or {}).get("PrimaryIdAttribute"),
    )
    return pk


def reconcile_due(entity: EntityConfig, reconciled_at: str | None, now: datetime) -> bool:
    """Whether this change set should include a key-only scan to find deletes."""
    if entity.reconcile_every_hours <= 0:
        return False
    if reconciled_at is None:
        return True
    return now - parse_datetime(reconciled_at) >= timedelta(hours=entity.reconcile_every_hours)


@dataclass
class FetchStep:
    """One query of a change set. kind: snapshot | changes | delta | ids | keys."""

    kind: str
    query: PageQuery
    start_url: str | None = None
    ranges: int = 1  # > 1: split into primary-key ranges paged in parallel
    # parallel_ranges 0 (auto): the fetch counts the read first and sizes `ranges` from it.
    auto_ranges: bool = False
    counted: int | None = None  # the read's `$count`, once asked for
    count_asked: bool = False

    def as_dict(self) -> dict:
        step = {"kind": self.kind, "params": self.query.params(), "prefer": self.query.prefer(),
                "start_url": self.start_url}
        if self.ranges > 1:
            step["ranges"] = self.ranges
        return step


@dataclass
class FetchRequest:
    """What one change set asks the source for, written to the archive as request.json."""

    entity: str
    change_set: str
    mode: str
    primary_key: str
    watermark_before: str | None
    delta_link_before: str | None = None
    steps: list[FetchStep] = field(default_factory=list)
    # Filtered entities: the ids this change set may stage (linked now or already mirrored).
    id_scope: list[str] | None = None
    # Ids that must come back; those that do not are requested one by one.
    expected_ids: list[str] = field(default_factory=list)
    reason: str = ""
    max_pages: int = DEFAULT_MAX_PAGES  # per step (see PagingGuard)
    # The entity's `select` as row keys ($select), and its `filter`; None: every column, row.
    select: list[str] | None = None
    row_filter: str | None = None

    def __post_init__(self) -> None:
        self.mode = str(self.mode)  # a Mode, written out (request.json, metadata) as text

    def as_dict(self) -> dict:
        return {
            "entity": self.entity, "change_set": self.change_set, "mode": self.mode,
            "primary_key": self.primary_key, "watermark_before": self.watermark_before,
            "delta_link_before": self.delta_link_before,
            "steps": [s.as_dict() for s in self.steps], "id_scope": self.id_scope,
            "expected_ids": self.expected_ids, "reason": self.reason,
            "max_pages": self.max_pages, "select": self.select, "row_filter": self.row_filter,
        }


def plan_fetch(
    entity: EntityConfig,
    change_set: str,
    definition: dict | None,
    *,
    watermark: str | None,
    delta_link: str | None = None,
    reconcile: bool = False,
    linked_ids: Iterable[str] = (),
    mirrored_ids: Iterable[str] = (),
    defunct_ids: Iterable[str] = (),
    targeted_ids: Iterable[str] = (),
    lookup_column: str | None = None,
) -> FetchRequest:
    """Decide the queries of one change set. Every read but a key-only scan asks for the
    formatted values and lookup annotations (kept in json_response; the readable view reads
    lookup names and targets from them).

    With `targeted_ids` the change set is a targeted refresh: exactly those records (or, with
    `lookup_column`, the records whose lookup points at them), nothing else; the watermark
    and delta link do not move.
    """
    targeted = sorted(set(targeted_ids))
    if targeted:
        request = plan_targeted_fetch(entity, change_set, definition, targeted, lookup_column,
                                      watermark)
    else:
        request = _plan_fetch(entity, change_set, definition, watermark=watermark,
                              delta_link=delta_link, reconcile=reconcile, linked_ids=linked_ids,
                              mirrored_ids=mirrored_ids, defunct_ids=defunct_ids)
    request.select = resolve_select(entity, definition, request.primary_key)
    request.row_filter = entity.filter
    _scope_steps(request)
    if entity.parallel_ranges != 1:
        for step in request.steps:
            if _splittable(request, step):
                step.ranges = max(1, entity.parallel_ranges)
                step.auto_ranges = entity.parallel_ranges == 0
    request.max_pages = entity.max_pages
    return request


def _scope_steps(request: FetchRequest) -> None:
    """Every read of the entity's records asks for its selected columns with annotations, and
    every query it starts (not a link it follows) stays inside its row filter."""
    for step in request.steps:
        if step.kind != "keys":
            step.query = replace(step.query, include_annotations=True,
                                 select=tuple(request.select or ()))
        if request.row_filter is not None and step.start_url is None:
            step.query = replace(step.query, filter=within_filter(request.row_filter,
                                                                  step.query.filter))


# A record asked for by id that exists but is outside the entity's `filter`: it leaves the
# mirror like a record gone from the source (staging makes it a delete).
OUTSIDE_FILTER = "outside_filter"
# Always mirrored whatever `select` says: the key, and what incremental reads and the
# key-and-version scan rely on.
ALWAYS_SELECTED = ("modifiedon", "versionnumber")
# Attribute types a row never carries: naming one in `select` is a mistake.
_NOT_IN_ROWS = {"Virtual"}


def resolve_select(entity: EntityConfig, definition: dict | None,
                   primary_key: str) -> list[str] | None:
    """The entity's `select` as the row keys to ask for ($select): lookups as
    `_<name>_value`, the key, modifiedon and versionnumber added. Checked against the
    metadata when there is some: an unknown name is one line naming it."""
    if entity.select is None:
        return None
    attributes = {a.get("LogicalName"): a for a in (definition or {}).get("Attributes", [])
                  if isinstance(a, dict) and a.get("LogicalName")}
    keys: list[str] = []
    for name in [primary_key, *entity.select, *ALWAYS_SELECTED]:
        logical = name[1:-len("_value")] if name.startswith("_") and name.endswith(
            "_value") else name
        attribute = attributes.get(name) or attributes.get(logical)
        if attributes and attribute is None:
            if name in ALWAYS_SELECTED:
                continue  # a table without it (an intersect table has no modifiedon)
            close = difflib.get_close_matches(name, sorted(attributes), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FetchConfigError(
                f"{entity.name}: 'select' names {name!r}, which is not a column of "
                f"{(definition or {}).get('LogicalName') or entity.name}{hint}; fix "
                "'select' in the entities file")
        key = name
        if attribute is not None:
            kind = attribute_type_of(attribute)
            if kind in _NOT_IN_ROWS:
                raise FetchConfigError(
                    f"{entity.name}: 'select' names {name!r}, a Virtual attribute Dataverse "
                    "never returns in rows (a choice's label comes with its column, in "
                    f"{entity.name}__readable); fix 'select' in the entities file")
            if kind in LOOKUP_TYPES and attribute["LogicalName"] != primary_key:
                key = f"_{attribute['LogicalName']}_value"
            else:
                key = attribute["LogicalName"]
        if key not in keys:
            keys.append(key)
    return keys


def within_filter(row_filter: str, step_filter: str | None) -> str:
    """A step's $filter inside the entity's row filter."""
    return f"({row_filter})" if not step_filter else f"({row_filter}) and ({step_filter})"


def _splittable(request: FetchRequest, step: FetchStep) -> bool:
    """Key ranges for large reads that take a $filter: a full snapshot, or a modifiedon first
    sync ordered by modifiedon (its watermark comes from the ranges, see ranged_watermark).
    Change tracking's initial read takes no $filter, so it stays one stream."""
    if request.mode == Mode.FULL:
        return step.kind == "snapshot"
    return (request.mode == Mode.MODIFIEDON and step.kind == "changes"
            and request.watermark_before is None
            and bool(step.query.orderby) and step.query.orderby[0].startswith("modifiedon"))


def _plan_fetch(
    entity: EntityConfig,
    change_set: str,
    definition: dict | None,
    *,
    watermark: str | None,
    delta_link: str | None,
    reconcile: bool,
    linked_ids: Iterable[str],
    mirrored_ids: Iterable[str],
    defunct_ids: Iterable[str],
) -> FetchRequest:
    pk = primary_key_for(entity, definition)
    page_size = entity.page_size
    orderby = tuple(part.strip() for part in entity.orderby.split(",")) if entity.orderby else ()
    keys = FetchStep("keys", PageQuery(select=(pk,), orderby=(f"{pk} asc",),
                                       page_size=page_size))
    if entity.filtered:
        mirrored = set(mirrored_ids)
        linked = set(linked_ids) - set(defunct_ids)
        steps: list[FetchStep] = [keys] if reconcile and mirrored else []
        if watermark is not None:
            steps.append(FetchStep("changes", PageQuery(
                filter=modified_since_filter(watermark),
                orderby=("modifiedon asc", f"{pk} asc"), page_size=page_size,
            )))
        missing = sorted(linked - mirrored)
        # Primary keys are GUIDs: a linked value that is not one (a link from a text column)
        # would make Dataverse refuse the whole batch (400). It is left out of the filters and
        # asked for by id like every id that does not come back, which records it as an issue.
        for _, expression in id_filter_batches(pk, [i for i in missing if is_guid(i)]):
            steps.append(FetchStep("ids", PageQuery(filter=expression, page_size=page_size)))
        return FetchRequest(entity.name, change_set, Mode.FILTERED, pk, watermark, None, steps,
                            id_scope=sorted(linked | mirrored), expected_ids=missing)
    mode = choose_mode(entity, definition)
    if mode == Mode.CHANGE_TRACKING:
        tracking = PageQuery(page_size=page_size, track_changes=True)
        if delta_link is None:
            # Never a delta token: the first sync. With a watermark but no token (the entity
            # synced by modifiedon before), the same read is a resync of a mirrored table.
            first = watermark is None
            return FetchRequest(entity.name, change_set,
                                Mode.INITIAL if first else Mode.CHANGE_TRACKING_RESYNC, pk,
                                watermark, None, [FetchStep("snapshot", tracking)],
                                reason="first sync" if first else "no delta token stored")
        # A change the delta link never reports (see the simulator's delta_token_moment) stays
        # missed until the record changes again: the key-and-version scan finds it. It goes
        # first, so a record created after it arrives in the delta.
        delta = FetchStep("delta", tracking, start_url=delta_link)
        return FetchRequest(entity.name, change_set, Mode.CHANGE_TRACKING, pk, watermark,
                            delta_link, [keys, delta] if reconcile else [delta])
    if mode == Mode.MODIFIEDON:
        changes = FetchStep("changes", PageQuery(
            filter=modified_since_filter(watermark),
            orderby=orderby or ("modifiedon asc", f"{pk} asc"), page_size=page_size,
        ))
        # The key scan goes first: a record created after it arrives in the changes step.
        steps = [keys, changes] if reconcile and watermark is not None else [changes]
        return FetchRequest(entity.name, change_set, Mode.MODIFIEDON, pk, watermark, None, steps)
    snapshot = FetchStep("snapshot", PageQuery(orderby=orderby or (f"{pk} asc",),
                                               page_size=page_size))
    return FetchRequest(entity.name, change_set, Mode.FULL, pk, None, None, [snapshot])


def plan_targeted_fetch(entity: EntityConfig, change_set: str, definition: dict | None,
                        ids: list[str], lookup_column: str | None,
                        watermark: str | None) -> FetchRequest:
    """A targeted refresh: records by id (missing ones asked one by one: 404 -> defunct), or
    the records whose `lookup_column` names one of the ids."""
    pk = primary_key_for(entity, definition)
    if lookup_column is not None:
        _check_lookup_column(entity, definition, lookup_column)
    column = lookup_column or pk
    not_guids = [i for i in ids if not is_guid(i)]
    if not_guids:
        raise FetchConfigError(
            f"{entity.name}: a targeted refresh takes record ids (GUIDs); "
            f"{', '.join(repr(i) for i in not_guids[:3])} "
            f"{'is not one' if len(not_guids) == 1 else 'are not'}")
    steps = [FetchStep("ids", PageQuery(filter=expression, page_size=entity.page_size))
             for _, expression in id_filter_batches(column, ids)]
    return FetchRequest(entity.name, change_set, Mode.TARGETED, pk, watermark, None, steps,
                        expected_ids=[] if lookup_column else ids,
                        reason=f"targeted refresh of {len(ids)} id(s)"
                        + (f" through {lookup_column}" if lookup_column else ""))


def _check_lookup_column(entity: EntityConfig, definition: dict | None, column: str) -> None:
    """A targeted refresh's lookup column goes into `$filter` unquoted: only a column name,
    and (with metadata) one of the table's (a lookup's row name is `_<attribute>_value`)."""
    try:
        check_column_name(column)
    except InvalidNameError as exc:
        raise FetchConfigError(f"{entity.name}: lookup column {exc}") from None
    names = attribute_names(definition)
    attribute = column[1:-len("_value")] if column.startswith("_") and column.endswith(
        "_value") else column
    if names and column not in names and attribute not in names:
        close = difflib.get_close_matches(
            column, sorted(names | {f"_{n}_value" for n in names}), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FetchConfigError(f"{entity.name} has no column {column!r}{hint}; a targeted "
                               "refresh through a lookup names the lookup column, e.g. "
                               "_parentcustomerid_value")


def without_annotations_for_delta_link(request: FetchRequest) -> FetchStep | None:
    """A change-tracking read that ended without `@odata.deltaLink` though it asked for
    annotations (Dataverse has been reported to drop the link then): the same read again
    without annotations, whose last page carries it. None when that is not the case (no
    tracking step, or it asked for no annotations: nothing to fall back to).

    Its pages are archived after the annotated ones, so a record served by both keeps the
    newer version; such records lack formatted values in json_response until they change
    again (labels still come from _choice_labels).
    """
    tracking = [step for step in request.steps if step.query.track_changes]
    if not tracking or not tracking[-1].query.include_annotations:
        return None
    last = tracking[-1]
    return FetchStep(last.kind, replace(last.query, include_annotations=False),
                     start_url=last.start_url)


def resync_request(request: FetchRequest, page_size: int) -> FetchRequest:
    """The delta token expired: read the table again in full (deletes found by diff), scoped
    like every other read of the entity."""
    tracking = PageQuery(page_size=page_size, track_changes=True)
    resync = FetchRequest(request.entity, request.change_set, Mode.CHANGE_TRACKING_RESYNC,
                          request.primary_key, request.watermark_before,
                          request.delta_link_before, [FetchStep("snapshot", tracking)],
                          reason="delta token expired (0x80044352): full resync",
                          max_pages=request.max_pages)
    resync.select, resync.row_filter = request.select, request.row_filter
    _scope_steps(resync)
    return resync


