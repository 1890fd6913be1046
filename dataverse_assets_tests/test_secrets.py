"""Secrets never leak: a full sync with a recognisable secret (and a server that echoes the
request's headers back in an error), then every file it produced (database, archive, Dagster's
instance storage and logs), every Dagster event and every exception message is searched for it
and its tokens; a link to another host never receives the token; and masking takes whole
values only."""

import socket
import threading
from pathlib import Path

from dagster import DagsterInstance
from dagster._serdes import serialize_value

from dataverse_assets.config import load_settings
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.ops.cli import new_change_set_key
from dataverse_assets.redaction import Redactor, redact
from dataverse_assets_tests.conftest import failure_messages, write_entities_config

SECRET = "S3CR3T-do-not-leak-7f1e2d"
WRONG = "WR0NG-secret-must-not-leak-93a1"


def produced_files(root: Path):
    for path in root.rglob("*"):
        if path.is_file():
            yield path


def test_a_full_sync_leaves_no_secret_or_token_anywhere(tmp_path, simulator_url, monkeypatch,
                                                         capfd):
    simulator, url = simulator_url
    simulator.client_secret = SECRET
    config = write_entities_config(tmp_path / "entities.json", page_size=200)
    environment = {
        "DATAVERSE_URL": url, "DATAVERSE_SOURCE": "live", "DATAVERSE_AUTHORITY": url,
        "DATAVERSE_CLIENT_ID": simulator.client_id, "DATAVERSE_CLIENT_SECRET": SECRET,
        "DATAVERSE_DB_PATH": str(tmp_path / "mirror.db"),
        "DATAVERSE_ARCHIVE_DIR": str(tmp_path / "archive"),
        "DATAVERSE_ENTITIES_CONFIG": str(config),
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(dotenv=False)
    defs = build_definitions(settings)
    (tmp_path / "dagster_home").mkdir()
    with DagsterInstance.local_temp(tempdir=str(tmp_path / "dagster_home")) as instance:
        for group in ("hourly", "daily", "hourly"):
            key = new_change_set_key(instance, group)
            result = defs.resolve_job_def(f"sync_{group}").execute_in_process(
                instance=instance, partition_key=key, raise_on_error=False)
            assert result.success, failure_messages(result)
            # Changes for the next hourly change set: delta links are followed with the token.
            candidate = simulator.records("vin_candidates")[0]["vin_candidateid"]
            simulator.update("vin_candidates", candidate, {"vin_name": f"renamed {group}"})
        # A server (a proxy, a debug endpoint) that answers 400 repeating the request's
        # headers: the token is in the body; the run fails with one line that holds none.
        simulator.inject("echo_headers", count=100, entity="vin_candidates")
        echoed = defs.resolve_job_def("sync_hourly").execute_in_process(
            instance=instance, partition_key=new_change_set_key(instance, "hourly"),
            raise_on_error=False)
        simulator.clear_faults()
        assert not echoed.success
        echo_errors = [event.step_failure_data.error for event in echoed.all_events
                       if event.is_step_failure and event.step_failure_data.error]
        assert len(echo_errors) == 1
        cause = echo_errors[0]
        while cause.cause is not None:  # the error that failed the step, under Dagster's
            cause = cause.cause
        echo_message = cause.message.strip()
        assert "\n" not in echo_message and "vin_candidates: GET " in echo_message
        assert "answered 400 (0x80040203): The request could not be routed" in echo_message
        assert 'Request headers: {"host":' in echo_message
        assert '"authorization":"***"' in echo_message
        messages_echoed = failure_messages(echoed)
        # A wrong secret: a clear failure, and the wrong secret is not repeated anywhere.
        monkeypatch.setenv("DATAVERSE_CLIENT_SECRET", WRONG)
        key = new_change_set_key(instance, "daily")
        failed = build_definitions(load_settings(dotenv=False)).resolve_job_def(
            "sync_daily").execute_in_process(instance=instance, partition_key=key,
                                             raise_on_error=False)
        assert not failed.success
        messages = failure_messages(failed)
        assert "DATAVERSE_CLIENT_SECRET" in messages and "401" in messages
        # Every Dagster event of every run (metadata, logs, errors), as stored.
        events = "".join(serialize_value(record) for run in instance.get_runs()
                         for record in instance.all_logs(run.run_id))
        assert "change_tracking" in events and len(events) > 10_000

    tokens = list(simulator._tokens)
    assert tokens, "the sync should have used bearer tokens"
    needles = [SECRET.encode(), WRONG.encode(), *(t.encode() for t in tokens)]
    searched = 0
    for path in produced_files(tmp_path):
        data = path.read_bytes()
        searched += 1
        for needle in needles:
            assert needle not in data, f"{needle[:6]!r}... found in {path}"
    assert searched > 20  # database, WAL, archive pages, manifests, instance storage
    for needle in needles:
        assert needle.decode() not in events
    output = capfd.readouterr()
    for needle in needles:
        assert needle.decode() not in output.out + output.err
    assert SECRET not in messages and WRONG not in messages
    for needle in needles:
        assert needle.decode() not in messages_echoed


def test_a_secret_is_masked_as_a_whole_value_only():
    host = "GET https://contoso.crm.dynamics.com/api/data/v9.2/accounts answered 400"
    assert redact(host, "co") == host
    prose = "every entity: your query is ready, try again"
    assert redact(prose, "y") == prose
    assert redact(f"client_secret={SECRET}&scope=x; {SECRET}.", SECRET) == \
        "client_secret=***&scope=x; ***."
    assert redact("co: 'co' co-worker", "co") == "***: '***' ***-worker"
    # The redactor remembers the secrets and tokens of the process's sessions.
    redactor = Redactor()
    redactor.remember_secret("co")
    redactor.remember_token("tok-12")
    assert redactor(host + " tok-123 tok-12") == host + " tok-123 ***"
    # URL-encoded and JSON-escaped forms of a secret are the secret too.
    redactor.remember_secret('p+ss/"w"rd')
    assert redactor('client_secret=p%2Bss%2F%22w%22rd {"s": "p+ss/\\"w\\"rd"}') == \
        'client_secret=*** {"s": "***"}'


def test_authorization_and_bearer_text_is_masked_whatever_the_token():
    unknown = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwcyJ9.c2lnbmF0dXJl"
    cases = {
        f"Authorization: Bearer {unknown}, Accept: application/json":
            "Authorization: ***, Accept: application/json",
        f'{{"Authorization": "Bearer {unknown}", "Accept": "application/json"}}':
            '{"Authorization": "***", "Accept": "application/json"}',
        f'message: {{\\"authorization\\": \\"Bearer {unknown}\\"}}':
            'message: {\\"authorization\\": \\"***\\"}',
        "{'authorization': 'Basic dXNlcjpwYXNzd29yZA=='}": "{'authorization': '***'}",
        f"the proxy saw bearer {unknown}.": "the proxy saw bearer ***",
        f"?authorization=Bearer%20{unknown}&x=1": "?authorization=***&x=1",
        # Prose about the scheme stays readable.
        "answered 200 without a Bearer challenge; is DATAVERSE_URL a Dataverse org?":
            "answered 200 without a Bearer challenge; is DATAVERSE_URL a Dataverse org?",
        "the 401 challenge has no authorization_uri; set DATAVERSE_TENANT_ID":
            "the 401 challenge has no authorization_uri; set DATAVERSE_TENANT_ID",
    }
    for text, expected in cases.items():
        assert redact(text) == expected, text


class Listener:
    """A loopback port that records whatever connects to it (it never answers)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.received: list[bytes] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self.stopped:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                continue
            connection.settimeout(0.5)
            try:
                self.received.append(connection.recv(65536))
            except OSError:
                self.received.append(b"")
            connection.close()

    def close(self) -> None:
        self.stopped = True
        self.thread.join()
        self.sock.close()


def test_a_next_or_delta_link_to_another_host_never_receives_the_token(
        tmp_path, simulator_url, monkeypatch):
    simulator, url = simulator_url
    simulator.client_secret = SECRET
    config = write_entities_config(tmp_path / "entities.json", page_size=4)
    for name, value in {
        "DATAVERSE_URL": url, "DATAVERSE_SOURCE": "live", "DATAVERSE_AUTHORITY": url,
        "DATAVERSE_CLIENT_ID": simulator.client_id, "DATAVERSE_CLIENT_SECRET": SECRET,
        "DATAVERSE_DB_PATH": str(tmp_path / "mirror.db"),
        "DATAVERSE_ARCHIVE_DIR": str(tmp_path / "archive"),
        "DATAVERSE_ENTITIES_CONFIG": str(config),
    }.items():
        monkeypatch.setenv(name, value)
    defs = build_definitions(load_settings(dotenv=False))
    listener = Listener()  # same host as the org, another port: another origin
    try:
        with DagsterInstance.ephemeral() as instance:
            for link, after in (("next", 0), ("delta", 1)):
                simulator.inject("foreign_link", count=50, entity="teams", link=link,
                                 host=listener.url, paging_only=False, after=after)
                result = defs.resolve_job_def("sync_daily").execute_in_process(
                    instance=instance, partition_key=new_change_set_key(instance, "daily"),
                    raise_on_error=False)
                simulator.clear_faults()
                assert not result.success
                messages = failure_messages(result)
                assert f"refusing to {'follow' if link == 'next' else 'store'} the {link}Link" \
                    f" to {listener.url}" in messages
                assert SECRET not in messages
                assert not any(token in messages for token in simulator._tokens)
    finally:
        listener.close()
    assert listener.received == [], "a request (and its token) went to the other host"
