"""What the tests that start a server of their own share (a browser, PostgreSQL, Redis): a
free loopback port, and skipping a test whose server is not installed, except in CI. Importable
without pytest: benchmarks/store_backends.py starts PostgreSQL through postgres_server.py."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def missing(reason: str, in_ci: str) -> None:
    """Skip the test for `reason` (what to install); with CI=true fail it, adding `in_ci`
    (why CI must run it), since .ci/run installs what the tests need."""
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; {in_ci}")
    pytest.skip(reason)
