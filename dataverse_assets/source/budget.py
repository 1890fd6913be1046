"""One request budget per application user, shared by every client that uses it.

Dataverse's service protection limits count per application user, not per client: 52
requests in flight at once, and a 429's Retry-After holds back everything that user sends.
A run that fetches several entities at once (threads), several runs at once (processes), and
the CLI next to a schedule all draw on the same budget. So the budget is kept where they all
see it: a folder per application user (the org URL and client id, hashed) holding

- `slot-NN.lock`, one file per request allowed in flight. A request holds an exclusive
  `flock` on one of them while it is sent and read. The kernel drops the lock when the
  holder's file is closed, and closes it when the process dies, so a SIGKILLed run never keeps
  a slot.
- `resume-at`, the wall-clock time before which nobody sends (the latest Retry-After anyone
  got, written atomically).
- `dop-hint`, the degree of parallelism Dataverse last recommended (`x-ms-dop-hint`): when
  it is below the configured limit, only that many slots are used.

The embedded simulator is an org of its own in each process, so its clients share an
in-process budget instead (`LocalBudget`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import random
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

# How often a request waiting for a free slot looks again. A Dataverse request takes tenths
# of a second to seconds; 20 ms keeps a freed slot idle for at most a few percent of that.
POLL_SECONDS = 0.02

Sleep = Callable[[float], Awaitable[None]]


def budget_key(org_url: str, client_id: str) -> str:
    """The folder name of an application user's budget: no URL or id in clear on disk."""
    return hashlib.sha256(f"{org_url.rstrip('/').lower()}\n{client_id.lower()}".encode()
                          ).hexdigest()[:20]


def default_budget_dir() -> Path:
    """The machine's shared place for budgets: every project and run of this user on this
    machine that uses the same credentials meets there."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"dataverse-assets-{uid}" / "budget"


class RequestBudget:
    """The in-flight limit and the throttle pause one application user's clients share."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a request budget allows at least one request in flight")
        self.limit = limit

    # -- implemented per kind ----------------------------------------------------------------
    def _try_acquire(self) -> int | None:
        raise NotImplementedError

    def _release(self, slot: int) -> None:
        raise NotImplementedError

    def resume_at(self) -> float:
        """Wall-clock time before which no request is sent (0: none pending)."""
        raise NotImplementedError

    def pause(self, seconds: float) -> None:
        """Hold back every client of this user for `seconds` from now (a Retry-After)."""
        raise NotImplementedError

    def dop_hint(self) -> int | None:
        raise NotImplementedError

    def observe_dop_hint(self, hint: int) -> None:
        """Remember the parallelism Dataverse recommends for this org (x-ms-dop-hint)."""
        raise NotImplementedError

    def close(self) -> None:
        """Give back what this client holds (its files); the budget itself stays."""

    # -- shared ------------------------------------------------------------------------------
    def effective_limit(self) -> int:
        hint = self.dop_hint()
        return max(1, min(self.limit, hint)) if hint else self.limit

    async def wait_until_resumed(self, sleep: Sleep) -> float:
        """Sleep out a pause any client of this user was told to take; the seconds waited."""
        waited = 0.0
        while (remaining := self.resume_at() - time.time()) > 0:
            await sleep(remaining)
            waited += remaining
        return waited

    @contextlib.asynccontextmanager
    async def slot(self, sleep: Sleep = asyncio.sleep) -> AsyncIterator[float]:
        """Hold one of the user's request slots while the block runs; yields the seconds
        spent waiting for it (pauses included)."""
        waited = 0.0
        while True:
            waited += await self.wait_until_resumed(sleep)
            slot = self._try_acquire()
            if slot is not None:
                break
            await sleep(POLL_SECONDS)
            waited += POLL_SECONDS
        try:
            yield waited
        finally:
            self._release(slot)


class _LocalState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.resume_at = 0.0
        self.hint: int | None = None


_LOCAL: dict[str, _LocalState] = {}
_LOCAL_LOCK = threading.Lock()


class LocalBudget(RequestBudget):
    """A budget shared by the clients of one process (threads included)."""

    def __init__(self, key: str, limit: int) -> None:
        super().__init__(limit)
        with _LOCAL_LOCK:
            self._state = _LOCAL.setdefault(key, _LocalState())

    def _try_acquire(self) -> int | None:
        state = self._state
        with state.lock:
            if state.in_flight >= self.effective_limit():
                return None
            state.in_flight += 1
            return state.in_flight

    def _release(self, slot: int) -> None:
        with self._state.lock:
            self._state.in_flight -= 1

    def resume_at(self) -> float:
        return self._state.resume_at

    def pause(self, seconds: float) -> None:
        with self._state.lock:
            self._state.resume_at = max(self._state.resume_at, time.time() + seconds)

    def dop_hint(self) -> int | None:
        return self._state.hint

    def observe_dop_hint(self, hint: int) -> None:
        self._state.hint = hint


class FileBudget(RequestBudget):
    """A budget shared through a folder by every process that opens it (see the module)."""

    def __init__(self, directory: Path, limit: int) -> None:
        super().__init__(limit)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # This client's own open file per slot (opened when first tried): a flock belongs to
        # an open file, so two clients in one process exclude each other like two processes.
        self._files: dict[int, int] = {}
        self._held: set[int] = set()
        self._guard = threading.Lock()
        self._hint_read = (0.0, None)

    def _slot_file(self, index: int) -> int:
        fd = self._files.get(index)
        if fd is None:
            fd = os.open(self.directory / f"slot-{index:02d}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            self._files[index] = fd
        return fd

    def _try_acquire(self) -> int | None:
        limit = self.effective_limit()
        start = random.randrange(limit)  # spread the clients over the slots
        with self._guard:
            for step in range(limit):
                index = (start + step) % limit
                if index in self._held:
                    continue
                try:
                    fcntl.flock(self._slot_file(index), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                self._held.add(index)
                return index
        return None

    def _release(self, slot: int) -> None:
        with self._guard:
            fcntl.flock(self._files[slot], fcntl.LOCK_UN)
            self._held.discard(slot)

    def _read(self, name: str) -> str | None:
        try:
            return (self.directory / name).read_text().strip() or None
        except FileNotFoundError:
            return None

    def _write(self, name: str, value: str) -> None:
        # Atomic: a reader sees the old value or the new one, never half of one.
        temporary = self.directory / f".{name}.{os.getpid()}.{threading.get_ident()}"
        temporary.write_text(value)
        os.replace(temporary, self.directory / name)

    @contextlib.contextmanager
    def _state_lock(self):
        fd = os.open(self.directory / "state.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def resume_at(self) -> float:
        value = self._read("resume-at")
        try:
            return float(value) if value else 0.0
        except ValueError:
            return 0.0

    def pause(self, seconds: float) -> None:
        with self._state_lock():
            until = time.time() + seconds
            if until > self.resume_at():
                self._write("resume-at", f"{until:.3f}")

    def dop_hint(self) -> int | None:
        # Read at most once a second: it changes rarely and is read before every request.
        read_at, hint = self._hint_read
        now = time.monotonic()
        if now - read_at > 1.0:
            value = self._read("dop-hint")
            hint = int(value) if value and value.isdigit() and int(value) > 0 else None
            self._hint_read = (now, hint)
        return hint

    def observe_dop_hint(self, hint: int) -> None:
        if hint != self.dop_hint():
            self._write("dop-hint", str(hint))
            self._hint_read = (time.monotonic(), hint)

    def close(self) -> None:
        with self._guard:
            for fd in self._files.values():
                os.close(fd)  # drops any lock still held
            self._files.clear()
            self._held.clear()


def file_budget(directory: Path | str | None, key: str, limit: int) -> FileBudget:
    return FileBudget(Path(directory or default_budget_dir()) / key, limit)
