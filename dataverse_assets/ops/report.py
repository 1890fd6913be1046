"""`dataverse-assets report`: a self-contained HTML status page from the database.

Per entity: the last change set, its age against the group's cadence (fresh / late / failed),
rows, open issues, dead letters; and plots over time, drawn here as inline SVG: rows changed
per change set, sync duration, publish latency (from the fetch's start to the publish), errors
and retries, each with its change sets named on the x axis and every line labelled at its end;
and each cadence group's share of fresh tables over time. No scripts, no external assets, and
a Content-Security-Policy that forbids loading anything, so the page can be mailed, archived
or opened offline.
"""

from __future__ import annotations

import html
import math
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from dataverse_assets.config import EntitiesConfig
from dataverse_assets.defs.checks import freshness_status
from dataverse_assets.modes import PublishStatus, SyncStatus
from dataverse_assets.names import change_set_time, is_change_set_key
from dataverse_assets.source.query import parse_datetime
from dataverse_assets.store import dead_letters
from dataverse_assets.store.bookkeeping import (
    fetch_details,
    last_complete_publish,
    latest_publish_state,
    publish_history,
    read_sync_state,
)
from dataverse_assets.store.tables import canonical_row_count
from dataverse_assets.sync.progress import format_duration

DURATION_TICKS = (0.01, 0.1, 1.0, 60.0, 3600.0, 86400.0, 30 * 86400.0, 365 * 86400.0)
FRESH, LATE, FAILED, NEVER = "fresh", "late", "failed", "never synced"
# Change sets plotted per entity: the page stays small for a mirror that runs for years.
MAX_POINTS_PER_ENTITY = 200
# Tableau 10 (chosen to stay apart, for colour-blind readers too), then two more; every line
# also carries its name at its end, so no colour has to be matched to the legend.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac", "#17becf", "#000000")
# Moments at which each group's freshness is evaluated across the plotted span.
FRESHNESS_SAMPLES = 96


@dataclass
class EntityStatus:
    """One row of the table at the top of the page."""

    entity: str
    group: str
    cron: str
    state: str
    last_change_set: str | None
    publish_status: str | None
    last_publish: datetime | None
    due_tick: datetime | None
    rows: int
    open_issues: int
    dead_letters: int
    queued_retries: int
    last_error: str | None


@dataclass
class ChangeSetPoint:
    """One change set of one entity, as plotted."""

    entity: str
    change_set: str
    at: datetime
    status: str
    rows_changed: int
    sync_seconds: float | None
    latency_seconds: float | None
    retries: int
    errors: int


@dataclass
class FreshnessPoint:
    """A cadence group at one moment: how many of its tables were fresh by its cron."""

    group: str
    at: datetime
    fresh: int
    tables: int


@dataclass
class StatusReport:
    generated_at: datetime
    database: str
    entities: list[EntityStatus]
    points: list[ChangeSetPoint] = field(default_factory=list)
    freshness: list[FreshnessPoint] = field(default_factory=list)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        return max(0.0, (parse_datetime(end) - parse_datetime(start)).total_seconds())
    except ValueError:
        return None


def entity_state(publish_status: str | None, sync_status: str | None, fresh: bool,
                 last_publish: datetime | None) -> str:
    """failed when the latest attempt failed, never synced, else fresh or late by cadence."""
    if publish_status == PublishStatus.FAILED or sync_status == SyncStatus.FAILED:
        return FAILED
    if last_publish is None:
        return NEVER
    return FRESH if fresh else LATE


def collect_report(connection: sqlite3.Connection, config: EntitiesConfig,
                   now: datetime | None = None, database: str = "") -> StatusReport:
    """Everything the page shows, from the database alone."""
    now = now or datetime.now(UTC)
    dead_letters.ensure_tables(connection)
    statuses = []
    for entity in config.entities:
        group = config.groups[entity.group]
        state = read_sync_state(connection, entity.name)
        latest = latest_publish_state(connection, entity.name)
        last = (latest["change_set"], latest["status"], latest["error"]) if latest else None
        published = last_complete_publish(connection, entity.name)
        freshness = freshness_status(group.cron, published, now,
                                     timedelta(minutes=group.freshness_grace_minutes))
        statuses.append(EntityStatus(
            entity=entity.name, group=entity.group, cron=group.cron,
            state=entity_state(last[1] if last else None, state.status if state else None,
                               freshness.fresh, published),
            last_change_set=last[0] if last else None,
            publish_status=last[1] if last else None,
            last_publish=published, due_tick=freshness.due_tick,
            rows=canonical_row_count(connection, entity.name),
            open_issues=_count(connection, "_issues", entity.name, "resolved_at IS NULL"),
            dead_letters=_count(connection, "_dead_letter", entity.name, "status = 'open'"),
            queued_retries=_count(connection, "_retry_queue", entity.name),
            last_error=last[2] if last and last[1] == PublishStatus.FAILED else None,
        ))
    points = _change_set_points(connection, config)
    return StatusReport(now, database, statuses, points,
                        _freshness_over_time(connection, config, points, now))


def _freshness_over_time(connection: sqlite3.Connection, config: EntitiesConfig,
                         points: list[ChangeSetPoint], now: datetime) -> list[FreshnessPoint]:
    """Each group's fresh tables at evenly spaced moments from the first plotted change set to
    now, by the freshness check's rule applied to the publishes finished by then."""
    if not points:
        return []
    start = min(p.at for p in points)
    step = max((now - start) / FRESHNESS_SAMPLES, timedelta(seconds=1))
    moments = [start + step * i for i in range(FRESHNESS_SAMPLES)] + [now]
    finished: dict[str, list[datetime]] = {}
    for entity in config.entities:
        finished[entity.name] = sorted(
            parse_datetime(row[3]) for row in publish_history(
                connection, entity.name, MAX_POINTS_PER_ENTITY)
            if row[1] == PublishStatus.COMPLETE and row[3])
    samples = []
    for group, group_config in config.groups.items():
        entities = config.entities_in_group(group)
        if not entities:
            continue
        grace = timedelta(minutes=group_config.freshness_grace_minutes)
        for moment in moments:
            fresh = sum(freshness_status(
                group_config.cron,
                max((t for t in finished[e.name] if t <= moment), default=None),
                moment, grace).fresh for e in entities)
            samples.append(FreshnessPoint(group, moment, fresh, len(entities)))
    return samples


def _count(connection: sqlite3.Connection, table: str, entity: str,
           condition: str = "1 = 1") -> int:
    return connection.execute(
        f"SELECT count(*) FROM {table} WHERE entity = ? AND {condition}", (entity,)
    ).fetchone()[0]


def _change_set_points(connection: sqlite3.Connection,
                       config: EntitiesConfig) -> list[ChangeSetPoint]:
    fetches = fetch_details(connection)
    failures: dict[tuple[str, str], int] = defaultdict(int)
    for entity, change_set, attempts in connection.execute(
            "SELECT entity, change_set, attempts FROM _retry_queue"):
        failures[(entity, change_set)] = max(failures[(entity, change_set)], attempts)
    for entity, change_set, history in connection.execute(
            "SELECT entity, change_set, retry_history FROM _dead_letter"):
        attempts = len(orjson.loads(history or "[]"))
        failures[(entity, change_set)] = max(failures[(entity, change_set)], attempts)
    points = []
    for entity in config.entities:
        rows = publish_history(connection, entity.name, MAX_POINTS_PER_ENTITY)
        keys = {row[0] for row in rows}
        # Change sets that failed before anything was staged have no publish state.
        rows += [(cs, str(PublishStatus.FAILED), None, None, 0, 0, 0, None, 0)
                 for (name, cs) in failures if name == entity.name and cs not in keys]
        for (change_set, status, _source_ts, finished, created, updated, deleted, seconds,
             retry_count) in sorted(rows):
            if not is_change_set_key(change_set):
                continue
            at = change_set_time(change_set)
            fetch = fetches.get((entity.name, change_set), {})
            fetch_seconds = fetch.get("seconds")
            # From the fetch's start: how old the newest data can be once it is in the mirror
            # (the source's own timestamps say when records changed, not when we read them).
            fetched = fetch.get("fetch_started_at")
            work = [s for s in (fetch_seconds, seconds) if isinstance(s, int | float)]
            points.append(ChangeSetPoint(
                entity=entity.name, change_set=change_set, at=at, status=status,
                rows_changed=(created or 0) + (updated or 0) + (deleted or 0),
                sync_seconds=sum(work) if work and status == PublishStatus.COMPLETE else None,
                latency_seconds=(_seconds_between(fetched, finished)
                                 if status == PublishStatus.COMPLETE else None),
                retries=int(fetch.get("retries") or 0),
                errors=max(retry_count or 0, failures.get((entity.name, change_set), 0)),
            ))
    return points


def write_report(connection: sqlite3.Connection, config: EntitiesConfig, out: Path,
                 now: datetime | None = None, database: str = "") -> StatusReport:
    report = collect_report(connection, config, now, database)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(report), encoding="utf-8")
    return report


# -- charts -----------------------------------------------------------------------------------

@dataclass
class Series:
    name: str
    points: list[tuple[datetime, float, str]]  # (x, y, tooltip)
    color: str


def _nice_ceiling(value: float, integers: bool = False) -> float:
    """The axis top: 1, 2 or 5 times a power of ten, at least `value` (at least 5 for counts,
    so the five intervals fall on whole numbers)."""
    if integers:
        value = max(value, 5.0)
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * magnitude * (1 + 1e-9):
            return step * magnitude
    return 10 * magnitude


def _format_value(value: float, unit: str) -> str:
    if unit == "s":  # 1m rather than 1m 00s on an axis
        text = format_duration(value) if value else "0"
        for zero in (" 00s", " 00m", " 0h"):
            text = text.removesuffix(zero)
        return text
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}".rstrip("0")


class _Scale:
    """Value -> pixel on the y axis: linear from zero, or logarithmic (powers of ten) for
    values that span orders of magnitude (latency: seconds to days)."""

    def __init__(self, values: list[float], top: float, height: float, log: bool,
                 integers: bool) -> None:
        self.top, self.height, self.log = top, height, log
        if log:
            positive = [v for v in values if v > 0] or [1.0]
            self.low = math.floor(math.log10(min(positive)))
            self.high = max(self.low + 1, math.ceil(math.log10(max(positive))))
        else:
            self.max = _nice_ceiling(max(values), integers)

    def __call__(self, value: float) -> float:
        if self.log:
            exponent = math.log10(value) if value > 0 else self.low
            share = (max(self.low, exponent) - self.low) / (self.high - self.low)
        else:
            share = value / self.max
        return self.top + self.height * (1 - share)

    def ticks(self, unit: str = "") -> list[float]:
        if self.log:
            low, high = 10.0 ** self.low, 10.0 ** self.high
            if unit == "s":  # a second, a minute, an hour, a day, a month, a year
                human = [t for t in DURATION_TICKS if low <= t <= high]
                if len(human) >= 2:
                    return human
            step = max(1, math.ceil((self.high - self.low) / 6))
            return [10.0 ** e for e in range(self.low, self.high + 1, step)]
        return [self.max * i / 5 for i in range(6)]


def line_chart(title: str, series: list[Series], unit: str = "", *, log: bool = False,
               integers: bool = False, change_sets: dict[datetime, str] | None = None,
               width: int = 900, height: int = 250) -> str:
    """An inline SVG line chart: time on x, values on y (from zero, or log-scaled), a point
    per value with its tooltip, each line's name at its last point, a legend that wraps.
    With `change_sets` (x -> key) the x axis names the change sets (as many as fit), else it
    shows the first and last moment. Drawn from the data alone (no library, no script)."""
    # The right margin holds the lines' names (bold 11px: about 7px a character).
    left, top = 84, 28
    right = 24 + 7 * max((len(s.name) for s in series), default=0)
    legend_rows, x_cursor = 1, left
    for s in series:  # lay the legend out first: its rows decide the bottom margin
        item = 22 + 7 * len(s.name)
        if x_cursor + item > width - 16 and x_cursor > left:
            legend_rows, x_cursor = legend_rows + 1, left
        x_cursor += item
    axis_labels = 96 if change_sets else 16  # change-set keys are drawn slanted
    bottom = 14 + axis_labels + 16 * legend_rows
    height += axis_labels - 16 + 16 * (legend_rows - 1)
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [(x, y) for s in series for x, y, _ in s.points]
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" aria-label="{html.escape(title)}">',
             f'<text class="chart-title" x="{left}" y="18">{html.escape(title)}</text>']
    if not values:
        parts.append(f'<text class="empty" x="{width / 2}" y="{height / 2}" '
                     'text-anchor="middle">no change sets yet</text></svg>')
        return "".join(parts)
    x_min = min(x for x, _ in values)
    x_max = max(x for x, _ in values)
    span = (x_max - x_min).total_seconds() or 1.0
    sy = _Scale([y for _, y in values], top, plot_h, log, integers)

    def sx(x: datetime) -> float:
        if x_max == x_min:
            return left + plot_w / 2
        return left + plot_w * (x - x_min).total_seconds() / span

    for y in sy.ticks(unit):  # horizontal grid and y labels
        parts.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" '
                     f'y1="{sy(y):.1f}" y2="{sy(y):.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6}" y="{sy(y) + 4:.1f}" '
                     f'text-anchor="end">{html.escape(_format_value(y, unit))}</text>')
    axis_y = top + plot_h
    if change_sets:
        parts += _change_set_ticks(change_sets, sx, axis_y)
    else:
        labels = [(x_min, "start")] if x_max == x_min else [(x_min, "start"), (x_max, "end")]
        for x, anchor in labels:
            parts.append(f'<text class="tick" x="{sx(x):.1f}" y="{axis_y + 16}" '
                         f'text-anchor="{anchor}">{x:%Y-%m-%d %H:%M}</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{left + plot_w}" y1="{axis_y}" '
                 f'y2="{axis_y}"/>')
    if log:
        parts.append(f'<text class="tick" x="{left + plot_w}" y="18" text-anchor="end">'
                     "log scale</text>")
    ends = []
    for s in series:
        ordered = sorted(s.points, key=lambda p: p[0])
        if len(ordered) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in ordered)
            parts.append(f'<polyline class="line" fill="none" stroke="{s.color}" '
                         f'points="{path}"/>')
        for x, y, tip in ordered:
            parts.append(f'<circle class="point" data-series="{html.escape(s.name)}" '
                         f'cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s.color}">'
                         f'<title>{html.escape(tip)}</title></circle>')
        ends.append((sy(ordered[-1][1]), sx(ordered[-1][0]), s))
    parts += _direct_labels(ends, left + plot_w + 8, top, axis_y)
    x_cursor, y_cursor = left, height - 16 * legend_rows + 8
    for s in series:
        item = 22 + 7 * len(s.name)
        if x_cursor + item > width - 16 and x_cursor > left:
            x_cursor, y_cursor = left, y_cursor + 16
        parts.append(f'<rect x="{x_cursor}" y="{y_cursor - 9}" width="10" height="10" '
                     f'fill="{s.color}"/><text class="legend" x="{x_cursor + 14}" '
                     f'y="{y_cursor}">{html.escape(s.name)}</text>')
        x_cursor += item
    parts.append("</svg>")
    return "".join(parts)


# Change-set keys on the x axis: slanted, at least this far apart (pixels), the newest always
# named.
CHANGE_SET_LABEL_GAP = 18
LABEL_LINE = 12  # the direct labels' line height


def _change_set_ticks(change_sets: dict[datetime, str], sx, axis_y: float) -> list[str]:
    moments = sorted(change_sets)
    kept: list[datetime] = []
    for moment in reversed(moments):  # from the newest, which is always named
        if not kept or sx(kept[-1]) - sx(moment) >= CHANGE_SET_LABEL_GAP:
            kept.append(moment)
    parts = []
    for moment in moments:  # a tick for every change set, a name where it fits
        parts.append(f'<line class="axis" x1="{sx(moment):.1f}" x2="{sx(moment):.1f}" '
                     f'y1="{axis_y}" y2="{axis_y + 4}"/>')
    for moment in kept:
        x, y = sx(moment), axis_y + 10
        parts.append(f'<text class="tick change-set" x="{x:.1f}" y="{y:.1f}" '
                     f'text-anchor="end" transform="rotate(-60 {x:.1f} {y:.1f})">'
                     f'{html.escape(change_sets[moment])}</text>')
    return parts


def _direct_labels(ends: list[tuple[float, float, Series]], x: float, top: float,
                   bottom: float) -> list[str]:
    """Each line's name beside the plot, at the height of its last point, pushed apart so
    none overlaps, with a thin leader to that point."""
    ends = sorted(ends, key=lambda e: e[0])
    placed: list[float] = []
    for y, _, _ in ends:
        placed.append(max(y, placed[-1] + LABEL_LINE) if placed else max(y, top))
    overflow = (placed[-1] - bottom) if placed else 0
    if overflow > 0:  # shift the stack up, keeping the gaps
        placed = [max(top, p - overflow) for p in placed]
        for i in range(1, len(placed)):
            placed[i] = max(placed[i], placed[i - 1] + LABEL_LINE)
    parts = []
    for (y, last_x, s), label_y in zip(ends, placed, strict=True):
        parts.append(f'<line class="leader" x1="{last_x:.1f}" y1="{y:.1f}" x2="{x - 2:.1f}" '
                     f'y2="{label_y:.1f}" stroke="{s.color}"/>'
                     f'<text class="direct-label" data-series="{html.escape(s.name)}" '
                     f'x="{x:.1f}" y="{label_y + 4:.1f}" fill="{s.color}">'
                     f'{html.escape(s.name)}</text>')
    return parts


def _entity_series(report: StatusReport, value, label: str, unit: str) -> list[Series]:
    by_entity: dict[str, list[tuple[datetime, float, str]]] = defaultdict(list)
    for point in report.points:
        y = value(point)
        if y is None:
            continue
        shown = _format_value(y, unit)
        by_entity[point.entity].append(
            (point.at, float(y), f"{point.entity} {point.change_set}: {label} {shown}"))
    # One colour per entity on every chart: its place in the table, not in this chart.
    return [Series(e.entity, by_entity[e.entity], PALETTE[i % len(PALETTE)])
            for i, e in enumerate(report.entities) if e.entity in by_entity]


def _change_set_keys(report: StatusReport) -> dict[datetime, str]:
    return {point.at: point.change_set for point in report.points}


def _freshness_series(report: StatusReport) -> list[Series]:
    by_group: dict[str, list[tuple[datetime, float, str]]] = defaultdict(list)
    for sample in report.freshness:
        by_group[sample.group].append((
            sample.at, 100.0 * sample.fresh / sample.tables,
            f"{sample.group} {sample.at:%Y-%m-%d %H:%M}: {sample.fresh} of {sample.tables} "
            "tables fresh"))
    colours = iter(PALETTE[::-1])  # not the first entities' colours
    return [Series(group, points, next(colours)) for group, points in by_group.items()]


def _errors_and_retries(report: StatusReport) -> list[Series]:
    totals: dict[datetime, list[int]] = defaultdict(lambda: [0, 0])
    keys: dict[datetime, str] = {}
    for point in report.points:
        totals[point.at][0] += point.retries
        totals[point.at][1] += point.errors
        keys[point.at] = point.change_set
    series = []
    for index, (name, color) in enumerate((("HTTP retries", PALETTE[0]),
                                           ("failed attempts", PALETTE[1]))):
        series.append(Series(name, [
            (at, float(counts[index]), f"{keys[at]}: {name} {counts[index]}")
            for at, counts in sorted(totals.items())], color))
    return series


def charts(report: StatusReport) -> list[str]:
    keys = _change_set_keys(report)
    return [
        line_chart("Rows changed per change set (created + updated + deleted)",
                   _entity_series(report, lambda p: p.rows_changed, "rows changed", ""),
                   integers=True, change_sets=keys),
        line_chart("Sync duration (fetch + publish)",
                   _entity_series(report, lambda p: p.sync_seconds, "took", "s"), unit="s",
                   change_sets=keys),
        line_chart("Publish latency (fetch start to publish)",
                   _entity_series(report, lambda p: p.latency_seconds, "latency", "s"),
                   unit="s", log=True, change_sets=keys),
        line_chart("Errors and retries per change set (all entities)",
                   _errors_and_retries(report), integers=True, change_sets=keys),
        line_chart("Fresh tables per cadence group (%, by its cron and grace)",
                   _freshness_series(report), integers=True),
    ]


# -- the page -----------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px;
       color: #111827; background: #f9fafb; }
h1 { font-size: 20px; margin: 0 0 4px; }
.meta { color: #6b7280; margin-bottom: 16px; }
.summary span { display: inline-block; margin-right: 12px; }
table { border-collapse: collapse; background: #fff; width: 100%; margin: 12px 0 24px; }
th, td { border-bottom: 1px solid #e5e7eb; padding: 6px 8px; text-align: left;
         vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.state { border-radius: 9px; padding: 1px 8px; font-weight: 600; font-size: 12px;
         white-space: nowrap; }
.state-fresh { background: #dcfce7; color: #166534; }
.state-late { background: #fef3c7; color: #92400e; }
.state-failed { background: #fee2e2; color: #991b1b; }
.state-never { background: #e5e7eb; color: #374151; }
.error { color: #991b1b; font-size: 12px; max-width: 360px; overflow-wrap: anywhere; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(640px, 1fr));
          gap: 16px; }
.chart { background: #fff; border: 1px solid #e5e7eb; width: 100%; height: auto; }
.chart-title { font-weight: 600; font-size: 13px; fill: #111827; }
.grid { stroke: #f3f4f6; } .axis { stroke: #9ca3af; }
.tick, .legend { font-size: 11px; fill: #4b5563; } .empty { fill: #9ca3af; }
.line { stroke-width: 1.5; } .leader { stroke-width: 0.5; stroke-dasharray: 2 2; }
.direct-label { font-size: 11px; font-weight: 600; }
"""


def _age(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    return format_duration(max(0.0, (now - moment).total_seconds())) + " ago"


def _entity_row(status: EntityStatus, now: datetime) -> str:
    css = "never" if status.state == NEVER else status.state
    cadence = (f"{html.escape(status.group)} <code>{html.escape(status.cron)}</code>"
               + (f"<br><small>due since {status.due_tick:%Y-%m-%d %H:%M} UTC</small>"
                  if status.due_tick else ""))
    error = (f'<div class="error">{html.escape(status.last_error[:300])}</div>'
             if status.last_error else "")
    cells = [
        f"<td>{html.escape(status.entity)}</td>",
        f"<td>{cadence}</td>",
        f'<td><span class="state state-{css}">{html.escape(status.state)}</span>{error}</td>',
        f"<td>{html.escape(status.last_change_set or '-')}"
        f"<br><small>{html.escape(status.publish_status or '')}</small></td>",
        f"<td>{html.escape(_age(status.last_publish, now))}</td>",
        f'<td class="num">{status.rows:,}</td>',
        f'<td class="num">{status.open_issues:,}</td>',
        f'<td class="num">{status.dead_letters:,}</td>',
        f'<td class="num">{status.queued_retries:,}</td>',
    ]
    return f'<tr data-entity="{html.escape(status.entity)}" data-state="{css}">' \
           + "".join(cells) + "</tr>"


def render_html(report: StatusReport) -> str:
    """The whole page: no external references, no script."""
    now = report.generated_at
    counts = {state: sum(e.state == state for e in report.entities)
              for state in (FRESH, LATE, FAILED, NEVER)}
    summary = "".join(
        f'<span><span class="state state-{"never" if s == NEVER else s}">{n}</span> '
        f"{html.escape(s)}</span>" for s, n in counts.items())
    rows = "\n".join(_entity_row(status, now) for status in report.entities)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Dataverse mirror status</title>
<style>{STYLE}</style>
</head>
<body>
<h1>Dataverse mirror status</h1>
<div class="meta">Generated {now:%Y-%m-%d %H:%M:%S} UTC from {html.escape(report.database)}</div>
<div class="summary">{summary}</div>
<table>
<thead><tr><th>entity</th><th>cadence</th><th>state</th><th>last change set</th>
<th>last published</th><th>rows</th><th>open issues</th><th>dead letters</th>
<th>queued retries</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<div class="charts">
{"".join(charts(report))}
</div>
</body>
</html>
"""
