"""How long the simulator takes to serve a data request: a cost per request plus one per row.

Off by default, so tests and the everyday simulator answer at once. `LatencyModel.dataverse()`
makes a 5,000-row page take about a second, the order of what a real org serves to one
application user: Mark Carrington measured 275,000 email rows read with paging cookies in 1:31
(55 pages of 5,000, ~1.65 s a page, markcarrington.dev/2019/03/20/handling-retrievemultiple-paging),
and DATAVERSE.md puts one user's read rate at "a few thousand rows per second". Microsoft
publishes the limits (learn.microsoft.com/power-apps/developer/data-platform/api-limits), not a
page latency; the figure is a rounded observation, and the benchmark reports it beside its
results.

The gateway waits the delay with `await asyncio.sleep` (concurrent requests overlap, as on a
real server) and counts it as the request's execution time for the service protection limits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyModel:
    """Seconds a data request takes: per_request + rows * per_row, times a seeded jitter."""

    per_request_seconds: float = 0.0
    per_row_seconds: float = 0.0
    # Each delay is scaled by a uniform factor in [1 - jitter, 1 + jitter].
    jitter: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.per_request_seconds < 0 or self.per_row_seconds < 0:
            raise ValueError("latency seconds are not negative")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter is a fraction in [0, 1)")

    @classmethod
    def dataverse(cls, jitter: float = 0.0, seed: int = 0) -> LatencyModel:
        """About a second per full 5,000-row page: 0.2 s per request, 0.16 ms per row."""
        return cls(per_request_seconds=0.2, per_row_seconds=0.8 / 5000, jitter=jitter,
                   seed=seed)

    def rng(self) -> random.Random:
        """The jitter's random source (one per simulator, so a run is reproducible)."""
        return random.Random(self.seed)

    def delay(self, rows: int, rng: random.Random | None = None) -> float:
        """Seconds to serve a request that returns `rows` rows."""
        seconds = self.per_request_seconds + max(0, rows) * self.per_row_seconds
        if self.jitter and rng is not None:
            seconds *= 1 + rng.uniform(-self.jitter, self.jitter)
        return seconds
