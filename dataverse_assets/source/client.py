"""The Dataverse Web API client: one retry policy, a global throttle gate, bounded concurrency,
a deadline and a size limit per response, and paging that follows nextLink exactly and refuses
to leave the org's host (redirects included). Error messages pass through the redactor.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import httpx
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from dataverse_assets.errors import (
    AuthenticationError,
    DataverseRequestError,
    PagingError,
    ResponseTooLargeError,
    UnreachableError,
)
from dataverse_assets.names import is_guid
from dataverse_assets.redaction import redact
from dataverse_assets.source.auth import API_PATH, ClientCredentials
from dataverse_assets.source.budget import RequestBudget
from dataverse_assets.source.key_ranges import KeyRange, key_ranges, range_query
from dataverse_assets.source.network import connection_problem
from dataverse_assets.source.query import ANNOTATIONS, PageQuery

ODATA_HEADERS = {
    "Accept": "application/json",
    "OData-MaxVersion": "4.0",
    "OData-Version": "4.0",
}


# Dataverse pages hold at most 5000 rows; even wide rows with long Memo fields stay far below
# this. A larger body is not a Dataverse page (a runaway proxy, a wrong URL): refuse it
# instead of holding it in memory.
DEFAULT_MAX_RESPONSE_BYTES = 512 * 1024 * 1024
# httpx's timeout is per read: a server sending a byte every few seconds never trips it. A
# 5000-row page takes seconds; five minutes for one whole response is far beyond any real one.
DEFAULT_RESPONSE_DEADLINE_SECONDS = 300.0


class _Transient(Exception):
    """One attempt failed in a way worth retrying."""

    def __init__(self, reason: str, *, status: int | None = None, kind: str = "server") -> None:
        super().__init__(reason)
        self.status = status
        self.kind = kind  # "connection", "server", "timeout", "malformed"


class _Throttled(_Transient):
    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason, status=429, kind="throttled")
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy of the client (see DESIGN: retry tiers, the in-run part)."""

    max_attempts: int = 6
    backoff_seconds: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    jitter: float = 0.25  # +/- fraction of each backoff, so workers don't retry in lockstep
    max_retry_after: float = 300.0

    def backoff(self, retry_number: int, rng: random.Random) -> float:
        base = self.backoff_seconds[min(retry_number, len(self.backoff_seconds) - 1)]
        return max(0.0, base * (1 + rng.uniform(-self.jitter, self.jitter)))


@dataclass
class RequestRecord:
    """One HTTP attempt, as written to a change set's manifest (never headers or tokens)."""

    url: str
    status: int | None
    attempt: int
    seconds: float
    bytes: int
    throttle_wait: float
    error: str | None = None

    def __post_init__(self) -> None:
        if self.error:
            self.error = redact(self.error)

    def as_dict(self) -> dict[str, object]:
        return {
            "url": self.url,
            "status": self.status,
            "attempt": self.attempt,
            "seconds": round(self.seconds, 4),
            "bytes": self.bytes,
            "throttle_wait": round(self.throttle_wait, 3),
            "error": self.error,
        }


@dataclass
class Page:
    """One page of an entity set, with its verbatim body for the archive."""

    number: int
    url: str
    body: bytes
    payload: dict
    next_link: str | None
    delta_link: str | None
    range_index: int | None = None  # which key range it came from, when paged in ranges

    @property
    def records(self) -> list[dict]:
        return self.payload["value"]


@dataclass
class FetchStats:
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    throttle_wait: float = 0.0
    bytes: int = 0
    max_in_flight: int = 0
    log: list[RequestRecord] = field(default_factory=list)


class ThrottleGate:
    """Dataverse's Retry-After applies to the caller, not one request: every worker waits."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._resume_at = 0.0

    def pause(self, seconds: float) -> None:
        self._resume_at = max(self._resume_at, self._clock() + seconds)

    async def wait(self, sleep: Callable[[float], Awaitable[None]]) -> float:
        waited = 0.0
        while (remaining := self._resume_at - self._clock()) > 0:
            await sleep(remaining)
            waited += remaining
        return waited


def _retry_after_seconds(value: str | None, default: float) -> float:
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return default


# Enough of an error body to hold any token that starts within the snippet kept of it.
_ERROR_BODY_READ = 16 * 1024


def _error_detail(body: bytes) -> tuple[str | None, str]:
    """Dataverse's `{"error": {"code", "message"}}`, or a short snippet of whatever came.
    Redacted before it is cut short: a token cut in half is no longer a whole value."""
    try:
        error = orjson.loads(body).get("error", {})
        if isinstance(error, dict):
            code = error.get("code")
            return (redact(str(code))[:40] if code else None,
                    redact(str(error.get("message", "")))[:500])
    except (orjson.JSONDecodeError, AttributeError):
        pass
    text = redact(body[:_ERROR_BODY_READ].decode("utf-8", "replace"))
    snippet = text[:200].strip().replace("\n", " ")
    return None, f"non-JSON body: {snippet!r}" if snippet else "empty body"


class DataverseClient:
    """Async Web API client for one org. Create one per run; share it across entities."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        credentials: ClientCredentials,
        *,
        org_url: str,
        max_concurrency: int = 8,
        retry_policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        response_deadline_seconds: float = DEFAULT_RESPONSE_DEADLINE_SECONDS,
        budget: RequestBudget | None = None,
    ) -> None:
        self._http = http
        # Shared with every other client of the same application user (threads, processes,
        # runs): the total in flight and every Retry-After. None: this client's own limit.
        self.budget = budget
        self.max_response_bytes = max_response_bytes
        self.response_deadline_seconds = response_deadline_seconds
        self._credentials = credentials
        self.org_url = org_url.rstrip("/")
        self.api_base = self.org_url + API_PATH
        self._origin = _origin(self.org_url)
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._in_flight = 0
        self.retry_policy = retry_policy or RetryPolicy()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.gate = ThrottleGate(clock)
        self.stats = FetchStats()

    # -- one request, with the retry policy -------------------------------------------------

    async def get(
        self, url: str, *, params: dict[str, str] | None = None, prefer: str | None = None,
        entity: str = "?",
    ) -> httpx.Response:
        """GET with retries; returns a 2xx response or raises a DataverseError."""
        request_url = str(httpx.URL(url, params=params)) if params else url
        self._check_same_origin(request_url, entity)
        last: _Transient | None = None
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry_policy.max_attempts),
            wait=self._wait_before_retry,
            retry=retry_if_exception_type(_Transient),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    if number > 1:
                        self.stats.retries += 1
                    try:
                        return await self._send_once(request_url, prefer, number, entity)
                    except _Transient as exc:
                        last = exc
                        raise
        except ResponseTooLargeError as exc:
            raise ResponseTooLargeError(f"{entity}: {exc}", status=exc.status) from None
        except _Transient:
            assert last is not None
            status = f"last status {last.status}" if last.status else "no response"
            raise DataverseRequestError(
                f"{entity}: GET {request_url} failed after {self.retry_policy.max_attempts} "
                f"attempts ({status}: {last})",
                status=last.status,
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait_before_retry(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_number = state.attempt_number - 1
        if isinstance(exc, _Throttled):
            # The gate makes every worker wait; this attempt waits there too.
            seconds = min(exc.retry_after, self.retry_policy.max_retry_after)
            self.gate.pause(seconds)
            if self.budget is not None:
                self.budget.pause(seconds)  # every client of this application user waits
            return 0.0
        if isinstance(exc, _Transient) and exc.kind == "connection" and retry_number == 0:
            return 0.0  # a dropped connection is usually fixed by simply reconnecting
        return self.retry_policy.backoff(retry_number, self._rng)

    async def _send_once(self, url: str, prefer: str | None, attempt: int,
                         entity: str) -> httpx.Response:
        waited = await self.gate.wait(self._sleep)
        self.stats.throttle_wait += waited
        token = await self._credentials.token()
        refreshed = False
        async with self._semaphore, self._budget_slot() as budget_wait:
            # A Retry-After may have arrived while this worker waited for a slot.
            late_wait = await self.gate.wait(self._sleep) + budget_wait
            waited += late_wait
            self.stats.throttle_wait += late_wait
            self._in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self._in_flight)
            try:
                while True:
                    started = time.perf_counter()
                    headers = dict(ODATA_HEADERS, Authorization=f"Bearer {token}")
                    if prefer:
                        headers["Prefer"] = prefer
                    self.stats.requests += 1
                    try:
                        response = await self._read_capped(url, headers)
                    except httpx.TimeoutException as exc:
                        self._record(url, None, attempt, started, 0, waited, "timeout")
                        raise _Transient(
                            f"timeout ({type(exc).__name__})", kind="timeout"
                        ) from None
                    except TimeoutError:
                        self._record(url, None, attempt, started, 0, waited, "deadline")
                        raise _Transient(
                            f"no complete response within the {self.response_deadline_seconds:g}"
                            " s deadline; raise DATAVERSE_RESPONSE_DEADLINE_SECONDS if the org "
                            "is really this slow", kind="timeout"
                        ) from None
                    except httpx.ConnectError as exc:
                        self._record(url, None, attempt, started, 0, waited, type(exc).__name__)
                        problem = connection_problem(exc, url)
                        if problem.permanent:  # no retry resolves the name or trusts the cert
                            raise UnreachableError(
                                f"{entity}: GET {url}: {problem.message}") from None
                        raise _Transient(problem.message, kind="connection") from None
                    except (httpx.TransportError, httpx.DecodingError) as exc:
                        self._record(url, None, attempt, started, 0, waited, type(exc).__name__)
                        raise _Transient(
                            f"connection error ({type(exc).__name__})", kind="connection"
                        ) from None
                    # httpx binds response.stream to the response (a reference cycle), so a
                    # read body lives until the next full garbage collection: on a large read
                    # that is a page body per page. The body is read; drop the binding.
                    response.stream = httpx.ByteStream(b"")
                    self.stats.bytes += len(response.content)
                    self._record(url, response.status_code, attempt, started,
                                 len(response.content), waited, None)
                    self._observe_dop_hint(response)
                    if response.status_code == 401 and not refreshed:
                        # Expired or revoked token: refresh once, then resend right away.
                        token = await self._credentials.refresh_after_unauthorized(token)
                        refreshed = True
                        continue
                    break
            finally:
                self._in_flight -= 1
        return self._classify(url, response, entity)

    def _budget_slot(self) -> AbstractAsyncContextManager[float]:
        if self.budget is None:
            return nullcontext(0.0)
        return self.budget.slot(self._sleep)

    def _observe_dop_hint(self, response: httpx.Response) -> None:
        """Dataverse recommends a degree of parallelism for the org (x-ms-dop-hint): the
        budget sends no more than that at once."""
        value = response.headers.get("x-ms-dop-hint", "").strip()
        if self.budget is not None and value.isdigit() and int(value) > 0:
            self.budget.observe_dop_hint(int(value))

    async def _read_capped(self, url: str, headers: dict[str, str]) -> httpx.Response:
        """GET and read the body, refusing one larger than `max_response_bytes` (checked as it
        streams in, so an enormous answer never sits in memory whole) or not complete within
        `response_deadline_seconds` (TimeoutError)."""
        cap = self.max_response_bytes
        async with asyncio.timeout(self.response_deadline_seconds):
            response = await self._http.send(
                self._http.build_request("GET", url, headers=headers), stream=True)
            try:
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > cap:
                    raise ResponseTooLargeError(self._too_large(url, int(declared), cap))
                parts: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise ResponseTooLargeError(self._too_large(url, size, cap, more=True))
                    parts.append(chunk)
                response._content = b"".join(parts)  # what httpx's own aread() sets
            finally:
                await response.aclose()
        return response

    @staticmethod
    def _too_large(url: str, size: int, cap: int, more: bool = False) -> str:
        return (f"GET {url} answered a body of {'more than ' if more else ''}{size:,} bytes, "
                f"over the limit of {cap:,} (DATAVERSE_MAX_RESPONSE_MB); lower the entity's "
                "page_size or raise the limit")

    def _classify(self, url: str, response: httpx.Response, entity: str) -> httpx.Response:
        status = response.status_code
        if 200 <= status < 300:
            return response
        if 300 <= status < 400:
            # Not retried: the same request would be sent to the same redirect.
            raise DataverseRequestError(_redirect_refused(entity, url, response), status=status)
        code, message = _error_detail(response.content)
        if status == 429:
            self.stats.throttled += 1
            retry_after = _retry_after_seconds(response.headers.get("Retry-After"), 5.0)
            raise _Throttled(f"throttled ({code}): {message}", retry_after)
        if status in (500, 502, 503, 504) or status >= 500:
            raise _Transient(f"{code or 'server error'}: {message}", status=status)
        if status == 401:
            raise AuthenticationError(
                f"{entity}: GET {url} was refused (401) even with a fresh token: {message}. "
                "Check the application user's access to this org"
            )
        raise DataverseRequestError(
            f"{entity}: GET {url} answered {status} ({code}): {message}", status=status,
            code=code,
        )

    def _record(self, url: str, status: int | None, attempt: int, started: float, size: int,
                waited: float, error: str | None) -> None:
        self.stats.log.append(RequestRecord(
            url=url, status=status, attempt=attempt, seconds=time.perf_counter() - started,
            bytes=size, throttle_wait=waited, error=error,
        ))

    def _check_same_origin(self, url: str, entity: str, what: str = "request") -> None:
        origin = _origin(url)
        if origin != self._origin:
            # The Authorization header must never go to another host (or over plain http).
            where = f"{origin[0]}://{origin[1]}" if origin[1] else f"the relative URL {url!r}"
            raise PagingError(
                f"{entity}: refusing to {what} {where}: links must stay on the configured "
                f"Dataverse URL {self._origin[0]}://{self._origin[1]} (DATAVERSE_URL), so the "
                "access token is never sent elsewhere"
            )

    # -- JSON and pages ---------------------------------------------------------------------

    async def get_json(
        self, path: str, *, params: dict[str, str] | None = None, entity: str = "?",
        prefer: str | None = None,
    ) -> tuple[httpx.Response, dict]:
        """GET a JSON document; a 200 that is not JSON is retried, then reported."""
        url = path if path.startswith("http") else self.api_base + path
        last_error = ""
        for _ in range(self.retry_policy.max_attempts):
            response = await self.get(url, params=params, prefer=prefer, entity=entity)
            try:
                payload = orjson.loads(response.content)
            except orjson.JSONDecodeError as exc:
                # Truncated bodies happen when a connection drops mid-response: try again.
                kind = response.headers.get("Content-Type", "no Content-Type")
                _, snippet = _error_detail(response.content)
                last_error = f"invalid JSON ({exc}); {kind}, {snippet}"
                self.stats.retries += 1
                continue
            if not isinstance(payload, dict):
                raise DataverseRequestError(
                    f"{entity}: GET {url} answered 200 with JSON that is not an object"
                )
            return response, payload
        raise DataverseRequestError(
            f"{entity}: GET {url} kept answering malformed bodies: {last_error}"
        )

    async def get_record(self, entity_set: str, record_id: str,
                         select: tuple[str, ...] = ()) -> tuple[str, bytes, dict]:
        """One record by id: (url, verbatim body, record). A missing one raises with 404."""
        if not is_guid(record_id):
            raise DataverseRequestError(
                f"{entity_set}: {record_id!r} is not a GUID; records are fetched by GUID",
                status=400,
            )
        params = {"$select": ",".join(select)} if select else None
        response, payload = await self.get_json(
            f"{entity_set}({record_id})", params=params, entity=entity_set,
            prefer=f'odata.include-annotations="{ANNOTATIONS}"')
        return str(response.url), response.content, payload

    async def iter_pages(self, entity_set: str, query: PageQuery,
                         start_url: str | None = None) -> AsyncIterator[Page]:
        """Yield each page as it arrives, following nextLink unchanged with the same Prefer.

        `start_url` (a stored delta link) replaces the entity set URL and query parameters.
        """
        url: str | None = start_url or self.api_base + entity_set
        params: dict[str, str] | None = None if start_url else query.params()
        prefer = query.prefer()
        # Every URL requested so far: a nextLink back to any of them would loop.
        seen_links: set[str] = {str(httpx.URL(url, params=params)) if params else url}
        number = 0
        # The next page is requested before this one is handed over, so the server works on
        # it while the consumer archives this one (one page ahead, no more).
        ahead: asyncio.Task[tuple[httpx.Response, dict]] | None = asyncio.ensure_future(
            self.get_json(url, params=params, prefer=prefer, entity=entity_set))
        try:
            while ahead is not None:
                response, payload = await ahead
                ahead = None
                values = payload.get("value")
                if not isinstance(values, list):
                    raise DataverseRequestError(
                        f"{entity_set}: GET {response.url} answered 200 without an OData "
                        "'value' list; is this a Dataverse Web API endpoint?"
                    )
                bad = next((i for i, item in enumerate(values) if not isinstance(item, dict)),
                           None)
                if bad is not None:
                    raise DataverseRequestError(
                        f"{entity_set}: GET {response.url} answered 200 with an OData 'value' "
                        f"list whose item {bad} is {type(values[bad]).__name__}, not a record "
                        "object"
                    )
                number += 1
                next_link = payload.get("@odata.nextLink")
                delta_link = payload.get("@odata.deltaLink")
                for link, name in ((next_link, "nextLink"), (delta_link, "deltaLink")):
                    if link is not None and not isinstance(link, str):
                        raise PagingError(f"{entity_set}: page {number} has an @odata.{name} "
                                          f"that is {type(link).__name__}, not a URL")
                # Checked before the page is used: a delta link to another host is never stored
                # (so never followed with our token in a later change set).
                if delta_link is not None:
                    self._check_same_origin(delta_link, entity_set, "store the deltaLink to")
                if next_link is not None:
                    self._check_same_origin(next_link, entity_set, "follow the nextLink to")
                    if next_link in seen_links:
                        raise PagingError(
                            f"{entity_set}: the server repeated a nextLink after page "
                            f"{number}; stopping instead of looping"
                        )
                    seen_links.add(next_link)
                    ahead = asyncio.ensure_future(
                        self.get_json(next_link, prefer=prefer, entity=entity_set))
                    await asyncio.sleep(0)  # let the request go out before the hand-over
                yield Page(number, str(response.url), response.content, payload, next_link,
                           delta_link)
        finally:
            if ahead is not None:
                ahead.cancel()
                await asyncio.gather(ahead, return_exceptions=True)

    # -- parallel key ranges ----------------------------------------------------------------

    async def key_bounds(self, entity_set: str, primary_key: str,
                         filter: str | None = None) -> tuple[str | None, str | None]:
        """The lowest and highest key (SQL Server order) matching the filter; (None, None)
        for no rows. Two `$top=1` requests, without maxpagesize (never mix the two)."""
        found: list[str | None] = []
        for direction in ("asc", "desc"):
            params = {"$select": primary_key, "$orderby": f"{primary_key} {direction}",
                      "$top": "1"}
            if filter:
                params["$filter"] = filter
            _, payload = await self.get_json(entity_set, params=params, entity=entity_set)
            rows = payload.get("value") or []
            key = rows[0].get(primary_key) if rows and isinstance(rows[0], dict) else None
            found.append(str(key).lower() if key and is_guid(str(key)) else None)
        return found[0], found[1]

    async def iter_pages_in_ranges(
        self, entity_set: str, query: PageQuery, primary_key: str, ranges: int,
        *, probe_bounds: bool = True,
    ) -> AsyncIterator[Page]:
        """Page `ranges` disjoint primary-key ranges concurrently; yield pages as they arrive.

        The ranges split the keys between the lowest and highest key (probed first, unless
        `probe_bounds` is False: then the whole GUID space) evenly in SQL Server order. Each
        range is ordered by the query's order ending with the key, so each is paged
        deterministically; pages of one range arrive in order, pages of different ranges
        interleave. Pages are renumbered 1, 2, ... in arrival order and carry `range_index`.
        Requests share the client's concurrency limit, retry policy and throttle gate; a
        failing range stops the others and its error is raised here.
        """
        if ranges <= 1:
            async for page in self.iter_pages(entity_set, query):
                yield page
            return
        parts = [KeyRange()]
        if probe_bounds:
            lowest, highest = await self.key_bounds(entity_set, primary_key, query.filter)
            if lowest is not None and highest is not None:
                parts = key_ranges(ranges, lowest, highest)
        else:
            parts = key_ranges(ranges)
        # Bounded: a slow consumer holds the ranges back instead of buffering the table.
        arrivals: asyncio.Queue[Page | _RangeDone] = asyncio.Queue(maxsize=1)

        async def page_range(index: int, key_range: KeyRange) -> None:
            error: Exception | None = None
            try:
                async for page in self.iter_pages(
                    entity_set, range_query(query, primary_key, key_range)
                ):
                    page.range_index = index
                    await arrivals.put(page)
            except Exception as exc:  # handed to the consumer, which raises it
                error = exc
            await arrivals.put(_RangeDone(index, error))

        tasks = [asyncio.create_task(page_range(i, r)) for i, r in enumerate(parts)]
        running, number = len(tasks), 0
        try:
            while running:
                item = await arrivals.get()
                if isinstance(item, _RangeDone):
                    running -= 1
                    if item.error is not None:
                        raise item.error
                    continue
                number += 1
                item.number = number
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _redirect_refused(entity: str, url: str, response: httpx.Response) -> str:
    location = response.headers.get("Location")
    if location:
        try:
            scheme, host = _origin(str(httpx.URL(url).join(location)))
        except (httpx.InvalidURL, TypeError):
            scheme, host = "", ""
        target = f"{scheme}://{host}" if host else repr(location[:200])
    else:
        target = "an unnamed location (no Location header)"
    return (f"{entity}: GET {url} answered {response.status_code}: redirect to {target} "
            "refused: Dataverse does not redirect Web API calls, and the access token must not "
            "follow a redirect elsewhere; check DATAVERSE_URL (the org's own address, e.g. "
            "https://contoso.crm.dynamics.com)")


def _origin(url: str) -> tuple[str, str]:
    """(scheme, host[:port]) as a browser compares origins: host case and default ports do
    not matter."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "", ""
    port = parsed.port
    default = {"http": 80, "https": 443}.get(parsed.scheme)
    host = parsed.host.lower()
    return parsed.scheme.lower(), host if port in (None, default) else f"{host}:{port}"


@dataclass(frozen=True)
class _RangeDone:
    index: int
    error: Exception | None
