"""Done-when of issue 19: a provider outage injected into the simulator, behind a real gateway (uvicorn,
lifespan on, so the engine runs as in ``marketpipe serve``), raises the availability alert at all four
local receivers — Slack-, PagerDuty-, email- and webhook-shaped — within the rule's window, and a
resolve for each once the outage is over; ``GET /v1/alerts`` shows it active, then resolved."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from marketpipe.api.app import create_app
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from tests.alerts.conftest import SMTP_PASSWORD, SMTP_USER, Mailbox, Received, Receiver
from tests.api.conftest import ENV, gateway_config, serving

ID = "provider_availability/alpaca"
KEY = "0123456789abcdef0123456789abcdef"


def _ours(reqs: list[Received]) -> list[dict[str, Any]]:
    """The requests about this test's alert (other tests' metrics share the process registry)."""
    docs = [r.json for r in reqs]
    return [
        d
        for d in docs
        if ID in str(d.get("dedup_key", "")) or ID in str(d.get("blocks", "")) or ID in str(d.get("annotations", ""))
    ]


async def _until(pred: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_an_injected_outage_alerts_every_sink_and_resolves(
    tmp_path: Path, receiver: Receiver, smtp_server: Mailbox
) -> None:
    window = 3.0
    receiver.default = (200, {}, "ok")
    with SimServer(vendor="alpaca") as vendor:
        cfg = gateway_config(
            vendor.url,
            tmp_path / "gw.duckdb",
            stream={"enabled": False},
            alerts={
                "evaluate_seconds": 0.2,
                "source": "gw-test",
                "rules": {"provider_availability": {"window_seconds": window, "min_count": 3}},
                "sinks": {
                    "slack": {"enabled": True, "rate_per_minute": 6000},
                    "pagerduty": {"enabled": True, "url": receiver.url + "/v2/enqueue", "rate_per_minute": 6000},
                    "webhook": {"enabled": True, "rate_per_minute": 6000},
                    "email": {
                        "enabled": True,
                        "host": smtp_server.host,
                        "port": smtp_server.port,
                        "ca_file": str(smtp_server.cert),
                        "to": ["ops@example.test"],
                        "rate_per_minute": 6000,
                    },
                },
            },
        )
        env = {
            **ENV,
            "MARKETPIPE_SLACK_WEBHOOK_URL": receiver.url + "/services/T/B/slack",
            "MARKETPIPE_PAGERDUTY_ROUTING_KEY": KEY,
            "MARKETPIPE_ALERT_WEBHOOK_URL": receiver.url + "/hook",
            "MARKETPIPE_ALERT_WEBHOOK_SECRET": "whsec-outage",
            "MARKETPIPE_SMTP_USERNAME": SMTP_USER,
            "MARKETPIPE_SMTP_PASSWORD": SMTP_PASSWORD,
        }
        app = create_app(cfg, env=env)
        with serving(app) as gw:
            async with httpx.AsyncClient(base_url=gw, timeout=10) as http:
                await asyncio.sleep(0.5)  # the engine's first samples: the baseline
                vendor.faults.set([FaultRule(kind="http_500")])
                outage = time.monotonic()
                for sym in ("AAPL", "MSFT", "SPY"):
                    assert (await http.get(f"/v1/quotes/{sym}/latest")).status_code == 503

                def by_path(path: str) -> list[dict[str, Any]]:
                    return _ours([r for r in receiver.requests if r.path == path])

                def mails(kind: str) -> list[Any]:
                    return [
                        m
                        for m in smtp_server.messages
                        if m["X-Marketpipe-Dedup-Key"] == "marketpipe/" + ID and kind in m["Subject"]
                    ]

                await _until(
                    lambda: (
                        all(by_path(p) for p in ("/services/T/B/slack", "/v2/enqueue", "/hook")) and mails("[CRITICAL]")
                    ),
                    window,
                    "the trigger at every sink",
                )
                assert time.monotonic() - outage < window  # within the rule's window
                (slack,) = by_path("/services/T/B/slack")
                assert slack["blocks"][0]["text"]["text"] == ":red_circle: Critical: provider_availability"
                (pd,) = by_path("/v2/enqueue")
                assert (pd["event_action"], pd["dedup_key"], pd["routing_key"]) == ("trigger", "marketpipe/" + ID, KEY)
                assert (pd["payload"]["severity"], pd["payload"]["source"]) == ("critical", "gw-test")
                (hook,) = by_path("/hook")
                assert (hook["status"], hook["labels"]) == ("firing", {"provider": "alpaca"})
                doc = (await http.get("/v1/alerts")).json()
                assert [a["id"] for a in doc["active"] if a["id"] == ID] == [ID]
                assert {s["sink"] for s in doc["sinks"]} == {"slack", "pagerduty", "email", "webhook"}

                vendor.faults.clear()  # the outage is over: requests succeed, the failures age out
                for sym in ("AAPL", "MSFT", "SPY", "QQQ"):
                    assert (await http.get(f"/v1/quotes/{sym}/latest")).status_code == 200
                await _until(
                    lambda: len(by_path("/v2/enqueue")) == 2 and len(by_path("/hook")) == 2 and mails("[RESOLVED]")
                    and len(by_path("/services/T/B/slack")) == 2,
                    window + 3,
                    "the resolve at every sink",
                )  # fmt: skip
                assert by_path("/v2/enqueue")[1] == {
                    "routing_key": KEY,
                    "dedup_key": "marketpipe/" + ID,
                    "event_action": "resolve",
                }
                assert by_path("/hook")[1]["status"] == "resolved" and by_path("/hook")[1]["ends_at"]
                assert by_path("/services/T/B/slack")[1]["text"].startswith("[RESOLVED]")
                doc = (await http.get("/v1/alerts")).json()
                assert ID not in [a["id"] for a in doc["active"]]
                assert [a["status"] for a in doc["resolved"] if a["id"] == ID][:1] == ["resolved"]
                metrics = (await http.get("/metrics")).text
                assert 'marketpipe_alert_notifications_total{result="sent",sink="pagerduty"}' in metrics
                for secret in (KEY, "whsec-outage", SMTP_PASSWORD, "/services/T/B/slack"):
                    assert secret not in metrics
