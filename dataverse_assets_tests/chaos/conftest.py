"""The chaos suite's report: one JSON line per scenario in test-artifacts/chaos-report.jsonl,
and a summary at the end of the session.

The default (CI) subset runs a few seeds; `DATAVERSE_CHAOS_SOAK=1` runs many more seeds and
longer scenarios (see docs/guarantees.md).
"""

import os
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest

REPORT = Path(__file__).resolve().parents[2] / "test-artifacts" / "chaos-report.jsonl"
SOAK = os.environ.get("DATAVERSE_CHAOS_SOAK", "") not in ("", "0")
_lines: list[dict] = []


def seeds(ci: list[int], soak_count: int, offset: int = 0) -> list[int]:
    """The seeds of a parametrized chaos test: a few in CI, many in a soak."""
    return list(range(offset + 1, offset + soak_count + 1)) if SOAK else ci


@pytest.fixture
def chaos_report(request):
    """Call with a dict (one run's report); it is written as one JSON line (with the store
    the test ran on)."""
    params = getattr(request.node, "callspec", None)
    store = params.params.get("chaos_store", "sqlite") if params else "sqlite"

    def write(line: dict) -> None:
        line = {"soak": SOAK, "store": store, **line}
        _lines.append(line)
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        with REPORT.open("ab") as report:
            report.write(orjson.dumps(line) + b"\n")

    return write


def pytest_terminal_summary(terminalreporter):
    if not _lines:
        return
    faults: Counter = Counter()
    for line in _lines:
        faults.update(line.get("faults", {}))
    kills = [line for line in _lines if line.get("scenario") == "kill"]
    survived = sum(1 for line in kills if line.get("killed") and line.get("passed"))
    passed = sum(1 for line in _lines if line.get("passed"))
    write = terminalreporter.write_line
    terminalreporter.section("chaos report")
    write(f"runs: {len(_lines)} ({passed} passed every invariant)"
          f"{' [soak]' if SOAK else ''}; report: {REPORT}")
    write(f"faults injected: {sum(faults.values())} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(faults.items()))})")
    write(f"retries: {sum(line.get('retries', 0) for line in _lines)}; failed runs recovered: "
          f"{sum(line.get('failed_runs', 0) for line in _lines)}; change sets: "
          f"{sum(line.get('change_sets', 0) for line in _lines)}")
    write(f"kills survived: {survived} of {len(kills)}; rows lost: "
          f"{sum(line.get('rows_lost', 0) for line in _lines)}; seconds: "
          f"{sum(line.get('seconds', 0) for line in _lines):.1f}")


@pytest.fixture(params=["sqlite", "postgresql"])
def chaos_store(request):
    """Where each mirror of a chaos test lives (make_chaos_mirror's `store_for`): a SQLite
    file in its folder, or a new database of the session's PostgreSQL cluster (each mirror
    its own, as each SQLite mirror has its own file). A test that runs on SQLite only for the
    CI budget narrows it: `@pytest.mark.parametrize("chaos_store", ["sqlite"], indirect=True)`.
    """
    if request.param == "sqlite":
        return lambda folder: str(folder / "mirror.db")
    first = iter([request.getfixturevalue("postgres_store_url")])  # allows the store too
    cluster = request.getfixturevalue("postgres_cluster")
    return lambda folder: next(first, None) or cluster.create_database(
        f"chaos_{uuid.uuid4().hex[:12]}")
