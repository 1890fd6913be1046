"""Worker processes that parse archived pages for staging, so a large change set uses every core.

Parsing, hashing and serialising a record is Python work that holds the GIL (~18 µs a row of
30 columns), so threads cannot share it. Each worker is
`python -m dataverse_assets.sync.stage_workers`, a process of our own: unlike
multiprocessing's spawn, it never re-imports the caller's main module, so a script without an
`if __name__ == "__main__"` guard cannot run twice. Tasks and results are pickled frames over
the worker's stdin and stdout; stray prints in the worker go to its stderr.

Results come back in task order (page i goes to worker i mod n, and each worker answers in
order), which staging needs: a later page wins for a key seen twice.
"""

import importlib
import os
import pickle
import struct
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from dataverse_assets.errors import StageWorkerError

_HEADER = struct.Struct("!Q")
# The largest peak RSS (MB) of any worker this process has run, read from /proc when a pool
# closes (Linux; 0.0 elsewhere): for reports, since a child's own rusage also counts the
# memory it had from its parent before exec.
peak_worker_rss_mb = 0.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def _write_frame(stream, payload: object) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read_frame(stream) -> object:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


class WorkerPool:
    """n worker processes running one function over tasks, results in task order, with at
    most `window` tasks in flight (so memory stays bounded)."""

    def __init__(self, function: Callable, workers: int, window: int | None = None) -> None:
        self.function = f"{function.__module__}:{function.__qualname__}"
        self.window = window or workers + 1
        self.unfinished = False  # a map stopped before its last result: kill, don't wait
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        # stderr to a file, not a pipe: a chatty worker can never block on it.
        self.stderr = [tempfile.TemporaryFile() for _ in range(workers)]
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "dataverse_assets.sync.stage_workers", self.function],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env)
            for stderr in self.stderr
        ]

    def map(self, tasks: Iterable[tuple]) -> Iterator[object]:
        """function(*task) for each task, in order."""
        pending: deque[subprocess.Popen] = deque()
        self.unfinished = True
        tasks = iter(tasks)
        submitted = 0
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.window:
                task = next(tasks, None)
                if task is None:
                    exhausted = True
                    break
                process = self.processes[submitted % len(self.processes)]
                try:
                    _write_frame(process.stdin, task)
                except (BrokenPipeError, OSError):
                    raise self._died(process) from None
                pending.append(process)
                submitted += 1
            if not pending:
                self.unfinished = False
                return
            process = pending.popleft()
            try:
                status, value = _read_frame(process.stdout)
            except EOFError:
                raise self._died(process) from None
            if status == "ok":
                yield value
            elif status == "missing":
                raise FileNotFoundError(value)
            elif status == "raise":
                raise value  # the worker's own exception (it pickled): the caller handles it
            else:
                raise StageWorkerError(f"a staging worker failed: {value}")

    def _died(self, process: subprocess.Popen) -> StageWorkerError:
        process.kill()
        log = self.stderr[self.processes.index(process)]
        log.seek(0)
        stderr = log.read().decode(errors="replace").strip()
        return StageWorkerError(
            f"a staging worker exited (code {process.wait()})"
            + (f": {stderr.splitlines()[-1]}" if stderr else ""))

    def close(self) -> None:
        global peak_worker_rss_mb
        for process in self.processes:
            peak_worker_rss_mb = max(peak_worker_rss_mb, _peak_rss_mb(process.pid))
        if self.unfinished:
            for process in self.processes:
                process.kill()
        for process in self.processes:
            if process.stdin:
                try:
                    process.stdin.close()
                except OSError:
                    pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout:
                process.stdout.close()
        for log in self.stderr:
            log.close()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def _serve(function_name: str) -> None:
    # Frames go to the original stdout; anything printed goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    module_name, _, qualname = function_name.partition(":")
    function = importlib.import_module(module_name)
    for part in qualname.split("."):
        function = getattr(function, part)
    stdin = sys.stdin.buffer
    while True:
        try:
            task = _read_frame(stdin)
        except EOFError:
            return
        try:
            result = ("ok", function(*task))
        except FileNotFoundError as exc:
            result = ("missing", str(exc))
        except Exception as exc:  # reported to the caller, who fails the staging
            result = ("raise", exc) if _pickles(exc) else ("error", f"{type(exc).__name__}: {exc}")
        _write_frame(out, result)


def _pickles(exc: Exception) -> bool:
    """Whether the exception is one of ours (their messages say what to fix) and survives the
    trip to the caller as itself; anything else is reported as a StageWorkerError."""
    if not type(exc).__module__.startswith("dataverse_assets."):
        return False
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return False
    return True


if __name__ == "__main__":
    _serve(sys.argv[1])
