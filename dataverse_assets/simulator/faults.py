"""Injected faults: what a production org does to a client now and then, on demand.

Two ways to ask for them:
- `sim.inject(kind, count=..., entity=..., after=...)`: the next `count` matching Web API
  requests (after letting `after` pass) get the fault. Deterministic, for tests.
- `sim.fault_plan = FaultPlan(seed=..., rates={...})`: every Web API request draws from a
  seeded random generator; a 5xx starts a burst. For soak tests and the CLI.

Kinds:
- `server_error`: a 503 / 502 / 504 (`status`) with an HTML gateway page or a Dataverse JSON
  error (`body="html"` or `"json"`).
- `reset`: the connection drops mid-body (over loopback the socket closes after half the
  body; in-process the transport raises `SimulatedConnectionReset`, an httpx transport error).
- `slow`: the response waits `seconds` first (the wait counts as execution time).
- `malformed`: a 200 whose body is cut in half (`body="truncated"`), an HTML page
  (`body="html"`), JSON that is not OData (`body="not_odata"`: `{"message": ...}`), or a JSON
  array (`body="array"`): what a misrouted proxy or a wrong URL answers.
- `token_expiry`: every issued access token expires just before this request (-> 401).
- `modify_records` / `delete_records`: `rows` records of the entity (or exactly `pks`) change
  or vanish just before this request (by default only on nextLink requests: between pages).
- `repeat_next_link`: the page's `@odata.nextLink` points back at the page just served.
- `foreign_link`: the page's `@odata.nextLink` (`link="next"`) or `@odata.deltaLink`
  (`link="delta"`) points at another host (`host=`, default `http://foreign.invalid`), as a
  misconfigured proxy or a tampered response would; a client must not send its token there.
  A response without that link passes unchanged.
- `throttle`: a 429 with Dataverse's service-protection error and `Retry-After: seconds`; in a
  `FaultPlan` a storm of `storm` 429s in a row whose Retry-After doubles each time (what a
  client sees when it keeps pushing a throttled org).
- `endless_next_link`: the page's `@odata.nextLink` (added when the page has none) is a new,
  distinct link that serves the same page again: each time with another `simloop=<n>`
  parameter, which the app ignores. A client following links blindly pages forever.
- `trickle`: the response body arrives `chunk` bytes at a time with `seconds` between them
  (over loopback as separate writes; the headers come at once), as a congested proxy sends it.
- `redirect`: a 302 with `Location` on another host (`host=`, path and query kept), as a
  misconfigured proxy or a wrong DATAVERSE_URL answers; a client must not follow it.
- `echo_headers`: a 400 with a Dataverse-style JSON error whose message echoes the request's
  headers, Authorization included, as a debug endpoint or a misconfigured proxy does.
- `omit_delta_link`: the last page of a change-tracking read (a first read with
  `Prefer: odata.track-changes`, or a delta link) that asked for annotations
  (`Prefer: odata.include-annotations=...`) comes without its `@odata.deltaLink`, as has been
  reported of Dataverse (DATAVERSE.md). It is drawn once the response is known to carry a
  delta link, so earlier pages and reads without annotations do not use it up; a read without
  annotations always gets its link. `sim.omit_delta_link_with_annotations = True` does the
  same to every such read.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import httpx

FAULT_KINDS = (
    "server_error",
    "reset",
    "slow",
    "malformed",
    "token_expiry",
    "modify_records",
    "delete_records",
    "repeat_next_link",
    "foreign_link",
    "throttle",
    "endless_next_link",
    "trickle",
    "redirect",
    "echo_headers",
    "omit_delta_link",
)
# Kinds that need an entity set request (a table to mutate, a page to rewrite).
_ENTITY_KINDS = frozenset({"modify_records", "delete_records", "repeat_next_link",
                           "foreign_link", "endless_next_link", "omit_delta_link"})
# Kinds drawn after the app answered, for a response that can have them (see omit_delta_link);
# every other kind is drawn before, and never for such a second draw.
RESPONSE_KINDS = frozenset({"omit_delta_link"})
# Kinds that by default only hit nextLink requests (the client is between pages).
_PAGING_KINDS = frozenset({"modify_records", "delete_records", "repeat_next_link"})

GATEWAY_PAGES = {
    502: (
        "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
        "<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
    ),
    503: (
        '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01//EN""http://www.w3.org/TR/html4/strict.dtd">'
        "\r\n<HTML><HEAD><TITLE>Service Unavailable</TITLE>\r\n"
        '<META HTTP-EQUIV="Content-Type" Content="text/html; charset=us-ascii"></HEAD>\r\n'
        "<BODY><h2>Service Unavailable</h2>\r\n<hr><p>HTTP Error 503. The service is "
        "unavailable.</p>\r\n</BODY></HTML>\r\n"
    ),
    504: (
        "<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
        "<center><h1>504 Gateway Time-out</h1></center>\r\n</body>\r\n</html>\r\n"
    ),
}
SERVER_ERROR_MESSAGES = {
    500: ("0x80040216", "An unexpected error occurred."),
    502: ("0x80040216", "The server received an invalid response from an upstream server."),
    503: ("", "The service is temporarily unavailable. Please retry later."),
    504: ("0x80040216", "The request timed out before the server could complete it."),
}


class SimulatedConnectionReset(httpx.RemoteProtocolError):
    """In-process stand-in for a connection dropped mid-body (raised through the transport)."""


@dataclass
class Fault:
    """One injected fault, applied to the next `count` matching requests."""

    kind: str
    count: int = 1
    entity: str | None = None
    after: int = 0
    status: int = 503
    # server_error: "html" | "json"; malformed: "truncated" | "html" | "not_odata" | "array"
    body: str | None = None
    seconds: float = 1.0  # slow: the wait; trickle: the pause between pieces of the body
    chunk: int = 1  # trickle: bytes per piece
    rows: int = 1
    pks: tuple[str, ...] = ()  # modify_records / delete_records: exactly these records
    paging_only: bool | None = None  # None: the kind's default
    link: str = "next"  # foreign_link: "next" | "delta"
    host: str = "http://foreign.invalid"  # foreign_link, redirect: where the link points

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(FAULT_KINDS)}")
        if self.count < 1 or self.after < 0:
            raise ValueError("count must be >= 1 and after >= 0")
        if self.chunk < 1 or self.seconds < 0:
            raise ValueError("chunk must be >= 1 and seconds >= 0")
        if self.link not in ("next", "delta"):
            raise ValueError("link must be 'next' or 'delta'")
        if self.paging_only is None:
            self.paging_only = self.kind in _PAGING_KINDS

    def matches(self, entity: str | None, paging: bool, collection: bool,
                after_response: bool = False) -> bool:
        if (self.kind in RESPONSE_KINDS) != after_response:
            return False
        if self.entity is not None and entity != self.entity:
            return False
        if self.paging_only and not paging:
            return False
        return not (self.kind in _ENTITY_KINDS and (entity is None or not collection))


@dataclass
class FaultPlan:
    """A seeded random scenario: each Web API request gets a fault of kind k with rates[k]."""

    seed: int = 0
    rates: dict[str, float] = field(default_factory=dict)
    entity: str | None = None
    burst: tuple[int, int] = (1, 3)  # length range of server_error bursts
    statuses: tuple[int, ...] = (503, 502, 504)
    slow_seconds: tuple[float, float] = (0.05, 0.5)
    rows: int = 1
    storm: tuple[int, int] = (2, 4)  # length range of throttle storms
    retry_after: float = 0.05  # the first Retry-After of a storm; it doubles with each 429

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; one of {FAULT_KINDS}")
        self._rng = random.Random(self.seed)
        # Draws after a response come from their own stream: a scenario's other faults fall
        # on the same requests whether or not responses were inspected.
        self._response_rng = random.Random(self.seed * 7 + 1)
        self._burst: Fault | None = None
        self._storm: list[float] = []  # the Retry-After values still to come

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """`seed=1,server_error=0.02,reset=0.01,slow=0.05` (the CLI's --faults)."""
        seed, rates = 0, {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, value = item.partition("=")
            try:
                if name == "seed":
                    seed = int(value)
                else:
                    rates[name] = float(value)
            except ValueError:
                raise ValueError(f"fault scenario item {item!r}: expected name=number") from None
        return cls(seed=seed, rates=rates)

    def draw(self, entity: str | None, paging: bool, collection: bool,
             after_response: bool = False) -> Fault | None:
        if self.entity is not None and entity != self.entity:
            return None
        if after_response:
            for kind, rate in sorted(self.rates.items()):
                if kind in RESPONSE_KINDS and self._response_rng.random() < rate:
                    return Fault(kind)
            return None
        if self._storm:
            return Fault("throttle", seconds=self._storm.pop(0))
        if self._burst is not None:
            fault = self._burst
            fault.count -= 1
            if fault.count <= 0:
                self._burst = None
            return replace(fault, count=1)
        for kind, rate in sorted(self.rates.items()):
            if kind in RESPONSE_KINDS or self._rng.random() >= rate:
                continue
            fault = self._make(kind)
            if fault.matches(entity, paging, collection):
                return fault
        return None

    def _make(self, kind: str) -> Fault:
        rng = self._rng
        if kind == "server_error":
            length = rng.randint(*self.burst)
            fault = Fault(kind, status=rng.choice(self.statuses),
                          body=rng.choice(("html", "json")))
            if length > 1:
                self._burst = replace(fault, count=length - 1)
            return fault
        if kind == "slow":
            return Fault(kind, seconds=rng.uniform(*self.slow_seconds))
        if kind == "malformed":
            return Fault(kind, body=rng.choice(("truncated", "html")))
        if kind == "throttle":
            length = rng.randint(*self.storm)
            self._storm = [self.retry_after * 2 ** i for i in range(1, length)]
            return Fault(kind, seconds=self.retry_after)
        return Fault(kind, rows=self.rows, paging_only=False)


class FaultBoard:
    """Pending injected faults and the random plan; callers hold the simulator lock."""

    def __init__(self) -> None:
        self.pending: list[Fault] = []
        self.plan: FaultPlan | None = None

    def add(self, fault: Fault) -> Fault:
        self.pending.append(fault)
        return fault

    def clear(self) -> None:
        self.pending.clear()
        self.plan = None

    def expects_response_faults(self) -> bool:
        """Whether a response may still draw a fault (see RESPONSE_KINDS), so that it is
        worth holding the response back to look at it."""
        if any(fault.kind in RESPONSE_KINDS for fault in self.pending):
            return True
        return self.plan is not None and any(
            kind in RESPONSE_KINDS and rate > 0 for kind, rate in self.plan.rates.items())

    def draw(self, entity: str | None, paging: bool, collection: bool,
             after_response: bool = False) -> Fault | None:
        """The fault for this request (or, after_response, for its response), if any: at
        most one of each."""
        chosen: Fault | None = None
        for fault in self.pending:
            if not fault.matches(entity, paging, collection, after_response):
                continue
            if fault.after > 0:
                fault.after -= 1
                continue
            if chosen is None:
                chosen = fault
        if chosen is not None:
            chosen.count -= 1
            if chosen.count <= 0:
                self.pending.remove(chosen)
            return replace(chosen, count=1)
        if self.plan is not None:
            return self.plan.draw(entity, paging, collection, after_response)
        return None
