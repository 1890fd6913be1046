"""The asset keys of an entity's three layers (`raw/E`, `staging/E`, `canonical/E`), and the
reverse: the entity a step key belongs to. The one place that knows how they are spelled."""

from dagster import AssetKey

LAYERS = ("raw", "staging", "canonical")


def entity_asset_keys(entity: str, layers: tuple[str, ...] = LAYERS) -> list[AssetKey]:
    return [AssetKey([layer, entity]) for layer in layers]


def raw_key(entity: str) -> AssetKey:
    return AssetKey(["raw", entity])


def staging_key(entity: str) -> AssetKey:
    return AssetKey(["staging", entity])


def canonical_key(entity: str) -> AssetKey:
    return AssetKey(["canonical", entity])


# Dagster concurrency pools. deploy/dagster.yaml counts them per run (`granularity: run`): a
# queued run starts only when every pool of its steps has room. raw/E calls Dataverse: its pool
# is the org's API budget, shared by all entities (its limit set with `dagster instance
# concurrency set dataverse/api N`). staging/E and canonical/E write E's tables: their pool is
# the entity's, limit 1 (the default), so at most one run that writes an entity is in progress.
API_POOL = "dataverse/api"


def entity_pool(entity: str) -> str:
    return f"dataverse/entity/{entity}"


def entity_of_step(step_key: str) -> str | None:
    """raw__accounts -> accounts (the step keys of our assets are <layer>__<entity>)."""
    layer, _, entity = step_key.partition("__")
    return entity if layer in LAYERS and entity else None
