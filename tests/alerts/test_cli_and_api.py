"""``marketpipe alerts test --sink NAME`` as a subprocess against a real receiver; its errors; the
secrets in ``config show``; ``GET /v1/alerts`` and the dashboard's active alerts."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import sys
from pathlib import Path

import httpx
from fastapi import FastAPI

from marketpipe.api.app import create_app
from tests.alerts.conftest import Receiver
from tests.api.conftest import ENV, gateway_config
from tests.cli.test_cli import run
from tests.cli.test_cli_errors import assert_error


async def run_async(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_", "MARKETPIPE_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "marketpipe.cli.main", *args, env={**base, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_alerts_test_sends_a_signed_trigger_and_resolve(receiver: Receiver, tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[alerts]\nsource = "ops-box"\n')  # the sink need not be enabled to be tested
    env = {"MARKETPIPE_ALERT_WEBHOOK_URL": receiver.url + "/in", "MARKETPIPE_ALERT_WEBHOOK_SECRET": "cli-secret-77"}
    code, out, err = await run_async("alerts", "test", "--sink", "webhook", "--config", str(cfg), env=env)
    assert code == 0, err
    assert "test alert sent to webhook: trigger + resolve" in out
    trig, res = receiver.requests
    assert (trig.json["status"], trig.json["dedup_key"], trig.json["annotations"]["test"]) == (
        "firing",
        "marketpipe/test",
        True,
    )
    assert trig.json["annotations"]["source"] == "ops-box" and res.json["status"] == "resolved"
    sig = "sha256=" + hmac.new(b"cli-secret-77", trig.body, hashlib.sha256).hexdigest()
    assert trig.headers["X-Marketpipe-Signature"] == sig
    assert "cli-secret-77" not in out + err and receiver.url not in out + err


async def test_alerts_test_reports_a_refusing_receiver_in_one_line(receiver: Receiver) -> None:
    receiver.default = (403, {}, "action_prohibited")
    env = {"MARKETPIPE_SLACK_WEBHOOK_URL": receiver.url + "/services/T/B/tok3n-abc"}
    code, _out, err = await run_async("alerts", "test", "--sink", "slack", "--no-resolve", env=env)
    assert code == 1 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error[")]
    assert line == "error[ALERT_SINK_FAILED]: alert sink slack: HTTP 403 action_prohibited"
    assert len(receiver.requests) == 1 and "tok3n" not in err


def test_alerts_test_errors_name_the_sink_or_the_variable() -> None:
    r = run("alerts", "test", "--sink", "sms")
    assert_error(r, "INVALID_ARGUMENT", 2, "sink must be one of slack, pagerduty, email, webhook")
    r = run("alerts", "test", "--sink", "pagerduty", env={"MARKETPIPE_PAGERDUTY_ROUTING_KEY": ""})
    assert_error(r, "MISSING_CREDENTIALS", 1, "$MARKETPIPE_PAGERDUTY_ROUTING_KEY")


def test_config_show_masks_the_sinks_secrets(tmp_path: Path) -> None:
    hook = "https://hooks.slack.com/services/T000/B000/verysecretpath"
    r = run("config", "show", env={"MARKETPIPE_SLACK_WEBHOOK_URL": hook, "MARKETPIPE_SMTP_PASSWORD": "pw-123456"})
    assert r.returncode == 0, r.stderr
    assert "verysecretpath" not in r.stdout and "pw-123456" not in r.stdout
    assert '"MARKETPIPE_SLACK_WEBHOOK_URL": "ht…****"' in r.stdout
    assert '"MARKETPIPE_ALERT_WEBHOOK_SECRET": "(unset)"' in r.stdout


def _app(tmp_path: Path, **alerts: object) -> FastAPI:
    cfg = gateway_config("http://127.0.0.1:9", tmp_path / "gw.duckdb", stream={"enabled": False}, alerts=alerts)
    return create_app(cfg, env=ENV)


async def test_v1_alerts_shows_active_and_resolved(tmp_path: Path) -> None:
    from marketpipe.core.metrics import QUALITY_SCORE

    app = _app(tmp_path, rules={"quality_score": {"threshold": 0.5, "critical_threshold": 0.2}})
    engine = app.state.mp.alerts
    QUALITY_SCORE.labels("ZZALRT", "1Day").set(0.1)  # a symbol no other test uses
    engine.evaluate()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        doc = (await c.get("/v1/alerts")).json()
        (mine,) = [a for a in doc["active"] if a["id"] == "quality_score/ZZALRT/1Day"]
        assert (mine["severity"], mine["status"], mine["labels"]) == (
            "critical",
            "firing",
            {"symbol": "ZZALRT", "timeframe": "1Day"},
        )
        assert doc["enabled"] is True and isinstance(doc["events"], list) and doc["sinks"] == []
        QUALITY_SCORE.labels("ZZALRT", "1Day").set(0.99)
        engine.evaluate()
        doc = (await c.get("/v1/alerts?limit=5")).json()
        assert "quality_score/ZZALRT/1Day" not in [a["id"] for a in doc["active"]]
        assert doc["resolved"][0]["id"] == "quality_score/ZZALRT/1Day" and doc["resolved"][0]["resolved_at"]
        assert (await c.get("/v1/alerts?limit=0")).status_code == 400
    QUALITY_SCORE.remove("ZZALRT", "1Day")


async def test_v1_alerts_with_the_engine_off(tmp_path: Path) -> None:
    app = _app(tmp_path, enabled=False)
    assert app.state.mp.alerts is None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        doc = (await c.get("/v1/alerts")).json()
    assert (doc["enabled"], doc["active"], doc["resolved"]) == (False, [], [])


def test_an_enabled_sink_without_its_secret_stops_the_gateway_at_build(tmp_path: Path) -> None:
    import pytest

    from marketpipe.core.errors import MissingCredentials

    with pytest.raises(MissingCredentials) as err:
        _app(tmp_path, sinks={"webhook": {"enabled": True}})
    assert err.value.details["env"] == "MARKETPIPE_ALERT_WEBHOOK_URL"
