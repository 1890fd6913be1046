"""Only the data the user wants, end to end against the simulated org: a `select` and a
`filter` hold on every path (sync, reconcile, targeted refresh, rebuild from the archive), a
column taken out of `select` is drift and can be purged everywhere, and the personal data left
out never reaches a table, a history row or an archived file."""

import gzip
import json

from dataverse_assets.ops import cli
from dataverse_assets.ops.rebuild import rebuild
from dataverse_assets.store.db import connect
from dataverse_assets_tests.conftest import failure_messages
from dataverse_assets_tests.helpers import mirror_of, reconfigured, tree

CONTACTS = {"name": "contacts", "select": ["fullname", "statecode", "birthdate"],
            "filter": "statecode eq 0", "reconcile_every_hours": 1e-9}
LEFT_OUT = "emailaddress1"


def mirrored(mirror) -> dict[str, dict]:
    with mirror.connection() as connection:
        cursor = connection.execute("SELECT * FROM contacts")
        names = [d[0] for d in cursor.description]
        return {row[0]: dict(zip(names, row, strict=True)) for row in cursor.fetchall()}


def active(simulator) -> dict[str, dict]:
    return {r["contactid"]: r for r in simulator.records("contacts") if r["statecode"] == 0}


def archived_text(mirror) -> str:
    """Every archived file's text (page files are gzip)."""
    out = []
    for name in tree(mirror.settings.archive_dir):
        data = (mirror.settings.archive_dir / name).read_bytes()
        if name.endswith(".gz"):
            data = gzip.decompress(data)
        out.append(data.decode("utf-8", "replace"))
    return "\n".join(out)


def test_select_and_filter_hold_through_sync_reconcile_refresh_and_rebuild(
        tmp_path, simulator_url, monkeypatch):
    simulator, _ = simulator_url
    mirror = mirror_of(tmp_path, simulator_url, [CONTACTS])
    mirror.sync("hourly")
    rows = mirrored(mirror)
    assert set(rows) == set(active(simulator))
    columns = set(next(iter(rows.values())))
    assert {"contactid", "fullname", "statecode", "birthdate", "modifiedon"} <= columns
    assert LEFT_OUT not in columns and "jobtitle" not in columns

    leaving, renamed = sorted(active(simulator))[:2]
    simulator.update("contacts", leaving, {"statecode": 1, "statuscode": 2})
    simulator.update("contacts", renamed, {"fullname": "Renamed Contact"})
    fresh = simulator.create("contacts", {"statecode": 0, "statuscode": 1})["contactid"]
    mirror.sync("hourly")  # modifiedon since the watermark, within the filter; then reconcile

    rows = mirrored(mirror)
    assert set(rows) == set(active(simulator))  # the record that left the filter is gone
    assert leaving not in rows and fresh in rows
    assert rows[renamed]["fullname"] == "Renamed Contact"

    # The mirror loses a record (a divergence): the reconcile fetches it by id, selected too.
    lost = next(k for k, r in active(simulator).items() if r[LEFT_OUT] and k != renamed)
    with mirror.connection() as connection:
        connection.execute("DELETE FROM contacts WHERE contactid = ?", (lost,))
        connection.commit()
    mirror.sync("hourly")
    assert lost in mirrored(mirror)

    # A targeted refresh reads with the select and the filter: a record that left the filter
    # leaves the mirror, without waiting for a reconcile.
    simulator.update("contacts", renamed, {"fullname": "Refreshed", LEFT_OUT: "x@example.com"})
    second_leaving = next(k for k in sorted(active(simulator)) if k not in (renamed, lost))
    simulator.update("contacts", second_leaving, {"statecode": 1, "statuscode": 2})
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    assert cli.main(["refresh", "contacts", "--id", renamed, "--id", second_leaving]) == 0
    rows = mirrored(mirror)
    assert rows[renamed]["fullname"] == "Refreshed"
    assert second_leaving not in rows
    assert all(LEFT_OUT not in json.loads(r["json_response"]) for r in rows.values())
    assert "x@example.com" not in archived_text(mirror)
    with mirror.connection() as connection:
        assert not connection.execute(
            "SELECT count(*) FROM contacts__history WHERE json_response LIKE ?",
            (f'%"{LEFT_OUT}"%',)).fetchone()[0]

    into = tmp_path / "rebuilt.db"
    rebuild(mirror.settings.entities, mirror.settings.archive_dir, into)
    with connect(into) as connection:
        rebuilt = {r[0]: r[1:] for r in connection.execute(
            "SELECT contactid, fullname, statecode, birthdate, json_response FROM contacts")}
    assert rebuilt == {k: (r["fullname"], r["statecode"], r["birthdate"], r["json_response"])
                       for k, r in mirrored(mirror).items()}


def test_a_narrower_select_or_another_filter_is_drift_and_the_column_can_be_purged(
        tmp_path, simulator_url, monkeypatch, capsys):
    simulator, _ = simulator_url
    wide = {**CONTACTS, "select": [*CONTACTS["select"], LEFT_OUT]}
    mirror = mirror_of(tmp_path, simulator_url, [wide])
    mirror.sync("hourly")
    emails = {r[LEFT_OUT] for r in mirrored(mirror).values() if r[LEFT_OUT]}
    assert emails and emails <= set(archived_text(mirror).split('"'))

    mirror = reconfigured(mirror, [{**CONTACTS, "filter": "statecode eq 0 and birthdate ne null"}])
    _, result = mirror.run("hourly")
    assert result.success, failure_messages(result)
    check = next(e for e in result.get_asset_check_evaluations()
                 if e.check_name == "schema_drift")
    assert not check.passed
    assert f"left out of select: {LEFT_OUT}" in check.description
    assert "filter changed" in check.description
    rows = mirrored(mirror)
    assert set(rows) == {k for k, r in active(simulator).items() if r["birthdate"]}
    # Still in the table and its history until purged: then nowhere, archive included.
    for name, value in mirror.cli_environment(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    assert cli.main(["purge", "--entity", "contacts", "--column", LEFT_OUT, "--yes"]) == 0
    # The column stays (the locked schema lists it), empty; the field is gone from the JSON.
    assert all(r[LEFT_OUT] is None and LEFT_OUT not in json.loads(r["json_response"])
               for r in mirrored(mirror).values())
    assert not emails & set(archived_text(mirror).split('"'))  # no value left in any file
    mirror.sync("hourly")
    assert set(mirrored(mirror)) == {k for k, r in active(simulator).items() if r["birthdate"]}
