import json

import pytest

from dataverse_assets.config import (
    DEFAULT_ENTITIES_CONFIG,
    ConfigError,
    load_entities_config,
    load_settings,
    parse_entities_config,
)


def valid_config() -> dict:
    return json.loads(DEFAULT_ENTITIES_CONFIG.read_text())


def error_for(raw: object) -> str:
    with pytest.raises(ConfigError) as excinfo:
        parse_entities_config(raw, source="entities_config.json")
    return str(excinfo.value)


def test_shipped_config_is_valid_and_realistic():
    config = load_entities_config(DEFAULT_ENTITIES_CONFIG)
    names = [e.name for e in config.entities]
    assert len(names) >= 8
    assert {"accounts", "contacts", "systemusers", "vin_candidates"} <= set(names)
    assert config.entity("accounts").filtered
    assert sum(1 for e in config.entities if e.incremental == "full") >= 2
    assert set(config.groups) == {"hourly", "daily"}


def test_wrong_field_value_names_the_entity_and_the_field():
    raw = valid_config()
    raw["entities"][2]["incremental"] = "sometimes"
    message = error_for(raw)
    assert "'vin_vin_candidate_accountset'" in message
    assert "field 'incremental'" in message


def test_unknown_field_is_reported_with_its_entity():
    raw = valid_config()
    raw["entities"][0]["primary_kee"] = "x"
    message = error_for(raw)
    assert "'vin_candidates'" in message and "'primary_kee'" in message
    assert "unknown field" in message


def test_group_that_does_not_exist_is_named():
    raw = valid_config()
    raw["entities"][0]["group"] = "weekly"
    message = error_for(raw)
    assert "'vin_candidates'" in message and "'weekly'" in message and "group" in message


def test_duplicate_entity_names_are_refused():
    raw = valid_config()
    raw["entities"].append(dict(raw["entities"][0]))
    assert "listed twice" in error_for(raw)


def test_filtered_entity_without_links_is_refused():
    raw = valid_config()
    accounts = next(e for e in raw["entities"] if e["name"] == "accounts")
    del accounts["linked_from"]
    message = error_for(raw)
    assert "'accounts'" in message and "linked_from" in message


def test_link_to_unknown_table_is_refused():
    raw = valid_config()
    accounts = next(e for e in raw["entities"] if e["name"] == "accounts")
    accounts["linked_from"][0]["entity"] = "nope"
    message = error_for(raw)
    assert "'accounts'" in message and "'nope'" in message


def test_bad_cron_names_the_group():
    raw = valid_config()
    raw["groups"]["daily"]["cron"] = "every day"
    message = error_for(raw)
    assert "group 'daily'" in message and "cron" in message


def test_hostile_entity_name_is_refused():
    raw = valid_config()
    raw["entities"][0]["name"] = 'x"; DROP TABLE accounts; --'
    message = error_for(raw)
    assert "entities[0]" in message and "field 'name'" in message


def test_empty_entity_list_is_refused():
    raw = valid_config()
    raw["entities"] = []
    assert "field 'entities'" in error_for(raw)


def test_missing_and_invalid_files_say_what_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="not found.*DATAVERSE_ENTITIES_CONFIG"):
        load_entities_config(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"groups": {')
    with pytest.raises(ConfigError, match="not valid JSON.*line 1"):
        load_entities_config(broken)


def test_settings_default_to_the_simulator_without_a_url():
    settings = load_settings({})
    assert settings.source == "simulator"
    assert settings.db_path.name == "dataverse.db"


def test_live_settings_need_credentials_and_never_echo_the_secret():
    with pytest.raises(ConfigError, match="DATAVERSE_CLIENT_ID"):
        load_settings({"DATAVERSE_URL": "https://org.crm.dynamics.com",
                       "DATAVERSE_CLIENT_SECRET": "s3cr3t-value"})
    settings = load_settings({
        "DATAVERSE_URL": "https://org.crm.dynamics.com", "DATAVERSE_CLIENT_ID": "id",
        "DATAVERSE_CLIENT_SECRET": "s3cr3t-value",
    })
    assert settings.source == "live"
    assert "s3cr3t-value" not in repr(settings)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="DATAVERSE_SOURCE"):
        load_settings({"DATAVERSE_SOURCE": "carrier-pigeon"})
