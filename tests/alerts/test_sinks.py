"""Each sink against a real receiver on loopback: the exact JSON per format (Slack blocks, PagerDuty
Events v2 trigger and resolve, our signed webhook), email over STARTTLS with AUTH to a real aiosmtpd
server; and the worker between engine and sink: routing by severity, de-duplication, pacing, retries
that honour Retry-After, a bounded queue with counted drops, and secrets kept out of errors and logs."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from datetime import UTC, datetime

import pytest

from marketpipe.alerts.dispatch import SinkWorker
from marketpipe.alerts.model import Alert, Notification
from marketpipe.alerts.sinks import PagerDutyEvents, SignedWebhook, SlackWebhook, SmtpEmail, build_sink
from marketpipe.core.config import EmailSink, PagerDutySink, RetryPolicy, SlackSink, WebhookSink
from marketpipe.core.errors import AlertSinkFailed, MissingCredentials
from marketpipe.core.metrics import REGISTRY
from tests.alerts.conftest import SMTP_PASSWORD, SMTP_USER, Mailbox, Receiver

T0 = datetime(2026, 3, 2, 15, 0, 5, tzinfo=UTC)
T1 = datetime(2026, 3, 2, 15, 4, 50, tzinfo=UTC)
ROUTING_KEY = "R0UT1NGKEY0123456789abcdef012345"  # 32 characters, as PagerDuty requires
FAST = RetryPolicy(attempts=3, base_seconds=0.01, max_seconds=0.02, max_retry_after_seconds=30.0)


def alert(severity: str = "critical", resolved: bool = False) -> Alert:
    return Alert(
        "provider_availability/alpaca",
        "provider_availability",
        severity,  # type: ignore[arg-type]
        "alpaca: 80.0 % of 10 requests succeeded over 300 s (below 95.0 %)",
        {"provider": "alpaca"},
        T0,
        T1,
        0.8,
        T1 if resolved else None,
    )


def note(action: str = "trigger", severity: str = "critical") -> Notification:
    return Notification(action, alert(severity, resolved=action == "resolve"), "gw-1")  # type: ignore[arg-type]


def count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_slack_blocks_exact(receiver: Receiver) -> None:
    sink = SlackWebhook(SlackSink(enabled=True), {"MARKETPIPE_SLACK_WEBHOOK_URL": receiver.url + "/services/T1/B2/s3"})
    await sink.send(note())
    await sink.send(note("resolve"))
    await sink.aclose()
    trig, res = receiver.requests
    assert trig.path == "/services/T1/B2/s3" and trig.headers["Content-Type"] == "application/json"
    assert trig.json == {
        "text": "[CRITICAL] provider_availability: alpaca: 80.0 % of 10 requests succeeded over 300 s (below 95.0 %)",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": ":red_circle: Critical: provider_availability"}},
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": "alpaca: 80.0 % of 10 requests succeeded over 300 s (below 95.0 %)"},
                "fields": [
                    {"type": "mrkdwn", "text": "*Provider*\nalpaca"},
                    {"type": "mrkdwn", "text": "*Severity*\ncritical"},
                    {"type": "mrkdwn", "text": "*Value*\n0.8"},
                ],
            },
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": "marketpipe on gw-1 · `provider_availability/alpaca` · first seen "
                        "2026-03-02T15:00:05+00:00 · last seen 2026-03-02T15:04:50+00:00",
                    }
                ],
            },
        ],
    }
    assert res.json["text"].startswith("[RESOLVED] provider_availability")
    assert res.json["blocks"][0]["text"]["text"] == ":white_check_mark: Resolved: provider_availability"
    assert res.json["blocks"][2]["elements"][0]["text"].endswith("resolved 2026-03-02T15:04:50+00:00")


def test_slack_limits_are_kept() -> None:
    a = alert()
    long = Alert(a.id, "r" * 300, a.severity, "s" * 5000, {f"l{i}": "v" * 3000 for i in range(12)}, T0, T1)
    doc = SlackWebhook.payload(Notification("trigger", long, "gw"))
    header, section, context = doc["blocks"]
    assert len(header["text"]["text"]) <= 150 and len(section["text"]["text"]) <= 3000
    assert len(section["fields"]) <= 10 and all(len(f["text"]) <= 2000 for f in section["fields"])
    assert len(doc["text"]) <= 3000 and len(context["elements"][0]["text"]) <= 3000


async def test_pagerduty_trigger_and_resolve_exact(receiver: Receiver) -> None:
    receiver.default = (202, {}, '{"status":"success","message":"Event processed","dedup_key":"x"}')
    cfg = PagerDutySink(enabled=True, url=receiver.url + "/v2/enqueue")
    sink = PagerDutyEvents(cfg, {"MARKETPIPE_PAGERDUTY_ROUTING_KEY": ROUTING_KEY})
    await sink.send(note())
    await sink.send(note("trigger", "warning"))
    await sink.send(note("resolve"))
    await sink.aclose()
    trig, warn, res = receiver.requests
    assert trig.path == "/v2/enqueue" and "authorization" not in {k.lower() for k in trig.headers}
    assert trig.json == {
        "routing_key": ROUTING_KEY,
        "event_action": "trigger",
        "dedup_key": "marketpipe/provider_availability/alpaca",
        "payload": {
            "summary": "[CRITICAL] provider_availability: alpaca: 80.0 % of 10 requests succeeded over 300 s "
            "(below 95.0 %)",
            "source": "gw-1",
            "severity": "critical",
            "timestamp": "2026-03-02T15:04:50+00:00",
            "component": "marketpipe",
            "group": "alpaca",
            "class": "provider_availability",
            "custom_details": {
                "alert_id": "provider_availability/alpaca",
                "labels": {"provider": "alpaca"},
                "value": 0.8,
                "first_seen": "2026-03-02T15:00:05+00:00",
                "test": False,
            },
        },
        "client": "marketpipe",
    }
    assert warn.json["payload"]["severity"] == "warning"
    assert res.json == {
        "routing_key": ROUTING_KEY,
        "dedup_key": "marketpipe/provider_availability/alpaca",
        "event_action": "resolve",
    }


async def test_webhook_json_and_hmac_signature(receiver: Receiver) -> None:
    env = {"MARKETPIPE_ALERT_WEBHOOK_URL": receiver.url + "/hook", "MARKETPIPE_ALERT_WEBHOOK_SECRET": "whsec-31f9"}
    sink = SignedWebhook(WebhookSink(enabled=True), env)
    await sink.send(note())
    await sink.send(note("resolve"))
    await sink.aclose()
    trig, res = receiver.requests
    expected_sig = "sha256=" + hmac.new(b"whsec-31f9", trig.body, hashlib.sha256).hexdigest()
    assert trig.headers["X-Marketpipe-Signature"] == expected_sig
    assert trig.json == {
        "version": "1",
        "alert": "provider_availability",
        "status": "firing",
        "severity": "critical",
        "dedup_key": "marketpipe/provider_availability/alpaca",
        "summary": "alpaca: 80.0 % of 10 requests succeeded over 300 s (below 95.0 %)",
        "labels": {"provider": "alpaca"},
        "annotations": {
            "alert_id": "provider_availability/alpaca",
            "value": 0.8,
            "source": "gw-1",
            "last_seen": "2026-03-02T15:04:50+00:00",
            "test": False,
        },
        "starts_at": "2026-03-02T15:00:05+00:00",
        "ends_at": None,
    }
    assert (res.json["status"], res.json["ends_at"]) == ("resolved", "2026-03-02T15:04:50+00:00")
    assert res.headers["X-Marketpipe-Signature"] == SignedWebhook.signature(b"whsec-31f9", res.body)


async def test_email_over_starttls_with_auth(smtp_server: Mailbox) -> None:
    cfg = EmailSink(
        enabled=True,
        host=smtp_server.host,
        port=smtp_server.port,
        ca_file=str(smtp_server.cert),
        sender="alerts@example.test",
        to=["ops@example.test", "oncall@example.test"],
    )
    env = {"MARKETPIPE_SMTP_USERNAME": SMTP_USER, "MARKETPIPE_SMTP_PASSWORD": SMTP_PASSWORD}
    sink = SmtpEmail(cfg, env)
    await sink.send(note())
    await sink.send(note("resolve"))
    assert smtp_server.logins == [SMTP_USER, SMTP_USER] and smtp_server.tls_seen == [True, True]
    assert smtp_server.envelopes[0] == ("alerts@example.test", ["ops@example.test", "oncall@example.test"])
    first, second = smtp_server.messages
    assert first["Subject"] == (
        "[marketpipe] [CRITICAL] provider_availability: alpaca: 80.0 % of 10 requests succeeded over 300 s "
        "(below 95.0 %)"
    )
    assert first["X-Marketpipe-Dedup-Key"] == "marketpipe/provider_availability/alpaca"
    body = first.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert "provider:   alpaca" in body and "first seen: 2026-03-02T15:00:05+00:00" in body
    assert second["Subject"].startswith("[marketpipe] [RESOLVED]")


async def test_email_wrong_password_is_refused_not_retried(smtp_server: Mailbox) -> None:
    cfg = EmailSink(enabled=True, host=smtp_server.host, port=smtp_server.port, ca_file=str(smtp_server.cert),
                    to=["ops@example.test"], retry=FAST)  # fmt: skip
    worker = SinkWorker(SmtpEmail(cfg, {"MARKETPIPE_SMTP_USERNAME": SMTP_USER, "MARKETPIPE_SMTP_PASSWORD": "wrong"}))
    with pytest.raises(AlertSinkFailed) as err:
        await worker.send_with_retries(note())
    assert err.value.code == "ALERT_SINK_FAILED" and "535" in err.value.message and "wrong" not in str(err.value)
    assert smtp_server.messages == []


async def test_email_without_tls_trust_fails_and_says_why(smtp_server: Mailbox) -> None:
    cfg = EmailSink(enabled=True, host=smtp_server.host, port=smtp_server.port, to=["ops@example.test"])
    sink = SmtpEmail(cfg, {"MARKETPIPE_SMTP_USERNAME": SMTP_USER, "MARKETPIPE_SMTP_PASSWORD": SMTP_PASSWORD})
    with pytest.raises(AlertSinkFailed) as err:  # the self-signed certificate is not trusted by default
        await sink.send(note())
    assert err.value.code == "ALERT_SINK_UNAVAILABLE" and smtp_server.messages == []


def test_an_enabled_sink_without_its_secret_names_the_variable() -> None:
    with pytest.raises(MissingCredentials) as err:
        build_sink("slack", SlackSink(enabled=True), {})
    assert err.value.details["env"] == "MARKETPIPE_SLACK_WEBHOOK_URL"
    with pytest.raises(MissingCredentials):
        build_sink("webhook", WebhookSink(enabled=True), {"MARKETPIPE_ALERT_WEBHOOK_URL": "http://127.0.0.1:9"})


# --- the worker --------------------------------------------------------------------------------------


class FakeTime:
    """A monotonic clock the worker's own sleeps advance (pacing and backoff without waiting)."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s
        await asyncio.sleep(0)


def webhook_worker(receiver: Receiver, ft: FakeTime | None = None, **cfg: object) -> SinkWorker:
    env = {"MARKETPIPE_ALERT_WEBHOOK_URL": receiver.url + "/hook", "MARKETPIPE_ALERT_WEBHOOK_SECRET": "k3y-k3y"}
    sink = SignedWebhook(WebhookSink(enabled=True, **{"retry": FAST, **cfg}), env)  # type: ignore[arg-type]
    if ft is None:
        return SinkWorker(sink)
    return SinkWorker(sink, clock=ft.clock, sleep=ft.sleep)


async def test_429_retry_after_is_honoured_then_delivered(receiver: Receiver) -> None:
    receiver.script = [(429, {"Retry-After": "7"}, "slow down"), (503, {}, "busy")]
    ft = FakeTime()
    w = webhook_worker(receiver, ft)
    sent = count("marketpipe_alert_notifications_total", sink="webhook", result="sent")
    assert await w.deliver(note())
    assert len(receiver.requests) == 3 and receiver.requests[0].body == receiver.requests[2].body
    assert 7.0 <= ft.sleeps[0] <= 7.06 and ft.sleeps[1] <= 0.02  # Retry-After, then full jitter
    assert count("marketpipe_alert_notifications_total", sink="webhook", result="sent") == sent + 1
    await w.sink.aclose()


async def test_400_is_not_retried_and_is_counted_failed(receiver: Receiver) -> None:
    receiver.default = (400, {}, "invalid_payload")
    w = webhook_worker(receiver, FakeTime())
    failed = count("marketpipe_alert_notifications_total", sink="webhook", result="failed")
    assert not await w.deliver(note())
    assert len(receiver.requests) == 1 and w.failed == 1 and "HTTP 400 invalid_payload" in (w.last_error or "")
    assert count("marketpipe_alert_notifications_total", sink="webhook", result="failed") == failed + 1
    await w.sink.aclose()


async def test_routing_by_severity_and_dedup(receiver: Receiver) -> None:
    w = webhook_worker(receiver, FakeTime(), min_severity="critical")
    assert not w.submit(note("trigger", "warning"))  # below this sink's level
    assert not w.submit(note("resolve"))  # never triggered here: nothing to resolve
    assert w.submit(note("trigger", "critical"))
    assert not w.submit(note("trigger", "critical"))  # the same again: a duplicate
    assert w.submit(note("trigger", "warning"))  # fell below the sink's level: resolved here
    assert [n.action for n in w.queue] == ["trigger", "resolve"]
    assert not w.submit(note("resolve"))  # already resolved here
    assert w.filtered == 4
    await w.sink.aclose()


async def test_pacing_holds_the_rate_per_minute(receiver: Receiver) -> None:
    ft = FakeTime()
    w = webhook_worker(receiver, ft, rate_per_minute=30)  # one every 2 s
    for sev in ("critical", "warning", "info"):
        w.submit(Notification("trigger", alert(sev), "gw"))
    task = asyncio.create_task(w.run())
    await receiver.wait_for(3)
    task.cancel()
    assert ft.sleeps == [2.0, 2.0] and [r.json["severity"] for r in receiver.requests] == [
        "critical",
        "warning",
        "info",
    ]
    await w.sink.aclose()


async def test_a_full_queue_drops_and_counts(receiver: Receiver) -> None:
    w = webhook_worker(receiver, queue=2)
    before = count("marketpipe_alert_notifications_dropped_total", sink="webhook")
    alerts = [Alert(f"r/{i}", "r", "critical", "s", {}, T0, T0) for i in range(3)]
    accepted = [w.submit(Notification("trigger", a, "gw")) for a in alerts]
    assert accepted == [True, True, False] and w.dropped == 1 and len(w.queue) == 2
    assert count("marketpipe_alert_notifications_dropped_total", sink="webhook") == before + 1
    assert REGISTRY.get_sample_value("marketpipe_backlog_items", {"queue": "alerts_webhook"}) == 2
    await w.sink.aclose()


async def test_a_hanging_sink_never_blocks_submit_and_times_out(receiver: Receiver) -> None:
    receiver.hang_seconds = 1.0
    w = webhook_worker(receiver, timeout=0.2, retry=RetryPolicy(attempts=1))
    task = asyncio.create_task(w.run())
    started = time.perf_counter()
    for i in range(50):
        w.submit(Notification("trigger", Alert(f"r/{i}", "r", "critical", "s", {}, T0, T0), "gw"))
    assert time.perf_counter() - started < 0.05  # the engine's side never waits for the receiver
    await receiver.wait_for(1)
    await asyncio.sleep(0.35)
    assert w.failed >= 1 and "no answer within 0.2 s" in (w.last_error or "")
    task.cancel()
    await w.sink.aclose()


async def test_secrets_stay_out_of_errors_logs_and_metrics(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_path = "/services/T0/B0/xoxb-s3cr3t-path"
    sink = SlackWebhook(
        SlackSink(enabled=True, retry=FAST), {"MARKETPIPE_SLACK_WEBHOOK_URL": "http://127.0.0.1:1" + secret_path}
    )
    w = SinkWorker(sink, sleep=FakeTime().sleep)
    assert not await w.deliver(note())  # nothing listens on port 1
    assert w.last_error is not None and "connection failed" in w.last_error and "s3cr3t" not in w.last_error
    from prometheus_client import generate_latest

    assert b"s3cr3t" not in generate_latest(REGISTRY)
    assert "s3cr3t" not in capsys.readouterr().err
    await sink.aclose()


async def test_httpx_request_logs_mask_the_webhook_url(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    """httpx logs ``HTTP Request: POST <url>`` at INFO; should anyone turn that on, the URL is masked."""
    import logging

    url = receiver.url + "/services/T9/B9/zz-h00k-s3cret"
    sink = SlackWebhook(SlackSink(enabled=True), {"MARKETPIPE_SLACK_WEBHOOK_URL": url})
    with caplog.at_level(logging.INFO, logger="httpx"):
        await sink.send(note())
    await sink.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert lines and all("zz-h00k-s3cret" not in line for line in lines), lines
    assert any("***" in line for line in lines)
