"""One group's sync through the same step functions and locks the Dagster assets use.

`raw/E` is `steps.fetch` under the entity's lock, `staging/E` is `steps.stage` written by
`write_staged` (what the SQLite IO manager does) under the lock, `canonical/E` is
`steps.publish` under the lock; an entity whose linking table failed is skipped, as Dagster
skips the downstream steps of a failed one. Without Dagster's per-run overhead (seconds per
run), a chaos scenario can run dozens of change sets in a CI budget; one scenario and the CLI
kill test run through Dagster itself to prove the wiring is the same.

Also a command (`python -m dataverse_assets_tests.chaos.driver ...`) so the process-death
tests can SIGKILL a sync at a fault point (DATAVERSE_FAULT_POINTS) in its own process.
"""

import argparse
import os
import sys

from dataverse_assets.config import EntitiesConfig, EntityConfig, load_entities_config
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.source.base import DataverseSource
from dataverse_assets.source.simulator import SimulatorSource
from dataverse_assets.sync import steps
from dataverse_assets.sync.faults import fault_point
from dataverse_assets.sync.stage import write_staged

FAST_RETRIES = [0.01, 0.02, 0.04, 0.08, 0.16]


def dependency_order(entities: list[EntityConfig]) -> list[EntityConfig]:
    """Linking tables before the filtered entities that read them."""
    return sorted(entities, key=lambda e: bool(e.linked_from))


def sync_group(store: MirrorStore, source: DataverseSource, config: EntitiesConfig, group: str,
               change_set: str, owner: str | None = None) -> dict[str, str | None]:
    """Fetch, stage and publish every entity of the group; entity -> error (None: ok)."""
    owner = owner or f"driver-{os.getpid()}"
    outcome: dict[str, str | None] = {}
    staged: set[str] = set()
    for entity in dependency_order(config.entities_in_group(group)):
        name = entity.name
        if any(link.entity not in staged for link in entity.linked_from):
            # raw/E depends on its linking tables' staging, not on their publish.
            outcome[name] = "skipped: a linking table was not staged"
            continue
        try:
            with store.entity_lock(name, owner=owner, purpose="fetch"):
                steps.fetch(store, source, entity, change_set)
            with store.entity_lock(name, owner=owner, purpose="staging"), \
                    store.connection() as connection:
                write_staged(connection, steps.staged_records(
                    connection, store.archive(name, change_set), entity))
            staged.add(name)
            fault_point("staging.after_write")
            with store.entity_lock(name, owner=owner, purpose="publish"):
                steps.publish(store, entity, change_set)
            outcome[name] = None
        except Exception as exc:  # noqa: BLE001 - one entity's failure does not stop others
            outcome[name] = f"{type(exc).__name__}: {exc}"
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--archive", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--change-set", required=True)
    args = parser.parse_args(argv)
    config = load_entities_config(args.config)
    store = MirrorStore(db_path=args.db, archive_dir=args.archive)
    source = SimulatorSource(entity_names=[e.name for e in config.entities],
                             base_url=args.url, retry_backoff_seconds=FAST_RETRIES)
    outcome = sync_group(store, source, config, args.group, args.change_set)
    for name, error in outcome.items():
        print(f"{name}: {error or 'ok'}")
    return 1 if any(outcome.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
