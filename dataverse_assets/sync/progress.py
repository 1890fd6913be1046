"""Progress of long work: pages, rows, rows/s and an ETA when the total is known, reported at
a bounded rate, for every phase of a change set (fetch, staging, planning, publishing).

A `ProgressReporter` is the callback `fetch.fetch_change_set` calls after every page. It
forwards the numbers to its sinks (the Dagster log, the terminal of `dataverse-assets sync`),
each throttled by time: a million-row table yields a line every few seconds, not one per page.

The CLI runs its jobs in-process, so it follows progress by `listening` here; the asset's
reporter hands every update to the listeners as well as to the run's log. Staging, planning
and publishing report to the listeners only (`phase_reporter`), each with its final line, so
the terminal can say when an entity is done and how long each phase took.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FetchProgress:
    """What a fetch has done so far. `total` is the record count the source reported for the
    reads under way (`$count`), None when it is not known."""

    pages: int
    records: int
    total: int | None = None


@dataclass(frozen=True)
class ProgressUpdate:
    """One line's worth of progress of one entity's change set."""

    entity: str
    change_set: str
    pages: int
    records: int
    total: int | None
    elapsed_seconds: float
    done: bool = False
    phase: str = "fetch"  # fetch, staging, planning, publishing
    note: str = ""  # the final line's summary, e.g. a publish's counts

    @property
    def rows_per_second(self) -> float | None:
        return self.records / self.elapsed_seconds if self.elapsed_seconds > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far; None without a total or a rate."""
        rate = self.rows_per_second
        if self.done or self.total is None or not rate:
            return None
        return max(0.0, (self.total - self.records) / rate)

    def line(self) -> str:
        """e.g. `accounts: 12 pages, 4,800 / 10,000 rows (48%), 960 rows/s, ETA 5s`; other
        phases than fetch are named: `accounts: staging 4,800 / 10,000 rows (48%), ...`."""
        rows = f"{self.records:,}"
        if self.total is not None:
            share = min(100, round(100 * self.records / self.total)) if self.total else 100
            rows += f" / {self.total:,} rows ({share}%)"
        else:
            rows += " rows"
        if self.phase == "fetch":
            parts = [f"{self.pages:,} page{'s' if self.pages != 1 else ''}", rows]
        elif self.records or self.total is not None:
            parts = [f"{self.phase} {rows}"]
        else:  # a phase without row counts (planning): its time only
            parts = [self.phase]
        rate = self.rows_per_second if self.records else None
        if rate is not None:
            parts.append(f"{rate:,.0f} rows/s")
        if self.done:
            parts.append(f"done in {format_duration(self.elapsed_seconds)}")
            if self.note:
                parts.append(self.note)
        elif (eta := self.eta_seconds) is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return f"{self.entity}: " + ", ".join(parts)


def format_duration(seconds: float) -> str:
    """0.5s, 45s, 3m 20s, 2h 05m, 12d 3h."""
    if seconds < 10:
        return f"{seconds:.1f}s".replace(".0s", "s") if seconds >= 1 else f"{seconds:.2g}s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


@dataclass
class ProgressSink:
    """Where lines go, and how often: at most one line per `interval_seconds` while work is
    under way, plus the final one (unless `final_only_after_progress` and no progress line
    was needed: short work stays quiet)."""

    emit: Callable[[ProgressUpdate], None]
    interval_seconds: float
    final_only_after_progress: bool = False
    last_emitted: float | None = field(default=None, init=False)


class ProgressReporter:
    """The progress callback of one entity's fetch (see fetch.fetch_change_set)."""

    def __init__(self, entity: str, change_set: str, sinks: list[ProgressSink],
                 clock: Callable[[], float] = time.monotonic, phase: str = "fetch") -> None:
        self.entity = entity
        self.change_set = change_set
        self.phase = phase
        self.sinks = sinks
        self._clock = clock
        self._started = clock()
        self._last = FetchProgress(0, 0)
        for sink in sinks:
            sink.last_emitted = None

    def _update(self, progress: FetchProgress, done: bool, note: str = "") -> ProgressUpdate:
        return ProgressUpdate(self.entity, self.change_set, progress.pages, progress.records,
                              progress.total, self._clock() - self._started, done, self.phase,
                              note)

    def __call__(self, progress: FetchProgress) -> None:
        self._last = progress
        now = self._clock()
        update: ProgressUpdate | None = None
        for sink in self.sinks:
            since = sink.last_emitted if sink.last_emitted is not None else self._started
            if now - since >= sink.interval_seconds:
                update = update or self._update(progress, done=False)
                sink.last_emitted = now
                sink.emit(update)

    def finish(self, pages: int | None = None, records: int | None = None,
               note: str = "") -> None:
        """The final line (with the fetch's own totals when given)."""
        last = self._last
        final = FetchProgress(last.pages if pages is None else pages,
                              last.records if records is None else records, last.total)
        update = self._update(final, done=True, note=note)
        for sink in self.sinks:
            if sink.final_only_after_progress and sink.last_emitted is None:
                continue
            sink.emit(update)


# -- in-process listeners (the CLI's terminal) ---------------------------------------------

_listeners: list[Callable[[ProgressUpdate], None]] = []
_listeners_lock = threading.Lock()


@contextmanager
def listening(listener: Callable[[ProgressUpdate], None]) -> Iterator[None]:
    """Receive the progress of every fetch in this process while the block runs."""
    with _listeners_lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _listeners_lock:
            _listeners.remove(listener)


def _to_listeners(update: ProgressUpdate) -> None:
    with _listeners_lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(update)


# How often progress goes to the Dagster log and to a listening terminal.
LOG_INTERVAL_SECONDS = 10.0
TERMINAL_INTERVAL_SECONDS = 2.0


def fetch_reporter(entity: str, change_set: str, log: Callable[[str], None], *,
                   log_interval: float = LOG_INTERVAL_SECONDS,
                   terminal_interval: float = TERMINAL_INTERVAL_SECONDS,
                   clock: Callable[[], float] = time.monotonic) -> ProgressReporter:
    """The reporter raw/E uses: a line to `log` (the run's log) every `log_interval` seconds
    and at the end, and updates to in-process listeners every `terminal_interval` seconds
    (their final line only when the fetch took long enough to show progress)."""
    return ProgressReporter(entity, change_set, [
        ProgressSink(lambda update: log(update.line()), log_interval),
        ProgressSink(_to_listeners, terminal_interval, final_only_after_progress=True),
    ], clock=clock)


def phase_reporter(entity: str, change_set: str, phase: str, *,
                   interval: float = TERMINAL_INTERVAL_SECONDS,
                   clock: Callable[[], float] = time.monotonic) -> ProgressReporter:
    """Staging, planning or publishing of one change set, for in-process listeners: an update
    every `interval` seconds while it runs and always the final one (with its time)."""
    return ProgressReporter(entity, change_set, [ProgressSink(_to_listeners, interval)],
                            clock=clock, phase=phase)
