"""Entities fetched at the same time within one run, without a process per step.

A run's steps execute one after another in its process (the in-process executor: a process
per step costs ~2 s of imports each). Fetching is waiting on the network, so the first raw/E
step of a run starts the fetches of every entity that can start now, on a small thread pool:
the entities of the run's group that are selected in it, have no linking table to wait for
(the unfiltered ones: filtered ones read ids staged earlier in the run, so the asset graph
orders them after), and have no run config of their own (a targeted refresh runs as asked).
Each raw/E step then waits for its own fetch, so staging and publishing one entity overlap the
fetches of the others, and a failure stays the failing entity's (its raw/E step re-raises
it; the others publish).

Every request still draws on the application user's one budget (source/budget.py), so
entities in parallel never send more than DATAVERSE_MAX_CONCURRENCY at once together, and a
429 pauses all of them. Each fetch takes its entity's lock as raw/E would, in the background
thread, on behalf of the run. Its log lines are kept and written to the run's log by the raw/E
step that claims it (so the UI shows each under its own step); live progress goes to in-process
listeners (the CLI's terminal) as it happens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from dagster import AssetExecutionContext, AssetKey

from dataverse_assets.config import EntitiesConfig, EntityConfig
from dataverse_assets.defs.asset_keys import raw_key
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.source.base import DataverseSource
from dataverse_assets.sync import steps
from dataverse_assets.sync.fetch import FetchSummary
from dataverse_assets.sync.progress import FetchProgress, fetch_reporter


@dataclass
class Fetched:
    """One entity's fetch: its outcome and the log lines it wrote on the way."""

    summary: FetchSummary
    reused: bool
    log: list[tuple[str, str]] = field(default_factory=list)  # (level, message)


@dataclass
class _RunFetches:
    started: set[str] = field(default_factory=set)  # entities whose fetch this run started
    futures: dict[str, Future[Fetched]] = field(default_factory=dict)  # not yet claimed
    pool: ThreadPoolExecutor | None = None
    # Set when the run is interrupted (terminated from the UI, Ctrl-C): the other fetches stop
    # at their next page instead of holding the process until they are done.
    stop: threading.Event = field(default_factory=threading.Event)


class FetchStopped(Exception):
    """The run this fetch belonged to was interrupted."""


_RUNS: dict[str, _RunFetches] = {}
_RUNS_LOCK = threading.Lock()
# Finished runs of a long-lived process (tests, a code server) keep only the names they
# started; past this many, the idle ones are forgotten.
_KEEP_RUNS = 64


def _op_name(key: AssetKey) -> str:
    return key.to_python_identifier()


def startable_entities(context: AssetExecutionContext, entity: EntityConfig,
                       config: EntitiesConfig) -> list[EntityConfig]:
    """The entities of this run whose fetch can start now, with `entity`'s: its group's
    unfiltered entities whose raw asset the run executes, without run config of their own."""
    run = context.run
    # A run of a whole job has no (or an empty) selection of its own: the job's assets.
    selection = run.asset_selection or context.job_def.asset_layer.selected_asset_keys
    steps_to_run = set(run.step_keys_to_execute) if run.step_keys_to_execute else None
    op_config = (run.run_config or {}).get("ops") or {}
    startable = []
    for candidate in config.entities_in_group(entity.group):
        key = raw_key(candidate.name)
        if candidate.linked_from or key not in selection:
            continue
        if steps_to_run is not None and _op_name(key) not in steps_to_run:
            continue
        if (op_config.get(_op_name(key)) or {}).get("config"):
            continue  # a targeted refresh or an on-demand reconcile: run as its step says
        startable.append(candidate)
    return startable


def fetch_in_parallel(context: AssetExecutionContext, entity: EntityConfig,
                      config: EntitiesConfig, *, store: MirrorStore, source: DataverseSource,
                      change_set: str, workers: int) -> Fetched:
    """This entity's fetch, started with the run's other startable ones (see the module)."""
    run_id = context.run.run_id
    with _RUNS_LOCK:
        run = _RUNS.setdefault(run_id, _RunFetches())

        def start(candidate: EntityConfig) -> None:
            if run.pool is None:
                run.pool = ThreadPoolExecutor(max_workers=workers,
                                              thread_name_prefix="dataverse-fetch")
            run.started.add(candidate.name)
            run.futures[candidate.name] = run.pool.submit(
                _fetch, candidate, store=store, source=source, change_set=change_set,
                owner=run_id, stop=run.stop)

        for candidate in startable_entities(context, entity, config):
            if candidate.name not in run.started:
                start(candidate)
        if entity.name not in run.futures:
            # Not startable with the others (a filtered entity), or its step runs again (a
            # retry): fetch it now.
            start(entity)
        future = run.futures.pop(entity.name)
    try:
        return future.result()
    except BaseException as exc:
        if not isinstance(exc, Exception):  # an interrupt of the run, not a failed fetch
            run.stop.set()
            for pending in run.futures.values():
                pending.cancel()  # those not started yet never start
        raise
    finally:
        with _RUNS_LOCK:
            if not run.futures and run.pool is not None:  # every fetch started was claimed
                run.pool.shutdown(wait=False)
                run.pool = None
            if len(_RUNS) > _KEEP_RUNS:
                for idle in [k for k, r in _RUNS.items() if r.pool is None and k != run_id]:
                    del _RUNS[idle]


def locked_fetch(store: MirrorStore, source: DataverseSource, entity: EntityConfig,
                 change_set: str, *, owner: str, info: Callable[[str], None],
                 warning: Callable[[str], None],
                 before_page: Callable[[], None] | None = None,
                 **options) -> tuple[FetchSummary, bool]:
    """raw/E's fetch, wherever it runs (its step, or a thread of the run): the entity's lock
    held (the archive directory and the sync state are the entity's: one run at a time),
    pages, rows, rows/s and ETA to `info` every few seconds (not every page). `before_page`
    runs as each page arrives (and may stop the fetch); `options` go to steps.fetch."""
    progress = fetch_reporter(entity.name, change_set, info)

    def each_page(update: FetchProgress) -> None:
        if before_page is not None:
            before_page()
        progress(update)

    with store.entity_lock(entity.name, owner=owner, purpose="fetch", warn=warning):
        summary, reused = steps.fetch(store, source, entity, change_set,
                                      on_progress=each_page, **options)
    if not reused:
        progress.finish(summary.pages, summary.records)
    return summary, reused


def _fetch(entity: EntityConfig, *, store: MirrorStore, source: DataverseSource,
           change_set: str, owner: str, stop: threading.Event) -> Fetched:
    log: list[tuple[str, str]] = []

    def keep(level: str) -> Callable[[str], None]:
        return lambda message: log.append((level, message))

    def unless_stopped() -> None:
        if stop.is_set():
            raise FetchStopped(f"{entity.name}: the run was interrupted; the change set is "
                               "fetched again by the next run")

    summary, reused = locked_fetch(store, source, entity, change_set, owner=owner,
                                   info=keep("info"), warning=keep("warning"),
                                   before_page=unless_stopped)
    return Fetched(summary, reused, log)


def unclaimed_fetches() -> int:
    """Fetches started in this process whose raw step has not taken them (tests: nothing is
    left behind)."""
    with _RUNS_LOCK:
        return sum(len(run.futures) for run in _RUNS.values())
