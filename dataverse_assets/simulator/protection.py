"""Dataverse's service protection limits: per user, a sliding window, three limits.

Per user (the application the bearer token was issued to) over a sliding window (300 s in
Dataverse): a number of requests (6000), a combined execution time (1200 s) and a number of
concurrent requests (52). Over a limit the answer is 429 with `Retry-After` in seconds and an
error code saying which limit: 0x80072322 requests, 0x80072321 execution time, 0x80072326
concurrency. A client that keeps sending while throttled only makes its Retry-After longer.

The simulator's limits are off unless a test or the CLI turns them on, so ordinary syncs never
meet them; `ServiceProtectionLimits.dataverse()` gives Dataverse's numbers and tests use small
ones (and fractional Retry-After values, which Dataverse itself never sends).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

REQUESTS_CODE = "0x80072322"
EXECUTION_TIME_CODE = "0x80072321"
CONCURRENCY_CODE = "0x80072326"


@dataclass(frozen=True)
class ServiceProtectionLimits:
    """The limits per user; None means unlimited (the default: no limits at all)."""

    max_requests: int | None = None
    max_execution_seconds: float | None = None
    max_concurrent: int | None = None
    window_seconds: float = 300.0
    # Retry-After is rounded up to a multiple of this (Dataverse: whole seconds).
    retry_after_granularity: float = 1.0
    # Every request sent during a throttle pushes its end back by this much.
    push_penalty_seconds: float = 1.0
    # The concurrency limit refuses at once and does not hold the user back afterwards.
    concurrency_retry_after: float = 1.0
    # The degree of parallelism the server recommends (`x-ms-dop-hint` on every answered
    # request); None: the header is not sent.
    dop_hint: int | None = None

    @classmethod
    def dataverse(cls) -> ServiceProtectionLimits:
        """Dataverse's documented defaults: 6000 requests, 1200 s, 52 concurrent per 300 s."""
        return cls(max_requests=6000, max_execution_seconds=1200.0, max_concurrent=52)

    @property
    def enabled(self) -> bool:
        return (
            self.max_requests is not None
            or self.max_execution_seconds is not None
            or self.max_concurrent is not None
        )

    def round_retry_after(self, seconds: float) -> float:
        step = self.retry_after_granularity
        return round(max(step, math.ceil(seconds / step - 1e-9) * step), 6)


@dataclass(frozen=True)
class Throttle:
    """A refusal: the 429's error code, message and Retry-After."""

    code: str
    message: str
    retry_after: float

    def header_value(self) -> str:
        return f"{self.retry_after:g}"


@dataclass
class _UserWindow:
    started: deque[float] = field(default_factory=deque)  # admission times
    executions: deque[tuple[float, float]] = field(default_factory=deque)  # (end, seconds)
    execution_total: float = 0.0
    in_flight: int = 0
    blocked_until: float = 0.0
    blocked_code: str = REQUESTS_CODE


class ServiceProtection:
    """Admission control for one simulator; callers hold the simulator lock."""

    def __init__(
        self, limits: ServiceProtectionLimits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._users: dict[str, _UserWindow] = {}
        self.pushes_while_throttled = 0

    def _prune(self, window: _UserWindow, now: float) -> None:
        horizon = now - self.limits.window_seconds
        while window.started and window.started[0] <= horizon:
            window.started.popleft()
        while window.executions and window.executions[0][0] <= horizon:
            window.execution_total -= window.executions.popleft()[1]

    def _messages(self) -> dict[str, str]:
        limits = self.limits
        window = f"{limits.window_seconds:g} seconds"
        return {
            REQUESTS_CODE: (
                f"Number of requests exceeded the limit of {limits.max_requests} over time "
                f"window of {window}."
            ),
            EXECUTION_TIME_CODE: (
                "Combined execution time of incoming requests exceeded limit of "
                f"{(limits.max_execution_seconds or 0) * 1000:,.0f} milliseconds over time "
                f"window of {window}. Decrease number of concurrent requests or reduce the "
                "duration of requests and try again later."
            ),
            CONCURRENCY_CODE: (
                f"Number of concurrent requests exceeded the limit of {limits.max_concurrent}."
            ),
        }

    def admit(self, user: str) -> Throttle | None:
        """Count a request against the user's limits, or refuse it."""
        limits = self.limits
        now = self._clock()
        window = self._users.setdefault(user, _UserWindow())
        self._prune(window, now)
        if now < window.blocked_until:
            # Pushing during a throttle: refused again, and the throttle lasts longer.
            self.pushes_while_throttled += 1
            window.blocked_until += limits.push_penalty_seconds
            return self._refuse(window.blocked_code, window.blocked_until - now)
        if limits.max_concurrent is not None and window.in_flight >= limits.max_concurrent:
            return self._refuse(CONCURRENCY_CODE, limits.concurrency_retry_after)
        if limits.max_requests is not None and len(window.started) >= limits.max_requests:
            # The window slides: a slot frees when the oldest counted request leaves it.
            wait = window.started[0] + limits.window_seconds - now
            return self._block(window, REQUESTS_CODE, now, wait)
        if (
            limits.max_execution_seconds is not None
            and window.execution_total >= limits.max_execution_seconds
        ):
            total, wait = window.execution_total, 0.0
            for end, seconds in window.executions:
                total -= seconds
                wait = end + limits.window_seconds - now
                if total < limits.max_execution_seconds:
                    break
            return self._block(window, EXECUTION_TIME_CODE, now, wait)
        window.started.append(now)
        window.in_flight += 1
        return None

    def remaining_headers(self, user: str) -> list[tuple[bytes, bytes]]:
        """What Dataverse tells a client on every answered request: the requests and the
        combined execution time (seconds) left to this user in the current window."""
        limits = self.limits
        window = self._users.get(user)
        if window is None:
            return []
        self._prune(window, self._clock())
        headers = []
        if limits.dop_hint is not None:
            headers.append((b"x-ms-dop-hint", str(limits.dop_hint).encode()))
        if limits.max_requests is not None:
            left = max(0, limits.max_requests - len(window.started))
            headers.append((b"x-ms-ratelimit-burst-remaining-xrm-requests", str(left).encode()))
        if limits.max_execution_seconds is not None:
            left = max(0.0, limits.max_execution_seconds - window.execution_total)
            headers.append((b"x-ms-ratelimit-time-remaining-xrm-requests",
                            f"{left:,.2f}".encode()))
        return headers

    def finish(self, user: str, seconds: float) -> None:
        """An admitted request is done; its execution time counts from now on."""
        window = self._users.get(user)
        if window is None:
            return
        window.in_flight = max(0, window.in_flight - 1)
        window.executions.append((self._clock(), seconds))
        window.execution_total += seconds

    def _block(self, window: _UserWindow, code: str, now: float, wait: float) -> Throttle:
        throttle = self._refuse(code, wait)
        window.blocked_until = now + throttle.retry_after
        window.blocked_code = code
        return throttle

    def _refuse(self, code: str, wait: float) -> Throttle:
        return Throttle(code, self._messages()[code], self.limits.round_retry_after(wait))
