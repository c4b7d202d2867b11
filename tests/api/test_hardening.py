"""Gateway hardening (issue 12): logs without locals or secrets, no 500s for bad input or an empty
store, a per-request deadline, bounded bodies and headers, throttled key guessing."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from marketpipe.api.app import create_app
from marketpipe.core.metrics import REGISTRY
from marketpipe.service.gateway import Gateway
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer

from .conftest import ENV, gateway_config, serving

pytestmark = pytest.mark.timeout(60)
ADMIN_TOKEN = "adm-7f3c9e1b2d4a6f80"
CLIENT_SECRET = "cks-5b8e2a7d9c1f4e36"
VENDOR_SECRET = "vsk-2c4e6a8b0d1f3e57"
SECRET_ENV = {
    "ALPACA_API_KEY": "SIMKEY",
    "ALPACA_SECRET_KEY": "SIMSECRET",
    "MARKETPIPE_ADMIN_TOKEN": ADMIN_TOKEN,
    "MARKETPIPE_API_KEYS": f"trader:{CLIENT_SECRET}",
    "POLYGON_API_KEY": VENDOR_SECRET,
}
CLIENT = {"Authorization": f"Bearer {CLIENT_SECRET}"}
DAY = {"start": "2024-06-03", "end": "2024-06-04", "timeframe": "1Min"}


def asgi(app: Any, host: str = "127.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(host, 40000)), base_url="http://gw")


async def close(app: Any) -> None:
    await app.state.mp.cache.aclose()
    await app.state.mp.data.aclose()


# --- 6: logs ------------------------------------------------------------------------------------------------


def test_an_unhandled_error_is_logged_once_without_locals_or_secrets(
    vendor: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(self: Gateway, kind: str, symbols: Any, *, feed: str | None = None) -> Any:
        admin_token = ADMIN_TOKEN  # a local a rich traceback with show_locals would print
        header = {b"authorization": f"Bearer {CLIENT_SECRET}".encode()}
        raise RuntimeError(f"boom with {admin_token} and {header!r} and {VENDOR_SECRET}")

    monkeypatch.setattr(Gateway, "latest", broken)
    app = create_app(gateway_config(vendor.url, tmp_path / "log.duckdb"), env=SECRET_ENV)
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        r = c.get("/v1/quotes/AAPL/latest", headers=CLIENT)
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["code"] == "INTERNAL" and err["request_id"] == r.headers["x-request-id"]
        assert c.get("/health").status_code == 200  # the same keep-alive connection is still good
    captured = capsys.readouterr()
    text = captured.err + captured.out
    for secret in (ADMIN_TOKEN, CLIENT_SECRET, VENDOR_SECRET, "SIMSECRET"):
        assert secret not in text, f"a secret value reached the log: {secret}"
    assert "locals" not in text and "admin_token = " not in text and "╭" not in text
    assert sum("unhandled_error" in line for line in text.splitlines()) == 1, text
    assert "Exception in ASGI application" not in text  # the server did not log it a second time
    assert err["request_id"] in text


# --- 7: no 500s ------------------------------------------------------------------------------------------


def test_an_unrepresentable_end_is_a_400_naming_end_and_the_connection_lives_on(
    vendor: SimServer, tmp_path: Path
) -> None:
    # Needs core.timeutil.parse_time to raise InvalidRange for years it cannot represent (cli-hard's part
    # of issue 12): until that is merged, the gateway answers a clean JSON 500, never a reset.
    app = create_app(gateway_config(vendor.url, tmp_path / "far.duckdb"), env=ENV)
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        r = c.get("/v1/bars/AAPL", params={"start": "2024-03-01", "end": "9999-12-31"})
        assert r.headers["content-type"] == "application/json"
        assert c.get("/health").status_code == 200  # no reset on the same connection
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "INVALID_RANGE" and err["details"]["parameter"] == "end"


async def test_quality_of_a_symbol_the_store_does_not_hold(vendor: SimServer, tmp_path: Path) -> None:
    """The answer ``marketpipe quality`` gives on an empty store (the same service): every expected bar
    a gap, completeness 0 — not a ShapeError once more than 500 ranges are missing."""
    app = create_app(gateway_config(vendor.url, tmp_path / "empty.duckdb"), env=ENV)
    async with asgi(app) as c:
        r = await c.get("/v1/quality/AAPL", params={"start": "2024-06-03"})
        assert r.status_code == 200, r.text
        doc = r.json()
        s = doc["summary"]
        assert s["present"] == 0 and s["expected"] > 100_000 and s["gap"] == s["expected"]
        assert s["completeness"] == 0.0 and s["score"] == 0.0
        assert 0 < len(doc["missing"]) <= 500 and doc["missing"][0]["start"].startswith("2024-06-03T13:30:00")
        (cli,) = await app.state.mp.data.quality(["AAPL"], "2024-06-03", None, timeframe="1Min")
        assert {k: cli.summary[k] for k in ("expected", "present", "gap", "score")} == {
            k: s[k] for k in ("expected", "present", "gap", "score")
        }
    await close(app)


# --- 10: the per-request deadline ------------------------------------------------------------------------------


def deadline_app(vendor: SimServer, store: Path, **cache: float) -> Any:
    cfg = gateway_config(vendor.url, store, server={"request_timeout": 1.0}, cache=cache)
    alpaca = cfg.providers["alpaca"]
    alpaca.read_timeout = 0.5  # ten attempts of 0.5 s each: well past the bound without it
    alpaca.retry.attempts = 10
    return create_app(cfg, env=ENV)


async def test_a_hanging_vendor_gets_a_503_within_the_deadline_and_nothing_left_running(
    vendor: SimServer, tmp_path: Path
) -> None:
    app = deadline_app(vendor, tmp_path / "hang.duckdb")
    async with asgi(app) as c:
        assert (await c.get("/health")).status_code == 200
        before = {t for t in asyncio.all_tasks() if not t.done()}
        vendor.faults.set([FaultRule(kind="hang", hang_seconds=30)])
        for url, params in (
            ("/v1/quotes/AAPL/latest", {}),
            ("/v1/bars/MSFT", DAY),
            ("/v2/stocks/AAPL/quotes/latest", {}),
            ("/v2/stocks/bars", {"symbols": "MSFT", "start": "2024-06-05", "end": "2024-06-06", "timeframe": "1Min"}),
        ):
            t0 = time.monotonic()
            r = await c.get(url, params=params)
            took = time.monotonic() - t0
            assert took < 2.5, (url, took)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, (url, r.text)
            if url.startswith("/v1/"):
                assert r.json()["error"]["code"] == "DEADLINE_EXCEEDED"
            else:
                assert "message" in r.json()  # the vendor's error shape
        # the upstream work ended with the request: no single-flight load, no task left behind
        await asyncio.sleep(0.1)
        assert app.state.mp.cache._inflight == {}
        left = {t for t in asyncio.all_tasks() if not t.done()} - before - {asyncio.current_task()}
        assert not left, left
    await close(app)


async def test_a_hanging_vendor_after_expiry_gets_the_cached_copy_labelled_stale(
    vendor: SimServer, tmp_path: Path
) -> None:
    app = deadline_app(vendor, tmp_path / "stale.duckdb", latest_open_ttl=0.2, latest_closed_ttl=0.2)
    async with asgi(app) as c:
        ok = await c.get("/v1/quotes/AAPL/latest")
        assert ok.status_code == 200 and "x-marketpipe-stale" not in ok.headers
        ok2 = await c.get("/v2/stocks/AAPL/quotes/latest")
        assert ok2.status_code == 200
        await asyncio.sleep(0.3)  # past the TTL
        vendor.faults.set([FaultRule(kind="hang", hang_seconds=30)])
        t0 = time.monotonic()
        stale = await c.get("/v1/quotes/AAPL/latest")
        assert time.monotonic() - t0 < 2.5
        assert stale.status_code == 200 and stale.headers["x-marketpipe-stale"] == "true"
        assert stale.json()["stale"] is True and stale.json()["bid"] == ok.json()["bid"]
        t0 = time.monotonic()
        stale2 = await c.get("/v2/stocks/AAPL/quotes/latest")
        assert time.monotonic() - t0 < 2.5
        assert stale2.status_code == 200 and stale2.headers["x-marketpipe-stale"] == "true"
        assert stale2.json() == ok2.json()  # the vendor's shape, staleness told by header only
    await close(app)


# --- 11: limits ----------------------------------------------------------------------------------------------


async def test_admin_bodies_are_bounded_and_never_echoed(vendor: SimServer, tmp_path: Path) -> None:
    app = create_app(gateway_config(vendor.url, tmp_path / "body.duckdb"), env=SECRET_ENV)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with asgi(app) as c:
        big = b'{"symbol": "' + b"Z" * (10 * 1024 * 1024) + b'"}'
        r = await c.post("/admin/cache/invalidate", content=big, headers=admin)
        assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
        assert len(r.content) < 500 and b"ZZZ" not in r.content

        async def chunks() -> Any:  # no Content-Length: the bound holds while reading
            for _ in range(200):
                yield b"Z" * 1024

        r = await c.post("/admin/cache/invalidate", content=chunks(), headers=admin)
        assert r.status_code == 413 and b"ZZZ" not in r.content
        r = await c.post("/admin/failover", content=b"Q" * 60_000, headers=admin)  # within the bound, not JSON
        assert r.status_code == 400 and len(r.content) < 500 and b"QQQ" not in r.content
        r = await c.post("/admin/failover", content=b'{"provider": "' + b"P" * 50_000 + b'"}', headers=admin)
        assert r.status_code == 400 and len(r.json()["error"]["message"]) <= 300 and len(r.content) < 1000
        r = await c.get("/v1/bars/AAPL", params={**DAY, "source": "S" * 5000}, headers=CLIENT)
        assert r.status_code == 400 and len(r.content) < 1000
        assert (await c.post("/admin/reconnect", content=b"{}", headers=admin)).status_code == 200
    await close(app)


def raw_request(port: int, extra_header: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n" + extra_header + b"\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_oversized_headers_are_refused_over_a_real_socket(vendor: SimServer, tmp_path: Path) -> None:
    app = create_app(gateway_config(vendor.url, tmp_path / "hdr.duckdb"), env=ENV)
    with serving(app) as url:  # uvicorn with its default parser, as `marketpipe serve` runs it
        port = int(url.rsplit(":", 1)[1])
        assert raw_request(port, b"X-Small: 1").startswith(b"HTTP/1.1 200")
        for size in (20 * 1024, 1024 * 1024):
            out = raw_request(port, b"X-Big: " + b"h" * size)
            assert out.startswith(b"HTTP/1.1 431"), out[:200]
            assert b"HEADERS_TOO_LARGE" in out and b"hhhh" not in out


async def test_failed_key_attempts_are_throttled_per_address(vendor: SimServer, tmp_path: Path) -> None:
    app = create_app(gateway_config(vendor.url, tmp_path / "thr.duckdb"), env=SECRET_ENV)

    def refused() -> float:
        return REGISTRY.get_sample_value("marketpipe_client_auth_throttled_total", {"result": "refused"}) or 0.0

    before = refused()
    async with asgi(app, "10.0.0.66") as guesser, asgi(app, "10.0.0.7") as other:
        for i in range(10):
            r = await guesser.get("/v1/providers", headers={"Authorization": f"Bearer guess-{i}"})
            assert r.status_code == 403, r.text
        r = await guesser.get("/v1/providers", headers={"Authorization": "Bearer guess-10"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "AUTH_THROTTLED"
        # refused unchecked, so going on guessing cannot tell a right key
        assert (await guesser.get("/v1/providers", headers=CLIENT)).status_code == 429
        v2 = await guesser.get(
            "/v2/stocks/AAPL/quotes/latest",
            headers={"APCA-API-KEY-ID": "trader", "APCA-API-SECRET-KEY": CLIENT_SECRET},
        )
        assert v2.status_code == 429 and "retry-after" in v2.headers
        admin = await guesser.post("/admin/reconnect", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert admin.status_code == 429 and admin.json()["error"]["code"] == "AUTH_THROTTLED"
        assert refused() - before == 4  # the 11th guess, the right key, v2 and admin from that address
        # another address is not affected
        assert (await other.get("/v1/providers", headers=CLIENT)).status_code == 200
        assert (
            await other.post("/admin/reconnect", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        ).status_code == 200
    await close(app)
