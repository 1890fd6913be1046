"""What the command line shows: tables, progress and ages, with `rich` on a terminal and as
plain lines otherwise (a pipe, a log file, CI, tests), so output stays greppable.

Plain tables keep one header line of column names and one line per row, cells separated by
spaces: `awk`, `column -t` and the tests read them. On a terminal the same rows are a rich
table, and the progress of a sync is a live display with one bar per entity and phase.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from dataverse_assets.sync.progress import (
    TERMINAL_INTERVAL_SECONDS,
    ProgressUpdate,
    format_duration,
)


def console(stderr: bool = False) -> Console:
    """A console on the current sys.stdout / sys.stderr (read at call time: tests swap them)."""
    return Console(file=sys.stderr if stderr else sys.stdout, highlight=False, soft_wrap=True)


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def print_table(rows: Sequence[dict], title: str | None = None) -> None:
    """Rows (dicts with the same keys) as a table; numbers right-aligned."""
    if not rows:
        return
    out = console()
    headers = list(rows[0])
    numeric = {h: all(isinstance(r[h], int | float) for r in rows) for h in headers}
    if out.is_terminal:
        table = Table(title=title, title_justify="left", header_style="bold")
        for header in headers:
            table.add_column(header, justify="right" if numeric[header] else "left")
        for row in rows:
            table.add_row(*(_cell(row[h]) for h in headers))
        out.print(table)
        return
    if title:
        print(title)
    cells = [[_cell(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for line in cells:
        print("  ".join(c.rjust(w) if numeric[h] else c.ljust(w)
                        for c, w, h in zip(line, widths, headers, strict=True)).rstrip())


def ago(seconds: float | None) -> str:
    """`just now`, `45 s ago`, `5 min ago`, `3 h ago`, `2 d ago`; `-` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 0:
        return "in " + _span(-seconds)
    if seconds < 5:
        return "just now"
    return _span(seconds) + " ago"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def until(moment: datetime | None, now: datetime | None = None) -> str:
    """A coming moment as `14:00 UTC (in 35 min)`; `-` when there is none."""
    if moment is None:
        return "-"
    now = now or datetime.now(UTC)
    seconds = (moment - now).total_seconds()
    day = "" if moment.date() == now.date() else moment.strftime("%Y-%m-%d ")
    return f"{day}{moment.strftime('%H:%M')} UTC (in {_span(max(seconds, 0))})"


class SyncProgress:
    """The progress listener of `sync`, `refresh` and `reconcile` (see progress.listening).

    On a terminal: a live display, one bar per entity with its phase (fetch, staging,
    planning, publishing), rows and ETA, and a line printed above it when an entity is done.
    Otherwise: a line per update (updates already come every few seconds at most, and only
    for long work), a phase's final line only when it was long, and always the line when an
    entity is done. Either way it keeps each phase's seconds, for the summary's overhead.
    """

    def __init__(self) -> None:
        self.out = console(stderr=True)
        self.seconds: dict[tuple[str, str], float] = {}  # (entity, phase) -> seconds
        self._shown: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._tasks: dict[str, int] = {}
        if self.out.is_terminal:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                console=self.out, transient=True)

    def __enter__(self) -> SyncProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, update: ProgressUpdate) -> None:
        with self._lock:
            key = (update.entity, update.phase)
            if update.done:
                self.seconds[key] = update.elapsed_seconds
            finished = update.done and update.phase == "publishing"
            if self._progress is not None:
                self._live(update, finished)
                return
            if finished:
                print(f"  {self.done_line(update)}", file=sys.stderr, flush=True)
            elif not update.done:
                self._shown.add(key)
                print(f"  {update.line()}", file=sys.stderr, flush=True)
            elif key in self._shown or update.elapsed_seconds >= TERMINAL_INTERVAL_SECONDS:
                print(f"  {update.line()}", file=sys.stderr, flush=True)

    def _live(self, update: ProgressUpdate, finished: bool) -> None:
        assert self._progress is not None
        rate = update.rows_per_second
        fields = {"rate": f"{rate:,.0f} rows/s" if rate and not update.done else ""}
        description = f"{update.entity} [dim]{update.phase}[/dim]"
        task = self._tasks.get(update.entity)
        if task is None:
            task = self._tasks[update.entity] = self._progress.add_task(
                description, total=update.total, completed=update.records, **fields)
        else:
            self._progress.update(task, description=description, total=update.total,
                                  completed=update.records, **fields)
        if finished:
            self._progress.remove_task(task)
            del self._tasks[update.entity]
            self._progress.console.print(f"  [green]{self.done_line(update)}[/green]",
                                         highlight=False, markup=True)

    def done_line(self, update: ProgressUpdate) -> str:
        """`done accounts: 90 created, ... (staging 0.2s, planning 0.1s, publishing 0.3s)`."""
        phases = ", ".join(f"{phase} {format_duration(self.seconds[(update.entity, phase)])}"
                           for phase in ("fetch", "staging", "planning", "publishing")
                           if (update.entity, phase) in self.seconds)
        return f"done {update.entity}: {update.note or f'{update.records:,} rows'} ({phases})"

    def step_seconds(self, entity: str) -> float:
        """The seconds measured here for the entity's staging (fetch and publish are in the
        step log)."""
        return self.seconds.get((entity, "staging"), 0.0)


def wall_time_line(group: str, entities: int, wall: float, steps: float) -> str:
    """`hourly: 7 entities in 8.4s wall time; our steps 5.1s, Dagster overhead 3.3s`."""
    overhead = max(wall - steps, 0.0)
    return (f"{group}: {entities} entit{'y' if entities == 1 else 'ies'} in "
            f"{format_duration(wall)} wall time; our steps {format_duration(steps)}, "
            f"Dagster overhead {format_duration(overhead)}")
