"""The simulator's front door for Web API requests, in front of the Starlette app.

Every request under the Web API path passes here: it is logged (arrival and finish times,
status, injected fault), counted for concurrency, given its injected fault if one is due, and
admitted (or refused with 429) by the service protection limits of the user its bearer token
was issued to, and delayed by the latency model (if on) before its answer leaves: the delay is
awaited, so requests in flight overlap, and counts as the request's execution time. The
request handlers themselves know nothing of faults, limits or latency.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .faults import GATEWAY_PAGES, SERVER_ERROR_MESSAGES, Fault, SimulatedConnectionReset
from .model import SimRequest
from .protection import REQUESTS_CODE

if TYPE_CHECKING:
    from .model import DataverseSimulator

_REWRITING_KINDS = frozenset({"reset", "malformed", "repeat_next_link", "foreign_link",
                              "endless_next_link", "trickle"})
# The query parameter that makes each endless_next_link link new (the app ignores it).
ENDLESS_LINK_PARAMETER = "simloop"
# Dataverse's code for an invalid argument, which a proxy's echo of a bad request imitates.
_INVALID_ARGUMENT_CODE = "0x80040203"
_NOT_ODATA = {
    "not_odata": b'{"message": "OK", "status": "healthy"}',
    "array": b'[{"accountid": "not an OData collection"}]',
}
_JSON_TYPE = b"application/json; odata.metadata=minimal"
# The app puts the number of rows a data request served under this key of the ASGI scope, so
# the latency model can charge for them before the answer leaves.
ROWS_SERVED_SCOPE_KEY = "dataverse_simulator.rows_served"


class HideInjectedResets(logging.Filter):
    """Keep uvicorn from logging a traceback for each connection reset we injected."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SimulatedConnectionReset)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _tracked_with_annotations(scope: Scope) -> bool:
    """A change-tracking read (a first one, or a delta link) that asks for annotations: the
    requests whose last page may lose its delta link (faults.omit_delta_link)."""
    prefer = ",".join(v.decode("latin-1") for k, v in scope.get("headers", ())
                      if k.lower() == b"prefer").lower()
    query = scope.get("query_string", b"").lower()
    tracked = "odata.track-changes" in prefer or b"deltatoken=" in query
    return tracked and "odata.include-annotations" in prefer


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, None for anything else."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _with_body(start: Message, body: bytes, content_type: bytes | None = None) -> Message:
    headers = [
        (k, v) for k, v in start.get("headers", ())
        if k.lower() != b"content-length" and (content_type is None or k.lower() != b"content-type")
    ]
    headers.append((b"content-length", str(len(body)).encode()))
    if content_type is not None:
        headers.append((b"content-type", content_type))
    return {**start, "headers": headers}


async def _respond(send: Send, status: int, body: bytes, content_type: bytes,
                   extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """ASGI middleware: request log, concurrency, injected faults, service protection."""

    def __init__(self, app: ASGIApp, sim: DataverseSimulator, api_path: str) -> None:
        self.app = app
        self.sim = sim
        self.api_path = api_path.rstrip("/")
        self._loop_numbers = itertools.count(1)

    def _target(self, path: str) -> tuple[str | None, bool]:
        """(entity set named by the path or None, whether it addresses the collection)."""
        rest = path[len(self.api_path):].strip("/")
        segments = rest.split("/") if rest else []
        if not segments:
            return None, False
        name, _, key = segments[0].partition("(")
        if self.sim.find_table(name) is None:
            return None, False
        return name, not key and len(segments) == 1

    def _user(self, scope: Scope) -> str | None:
        token = bearer_token(_header(scope, b"authorization"))
        return self.sim.token_client(token) if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (
            path == self.api_path or path.startswith(self.api_path + "/")
        ):
            await self.app(scope, receive, send)
            return
        sim = self.sim
        entity, collection = self._target(path)
        query = scope.get("query_string", b"")
        paging = b"skiptoken=" in query
        arrived = time.monotonic()
        with sim.lock:
            sim.in_flight += 1
            sim.stats.max_concurrency = max(sim.stats.max_concurrency, sim.in_flight)
        fault = sim.draw_fault(entity, paging, collection)
        status = [0]
        admitted: tuple[Any, str] | None = None
        retry_after: float | None = None
        started = arrived
        # [modelled delay, seconds the wait really took]: a fake sleep in a test takes none,
        # and the execution time counted is still the modelled one.
        latency = [0.0, 0.0]

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                rows = scope.get(ROWS_SERVED_SCOPE_KEY)
                if rows is not None and sim.latency is not None:
                    latency[0] = sim.latency_delay(rows)
                    before = time.monotonic()
                    await sim.latency_sleep(latency[0])
                    latency[1] = time.monotonic() - before
                status[0] = message["status"]
                if admitted is not None:  # the budget left, as Dataverse reports it
                    with sim.lock:
                        extra = admitted[0].remaining_headers(admitted[1])
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            if fault is not None and fault.kind == "server_error":
                await self._server_error(watched, fault)
                return
            if fault is not None and fault.kind == "throttle":
                retry_after = fault.seconds
                await self._throttle(watched, fault)
                return
            if fault is not None and fault.kind == "redirect":
                await self._redirect(scope, watched, fault)
                return
            if fault is not None and fault.kind == "echo_headers":
                await self._echo_headers(scope, watched)
                return
            if fault is not None and fault.kind == "token_expiry":
                sim.expire_all_tokens()
            elif fault is not None and fault.kind in ("modify_records", "delete_records"):
                assert entity is not None
                sim.mutate_for_fault(entity, fault.kind, fault.rows, fault.pks)
            user = self._user(scope)
            if user is not None and sim.limits.enabled:
                with sim.lock:
                    protection = sim.protection
                    pushes = protection.pushes_while_throttled
                    throttle = protection.admit(user)
                    if throttle is not None:
                        sim.stats.throttled += 1
                        sim.stats.throttled_by_code[throttle.code] += 1
                        sim.stats.status_counts[429] += 1
                        if protection.pushes_while_throttled > pushes:
                            sim.stats.requests_while_throttled += 1
                if throttle is not None:
                    retry_after = throttle.retry_after
                    body = orjson.dumps({"error": {"code": throttle.code,
                                                   "message": throttle.message}})
                    await _respond(watched, 429, body, _JSON_TYPE,
                                   [(b"retry-after", throttle.header_value().encode())])
                    return
                admitted = (protection, user)
            started = time.monotonic()
            if fault is not None and fault.kind == "slow":
                await asyncio.sleep(fault.seconds)
            if fault is not None and fault.kind in _REWRITING_KINDS:
                await self._rewritten(scope, receive, watched, fault)
            elif (fault is None and collection and _tracked_with_annotations(scope)
                  and sim.expects_response_faults()):
                fault = await self._after_response(scope, receive, watched, entity, paging)
            elif sim.response_cache is not None:
                await self._cached(scope, receive, watched, entity)
            else:
                await self.app(scope, receive, watched)
        finally:
            finished = time.monotonic()
            target = path + (f"?{query.decode('latin-1')}" if query else "")
            execution = max(0.0, finished - started - latency[1]) + latency[0]
            with sim.lock:
                sim.in_flight -= 1
                if admitted is not None:
                    admitted[0].finish(admitted[1], execution)
                sim.stats.request_log.append(SimRequest(
                    arrived=arrived, finished=finished, method=scope.get("method", "GET"),
                    target=target, entity=entity, status=status[0],
                    fault=fault.kind if fault is not None else None, retry_after=retry_after,
                    rows=scope.get(ROWS_SERVED_SCOPE_KEY),
                    execution_seconds=execution if admitted is not None else None,
                    latency_seconds=latency[0],
                ))

    async def _server_error(self, send: Send, fault: Fault) -> None:
        with self.sim.lock:
            self.sim.stats.status_counts[fault.status] += 1
        if fault.body == "json":
            code, message = SERVER_ERROR_MESSAGES.get(fault.status, SERVER_ERROR_MESSAGES[500])
            body = orjson.dumps({"error": {"code": code, "message": message}})
            await _respond(send, fault.status, body, _JSON_TYPE)
            return
        page = GATEWAY_PAGES.get(fault.status, GATEWAY_PAGES[503])
        await _respond(send, fault.status, page.encode(), b"text/html")

    async def _throttle(self, send: Send, fault: Fault) -> None:
        with self.sim.lock:
            self.sim.stats.throttled += 1
            self.sim.stats.throttled_by_code[REQUESTS_CODE] += 1
            self.sim.stats.status_counts[429] += 1
        body = orjson.dumps({"error": {"code": REQUESTS_CODE, "message": (
            "Number of requests exceeded the limit of 6000 over time window of 300 seconds.")}})
        await _respond(send, 429, body, _JSON_TYPE,
                       [(b"retry-after", f"{fault.seconds:g}".encode())])

    async def _redirect(self, scope: Scope, send: Send, fault: Fault) -> None:
        """302 to the same path and query on another host."""
        host = urlsplit(fault.host)
        query = scope.get("query_string", b"").decode("latin-1")
        location = urlunsplit((host.scheme, host.netloc, scope.get("path", ""), query, ""))
        body = (f'<html><head><title>Object moved</title></head><body><h2>Object moved to '
                f'<a href="{location}">here</a>.</h2></body></html>').encode()
        await _respond(send, 302, body, b"text/html; charset=utf-8",
                       [(b"location", location.encode("latin-1"))])

    async def _echo_headers(self, scope: Scope, send: Send) -> None:
        """A 400 whose error message repeats every request header, Authorization too."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        message = ("The request could not be routed. Request headers: "
                   + orjson.dumps(headers).decode())
        body = orjson.dumps({"error": {"code": _INVALID_ARGUMENT_CODE, "message": message}})
        await _respond(send, 400, body, _JSON_TYPE)

    async def _trickle(self, receive: Receive, send: Send, start: Message, body: bytes,
                       fault: Fault) -> None:
        """The headers at once, then the body `fault.chunk` bytes at a time; stops early when
        the client hangs up (over loopback), so an abandoned response does not linger."""
        async def hang_up() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        gone = asyncio.ensure_future(hang_up())
        try:
            await send(start)
            for offset in range(0, len(body), fault.chunk):
                if gone.done():
                    return
                piece = body[offset:offset + fault.chunk]
                last = offset + fault.chunk >= len(body)
                await send({"type": "http.response.body", "body": piece, "more_body": not last})
                if not last:
                    await asyncio.sleep(fault.seconds)
            if not body:
                await send({"type": "http.response.body", "body": b""})
        finally:
            gone.cancel()

    def _endless_link(self, scope: Scope) -> str:
        """This request's URL with a new `simloop` value: the same page, under a new link."""
        url = urlsplit(str(Request(scope).url))
        # The rest of the query stays byte for byte (a skiptoken is not re-encoded).
        parts = [p for p in url.query.split("&")
                 if p and p.partition("=")[0] != ENDLESS_LINK_PARAMETER]
        parts.append(f"{ENDLESS_LINK_PARAMETER}={next(self._loop_numbers)}")
        return urlunsplit((*url[:3], "&".join(parts), ""))

    async def _captured(self, scope: Scope, receive: Receive) -> tuple[Message, bytes]:
        """Run the app and hold its response back: the start message and the whole body."""
        messages: list[Message] = []

        async def capture(message: Message) -> None:
            messages.append(message)

        await self.app(scope, receive, capture)
        return messages[0], b"".join(m.get("body", b"") for m in messages[1:])

    async def _cached(self, scope: Scope, receive: Receive, send: Send,
                      entity: str | None) -> None:
        """Answer a GET from the simulator's response cache, or render it and keep it (the
        key: the org's version, the target and every request header but the token). Anything
        else clears the cache and goes through."""
        sim = self.sim
        cache = sim.response_cache
        assert cache is not None
        if scope.get("method", "GET") != "GET":
            cache.clear()
            await self.app(scope, receive, send)
            return
        with sim.lock:
            version = (sim.version, sim.user_language_code)
        headers = tuple(sorted((k, v) for k, v in scope.get("headers", [])
                               if k.lower() != b"authorization"))
        key = (version, scope.get("path", ""), scope.get("query_string", b""), headers)
        hit = cache.get(key)
        if hit is None:
            start, body = await self._captured(scope, receive)
            hit = (start, body, scope.get(ROWS_SERVED_SCOPE_KEY))
            if start["status"] == 200:
                cache[key] = hit
        elif hit[2] is not None:
            scope[ROWS_SERVED_SCOPE_KEY] = hit[2]
            if entity is not None:
                with sim.lock:
                    sim.stats.rows_served[entity] += hit[2]
        await send(hit[0])
        await send({"type": "http.response.body", "body": hit[1]})

    async def _after_response(self, scope: Scope, receive: Receive, send: Send,
                              entity: str | None, paging: bool) -> Fault | None:
        """Run the app, then draw a response fault if the response has what it changes (a
        last page's delta link); returns the fault applied, if any."""
        start, body = await self._captured(scope, receive)
        fault = None
        if start["status"] == 200 and b'"@odata.deltaLink"' in body:
            fault = self.sim.draw_fault(entity, paging, True, after_response=True)
        if fault is not None:  # omit_delta_link
            payload = orjson.loads(body)
            payload.pop("@odata.deltaLink", None)
            body = orjson.dumps(payload)
            start = _with_body(start, body)
        await send(start)
        await send({"type": "http.response.body", "body": body})
        return fault

    async def _rewritten(self, scope: Scope, receive: Receive, send: Send, fault: Fault) -> None:
        """Run the app, then deliver its response damaged the way the fault says."""
        start, body = await self._captured(scope, receive)
        if fault.kind == "trickle":
            await self._trickle(receive, send, start, body, fault)
            return
        if start["status"] != 200:
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        if fault.kind == "reset":
            # The headers promise the whole body; half of it arrives, then the socket closes.
            await send(start)
            await send({"type": "http.response.body", "body": body[: len(body) // 2],
                        "more_body": True})
            raise SimulatedConnectionReset("connection reset by the simulator mid-body")
        if fault.kind == "malformed":
            if fault.body == "html":
                page = GATEWAY_PAGES[503].encode()
                await send(_with_body(start, page, b"text/html"))
                await send({"type": "http.response.body", "body": page})
                return
            if fault.body in _NOT_ODATA:
                other = _NOT_ODATA[fault.body]
                await send(_with_body(start, other, b"application/json"))
                await send({"type": "http.response.body", "body": other})
                return
            cut = body[: max(1, len(body) // 2)]
            await send(_with_body(start, cut))
            await send({"type": "http.response.body", "body": cut})
            return
        payload = orjson.loads(body)
        if fault.kind == "foreign_link":
            name = "@odata.nextLink" if fault.link == "next" else "@odata.deltaLink"
            if isinstance(payload.get(name), str):
                original = urlsplit(payload[name])
                host = urlsplit(fault.host)
                payload[name] = urlunsplit((host.scheme, host.netloc, *original[2:]))
        elif fault.kind == "endless_next_link":
            payload.pop("@odata.deltaLink", None)
            payload["@odata.nextLink"] = self._endless_link(scope)
        else:
            # repeat_next_link: the next page is said to be the page just served.
            payload["@odata.nextLink"] = str(Request(scope).url)
        rewritten = orjson.dumps(payload)
        await send(_with_body(start, rewritten))
        await send({"type": "http.response.body", "body": rewritten})
