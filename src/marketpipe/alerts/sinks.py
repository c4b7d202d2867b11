"""The four sinks, each turning a :class:`~marketpipe.alerts.model.Notification` into its receiver's
format and sending it once (retries, pacing and queueing are :mod:`~marketpipe.alerts.dispatch`'s):

- **Slack** incoming webhook: ``{"text", "blocks": [header, section with fields, context]}``; 200 ``ok``.
- **PagerDuty** Events API v2: trigger with ``payload`` (summary, source, severity, timestamp, …) or
  ``{routing_key, dedup_key, event_action: "resolve"}``; 202. ``dedup_key`` is ``marketpipe/<alert id>``.
- **Email** over SMTP (STARTTLS or TLS, AUTH when a username is set) with ``aiosmtplib``.
- **Webhook**: our JSON (``version, alert, status, severity, dedup_key, summary, labels, annotations,
  starts_at, ends_at``) signed ``X-Marketpipe-Signature: sha256=<HMAC-SHA256(secret, body)>``.

Secrets (webhook URLs, the routing key, the SMTP password, the signing key) come from the environment
variables the config names, are registered for log redaction, and never appear in an error message:
errors name the sink and the status, never the URL."""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import ssl
import time
from collections.abc import Mapping
from email.message import EmailMessage
from typing import Any, Protocol

import httpx
import orjson

from marketpipe.alerts.model import RESOLVE, Notification
from marketpipe.core import log as logging_
from marketpipe.core.config import AlertSink, EmailSink, PagerDutySink, SlackSink, WebhookSink
from marketpipe.core.errors import AlertSinkFailed, AlertSinkUnavailable, MissingCredentials

SIGNATURE_HEADER = "X-Marketpipe-Signature"
SEVERITY_EMOJI = {"critical": ":red_circle:", "warning": ":large_orange_circle:", "info": ":large_blue_circle:"}
PAGERDUTY_SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}  # PD: critical|error|warning|info
SLACK_HEADER_MAX, SLACK_TEXT_MAX, SLACK_FIELD_MAX, SLACK_FIELDS_MAX = 150, 3000, 2000, 10
PD_SUMMARY_MAX = 1024
WEBHOOK_VERSION = "1"


class Sink(Protocol):
    name: str

    @property
    def config(self) -> AlertSink: ...

    async def send(self, n: Notification) -> None:
        """Deliver once; raise AlertSinkUnavailable (retried) or AlertSinkFailed (not)."""

    async def aclose(self) -> None: ...


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _secret(env: Mapping[str, str], var: str, sink: str, what: str) -> str:
    value = (env.get(var) or "").strip()
    if not value:
        raise MissingCredentials(
            f"alert sink {sink} needs ${var} ({what}) set in the environment", details={"sink": sink, "env": var}
        )
    logging_.register_secrets([value])
    return value


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    raw = (headers.get("retry-after") or "").strip()
    if not raw:
        return None
    if raw.isdigit():
        return float(raw)
    try:
        at = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, at.timestamp() - (time.time() if now is None else now))


def _labels_title(name: str) -> str:
    return name.replace("_", " ").capitalize()


def headline(n: Notification) -> str:
    a = n.alert
    state = "RESOLVED" if n.action == RESOLVE else a.severity.upper()
    prefix = "[test] " if n.test else ""
    return f"{prefix}[{state}] {a.rule}: {a.summary}"


class HttpSink:
    """What the three HTTP sinks share: one client, and the status → error mapping."""

    def __init__(self, name: str, config: AlertSink, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.name = name
        self.config = config
        self._client = httpx.AsyncClient(timeout=config.timeout, transport=transport, follow_redirects=False)
        logging_.guard_stdlib(("httpx", "httpcore"))  # httpx logs each request's URL at INFO: the URL is a secret

    async def post(self, url: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        try:
            resp = await self._client.post(
                url, content=body, headers={"Content-Type": "application/json", **(headers or {})}
            )
        except httpx.TransportError as exc:  # the URL is a secret: only the exception's type is told
            raise AlertSinkUnavailable(
                f"alert sink {self.name}: connection failed ({type(exc).__name__})", details={"sink": self.name}
            ) from None
        status = resp.status_code
        if 200 <= status < 300:
            return resp
        snippet = resp.text[:120].strip()
        details = {"sink": self.name, "status": status}
        if status == 429 or status >= 500:
            raise AlertSinkUnavailable(
                f"alert sink {self.name}: HTTP {status} {snippet}".rstrip(),
                details=details,
                retry_after=retry_after(resp.headers),
            )
        raise AlertSinkFailed(f"alert sink {self.name}: HTTP {status} {snippet}".rstrip(), details=details)

    async def aclose(self) -> None:
        await self._client.aclose()


class SlackWebhook(HttpSink):
    def __init__(self, config: SlackSink, env: Mapping[str, str], **kw: Any) -> None:
        super().__init__("slack", config, **kw)
        self._url = _secret(env, config.url_env, self.name, "the incoming webhook URL")

    @staticmethod
    def payload(n: Notification) -> dict[str, Any]:
        a = n.alert
        resolved = n.action == RESOLVE
        emoji = ":white_check_mark:" if resolved else SEVERITY_EMOJI[a.severity]
        title = f"{'[test] ' if n.test else ''}{'Resolved' if resolved else a.severity.capitalize()}: {a.rule}"
        fields = [
            {"type": "mrkdwn", "text": _cut(f"*{_labels_title(k)}*\n{v}", SLACK_FIELD_MAX)}
            for k, v in sorted(a.labels.items())
        ]
        fields.append({"type": "mrkdwn", "text": f"*Severity*\n{a.severity}"})
        if a.value is not None:
            fields.append({"type": "mrkdwn", "text": f"*Value*\n{a.value:g}"})
        when = f"resolved {a.resolved_at.isoformat()}" if a.resolved_at else f"last seen {a.last_seen.isoformat()}"
        return {
            "text": _cut(headline(n), SLACK_TEXT_MAX),
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": _cut(f"{emoji} {title}", SLACK_HEADER_MAX)}},
                {
                    "type": "section",
                    "text": {"type": "mrkdwn", "text": _cut(a.summary, SLACK_TEXT_MAX)},
                    "fields": fields[:SLACK_FIELDS_MAX],
                },
                {
                    "type": "context",
                    "elements": [
                        {
                            "type": "mrkdwn",
                            "text": _cut(
                                f"marketpipe on {n.source} · `{a.id}` · first seen {a.first_seen.isoformat()} · {when}",
                                SLACK_TEXT_MAX,
                            ),
                        }
                    ],
                },
            ],
        }

    async def send(self, n: Notification) -> None:
        await self.post(self._url, orjson.dumps(self.payload(n)))


class PagerDutyEvents(HttpSink):
    def __init__(self, config: PagerDutySink, env: Mapping[str, str], **kw: Any) -> None:
        super().__init__("pagerduty", config, **kw)
        self._url = config.url
        self._key = _secret(env, config.routing_key_env, self.name, "the integration's routing key")

    @staticmethod
    def payload(n: Notification, routing_key: str) -> dict[str, Any]:
        a = n.alert
        if n.action == RESOLVE:
            return {"routing_key": routing_key, "dedup_key": n.dedup_key, "event_action": "resolve"}
        return {
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": n.dedup_key,
            "payload": {
                "summary": _cut(headline(n), PD_SUMMARY_MAX),
                "source": n.source,
                "severity": PAGERDUTY_SEVERITY[a.severity],
                "timestamp": a.last_seen.isoformat(),
                "component": "marketpipe",
                "group": a.labels.get("provider") or a.labels.get("symbol") or "marketpipe",
                "class": a.rule,
                "custom_details": {
                    "alert_id": a.id,
                    "labels": dict(a.labels),
                    "value": a.value,
                    "first_seen": a.first_seen.isoformat(),
                    "test": n.test,
                },
            },
            "client": "marketpipe",
        }

    async def send(self, n: Notification) -> None:
        await self.post(self._url, orjson.dumps(self.payload(n, self._key)))


class SignedWebhook(HttpSink):
    def __init__(self, config: WebhookSink, env: Mapping[str, str], **kw: Any) -> None:
        super().__init__("webhook", config, **kw)
        self._url = _secret(env, config.url_env, self.name, "the receiver's URL")
        self._key = _secret(env, config.secret_env, self.name, "the HMAC-SHA256 signing key").encode()

    @staticmethod
    def payload(n: Notification) -> dict[str, Any]:
        a = n.alert
        return {
            "version": WEBHOOK_VERSION,
            "alert": a.rule,
            "status": "resolved" if n.action == RESOLVE else "firing",
            "severity": a.severity,
            "dedup_key": n.dedup_key,
            "summary": a.summary,
            "labels": dict(a.labels),
            "annotations": {
                "alert_id": a.id,
                "value": a.value,
                "source": n.source,
                "last_seen": a.last_seen.isoformat(),
                "test": n.test,
            },
            "starts_at": a.first_seen.isoformat(),
            "ends_at": a.resolved_at.isoformat() if a.resolved_at else None,
        }

    @staticmethod
    def signature(key: bytes, body: bytes) -> str:
        return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()

    async def send(self, n: Notification) -> None:
        body = orjson.dumps(self.payload(n))
        await self.post(self._url, body, {SIGNATURE_HEADER: self.signature(self._key, body)})


class SmtpEmail:
    name = "email"

    def __init__(self, config: EmailSink, env: Mapping[str, str]) -> None:
        self.config = config
        self._user = (env.get(config.username_env) or "").strip() or None
        self._password = _secret(env, config.password_env, self.name, "the SMTP password") if self._user else None

    def message(self, n: Notification) -> EmailMessage:
        a, cfg = n.alert, self.config
        msg = EmailMessage()
        msg["Subject"] = _cut(f"[marketpipe] {headline(n)}", 200)
        msg["From"] = cfg.sender
        msg["To"] = ", ".join(cfg.to)
        msg["Date"] = email.utils.formatdate(localtime=False)
        msg["Message-ID"] = email.utils.make_msgid(domain="marketpipe")
        msg["X-Marketpipe-Dedup-Key"] = n.dedup_key
        lines = [
            headline(n),
            "",
            f"alert:      {a.id}",
            f"status:     {'resolved' if n.action == RESOLVE else 'firing'}",
            f"severity:   {a.severity}",
            *(f"{k + ':':<11} {v}" for k, v in sorted(a.labels.items())),
            *([f"value:      {a.value:g}"] if a.value is not None else []),
            f"first seen: {a.first_seen.isoformat()}",
            f"last seen:  {a.last_seen.isoformat()}",
            *([f"resolved:   {a.resolved_at.isoformat()}"] if a.resolved_at else []),
            f"source:     {n.source}",
        ]
        msg.set_content("\n".join(lines) + "\n")
        return msg

    async def send(self, n: Notification) -> None:
        import aiosmtplib  # only when email is configured

        cfg = self.config
        context = ssl.create_default_context(cafile=cfg.ca_file) if cfg.security != "none" else None
        try:
            await aiosmtplib.send(
                self.message(n),
                hostname=cfg.host,
                port=cfg.port,
                username=self._user,
                password=self._password,
                use_tls=cfg.security == "tls",
                start_tls=cfg.security == "starttls",
                tls_context=context,
                timeout=cfg.timeout,
            )
        except aiosmtplib.SMTPResponseException as exc:  # the server's answer: 4xx try again, 5xx never
            cls = AlertSinkUnavailable if 400 <= exc.code < 500 else AlertSinkFailed
            raise cls(
                f"alert sink email: SMTP {exc.code} {exc.message[:120]}",
                details={"sink": self.name, "status": exc.code},
            ) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise AlertSinkUnavailable(
                f"alert sink email: {type(exc).__name__}: {str(exc)[:120]}", details={"sink": self.name}
            ) from None

    async def aclose(self) -> None:
        return None


SINK_NAMES = ("slack", "pagerduty", "email", "webhook")


def build_sink(name: str, config: AlertSink, env: Mapping[str, str]) -> Sink:
    if isinstance(config, SlackSink):
        return SlackWebhook(config, env)
    if isinstance(config, PagerDutySink):
        return PagerDutyEvents(config, env)
    if isinstance(config, EmailSink):
        return SmtpEmail(config, env)
    if isinstance(config, WebhookSink):
        return SignedWebhook(config, env)
    raise AlertSinkFailed(f"no alert sink named {name!r}", details={"sink": name})
