"""The client's retry policy, throttling gate and paging safety, over a scripted transport.

(Behaviour against the simulator over loopback HTTP is covered by the end-to-end tests.)
"""

import asyncio
import random

import httpx
import orjson
import pytest

from dataverse_assets.errors import (
    AuthenticationError,
    DataverseRequestError,
    PagingError,
    UnreachableError,
)
from dataverse_assets.source.auth import ClientCredentials
from dataverse_assets.source.client import DataverseClient, RetryPolicy
from dataverse_assets.source.live import shared_ssl_context
from dataverse_assets.source.query import PageQuery

ORG = "https://org.example.com"
SECRET = "very-secret-client-secret"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Script:
    """A transport answering data requests from a list of (status, headers, body) steps."""

    def __init__(self, steps, clock: FakeClock) -> None:
        self.steps = list(steps)
        self.clock = clock
        self.data_requests: list[tuple[float, httpx.Request]] = []
        self.tokens_issued = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/oauth2/v2.0/token"):
            self.tokens_issued += 1
            return httpx.Response(200, json={"token_type": "Bearer", "expires_in": 3599,
                                             "access_token": f"token-{self.tokens_issued}"})
        self.data_requests.append((self.clock.now, request))
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        status, headers, body = step
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        return httpx.Response(status, headers=headers, content=content)


def run_client(steps, coroutine_factory, *, max_attempts: int = 6):
    clock = FakeClock()
    script = Script(steps, clock)

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as http:
            credentials = ClientCredentials(
                http, org_url=ORG, client_id="id", client_secret=SECRET,
                authority="https://login.example.com", tenant_id="tenant", clock=clock,
            )

            client = DataverseClient(
                http, credentials, org_url=ORG, sleep=clock.sleep, clock=clock,
                rng=random.Random(1), retry_policy=RetryPolicy(max_attempts=max_attempts),
            )
            return await coroutine_factory(client), client

    result, client = asyncio.run(main())
    return result, client, script, clock


def page(rows, next_link=None):
    body = {"@odata.context": f"{ORG}/api/data/v9.2/$metadata#accounts", "value": rows}
    if next_link:
        body["@odata.nextLink"] = next_link
    return (200, {"Content-Type": "application/json"}, body)


def collect(client, query: PageQuery | None = None):
    async def go():
        return [p async for p in client.iter_pages("accounts", query or PageQuery())]
    return go()


def test_retry_after_is_honoured_before_the_next_request():
    steps = [
        (429, {"Retry-After": "7"}, {"error": {"code": "0x80072322", "message": "limit"}}),
        page([{"accountid": "a"}]),
    ]
    pages, client, script, clock = run_client(steps, lambda c: collect(c))
    assert [r["accountid"] for p in pages for r in p.records] == ["a"]
    (first_at, _), (second_at, _) = script.data_requests
    assert second_at - first_at == pytest.approx(7.0)
    assert client.stats.throttled == 1 and client.stats.throttle_wait == pytest.approx(7.0)


def test_server_errors_back_off_exponentially_then_give_up_with_a_clear_error():
    steps = [(503, {}, b"<html>Service Unavailable</html>")] * 6
    with pytest.raises(DataverseRequestError) as excinfo:
        run_client(steps, lambda c: collect(c))
    message = str(excinfo.value)
    assert "accounts" in message and "/api/data/v9.2/accounts" in message
    assert "503" in message and "6 attempts" in message
    assert "token-" not in message and SECRET not in message


def test_backoff_schedule_is_one_two_four_eight_seconds_with_jitter():
    steps = [(500, {}, {"error": {"code": "", "message": "boom"}})] * 4 + [page([])]
    _, _, script, clock = run_client(steps, lambda c: collect(c))
    gaps = [b[0] - a[0] for a, b in zip(script.data_requests, script.data_requests[1:],
                                        strict=False)]
    for gap, expected in zip(gaps, [1, 2, 4, 8], strict=True):
        assert expected * 0.75 <= gap <= expected * 1.25


def test_a_dropped_connection_is_retried_at_once():
    steps = [httpx.ConnectError("reset by peer"), page([{"accountid": "a"}])]
    pages, _, script, _ = run_client(steps, lambda c: collect(c))
    assert len(pages) == 1
    assert script.data_requests[1][0] == script.data_requests[0][0]


def test_an_expired_token_is_refreshed_once_and_the_request_resent():
    steps = [(401, {}, {"error": {"code": "", "message": "expired"}}), page([])]
    _, _, script, _ = run_client(steps, lambda c: collect(c))
    assert script.tokens_issued == 2
    assert script.data_requests[1][1].headers["Authorization"] == "Bearer token-2"


def test_client_errors_are_not_retried_and_carry_dataverse_code():
    steps = [(400, {}, {"error": {"code": "0x80060888", "message": "bad filter"}})]
    with pytest.raises(DataverseRequestError, match="0x80060888.*bad filter") as excinfo:
        run_client(steps, lambda c: collect(c))
    assert excinfo.value.status == 400


@pytest.mark.parametrize("shape", ["json", "html"])
def test_an_error_echoing_the_secret_or_token_is_redacted_before_it_is_cut_short(shape):
    """Messages keep 500 characters of a JSON error and 200 of anything else: a secret or
    token straddling that cut must not leave its first half behind."""
    filler = "x " * (245 if shape == "json" else 89)
    echo = f"{filler}{SECRET} Authorization: Bearer token-1"
    body = {"error": {"code": "0x80040203", "message": echo}} if shape == "json" else \
        f"<html><body>{echo}</body></html>".encode()
    with pytest.raises(DataverseRequestError) as excinfo:
        run_client([(400, {}, body)], lambda c: collect(c))
    message = str(excinfo.value)
    assert message.startswith("accounts: GET ") and "answered 400" in message
    assert "very-" not in message and "token-1" not in message
    assert "x ***" in message


def test_next_link_is_followed_unchanged_with_the_same_prefer_header():
    link = f"{ORG}/api/data/v9.2/accounts?$skiptoken=%3Ccookie%20pagenumber%3D%222%22%20%2F%3E"
    steps = [page([{"accountid": "a"}], link), page([{"accountid": "b"}])]
    _, _, script, _ = run_client(steps, lambda c: collect(c, PageQuery(page_size=1)))
    second = script.data_requests[1][1]
    assert str(second.url) == link
    assert second.headers["Prefer"] == "odata.maxpagesize=1"


def test_next_link_to_another_host_is_refused():
    steps = [page([{"accountid": "a"}], "https://evil.example.net/api/data/v9.2/accounts?x=1")]
    with pytest.raises(PagingError, match="evil.example.net"):
        run_client(steps, lambda c: collect(c))


def test_a_repeated_next_link_stops_instead_of_looping():
    link = f"{ORG}/api/data/v9.2/accounts?$skiptoken=same"
    steps = [page([{"accountid": "a"}], link), page([{"accountid": "b"}], link)]
    with pytest.raises(PagingError, match="repeated a nextLink"):
        run_client(steps, lambda c: collect(c))


def test_malformed_json_is_retried_then_reported():
    steps = [(200, {}, b'{"value": [{"accountid": "a"'), page([{"accountid": "a"}])]
    pages, _, _, _ = run_client(steps, lambda c: collect(c))
    assert len(pages) == 1
    with pytest.raises(DataverseRequestError, match="malformed"):
        run_client([(200, {}, b"{not json")] * 6, lambda c: collect(c))


def test_a_200_that_is_not_odata_is_a_clear_error():
    with pytest.raises(DataverseRequestError, match="without an OData 'value' list"):
        run_client([(200, {}, {"hello": "world"})], lambda c: collect(c))


def test_refused_credentials_give_a_clear_error_without_the_secret():
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={
            "error": "invalid_client",
            "error_description": f"AADSTS7000215: Invalid client secret provided ({SECRET})",
        })

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
            credentials = ClientCredentials(http, org_url=ORG, client_id="id",
                                            client_secret=SECRET, authority=ORG,
                                            tenant_id="t")
            await credentials.token()

    with pytest.raises(AuthenticationError) as excinfo:
        asyncio.run(main())
    message = str(excinfo.value)
    assert "invalid_client" in message and "DATAVERSE_CLIENT_SECRET" in message
    assert SECRET not in message


def test_concurrent_callers_share_one_token_request():
    steps = [page([])] * 20

    async def many(client):
        await asyncio.gather(*(client.get(f"{ORG}/api/data/v9.2/accounts") for _ in range(20)))

    _, _, script, _ = run_client(steps, many)
    assert script.tokens_issued == 1


def test_fetch_sessions_share_one_verifying_tls_context(monkeypatch, tmp_path):
    import shutil
    import ssl

    import certifi


    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    first = shared_ssl_context()
    assert shared_ssl_context() is first  # the CA bundle is loaded once per process
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    # Another CA bundle (SSL_CERT_FILE, as httpx honours it) gets its own context.
    bundle = tmp_path / "ca.pem"
    shutil.copy(certifi.where(), bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    other = shared_ssl_context()
    assert other is not first and other.verify_mode == ssl.CERT_REQUIRED


def test_an_unknown_host_is_a_dns_failure_in_one_line_and_not_retried():
    steps = [httpx.ConnectError("[Errno -2] Name or service not known")]
    with pytest.raises(UnreachableError) as failed:
        run_client(steps, lambda c: collect(c))
    message = str(failed.value)
    assert "DNS failure: org.example.com could not be resolved" in message
    assert "Name or service not known" in message and "\n" not in message


def test_tenant_discovery_of_an_unknown_host_says_dns():
    def unresolvable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno -2] Name or service not known", request=request)

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(unresolvable)) as http:
            credentials = ClientCredentials(http, org_url=ORG, client_id="id",
                                            client_secret=SECRET, authority="https://login.x",
                                            tenant_id=None)
            await credentials.token()

    with pytest.raises(UnreachableError, match="tenant discovery: .*DNS failure: "
                       "org.example.com could not be resolved"):
        asyncio.run(main())


def test_https_to_a_plain_http_server_is_a_tls_failure_that_says_so(simulator_url):
    """A real TLS handshake against the loopback simulator, which speaks plain HTTP."""
    from dataverse_assets.simulator import (
        SIMULATOR_CLIENT_ID,
        SIMULATOR_CLIENT_SECRET,
        SIMULATOR_TENANT_ID,
    )

    _, url = simulator_url
    https = url.replace("http://", "https://")
    host = https.removeprefix("https://").rstrip("/")

    async def main():
        async with httpx.AsyncClient(verify=shared_ssl_context()) as http:
            credentials = ClientCredentials(http, org_url=https, client_id=SIMULATOR_CLIENT_ID,
                                            client_secret=SIMULATOR_CLIENT_SECRET,
                                            authority=url, tenant_id=None)
            with pytest.raises(UnreachableError) as discovery:
                await credentials.token()
            client = DataverseClient(http, ClientCredentials(
                http, org_url=https, client_id=SIMULATOR_CLIENT_ID,
                client_secret=SIMULATOR_CLIENT_SECRET, authority=url,
                tenant_id=SIMULATOR_TENANT_ID),
                org_url=https, retry_policy=RetryPolicy(max_attempts=2))
            with pytest.raises(UnreachableError) as request:
                await client.get(f"{https}/api/data/v9.2/accounts", entity="accounts")
            return str(discovery.value), str(request.value), client.stats.requests

    discovery, request, requests = asyncio.run(main())
    assert f"TLS failure with {host}: the TLS handshake failed" in discovery, discovery
    assert f"TLS failure with {host}: the TLS handshake failed" in request, request
    assert f"does {host} serve https:// on that port?" in request
    assert requests == 1  # not retried: the next handshake would fail the same way
