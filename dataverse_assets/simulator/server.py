"""Run a simulator over real HTTP on the loopback interface, in a background thread."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from .app import create_app
from .gateway import HideInjectedResets
from .model import DataverseSimulator

_STARTUP_TIMEOUT_SECONDS = 15.0


def _hide_injected_resets() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, HideInjectedResets) for f in logger.filters):
        logger.addFilter(HideInjectedResets())


@contextmanager
def serve_on_loopback(sim: DataverseSimulator, port: int = 0, *,
                      control: bool = False) -> Iterator[str]:
    """Serve sim on 127.0.0.1 and yield its base URL; port 0 picks a free port.

    The socket is bound here, before uvicorn starts, so the port is known up front and no other
    process can take it between choosing and binding.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    _hide_injected_resets()
    config = uvicorn.Config(
        create_app(sim, control=control),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run,
        kwargs={"sockets": [sock]},
        name=f"dataverse-simulator-{bound_port}",
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + _STARTUP_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("the Dataverse simulator failed to start")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            sock.close()
            raise RuntimeError("the Dataverse simulator did not start in time")
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(_STARTUP_TIMEOUT_SECONDS)
        sock.close()
