"""Alerts where users expect them: a failed run, a blocking check, a dead letter and a late
group reach a Slack-compatible webhook and an SMTP server (both on loopback, in this test),
through Dagster's own sensors; none is defined unless a channel is configured."""

import dataclasses
import email
import http.server
import json
import socketserver
import threading
from collections.abc import Iterator

import pytest
from dagster import DagsterEventType, build_run_status_sensor_context, build_sensor_context

from dataverse_assets.defs.alerts import (
    Alert,
    AlertDeliveryError,
    AlertSettings,
    load_alert_settings,
    send_alert,
)
from dataverse_assets.defs.definitions import build_definitions
from dataverse_assets.errors import ConfigError
from dataverse_assets.redaction import REDACTOR
from dataverse_assets.store import dead_letters
from dataverse_assets.sync.faults import armed
from dataverse_assets_tests.helpers import duplicate_a_team_key, source_of, store_of

ALERT_SENSORS = {"alert_on_run_failure", "alert_on_dead_letters", "alert_on_late_groups"}


# -- a webhook and an SMTP server on loopback -----------------------------------------------

class _Webhook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


class _SMTP(socketserver.StreamRequestHandler):
    """Just enough SMTP for smtplib.send_message: EHLO, MAIL, RCPT, DATA, QUIT."""

    def handle(self):
        self.wfile.write(b"220 localhost test SMTP\r\n")
        while line := self.rfile.readline():
            verb = line.decode().strip().split(" ")[0].upper()
            if verb == "DATA":
                self.wfile.write(b"354 end with .\r\n")
                lines = []
                while (data := self.rfile.readline()) not in (b".\r\n", b""):
                    lines.append(data[1:] if data.startswith(b"..") else data)
                self.server.received.append(email.message_from_bytes(b"".join(lines)))
                self.wfile.write(b"250 queued\r\n")
            elif verb == "QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:  # EHLO, HELO, MAIL, RCPT, RSET, NOOP
                self.wfile.write(b"250 ok\r\n")


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True


def _serve(server) -> Iterator:
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def webhook():
    yield from _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Webhook))


@pytest.fixture
def smtp():
    yield from _serve(_Server(("127.0.0.1", 0), _SMTP))


@pytest.fixture
def alerting(mirror, webhook, smtp):
    """The mirror's definitions with both channels configured (as the environment would)."""
    settings = load_alert_settings({
        "DATAVERSE_ALERT_WEBHOOK_URL": f"http://127.0.0.1:{webhook.server_address[1]}/hook",
        "DATAVERSE_ALERT_SMTP_HOST": "127.0.0.1",
        "DATAVERSE_ALERT_SMTP_PORT": str(smtp.server_address[1]),
        "DATAVERSE_ALERT_TO": "ops@example.test, data@example.test",
        "DATAVERSE_ALERT_UI_URL": "http://127.0.0.1:3000/",
    })
    defs = build_definitions(mirror.settings, source=source_of(mirror), alerts=settings)
    return dataclasses.replace(mirror, defs=defs)


def _texts(webhook) -> list[str]:
    return [body["text"] for body in webhook.received]


def _tick(mirror, name: str, cursor: str | None = None):
    context = build_sensor_context(instance=mirror.instance, cursor=cursor,
                                   definitions=mirror.defs,
                                   resources={"store": store_of(mirror)})
    mirror.defs.resolve_sensor_def(name)(context)
    return context.cursor


# -- off by default -------------------------------------------------------------------------

def test_no_alert_sensor_exists_unless_a_channel_is_configured(mirror):
    assert not load_alert_settings({}).enabled
    assert not load_alert_settings({"DATAVERSE_ALERT_SMTP_HOST": "mail"}).enabled  # nobody to
    defined = {s.name for s in mirror.defs.sensors}
    assert not defined & ALERT_SENSORS
    configured = build_definitions(mirror.settings, alerts=load_alert_settings(
        {"DATAVERSE_ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook"}))
    assert ALERT_SENSORS <= {s.name for s in configured.sensors}


# -- what reaches the channels --------------------------------------------------------------

def test_a_failed_run_reaches_the_webhook_and_the_mailbox(alerting, webhook, smtp):
    alerting.sync("daily")
    alerting.simulator.create("teams", {"name": "Ops"})
    with armed("publish.mid_plan"):
        key, result = alerting.run("daily")
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.RUN_FAILURE)
    sensor = alerting.defs.resolve_sensor_def("alert_on_run_failure")
    context = build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_event=failure, dagster_instance=alerting.instance,
        dagster_run=result.dagster_run)
    sensor(context.for_run_failure())

    [text] = _texts(webhook)
    assert text.startswith(f"[dataverse-assets] run failed: sync_daily {key}\n")
    assert "canonical__teams: " in text and "injected fault at publish.mid_plan" in text
    assert f"http://127.0.0.1:3000/runs/{result.run_id}" in text
    [mail] = smtp.received
    assert mail["Subject"] == f"[dataverse-assets] run failed: sync_daily {key}"
    assert mail["To"] == "ops@example.test, data@example.test"
    assert "injected fault at publish.mid_plan" in mail.get_payload()


def test_a_blocking_check_that_failed_is_named_in_the_alert(alerting, webhook):
    alerting.sync("daily")
    with alerting.connection() as connection:  # two keys equal but for case: blocking check
        duplicate_a_team_key(connection)
    change_set, result = alerting.run("daily")
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.RUN_FAILURE)
    sensor = alerting.defs.resolve_sensor_def("alert_on_run_failure")
    sensor(build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_event=failure, dagster_instance=alerting.instance,
        dagster_run=result.dagster_run).for_run_failure())

    [text] = _texts(webhook)
    assert text.startswith(
        f"[dataverse-assets] blocking check failed: sync_daily {change_set}\n"), text
    assert "canonical__teams: DagsterAssetCheckFailedError" in text


def test_a_new_dead_letter_is_alerted_once(alerting, webhook, smtp):
    alerting.sync("daily")
    assert _tick(alerting, "alert_on_dead_letters") in (None, "")  # none yet: nothing sent
    with alerting.connection() as connection:
        for _ in range(4):  # the first failure and every scheduled retry
            dead_letters.record_failure(connection, "teams", "20260101T000000Z", "HTTP 500")
    cursor = _tick(alerting, "alert_on_dead_letters")
    [text] = _texts(webhook)
    assert text.startswith("[dataverse-assets] dead letter: teams 20260101T000000Z\n")
    assert "reason: HTTP 500" in text and "dataverse-assets dlq show 1" in text
    assert [m["Subject"] for m in smtp.received] == [
        "[dataverse-assets] dead letter: teams 20260101T000000Z"]

    assert _tick(alerting, "alert_on_dead_letters", cursor) == cursor
    assert len(webhook.received) == 1  # not again on the next tick


def test_a_late_group_is_alerted_once_per_cron_tick(alerting, webhook):
    alerting.sync("daily")
    alerting.sync("hourly")
    cursor = _tick(alerting, "alert_on_late_groups")
    assert _texts(webhook) == []  # both fresh
    with alerting.connection() as connection:
        connection.execute("UPDATE _publish_state SET finished_at = '2020-01-01T00:00:00Z'"
                           " WHERE entity = 'teams'")

    cursor = _tick(alerting, "alert_on_late_groups", cursor)
    [text] = _texts(webhook)
    assert text.startswith("[dataverse-assets] late group: daily (1 tables)\n"), text
    assert "teams: last published 2020-01-01T00:00:00+00:00" in text
    _tick(alerting, "alert_on_late_groups", cursor)
    assert len(webhook.received) == 1  # the same tick's lateness is sent once


def test_alerts_carry_no_secret_and_a_lost_alert_fails_loudly():
    REDACTOR.remember_secret("client-secret-value-1234")
    alert = Alert("[dataverse-assets] run failed",
                  ("auth: client-secret-value-1234 rejected",
                   "header: Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345"))
    assert "client-secret-value-1234" not in alert.text
    assert "abcdefghijklmnopqrstuvwxyz012345" not in alert.text
    nowhere = AlertSettings(webhook_url="http://127.0.0.1:9/closed")  # the discard port
    with pytest.raises(AlertDeliveryError, match="webhook: ConnectError"):
        send_alert(nowhere, alert)


@pytest.mark.parametrize("port", ["smtp", "0", "70000"])
def test_a_bad_smtp_port_is_one_line_naming_the_variable(port):
    with pytest.raises(ConfigError) as caught:
        load_alert_settings({"DATAVERSE_ALERT_SMTP_HOST": "127.0.0.1",
                             "DATAVERSE_ALERT_SMTP_PORT": port, "DATAVERSE_ALERT_TO": "a@b.c"})
    assert str(caught.value) == (f"DATAVERSE_ALERT_SMTP_PORT={port!r}: expected a port number "
                                 "from 1 to 65535 (25 when unset)")
