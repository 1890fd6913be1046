import json
from pathlib import Path
from typing import get_args

import pytest

from dataverse_assets.config import (
    _ENV_FIELDS,
    DEFAULT_ENTITIES_CONFIG,
    ArchiveConfig,
    EntityConfig,
    GroupConfig,
    LabelsConfig,
    MaintenanceConfig,
    Settings,
    load_entities_config,
    load_settings,
    parse_entities_config,
    parse_store_url,
)
from dataverse_assets.errors import ConfigError


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


def test_the_store_defaults_to_sqlite_at_the_db_path(tmp_path):
    assert load_settings({}).store.kind == "sqlite"
    settings = load_settings({"DATAVERSE_DB_PATH": str(tmp_path / "m.db")})
    assert (settings.store.kind, settings.store.address) == ("sqlite", str(tmp_path / "m.db"))


def test_a_sqlite_store_url_is_the_db_path(tmp_path):
    settings = load_settings({"DATAVERSE_STORE_URL": f"sqlite:///{tmp_path}/m.db"})
    assert settings.db_path == tmp_path / "m.db"
    assert settings.store.address == str(tmp_path / "m.db")
    assert load_settings({"DATAVERSE_STORE_URL": "sqlite:///data/m.db"}).db_path == Path(
        "data/m.db")
    with pytest.raises(ConfigError, match="different SQLite files; set only one"):
        load_settings({"DATAVERSE_STORE_URL": f"sqlite:///{tmp_path}/m.db",
                       "DATAVERSE_DB_PATH": str(tmp_path / "other.db")})


def test_a_postgresql_store_url_is_parsed():
    url = "postgresql://mirror@db.internal:5432/dataverse?sslmode=require"
    store = load_settings({"DATAVERSE_STORE_URL": url}).store
    assert (store.kind, store.address, store.path) == ("postgresql", url, None)
    assert parse_store_url("postgres://mirror@localhost/dv").kind == "postgresql"


@pytest.mark.parametrize("url", ["postgresql://mirror:hunter22@db:5432/dv",
                                 "postgresql://mirror:@db/dv",
                                 "postgresql://mirror@db/dv?password=hunter22"])
def test_a_store_url_with_a_password_is_refused_without_echoing_it(url):
    with pytest.raises(ConfigError) as refused:
        load_settings({"DATAVERSE_STORE_URL": url})
    message = str(refused.value)
    assert message.startswith("DATAVERSE_STORE_URL: ") and "PGPASSWORD" in message
    assert "hunter22" not in message and "\n" not in message


@pytest.mark.parametrize(("url", "says"), [
    ("mysql://u@h/db", "must be sqlite:///"), ("sqlite://host/m.db", "no host"),
    ("sqlite:///", "names no file"), ("postgresql://u@h:5432", "names no database"),
    ("postgresql://u@h:port/db", "not a valid URL"), ("data/dataverse.db", "must be sqlite"),
])
def test_a_bad_store_url_names_the_variable_and_the_forms(url, says):
    with pytest.raises(ConfigError, match=f"^DATAVERSE_STORE_URL: .*{says}"):
        load_settings({"DATAVERSE_STORE_URL": url})


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="DATAVERSE_SOURCE"):
        load_settings({"DATAVERSE_SOURCE": "carrier-pigeon"})


# -- numbers: every numeric field has a documented range, enforced at load --------------------

NUMERIC_MODELS = (GroupConfig, EntityConfig, ArchiveConfig, MaintenanceConfig, LabelsConfig,
                  Settings)


def numeric_fields() -> list[tuple[type, str]]:
    fields = []
    for model in NUMERIC_MODELS:
        for name, info in model.model_fields.items():
            types = set(get_args(info.annotation)) or {info.annotation}
            if types & {int, float} and bool not in types:
                fields.append((model, name))
    return fields


def is_integer(model: type, name: str) -> bool:
    annotation = model.model_fields[name].annotation
    return int in (set(get_args(annotation)) or {annotation})


def field_range(model: type, name: str) -> tuple[float, float]:
    bounds = {type(m).__name__: m for m in model.model_fields[name].metadata}
    return bounds["Ge"].ge, bounds["Le"].le


def test_every_numeric_field_has_its_range_in_its_description():
    # A new numeric field needs a range too: 1 group, 5 entity, 4 archive, 6 maintenance,
    # 1 labels field and 6 environment variables.
    assert len(numeric_fields()) == 23
    for model, name in numeric_fields():
        info = model.model_fields[name]
        low, high = field_range(model, name)
        assert f"Range: {low:,} to {high:,}." in info.description, (model.__name__, name)


# Where each entities-file field sits in the shipped config, and whether it takes integers.
FIELD_PATHS = {
    (GroupConfig, "freshness_grace_minutes"): ("groups", "daily"),
    **{(EntityConfig, name): ("entities", 2) for name in (
        "page_size", "max_pages", "parallel_ranges", "publish_chunk_rows",
        "reconcile_every_hours")},
    **{(ArchiveConfig, name): ("archive",) for name in (
        "compact_after_days", "retention_days", "zstd_level", "staging_keep_change_sets")},
    **{(MaintenanceConfig, name): ("maintenance",) for name in (
        "publish_plan_days", "change_history_days", "sync_log_days", "resolved_issues_days",
        "closed_dead_letters_days", "history_days")},
    (LabelsConfig, "language_code"): ("labels",),
}
WHERE = {"groups": "group 'daily', field '{}'",
         "entities": "entity 'vin_vin_candidate_accountset' (entities[2]), field '{}'",
         "archive": "field 'archive.{}'", "maintenance": "field 'maintenance.{}'",
         "labels": "field 'labels.{}'"}


def config_with(path: tuple, name: str, value: object) -> dict:
    raw = valid_config()
    target = raw
    for part in path:
        target = target.setdefault(part, {}) if isinstance(part, str) else target[part]
    target[name] = value
    return raw


def test_every_entities_file_number_is_covered_here():
    assert set(FIELD_PATHS) == {(m, n) for m, n in numeric_fields() if m is not Settings}


@pytest.mark.parametrize("field", FIELD_PATHS, ids=lambda f: f[1])
def test_a_number_outside_its_range_or_not_a_number_names_the_field(field):
    model, name = field
    path = FIELD_PATHS[field]
    low, high = field_range(model, name)
    where = WHERE[path[0]].format(name)
    integer = is_integer(model, name)
    for value, says in [
        (low, None), (high, None),  # both ends are usable
        (low - 1, f"greater than or equal to {low}"), (high + 1, f"less than or equal to {high}"),
        (1e308, "must be a whole number" if integer else "less than or equal to"),
        (-1e308, "must be a whole number" if integer else "greater than or equal to"),
        (float("nan"), "NaN and Infinity are not numbers"),
        (float("inf"), "NaN and Infinity are not numbers"),
        (float("-inf"), "NaN and Infinity are not numbers"),
        (True, "true and false are not numbers"), (False, "true and false are not numbers"),
        (str(low), "valid"), ([low], "valid"),
        *([(low + 0.5, "must be a whole number"), (2**64, "less than or equal to")]
          if integer else []),
    ]:
        raw = config_with(path, name, value)
        if says is None:
            assert getattr(_section(parse_entities_config(raw), path), name) == value
            continue
        message = error_for(raw)
        assert message.startswith(f"entities_config.json: {where}: "), (value, message)
        assert says in message and "\n" not in message, (value, message)


def _section(config, path: tuple):
    if path[0] == "groups":
        return config.groups[path[1]]
    return config.entities[path[1]] if path[0] == "entities" else getattr(config, path[0])


def test_the_reported_cases_are_refused_at_load():
    """The values from the issue, each of which used to pass validation and crash a run."""
    for path, name, value in [
        (("entities", 2), "reconcile_every_hours", 1e308),
        (("entities", 2), "reconcile_every_hours", float("inf")),
        (("entities", 2), "publish_chunk_rows", 1e30),
        (("groups", "daily"), "freshness_grace_minutes", 1e300),
        (("archive",), "compact_after_days", 1e308),
        (("entities", 2), "page_size", True),
    ]:
        message = error_for(config_with(path, name, value))
        assert WHERE[path[0]].format(name) in message, message


def test_a_cron_that_never_fires_is_refused():
    raw = valid_config()
    raw["groups"]["daily"]["cron"] = "0 0 31 4 *"  # 31 April: parses, matches no date
    message = error_for(raw)
    assert "group 'daily', field 'cron'" in message and "never fires" in message
    raw["groups"]["daily"]["cron"] = "0 0 29 2 *"  # leap days only: fires, rarely
    assert parse_entities_config(raw).groups["daily"].cron == "0 0 29 2 *"


# -- JSON the json module reads but a config must not hold ------------------------------------

def load_text(tmp_path, text: str) -> str:
    path = tmp_path / "entities_config.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        load_entities_config(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message.removeprefix(f"{path}: ")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_name_the_field(tmp_path, constant):
    text = json.dumps(valid_config()).replace('"incremental": "full"',
                                              f'"incremental": "full", "page_size": {constant}', 1)
    assert load_text(tmp_path, text) == ("entity 'vin_vin_candidate_accountset' (entities[2]), "
                                         "field 'page_size': NaN and Infinity are not numbers")
    text = json.dumps(config_with(("archive",), "retention_days", 1)).replace(
        '"retention_days": 1', f'"retention_days": {constant}')
    assert load_text(tmp_path, text) == (
        "field 'archive.retention_days': NaN and Infinity are not numbers")


DUPLICATES = {
    "in an entity": ('"name": "vin_vin_candidate_accountset"',
                     '"name": "vin_vin_candidate_accountset", "incremental": "full"',
                     "entity 'vin_vin_candidate_accountset' (entities[2]): key 'incremental'"),
    "in a group": ('"daily": {', '"daily": {"cron": "0 * * * *", ',
                   "group 'daily': key 'cron'"),
    "a group twice": ('"daily": {', '"daily": {}, "daily": {', "field 'groups': key 'daily'"),
    "at the top": ('"entities": [', '"entities": [], "entities": [', "top level: key 'entities'"),
    "in a link": ('"column": "accountid"', '"column": "accountid", "column": "accountid"',
                  "entity 'accounts' (entities[5]), field 'linked_from.0': key 'column'"),
}


@pytest.mark.parametrize("case", DUPLICATES)
def test_a_key_given_twice_names_the_object_and_the_key(tmp_path, case):
    old, new, expected = DUPLICATES[case]
    text = json.dumps(valid_config())
    assert old in text
    message = load_text(tmp_path, text.replace(old, new, 1))
    assert message == f"{expected} is given twice (only one value can count; remove the other)"


def test_json_nested_too_deeply_is_one_line(tmp_path):
    assert load_text(tmp_path, "[" * 100_000) == "not valid JSON: nested too deeply"


# -- names the mirror or SQLite already use ---------------------------------------------------

@pytest.mark.parametrize("name", [
    "sqlite_master", "SQLITE_SEQUENCE", "Sqlite_stat1", "sqlite_anything",
    "accounts__history", "accounts__HISTORY", "accounts__readable", "accounts__Readable",
    "accounts__pk_nocase", "accounts__modifiedon", "accounts__createdon",
    "accounts__history__pk", "accounts_pkey"])
def test_names_sqlite_or_the_mirror_use_are_refused(name):
    raw = valid_config()
    raw["entities"][0]["name"] = name
    message = error_for(raw)
    assert f"entity {name!r} (entities[0]), field 'name': names " in message
    assert "reserved" in message


def test_an_entity_whose_name_is_not_text_is_named_by_its_index():
    raw = valid_config()
    raw["entities"][0]["name"] = ["vin_candidates"]
    assert error_for(raw) == ("entities_config.json: entities[0], field 'name': Input should be "
                              "a valid string")


def test_names_that_only_resemble_reserved_ones_are_allowed():
    raw = valid_config()
    for n, name in enumerate(["sqlitestuff", "my_sqlite_table", "history", "a_history",
                              "readable__x"]):
        raw["entities"][n]["name"] = name
    for entity in raw["entities"]:
        entity.pop("linked_from", None)
        entity["filtered"] = False
    assert parse_entities_config(raw).entities[0].name == "sqlitestuff"


# -- the environment ---------------------------------------------------------------------------

ENV_NUMBERS = {variable: field for variable, field in _ENV_FIELDS.items()
               if (Settings, field) in numeric_fields()}


def test_every_numeric_setting_is_an_environment_variable():
    assert set(ENV_NUMBERS.values()) == {n for m, n in numeric_fields() if m is Settings}
    assert {"DATAVERSE_MAX_CONCURRENCY", "DATAVERSE_MAX_RESPONSE_MB",
            "DATAVERSE_LOCK_WAIT_SECONDS", "DATAVERSE_SIMULATOR_SEED",
            "DATAVERSE_RESPONSE_DEADLINE_SECONDS"} <= set(ENV_NUMBERS)


@pytest.mark.parametrize("variable", ENV_NUMBERS)
def test_a_numeric_variable_refuses_non_numbers_and_values_out_of_range(variable):
    field = ENV_NUMBERS[variable]
    low, high = field_range(Settings, field)
    for value in (low, high):
        assert getattr(load_settings({variable: str(value)}), field) == value
    integer = is_integer(Settings, field)
    below = str(low - 1 if integer else low / 2 if low else -0.001)
    for value in ["inf", "-inf", "Infinity", "nan", "NaN", below, str(high + 1), "1e308",
                  "true", "ten", "1,000", *(["1.5", "1e3", str(2**64)] if integer else [])]:
        with pytest.raises(ConfigError) as excinfo:
            load_settings({variable: value})
        message = str(excinfo.value)
        assert message.startswith(f"{variable}: ") and "\n" not in message, (value, message)


def test_a_short_client_secret_is_refused_without_showing_it():
    for secret in ("Q", "Xy7!", "1234567"):
        with pytest.raises(ConfigError) as excinfo:
            load_settings({"DATAVERSE_URL": "https://org.crm.dynamics.com",
                           "DATAVERSE_CLIENT_ID": "id", "DATAVERSE_CLIENT_SECRET": secret})
        message = str(excinfo.value)
        assert message.startswith("DATAVERSE_CLIENT_SECRET: shorter than 8 characters")
        assert secret not in message.removeprefix("DATAVERSE_CLIENT_SECRET: ")
    settings = load_settings({"DATAVERSE_URL": "https://org.crm.dynamics.com",
                              "DATAVERSE_CLIENT_ID": "id", "DATAVERSE_CLIENT_SECRET": "12345678"})
    assert settings.client_secret.get_secret_value() == "12345678"


LIVE = {"DATAVERSE_CLIENT_ID": "id", "DATAVERSE_CLIENT_SECRET": "s3cr3t-value"}


@pytest.mark.parametrize("variable", ["DATAVERSE_URL", "DATAVERSE_AUTHORITY"])
@pytest.mark.parametrize("url", [
    "http://contoso.crm.dynamics.com", "HTTP://contoso.crm.dynamics.com/", "http://10.0.0.5:8080",
    "http://localhost.evil.example", "http://127.0.0.1.nip.io", "http://user:pw@192.168.1.2",
    "http://[2001:db8::1]:80"])
def test_plain_http_to_another_host_is_refused_and_says_how_to_allow_it(variable, url):
    environ = {"DATAVERSE_URL": "https://org.crm.dynamics.com", **LIVE, variable: url}
    with pytest.raises(ConfigError) as excinfo:
        load_settings(environ)
    message = str(excinfo.value)
    assert message.startswith(f"{variable}: plain http://") and "\n" not in message
    assert "DATAVERSE_ALLOW_INSECURE_HTTP=true" in message and "pw" not in message
    settings = load_settings({**environ, "DATAVERSE_ALLOW_INSECURE_HTTP": "true"})
    assert settings.allow_insecure_http


@pytest.mark.parametrize("url", [
    "https://contoso.crm.dynamics.com", "http://127.0.0.1:8765", "http://127.8.9.10",
    "http://localhost:8080", "http://LOCALHOST", "http://[::1]:8080"])
def test_https_anywhere_and_http_to_loopback_are_allowed(url):
    settings = load_settings({"DATAVERSE_URL": url, "DATAVERSE_AUTHORITY": url, **LIVE})
    assert settings.source == "live" and settings.url == url and settings.authority == url


def test_a_live_url_without_https_or_a_host_is_refused():
    for url in ("ftp://contoso.crm.dynamics.com", "https://"):
        with pytest.raises(ConfigError, match="^DATAVERSE_URL: must be an https:// URL"):
            load_settings({"DATAVERSE_URL": url, **LIVE})


@pytest.mark.parametrize("source", ["live", "simulator"])
def test_a_url_without_a_scheme_is_one_line_with_the_fix(source):
    with pytest.raises(ConfigError) as refused:
        load_settings({"DATAVERSE_URL": "contoso.crm.dynamics.com", **LIVE,
                       "DATAVERSE_SOURCE": source})
    assert str(refused.value) == ("DATAVERSE_URL: 'contoso.crm.dynamics.com' has no scheme; "
                                  "write https://contoso.crm.dynamics.com")


def test_the_simulator_may_be_served_over_http_on_another_host():
    """Its credentials are public: nothing secret crosses the network."""
    settings = load_settings({"DATAVERSE_URL": "http://simulator:8765",
                              "DATAVERSE_SOURCE": "simulator"})
    assert settings.url == "http://simulator:8765"
