"""OAuth client credentials for Dataverse: tenant discovery, a cached token, one refresh at a time.

The secret is only ever sent to the configured authority, never to a host learned at run time,
and never appears in an exception message: the secret and every token issued are given to the
process's redactor (see redaction.py), which every error message passes through.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import orjson

from dataverse_assets.errors import AuthenticationError, UnreachableError
from dataverse_assets.redaction import REDACTOR
from dataverse_assets.source.network import connection_problem

API_PATH = "/api/data/v9.2/"
# Refresh well before the hour a token lives, so a long page walk never meets an expiry.
DEFAULT_REFRESH_AFTER_SECONDS = 50 * 60

_AUTHORIZATION_URI = re.compile(r"authorization_uri=([^,\s]+)", re.IGNORECASE)


def parse_tenant_from_challenge(header: str) -> str:
    """The tenant id in `WWW-Authenticate: Bearer authorization_uri=https://.../<tenant>/...`."""
    match = _AUTHORIZATION_URI.search(header)
    if not match:
        raise AuthenticationError(
            "tenant discovery: the 401 challenge has no authorization_uri; "
            "set DATAVERSE_TENANT_ID"
        )
    path = urlsplit(match.group(1)).path.strip("/").split("/")
    if not path or not path[0]:
        raise AuthenticationError(
            "tenant discovery: authorization_uri names no tenant; set DATAVERSE_TENANT_ID"
        )
    return path[0]


@dataclass
class _Token:
    value: str
    refresh_at: float
    expires_at: float


class SharedTokens:
    """Tokens, and tenants found by discovery, kept for every session of this process.

    Each `raw/E` step opens its own HTTP session; without this, a run over twenty entities
    would ask the org for its tenant and the authority for a token twenty times (two round
    trips to the internet each, and Entra ID throttles token requests too). Kept in memory
    only: a token is a secret, so it is never written anywhere. Keyed by the authority, org,
    configured tenant, client id and a digest of the secret, so changed credentials never
    reuse a token. A token the org refuses (401) is replaced here as in the session.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._tenants: dict[str, str] = {}
        self._asking: dict[tuple[str, ...], threading.Lock] = {}

    def token(self, key: tuple[str, ...], now: float) -> _Token | None:
        with self._lock:
            token = self._tokens.get(key)
        return token if token is not None and now < token.refresh_at else None

    def keep_token(self, key: tuple[str, ...], token: _Token) -> None:
        with self._lock:
            self._tokens[key] = token

    def tenant(self, org_url: str) -> str | None:
        with self._lock:
            return self._tenants.get(org_url)

    def keep_tenant(self, org_url: str, tenant_id: str) -> None:
        with self._lock:
            self._tenants[org_url] = tenant_id

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()
            self._tenants.clear()

    @asynccontextmanager
    async def asking(self, key: tuple[str, ...]) -> AsyncIterator[None]:
        """Held by the one session asking for a token for `key`: sessions of other threads
        (the entities of a run fetched at once) wait here for it instead of asking too.
        Polled, not blocking: a session of the same event loop may be the one asking."""
        with self._lock:
            lock = self._asking.setdefault(key, threading.Lock())
        while not lock.acquire(blocking=False):
            await asyncio.sleep(0.005)
        try:
            yield
        finally:
            lock.release()


# The process's shared tokens: used by the sources' sessions, not by `doctor`, whose point is
# to ask for a token.
SHARED_TOKENS = SharedTokens()


class ClientCredentials:
    """Gets and caches bearer tokens with the OAuth 2.0 client-credentials grant.

    With `shared`, tokens and the discovered tenant are also taken from and given to it, so
    the sessions of one process ask once (see SharedTokens); it needs the default clock.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        org_url: str,
        client_id: str,
        client_secret: str,
        authority: str,
        tenant_id: str | None = None,
        refresh_after_seconds: float = DEFAULT_REFRESH_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedTokens | None = None,
    ) -> None:
        self._http = http
        self._org_url = org_url.rstrip("/")
        self._client_id = client_id
        self._client_secret = client_secret
        self._authority = authority.rstrip("/")
        self._tenant_id = tenant_id
        self._refresh_after = refresh_after_seconds
        self._clock = clock
        self._token: _Token | None = None
        self._shared = shared
        # The secret itself is never a key: a digest of it tells credentials apart.
        self._shared_key = (
            self._authority, self._org_url, tenant_id or "", client_id,
            hashlib.sha256(client_secret.encode()).hexdigest(),
        )
        self._lock = asyncio.Lock()
        self.token_requests = 0
        REDACTOR.remember_secret(client_secret)

    @property
    def tenant_id(self) -> str | None:
        return self._tenant_id

    async def discover_tenant(self) -> str:
        """Ask the org (unauthenticated) which tenant it belongs to."""
        try:
            response = await self._http.get(self._org_url + API_PATH)
        except httpx.TransportError as exc:
            raise UnreachableError(
                f"tenant discovery: GET {self._org_url}{API_PATH} failed: "
                f"{connection_problem(exc, self._org_url).message}") from None
        challenge = response.headers.get("WWW-Authenticate", "")
        if response.status_code != 401 or not challenge:
            raise AuthenticationError(
                f"tenant discovery: GET {self._org_url}{API_PATH} answered "
                f"{response.status_code} without a Bearer challenge; is DATAVERSE_URL a "
                "Dataverse org? Set DATAVERSE_TENANT_ID to skip discovery"
            )
        return parse_tenant_from_challenge(challenge)

    async def token(self) -> str:
        """A valid bearer token, refreshed ahead of expiry. Safe under concurrency."""
        current = self._token
        if current is not None and self._clock() < current.refresh_at:
            return current.value
        async with self._lock:
            current = self._token
            if current is not None and self._clock() < current.refresh_at:
                return current.value
            current = self._shared_token()
            if current is not None:
                self._token = current
                return current.value
            if self._shared is None:
                self._token = await self._new_token()
                return self._token.value
            async with self._shared.asking(self._shared_key):
                # Another thread's session may have got one while this one waited.
                self._token = self._shared_token() or await self._new_token()
            return self._token.value

    async def refresh_after_unauthorized(self, rejected: str) -> str:
        """A request was refused with 401: get a new token unless another task (or another
        session of this process) already did."""
        async with self._lock:
            if self._token is None or self._token.value == rejected:
                shared = self._shared_token()
                if shared is not None and shared.value != rejected:
                    self._token = shared
                else:
                    self._token = await self._new_token()
            return self._token.value

    def _shared_token(self) -> _Token | None:
        """The process's valid token for these credentials, when sharing (else None)."""
        if self._shared is None:
            return None
        return self._shared.token(self._shared_key, self._clock())

    async def _new_token(self) -> _Token:
        token = await self._request_token()
        if self._shared is not None:
            self._shared.keep_token(self._shared_key, token)
        return token

    async def _request_token(self) -> _Token:
        if self._tenant_id is None and self._shared is not None:
            self._tenant_id = self._shared.tenant(self._org_url)
        if self._tenant_id is None:
            self._tenant_id = await self.discover_tenant()
            if self._shared is not None:
                self._shared.keep_tenant(self._org_url, self._tenant_id)
        url = f"{self._authority}/{self._tenant_id}/oauth2/v2.0/token"
        started = self._clock()
        try:
            response = await self._http.post(
                url,
                data={
                    "grant_type": "client_credentials",
                    "client_id": self._client_id,
                    "client_secret": self._client_secret,
                    "scope": f"{self._org_url}/.default",
                },
            )
        except httpx.TransportError as exc:
            raise UnreachableError(
                f"token request to {url} failed: {connection_problem(exc, url).message}"
            ) from None
        except httpx.HTTPError as exc:
            raise AuthenticationError(
                f"token request to {url} failed: {type(exc).__name__}"
            ) from None
        self.token_requests += 1
        if response.status_code != 200:
            detail = ""
            try:
                body = orjson.loads(response.content)
                detail = f": {body.get('error', '')} {body.get('error_description', '')}".rstrip()
            except orjson.JSONDecodeError:
                pass
            raise AuthenticationError(
                f"token request to {url} was refused ({response.status_code}){detail}. "
                "Check DATAVERSE_CLIENT_ID, DATAVERSE_CLIENT_SECRET and DATAVERSE_TENANT_ID"
            )
        try:
            body = orjson.loads(response.content)
            value = body["access_token"]
            lifetime = float(body.get("expires_in", 3599))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise AuthenticationError(
                f"token request to {url} answered 200 without an access_token"
            ) from None
        REDACTOR.remember_token(value)
        refresh_in = min(self._refresh_after, max(lifetime - 60.0, lifetime * 0.8))
        return _Token(value=value, refresh_at=started + refresh_in, expires_at=started + lifetime)
