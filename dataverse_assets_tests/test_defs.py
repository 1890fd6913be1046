"""The whole graph, as `dagster dev` and `dagster definitions validate` load it."""

from dagster import AssetKey

from dataverse_assets import defs
from dataverse_assets.config import DEFAULT_ENTITIES_CONFIG, load_entities_config

CONFIG = load_entities_config(DEFAULT_ENTITIES_CONFIG)


def asset_graph():
    return defs.resolve_asset_graph()


def test_every_entity_has_three_assets_in_its_cadence_group():
    graph = asset_graph()
    for entity in CONFIG.entities:
        for layer in ("raw", "staging", "canonical"):
            node = graph.get(AssetKey([layer, entity.name]))
            assert node.group_name == entity.group
            assert node.description and len(node.description) > 20
            assert node.partitions_def.name == f"change_sets_{entity.group}"
    assert len(list(graph.get_all_asset_keys())) == 3 * len(CONFIG.entities)


def test_layers_chain_and_filtered_entities_wait_for_their_linking_tables():
    graph = asset_graph()
    assert graph.get(AssetKey(["canonical", "vin_candidates"])).parent_keys == {
        AssetKey(["staging", "vin_candidates"])}
    assert graph.get(AssetKey(["staging", "vin_candidates"])).parent_keys == {
        AssetKey(["raw", "vin_candidates"])}
    assert graph.get(AssetKey(["raw", "accounts"])).parent_keys == {
        AssetKey(["staging", "vin_vin_candidate_accountset"]),
        AssetKey(["staging", "vin_candidates"]), AssetKey(["staging", "vin_clinicaltrials"])}


def test_one_sync_job_per_cadence_group_and_all_resources_bound():
    for group in CONFIG.groups:
        job = defs.resolve_job_def(f"sync_{group}")
        keys = {n.key for n in job.asset_layer.asset_graph.asset_nodes if n.is_executable}
        assert {k.path[-1] for k in keys} == {e.name for e in CONFIG.entities_in_group(group)}
    defs.validate_loadable(defs)
