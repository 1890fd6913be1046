"""Alerts through Dagster's own sensors: a failed run (a blocking check that failed says so), a
new dead letter, and a cadence group whose canonical tables are late are sent to a
Slack-compatible webhook and/or by e-mail.

Off by default: without `DATAVERSE_ALERT_WEBHOOK_URL` or `DATAVERSE_ALERT_SMTP_HOST` (+
`DATAVERSE_ALERT_TO`) no alert sensor is defined. Configured, the sensors start running with
the daemon (`dg dev`): setting the variable is the opt-in. Every message passes through the
redactor and carries no secret (names, keys, counts and the root cause of a failure only).

Variables: DATAVERSE_ALERT_WEBHOOK_URL (POST `{"text": ...}`, as Slack's incoming webhooks and
most chat tools take it); DATAVERSE_ALERT_SMTP_HOST, DATAVERSE_ALERT_SMTP_PORT (25),
DATAVERSE_ALERT_FROM (dataverse-assets@localhost), DATAVERSE_ALERT_TO (comma-separated);
DATAVERSE_ALERT_UI_URL (optional: the Dagster UI's address, for a link to the run).
"""

from __future__ import annotations

import os
import smtplib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import httpx
import orjson
from dagster import (
    DefaultSensorStatus,
    RunFailureSensorContext,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from dataverse_assets.config import EntitiesConfig
from dataverse_assets.defs.checks import freshness_status
from dataverse_assets.defs.resources import MirrorStore
from dataverse_assets.defs.sensors import root_cause
from dataverse_assets.errors import ConfigError
from dataverse_assets.redaction import redact
from dataverse_assets.store import dead_letters
from dataverse_assets.store.bookkeeping import last_complete_publish

SUBJECT_PREFIX = "[dataverse-assets]"
SEND_TIMEOUT_S = 10
BLOCKING_CHECK_ERROR = "DagsterAssetCheckFailedError"


class AlertDeliveryError(RuntimeError):
    """No channel took the alert (the sensor tick fails, so the UI shows it)."""


@dataclass(frozen=True)
class AlertSettings:
    """Where alerts go; `enabled` when at least one channel is configured."""

    webhook_url: str | None = None
    smtp_host: str | None = None
    smtp_port: int = 25
    sender: str = "dataverse-assets@localhost"
    recipients: tuple[str, ...] = field(default_factory=tuple)
    ui_url: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.webhook_url or (self.smtp_host and self.recipients))


def load_alert_settings(environ: Mapping[str, str] | None = None) -> AlertSettings:
    """Alert channels from the environment (`.env` is loaded by config.load_settings first)."""
    env = os.environ if environ is None else environ
    recipients = tuple(r.strip() for r in env.get("DATAVERSE_ALERT_TO", "").split(",")
                       if r.strip())
    return AlertSettings(
        webhook_url=env.get("DATAVERSE_ALERT_WEBHOOK_URL") or None,
        smtp_host=env.get("DATAVERSE_ALERT_SMTP_HOST") or None,
        smtp_port=_port(env.get("DATAVERSE_ALERT_SMTP_PORT")),
        sender=env.get("DATAVERSE_ALERT_FROM") or AlertSettings.sender,
        recipients=recipients,
        ui_url=(env.get("DATAVERSE_ALERT_UI_URL") or "").rstrip("/") or None,
    )


def _port(text: str | None) -> int:
    if not text:
        return 25
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(f"DATAVERSE_ALERT_SMTP_PORT={text!r}: expected a port number from 1 to "
                          "65535 (25 when unset)")
    return port


@dataclass(frozen=True)
class Alert:
    subject: str
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return redact("\n".join((self.subject, *self.lines)))


def send_alert(settings: AlertSettings, alert: Alert) -> list[str]:
    """Send to every configured channel; returns the channels that took it. Raises when
    none did (and says why), so a lost alert shows as a failed sensor tick."""
    sent, errors = [], []
    if settings.webhook_url:
        try:
            response = httpx.post(settings.webhook_url, json={"text": alert.text},
                                  timeout=SEND_TIMEOUT_S)
            response.raise_for_status()
            sent.append("webhook")
        except httpx.HTTPError as exc:
            errors.append(f"webhook: {type(exc).__name__}: {redact(str(exc))}")
    if settings.smtp_host and settings.recipients:
        message = EmailMessage()
        message["Subject"] = redact(alert.subject)
        message["From"] = settings.sender
        message["To"] = ", ".join(settings.recipients)
        message.set_content(alert.text)
        try:
            with smtplib.SMTP(settings.smtp_host, settings.smtp_port,
                              timeout=SEND_TIMEOUT_S) as smtp:
                smtp.send_message(message)
            sent.append("email")
        except (OSError, smtplib.SMTPException) as exc:
            errors.append(f"email: {type(exc).__name__}: {redact(str(exc))}")
    if errors and not sent:
        raise AlertDeliveryError("alert not delivered: " + "; ".join(errors))
    return sent


# -- what each alert says -------------------------------------------------------------------

def run_failure_alert(context: RunFailureSensorContext, ui_url: str | None) -> Alert:
    run = context.dagster_run
    failures = [(event.step_key or "?",
                 event.step_failure_data.error if event.step_failure_data else None)
                for event in context.get_step_failure_events()]
    blocking = [step for step, error in failures
                if _error_classes(error) & {BLOCKING_CHECK_ERROR}]
    what = "blocking check failed" if blocking else "run failed"
    partition = run.tags.get("dagster/partition")
    lines = [f"job: {run.job_name}", f"run: {run.run_id}"]
    if partition:
        lines.append(f"change set: {partition}")
    lines += [f"{step}: {root_cause(error)}" for step, error in failures]
    if not failures:
        lines.append(f"reason: {context.failure_event.message or 'see the run'}")
    if ui_url:
        lines.append(f"{ui_url}/runs/{run.run_id}")
    return Alert(f"{SUBJECT_PREFIX} {what}: {run.job_name}"
                 + (f" {partition}" if partition else ""), tuple(lines))


def _error_classes(error) -> set[str]:
    classes = set()
    while error is not None:
        classes.add(error.cls_name or "")
        error = getattr(error, "cause", None)
    return classes


def dead_letter_alert(letter: dict) -> Alert:
    return Alert(
        f"{SUBJECT_PREFIX} dead letter: {letter['entity']} {letter['change_set']}",
        (f"reason: {letter['reason']}", f"created: {letter['created_at']}",
         f"every scheduled retry failed; `dataverse-assets dlq show {letter['id']}` has the "
         "diagnostics, `dataverse-assets dlq requeue` retries it"))


def late_group_alert(group: str, cron: str, due_tick: datetime,
                     late: dict[str, datetime | None]) -> Alert:
    lines = [f"no publish since the {due_tick:%Y-%m-%d %H:%M} UTC tick of {cron!r}:"]
    lines += [f"{entity}: last published {last.isoformat() if last else 'never'}"
              for entity, last in sorted(late.items())]
    return Alert(f"{SUBJECT_PREFIX} late group: {group} ({len(late)} tables)", tuple(lines))


# -- the sensors --------------------------------------------------------------------------

def build_alert_sensors(config: EntitiesConfig,
                        settings: AlertSettings) -> list[SensorDefinition]:
    """The alert sensors, or none when no channel is configured (off by default)."""
    if not settings.enabled:
        return []

    @run_failure_sensor(
        name="alert_on_run_failure", default_status=DefaultSensorStatus.RUNNING,
        description="Sends an alert for every failed run of this code location (a blocking "
                    "asset check that failed is named as such).",
    )
    def alert_on_run_failure(context: RunFailureSensorContext):
        channels = send_alert(settings, run_failure_alert(context, settings.ui_url))
        context.log.info(f"alerted run {context.dagster_run.run_id} via {channels}")

    @sensor(
        name="alert_on_dead_letters", minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.RUNNING,
        description="Sends an alert for each new dead letter (a change set that failed every "
                    "scheduled retry).",
    )
    def alert_on_dead_letters(context: SensorEvaluationContext, store: MirrorStore):
        last_seen = int(context.cursor or 0)
        with store.connection() as connection:
            letters = [d for d in dead_letters.list_dead_letters(connection, include_closed=True)
                       if d["id"] > last_seen]
        for letter in letters:  # oldest first; the cursor moves past each one sent
            send_alert(settings, dead_letter_alert(letter))
            context.update_cursor(str(letter["id"]))
        return SkipReason(f"alerted {len(letters)} dead letter(s)")

    @sensor(
        name="alert_on_late_groups", minimum_interval_seconds=300,
        default_status=DefaultSensorStatus.RUNNING,
        description="Sends an alert once per cron tick when a cadence group's canonical "
                    "tables have not been published since that tick plus the group's grace "
                    "(the freshness check's rule, evaluated whether or not it runs).",
    )
    def alert_on_late_groups(context: SensorEvaluationContext, store: MirrorStore):
        alerted: dict[str, str] = orjson.loads(context.cursor) if context.cursor else {}
        now = datetime.now(UTC)
        sent = []
        with store.connection() as connection:
            for group, group_config in config.groups.items():
                entities = config.entities_in_group(group)
                if not entities:
                    continue
                grace = timedelta(minutes=group_config.freshness_grace_minutes)
                statuses = {e.name: freshness_status(
                    group_config.cron, last_complete_publish(connection, e.name), now, grace)
                    for e in entities}
                late = {name: s.last_publish for name, s in statuses.items() if not s.fresh}
                if not late:
                    continue
                due = max(s.due_tick for s in statuses.values())
                if alerted.get(group) == due.isoformat():
                    continue  # this tick's lateness was sent already
                send_alert(settings, late_group_alert(group, group_config.cron, due, late))
                alerted[group] = due.isoformat()
                sent.append(group)
        context.update_cursor(orjson.dumps(alerted).decode())
        return SkipReason(f"late groups alerted: {sent or 'none'}")

    return [alert_on_run_failure, alert_on_dead_letters, alert_on_late_groups]
