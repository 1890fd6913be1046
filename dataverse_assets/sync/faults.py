"""Named fault points, so tests can fail a sync at an exact step and prove nothing is lost.

Production code calls `fault_point("publish.mid_execute")`; it does nothing unless a test armed
that name (in-process with `armed(...)`, or across processes with the environment variable
`DATAVERSE_FAULT_POINTS="name=raise,other=kill"`, which the chaos tests use to SIGKILL a run;
`name=sleep:2` pauses there for 2 s, to hold a step open while another run tries it;
`name=kill@3` lets the first 3 calls pass).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dataverse_assets.errors import InjectedFault

ENV_VARIABLE = "DATAVERSE_FAULT_POINTS"
_armed: dict[str, list] = {}  # name -> [action, calls to let pass first]
_env_calls: dict[str, int] = {}  # name -> calls seen, for "name=kill@3" (let 3 pass)


def _from_environment() -> dict[str, str]:
    spec = os.environ.get(ENV_VARIABLE, "")
    points: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        points[name] = action or "raise"
    return points


def fault_point(name: str) -> None:
    """Fail here if a test armed this point."""
    action = None
    if name in _armed:
        entry = _armed[name]
        if entry[1] > 0:
            entry[1] -= 1
            return
        action = entry[0]
    elif ENV_VARIABLE in os.environ:
        action = _from_environment().get(name)
        if action is not None and "@" in action:
            action, _, skip = action.partition("@")
            _env_calls[name] = _env_calls.get(name, 0) + 1
            if _env_calls[name] <= int(skip):
                return
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action.startswith("sleep:"):
        time.sleep(float(action.removeprefix("sleep:")))
        return
    raise InjectedFault(f"injected fault at {name}")


@contextmanager
def armed(name: str, action: str = "raise", after: int = 0) -> Iterator[None]:
    """Arm a fault point for the duration of a block (in this process); it lets the first
    `after` calls pass, then fails every call."""
    _armed[name] = [action, after]
    try:
        yield
    finally:
        _armed.pop(name, None)
