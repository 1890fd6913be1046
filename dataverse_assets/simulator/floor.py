"""The floor: the shortest wall time in which the service protection limits let an org's pages
be served, whoever the client is.

A pure function of the pages' serving times (what the latency model, or a real org, takes for
each) and the limits, played the way the simulator (protection.py) and Dataverse apply them:

- at most `max_concurrent` requests in flight;
- a request starts only while fewer than `max_requests` requests started in the last
  `window_seconds` (a start stops counting `window_seconds` after it);
- a request starts only while the execution time of the requests that *finished* in the last
  `window_seconds` is below `max_execution_seconds` (a request's time counts when it ends, so a
  burst started under the budget may overshoot it, as on Dataverse).

Pages are independent (key ranges can split any table, so no page waits for another), and a
client that never meets a 429 loses nothing to Retry-After. The floor is then the makespan of a
perfect client: every page starts at the first moment the limits allow, longest pages first
(LPT). That schedule is one the limits permit, so nothing slower can be called the floor; it
is within one page of the true minimum under concurrency alone (LPT's classic bound), equal to
it for equal pages, and, where the execution-time budget binds, a different order could win at
most the tail of one window. `lower_bound_seconds` gives bounds no client can beat (longest
page, total work over the concurrency, and the request window), so the true minimum lies
between the two; the report prints both.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from .protection import ServiceProtectionLimits

# Times within this much count as the same moment (float sums of many small pages).
_EPSILON = 1e-9


def _schedule(page_seconds: list[float], limits: ServiceProtectionLimits) -> list[float]:
    """Start times of the pages, in the order given, each as early as the limits allow."""
    pending = deque(page_seconds)
    window = limits.window_seconds
    running: list[tuple[float, float]] = []  # (end, seconds), a heap
    starts: deque[float] = deque()  # start times still inside the window
    executions: deque[tuple[float, float]] = deque()  # (end, seconds) counted, by end
    execution_total = 0.0
    started_at: list[float] = []
    now = 0.0
    while pending:
        # A request's execution time counts from its end, in end order.
        while running and running[0][0] <= now + _EPSILON:
            executions.append(heapq.heappop(running))
            execution_total += executions[-1][1]
        while starts and starts[0] <= now - window + _EPSILON:
            starts.popleft()
        while executions and executions[0][0] <= now - window + _EPSILON:
            execution_total -= executions.popleft()[1]
        while pending:
            if limits.max_concurrent is not None and len(running) >= limits.max_concurrent:
                break
            if limits.max_requests is not None and len(starts) >= limits.max_requests:
                break
            if (limits.max_execution_seconds is not None
                    and execution_total >= limits.max_execution_seconds - _EPSILON):
                break
            seconds = pending.popleft()
            heapq.heappush(running, (now + seconds, seconds))
            starts.append(now)
            started_at.append(now)
        if not pending:
            break
        candidates = [running[0][0]] if running else []
        if limits.max_requests is not None and len(starts) >= limits.max_requests:
            candidates.append(starts[0] + window)
        if executions and (limits.max_execution_seconds is not None
                           and execution_total >= limits.max_execution_seconds - _EPSILON):
            candidates.append(executions[0][0] + window)
        later = [c for c in candidates if c > now + _EPSILON]
        if not later:  # pragma: no cover - every limit above is finite and frees with time
            raise RuntimeError("the floor's schedule cannot advance")
        now = min(later)
    return started_at


def floor_seconds(page_seconds: list[float], limits: ServiceProtectionLimits) -> float:
    """The makespan of the perfect client's schedule, longest pages first (module docstring)."""
    if not page_seconds:
        return 0.0
    ordered = sorted(page_seconds, reverse=True)
    starts = _schedule(ordered, limits)
    return max(start + seconds for start, seconds in zip(starts, ordered, strict=True))


def lower_bound_seconds(page_seconds: list[float], limits: ServiceProtectionLimits) -> float:
    """A time no client can beat: the longest page, the total over the concurrency limit, and
    the request window (the (k*R+1)-th page starts no earlier than k windows in)."""
    if not page_seconds:
        return 0.0
    bounds = [max(page_seconds)]
    if limits.max_concurrent is not None:
        bounds.append(sum(page_seconds) / limits.max_concurrent)
    if limits.max_requests is not None:
        windows = (len(page_seconds) - 1) // limits.max_requests
        bounds.append(windows * limits.window_seconds + min(page_seconds))
    return max(bounds)


@dataclass(frozen=True)
class FloorReport:
    """A measured run beside the floor for the same pages."""

    pages: int
    rows: int
    page_seconds_total: float
    floor_seconds: float
    lower_bound_seconds: float
    measured_seconds: float

    @property
    def ratio(self) -> float:
        """Measured wall time over the floor (1.0 is as fast as the limits allow)."""
        return self.measured_seconds / self.floor_seconds if self.floor_seconds else float("inf")

    def lines(self) -> list[str]:
        return [
            f"pages {self.pages:,} ({self.rows:,} rows, {self.page_seconds_total:,.1f} s of "
            f"serving)",
            f"floor {self.floor_seconds:,.2f} s (no client beats "
            f"{self.lower_bound_seconds:,.2f} s)",
            f"measured {self.measured_seconds:,.2f} s = {self.ratio:,.2f} x the floor",
        ]


def floor_report(page_rows: list[int], page_seconds: list[float],
                 limits: ServiceProtectionLimits, measured_seconds: float) -> FloorReport:
    """The floor for these pages (rows and serving seconds of each) against a measured time."""
    return FloorReport(
        pages=len(page_seconds), rows=sum(page_rows),
        page_seconds_total=sum(page_seconds),
        floor_seconds=floor_seconds(page_seconds, limits),
        lower_bound_seconds=lower_bound_seconds(page_seconds, limits),
        measured_seconds=measured_seconds,
    )
