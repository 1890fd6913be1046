"""The sessions of one process share the access token and the discovered tenant: a run over
many entities asks the authority once, never with other credentials' token."""

import asyncio
import threading

import pytest

from dataverse_assets.errors import AuthenticationError
from dataverse_assets.simulator import (
    SIMULATOR_CLIENT_ID,
    SIMULATOR_CLIENT_SECRET,
    DataverseSimulator,
    serve_on_loopback,
)
from dataverse_assets.source.auth import SHARED_TOKENS
from dataverse_assets.source.live import LiveDataverseSource
from dataverse_assets_tests.conftest import failure_messages


def live(base: str, secret: str = SIMULATOR_CLIENT_SECRET) -> LiveDataverseSource:
    return LiveDataverseSource(url=base, client_id=SIMULATOR_CLIENT_ID, client_secret=secret,
                               authority=base)


def read_in_sessions(source: LiveDataverseSource, sessions: int) -> list[int]:
    """Each session (as each raw/E step opens one) reads the metadata and the first page."""
    async def one() -> int:
        async with source.open_session() as session:
            await session.entity_definition("accounts")
            _, body = await session.client.get_json("accounts", params={"$top": "5"},
                                                    entity="accounts")
            return len(body["value"])

    return [asyncio.run(one()) for _ in range(sessions)]


def discoveries(sim: DataverseSimulator) -> int:
    return sum(1 for r in sim.stats.request_log
               if r.target == "/api/data/v9.2/" and r.status == 401)


@pytest.fixture
def org():
    sim = DataverseSimulator(["accounts"], seed=5, row_counts={"accounts": 30})
    with serve_on_loopback(sim) as base:
        yield sim, base


def test_sessions_of_one_process_ask_for_the_tenant_and_a_token_once(org) -> None:
    sim, base = org
    assert read_in_sessions(live(base), 3) == [5, 5, 5]
    assert sim.stats.token_requests == 1
    assert discoveries(sim) == 1


def test_sessions_of_many_threads_starting_at_once_ask_once(org) -> None:
    """A run's entities are fetched on threads whose sessions start at the same moment:
    one of them asks, the others wait for its token."""
    sim, base = org
    start = threading.Barrier(8)
    counts: list[list[int]] = []

    def read() -> None:
        start.wait()
        counts.append(read_in_sessions(live(base), 1))

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts == [[5]] * 8
    assert sim.stats.token_requests == 1
    assert discoveries(sim) == 1


def test_other_credentials_never_get_the_shared_token(org) -> None:
    sim, base = org
    read_in_sessions(live(base), 1)
    wrong = "wrong-secret-5c0ffee"
    with pytest.raises(AuthenticationError) as excinfo:
        read_in_sessions(live(base, secret=wrong), 1)
    assert "invalid_client" in str(excinfo.value)
    assert sim.stats.token_requests == 2  # the wrong secret was sent, and refused
    # The shared tokens are keyed by a digest of the secret, never by the secret itself.
    assert SIMULATOR_CLIENT_SECRET not in repr(vars(SHARED_TOKENS))


def test_a_token_the_org_refuses_is_replaced_for_every_later_session(org) -> None:
    sim, base = org
    read_in_sessions(live(base), 1)
    sim.inject("token_expiry", entity="accounts")  # the shared token expires now
    read_in_sessions(live(base), 1)  # 401, then one new token ...
    refused = sim.stats.status_counts[401]
    read_in_sessions(live(base), 2)  # ... which the next sessions use as they are
    assert sim.stats.token_requests == 2
    assert sim.stats.status_counts[401] == refused
    assert len(sim.issued_access_tokens()) == 2


def test_a_run_over_many_entities_asks_for_one_token(mirror) -> None:
    key, result = mirror.run("hourly")
    assert result.success, failure_messages(result)
    raws = [e for e in result.get_asset_materialization_events()
            if e.asset_key.path[0] == "raw"]
    assert len(raws) >= 3  # several entities, each its own HTTP session
    assert mirror.simulator.stats.token_requests == 1
    assert discoveries(mirror.simulator) == 1
