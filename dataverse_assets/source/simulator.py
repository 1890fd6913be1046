"""The built-in Dataverse simulator behind the same HTTP client as live Dataverse."""

import threading
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

import httpx
from pydantic import Field

from dataverse_assets.source.base import SourceSession
from dataverse_assets.source.client import RetryPolicy
from dataverse_assets.source.live import HttpClientSource, _client_session

_EMBEDDED_LOCK = threading.Lock()
_EMBEDDED: dict[tuple[int, tuple[str, ...]], object] = {}


def embedded_simulator(seed: int, entity_names: Sequence[str]):
    """The in-process simulator for a seed and entity list: one per process, so the data a
    run sees is the data a test mutated."""
    from dataverse_assets.simulator import DataverseSimulator

    key = (seed, tuple(sorted(entity_names)))
    with _EMBEDDED_LOCK:
        if key not in _EMBEDDED:
            _EMBEDDED[key] = DataverseSimulator(key[1], seed=seed)
        return _EMBEDDED[key]


class SimulatorSource(HttpClientSource):
    """The built-in Dataverse simulator behind the same HTTP client as live Dataverse.

    Without `base_url` it runs in-process (httpx's ASGI transport, no sockets); with one it
    talks to a simulator already served on loopback (`dataverse-assets simulator`).
    """

    entity_names: list[str]
    seed: int = 42
    base_url: str | None = None
    timeout_seconds: float = 60.0
    retry_backoff_seconds: list[float] | None = Field(
        None, description="Waits between retries (default: the client's 1, 2, 4, 8, 16 s); "
        "chaos tests shorten them.")

    def open_session(self) -> AbstractAsyncContextManager[SourceSession]:
        from dataverse_assets.simulator.identity import (
            SIMULATOR_CLIENT_ID,
            SIMULATOR_CLIENT_SECRET,
        )

        transport = None
        org_url = self.base_url
        scope = None  # served on loopback: shared like a real org's budget
        if org_url is None:
            from dataverse_assets.simulator import create_app

            simulator = embedded_simulator(self.seed, self.entity_names)
            transport = httpx.ASGITransport(app=create_app(simulator))
            org_url = "http://simulator.invalid"
            scope = str(id(simulator))  # this process's own org: an in-process budget
        return _client_session(
            org_url=org_url, client_id=SIMULATOR_CLIENT_ID, client_secret=SIMULATOR_CLIENT_SECRET,
            authority=org_url, tenant_id=None, max_concurrency=self.max_concurrency,
            timeout_seconds=self.timeout_seconds, transport=transport,
            max_response_mb=self.max_response_mb,
            response_deadline_seconds=self.response_deadline_seconds,
            budget_dir=self.budget_dir, local_budget_scope=scope,
            retry_policy=RetryPolicy(backoff_seconds=tuple(self.retry_backoff_seconds))
            if self.retry_backoff_seconds else None,
        )


