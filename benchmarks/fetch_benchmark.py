"""Full fetch of a large entity from the simulator over loopback, through the real client and
fetch code, into an archive folder. Not part of the test suite.

    .venv/bin/python benchmarks/fetch_benchmark.py --rows 1000000

The simulator runs in its own process (`dataverse-assets simulator --rows ...`), as Dataverse
would, so the numbers are the client's: its CPU and memory are measured apart from the
server's. Two phases:
1. simulator alone: one connection follows every nextLink without parsing pages (how fast the
   simulator serves; it must never be the bottleneck of phase 2);
2. fetch: `fetch_change_set` of the entity (mode full, parallel key ranges) into an archive,
   `--repeat` times (the median run is reported), then the archive is read back to check
   that every row arrived exactly once.

Results go to benchmarks/results/fetch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataverse_assets.archive.change_sets import ChangeSetArchive  # noqa: E402
from dataverse_assets.config import EntityConfig  # noqa: E402
from dataverse_assets.simulator import (  # noqa: E402
    SIMULATOR_CLIENT_ID,
    SIMULATOR_CLIENT_SECRET,
    SIMULATOR_TENANT_ID,
)
from dataverse_assets.source.live import LiveDataverseSource  # noqa: E402
from dataverse_assets.sync.fetch import fetch_change_set  # noqa: E402
from dataverse_assets.sync.fetch_plan import plan_fetch  # noqa: E402

TARGET_ROWS_PER_SECOND = 100_000
TARGET_PEAK_RSS_MB = 300


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    """Resident memory of a process from /proc (VmHWM is its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """The client's resident memory, sampled while a phase runs (its peak is what counts)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def start_simulator(entity: str, rows: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "dataverse_assets.ops.cli", "simulator", "--port", "0",
               "--rows", f"{entity}={rows}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"the simulator did not start: {line!r}")
    return process, match.group(1)


def token(base: str) -> str:
    response = httpx.post(f"{base}/{SIMULATOR_TENANT_ID}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": SIMULATOR_CLIENT_ID,
        "client_secret": SIMULATOR_CLIENT_SECRET, "scope": f"{base}/.default"})
    response.raise_for_status()
    return response.json()["access_token"]


_NEXT_LINK = re.compile(rb'"@odata\.nextLink":"([^"]+)"')


def serve_only(base: str, entity: str, page_size: int) -> dict:
    """Phase 1: follow every nextLink on one connection; pages are not parsed."""
    headers = {"Authorization": f"Bearer {token(base)}", "Accept": "application/json",
               "Prefer": f"odata.maxpagesize={page_size}"}
    url: str | None = f"{base}/api/data/v9.2/{entity}"
    pages = received = 0
    started = time.perf_counter()
    with httpx.Client(headers=headers, timeout=120) as client:
        while url:
            response = client.get(url)
            response.raise_for_status()
            pages += 1
            received += len(response.content)
            match = _NEXT_LINK.search(response.content, max(0, len(response.content) - 4096))
            url = match.group(1).decode() if match else None
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "pages": pages, "mb_received": round(received / 1e6, 1),
            "mb_per_second": round(received / 1e6 / seconds, 1)}


def fetch(base: str, entity: str, page_size: int, ranges: int, concurrency: int,
          archive_root: Path) -> tuple[dict, ChangeSetArchive]:
    """Phase 2: the real source, client and fetch code, mode full, into an archive."""
    source = LiveDataverseSource(url=base, client_id=SIMULATOR_CLIENT_ID,
                                 client_secret=SIMULATOR_CLIENT_SECRET, authority=base,
                                 max_concurrency=concurrency)
    config = EntityConfig(name=entity, group="benchmark", incremental="full",
                          page_size=page_size, parallel_ranges=ranges)
    archive = ChangeSetArchive(archive_root, entity, "20260101T000000Z")

    async def main():
        async with source.open_session() as session:
            definition = await session.entity_definition(entity)
            request = plan_fetch(config, archive.change_set, definition, watermark=None)
            return await fetch_change_set(session, archive, request, definition), session

    cpu_before = time.process_time()
    started = time.perf_counter()
    summary, session = asyncio.run(main())
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    return {
        "seconds": round(seconds, 2),
        "rows_per_second": round(summary.records / seconds),
        "records": summary.records,
        "pages": summary.pages,
        "requests": summary.requests,
        "retries": summary.retries,
        "mb_received": round(session.stats.bytes / 1e6, 1),
        "mb_archived": round(summary.bytes_archived / 1e6, 1),
        "client_cpu_seconds": round(cpu, 2),
        "max_requests_in_flight": session.stats.max_in_flight,
    }, archive


def verify(archive: ChangeSetArchive, primary_key: str) -> dict:
    """Every row exactly once (run after the timed phase; it holds every key)."""
    seen: set[str] = set()
    total = 0
    for path in archive.page_paths():
        for row in orjson.loads(gzip.decompress(path.read_bytes()))["value"]:
            seen.add(row[primary_key])
            total += 1
    return {"rows_archived": total, "distinct_keys": len(seen)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--entity", default="accounts",
                        help="entity set; accounts rows carry 17 columns (~620 bytes)")
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument("--ranges", type=int, default=4, help="parallel key ranges")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--archive-dir", type=Path,
                        help="where the archive goes (default: a temporary folder, removed)")
    parser.add_argument("--repeat", type=int, default=3, help="fetch runs; the median counts")
    parser.add_argument("--skip-serve-only", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fetch.json")
    args = parser.parse_args()

    simulator, base = start_simulator(args.entity, args.rows)
    archive_root = args.archive_dir or Path(tempfile.mkdtemp(prefix="fetch-benchmark-"))
    try:
        served = None if args.skip_serve_only else serve_only(base, args.entity, args.page_size)
        if served:
            served["rows_per_second"] = round(args.rows / served["seconds"])
            print(f"simulator alone: {served['rows_per_second']:,} rows/s "
                  f"({served['mb_per_second']} MB/s, {served['pages']} pages)", flush=True)
        runs = []
        for _ in range(args.repeat):
            with RssSampler() as sampler:
                fetched, archive = fetch(base, args.entity, args.page_size, args.ranges,
                                         args.concurrency, archive_root)
            fetched["peak_rss_mb"] = round(sampler.peak, 1)
            runs.append(fetched)
            print(f"fetch: {fetched['rows_per_second']:,} rows/s, {fetched['requests']} "
                  f"requests, peak RSS {fetched['peak_rss_mb']} MB", flush=True)
        ru_maxrss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        simulator_peak = round(rss_mb(simulator.pid, "VmHWM"), 1)
        fetched = sorted(runs, key=lambda run: run["rows_per_second"])[len(runs) // 2]
        print(f"median of {len(runs)}: {fetched['rows_per_second']:,} rows/s; peak RSS "
              f"{max(r['peak_rss_mb'] for r in runs)} MB (simulator {simulator_peak} MB)")
        request = archive.read_json("request.json")
        assert isinstance(request, dict)
        checked = verify(archive, request["primary_key"])
    finally:
        simulator.terminate()
        simulator.wait(10)
        if args.archive_dir is None:
            shutil.rmtree(archive_root, ignore_errors=True)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "processor": platform.machine()},
        "entity": args.entity, "rows": args.rows, "page_size": args.page_size,
        "parallel_ranges": args.ranges, "max_concurrency": args.concurrency,
        "simulator_serving_alone": served,
        "simulator_peak_rss_mb": simulator_peak,
        "fetch": fetched,  # the median run
        "fetch_runs": runs,
        "client_ru_maxrss_mb": ru_maxrss,
        "load_average_after": os.getloadavg(),
        "verification": checked,
        "target": {"rows_per_second": TARGET_ROWS_PER_SECOND,
                   "peak_rss_mb": TARGET_PEAK_RSS_MB},
        "met": fetched["rows_per_second"] >= TARGET_ROWS_PER_SECOND
        and max(r["peak_rss_mb"] for r in runs) < TARGET_PEAK_RSS_MB
        and checked["distinct_keys"] == checked["rows_archived"] == args.rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"verified: {checked['distinct_keys']:,} distinct of {checked['rows_archived']:,} "
          f"rows; written to {args.out}")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
