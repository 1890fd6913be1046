"""The simulator's truth and the mirror's contents, in comparable shapes."""

import orjson

from dataverse_assets.store.db import quote_identifier

CONFIGURED = [
    "vin_candidates", "vin_clinicaltrials", "vin_vin_candidate_accountset",
    "vin_vin_clinicaltrial_contactset", "vin_vin_candidate_clinicaltrialset", "systemusers",
    "businessunits", "teams",
]
FILTERED = {
    "accounts": [("vin_vin_candidate_accountset", "accountid"),
                 ("vin_candidates", "_vin_primaryaccountid_value"),
                 ("vin_clinicaltrials", "_vin_sponsorid_value")],
    "contacts": [("vin_vin_clinicaltrial_contactset", "contactid")],
}
ANNOTATED = {"vin_clinicaltrials"}  # accounts link through its polymorphic-style lookup
PRIMARY_KEYS = {
    "vin_candidates": "vin_candidateid", "vin_clinicaltrials": "vin_clinicaltrialid",
    "vin_vin_candidate_accountset": "vin_vin_candidate_accountid",
    "vin_vin_clinicaltrial_contactset": "vin_vin_clinicaltrial_contactid",
    "vin_vin_candidate_clinicaltrialset": "vin_vin_candidate_clinicaltrialid",
    "systemusers": "systemuserid", "businessunits": "businessunitid", "teams": "teamid",
    "accounts": "accountid", "contacts": "contactid",
}


def expected_records(simulator, entity: str) -> dict[str, dict]:
    """The simulator's truth for an entity (filtered entities: only the linked records)."""
    records = {r[PRIMARY_KEYS[entity]]: r for r in simulator.records(entity)}
    if entity in FILTERED:
        linked = {r.get(column) for link_table, column in FILTERED[entity]
                  for r in simulator.records(link_table)}
        records = {k: v for k, v in records.items() if k in linked}
    return records


def record_content(record: dict) -> dict:
    """A record minus its annotations (formatted values, lookup target names): they say what
    the org showed when the record was read (a lookup's name follows the target's renames, a
    label follows the option set), not the record's content. The etag stays."""
    return {k: v for k, v in record.items() if "@" not in k or k == "@odata.etag"}


def without_annotations(json_response: str) -> dict:
    """A stored record (its json_response) minus its annotations (see record_content)."""
    return record_content(orjson.loads(json_response))


def normalized(record: dict) -> bytes:
    """A record's content in one comparable, sortable form."""
    return orjson.dumps(record_content(record), option=orjson.OPT_SORT_KEYS)


def canonical_rows(connection, entity: str) -> dict[str, dict]:
    cursor = connection.execute(f"SELECT * FROM {quote_identifier(entity)}")
    names = [d[0] for d in cursor.description]
    return {row[0]: dict(zip(names, row, strict=True)) for row in cursor}


def assert_mirror_equals_simulator(mirror, entity: str) -> None:
    expected = expected_records(mirror.simulator, entity)
    with mirror.connection() as connection:
        rows = canonical_rows(connection, entity)
    assert set(rows) == set(expected), f"{entity}: keys differ"
    for key, row in rows.items():
        record = expected[key]
        stored_record = orjson.loads(row["json_response"])
        annotations = {k for k in stored_record if "@" in k and k != "@odata.etag"}
        if entity in ANNOTATED:
            # Read with odata.include-annotations: kept verbatim in json_response.
            assert any(k.endswith("@Microsoft.Dynamics.CRM.lookuplogicalname")
                       for k in annotations), f"{entity} {key}: no lookup annotations"
        assert record_content(stored_record) == record, (
            f"{entity} {key}")
        for column, value in record.items():
            if "@" in column:
                continue
            stored = row[column]
            want = int(value) if isinstance(value, bool) else value
            assert stored == want, f"{entity} {key} {column}: {stored!r} != {want!r}"
        assert row["valid_from"] == record.get("modifiedon", row["sync_time"])


def mirror_contents(mirror, entities) -> dict:
    """Everything a user relies on, minus timestamps of when we happened to run: canonical
    rows (key, record without annotations), history (key, record, kind), defunct ids,
    watermarks."""
    contents: dict = {}
    with mirror.connection() as connection:
        for entity in entities:
            pk = PRIMARY_KEYS[entity]
            contents[entity] = sorted(
                (key, normalized(orjson.loads(body))) for key, body in connection.execute(
                    f"SELECT {quote_identifier(pk)}, json_response"
                    f" FROM {quote_identifier(entity)}"))
            history = connection.execute(
                f"SELECT {quote_identifier(pk)}, json_response, change_kind"
                f" FROM {quote_identifier(entity + '__history')}")
            contents[entity + "__history"] = sorted(
                (key, normalized(orjson.loads(body)), kind) for key, body, kind in history)
        contents["_defunct"] = sorted(connection.execute(
            "SELECT entity, id, reason FROM _defunct").fetchall())
        contents["_sync_state"] = sorted(connection.execute(
            "SELECT entity, watermark, status FROM _sync_state").fetchall())
        duplicates = [
            entity for entity in entities
            if len(contents[entity]) != len({row[0] for row in contents[entity]})
        ]
    assert not duplicates, f"duplicate keys in {duplicates}"
    return contents
