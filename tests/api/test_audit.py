"""Operating (issue 19): every admin request — answered or refused — is one row of the store's audit log
(who, what, when, how it ended), readable at ``/admin/audit``; readiness fails while a configured Redis
does not answer, liveness does not."""

from __future__ import annotations

import socket
from pathlib import Path

import polars as pl
import pytest

from marketpipe.api.app import create_app
from marketpipe.core.errors import StoreError
from marketpipe.core.metrics import AUDIT_WRITE_FAILURES
from marketpipe.sim.server import SimServer
from marketpipe.store.duckdb import DuckDBStore

from .conftest import gateway_config
from .test_hardening import ADMIN_TOKEN, SECRET_ENV, asgi, close

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def test_every_admin_request_is_audited_in_the_store(vendor: SimServer, tmp_path: Path) -> None:
    store = tmp_path / "audit.duckdb"
    app = create_app(gateway_config(vendor.url, store), env=SECRET_ENV)
    async with asgi(app) as c:
        assert (await c.post("/admin/failover", json={"provider": "alpaca"})).status_code == 401
        assert (await c.post("/admin/reconnect", headers={"Authorization": "Bearer wrong"})).status_code == 403
        r = await c.post("/admin/failover", json={"provider": "alpaca"}, headers=ADMIN)
        assert r.status_code == 200
        bad = await c.post("/admin/cache/invalidate", json={"kind": "nonsense"}, headers=ADMIN)
        assert bad.status_code == 400
        doc = (await c.get("/admin/audit", params={"limit": "10"}, headers=ADMIN)).json()
        assert (await c.get("/admin/audit", params={"limit": "0"}, headers=ADMIN)).status_code == 400
    await close(app)
    rows = doc["actions"]  # newest first; the audit read itself is not in its own answer yet
    got = [(a["actor"], a["action"], a["status"], a["code"]) for a in reversed(rows)]
    assert got == [
        ("anonymous", "POST /admin/failover", 401, "UNAUTHENTICATED"),
        ("anonymous", "POST /admin/reconnect", 403, "FORBIDDEN"),
        ("admin", "POST /admin/failover", 200, None),
        ("admin", "POST /admin/cache/invalidate", 400, "INVALID_ARGUMENT"),
    ]
    assert rows[1]["params"] == '{"provider":"alpaca"}' and all(a["address"] == "127.0.0.1" for a in rows)
    assert all(a["request_id"] for a in rows) and ADMIN_TOKEN not in str(rows)
    with DuckDBStore(store, read_only=True) as st:  # kept in the store, with both audit reads now
        held = st.admin_actions()
    assert held.height == 6 and held["occurred_at"].dtype == pl.Datetime("us", "UTC")
    assert held["action"].to_list()[:2] == ["GET /admin/audit", "GET /admin/audit"]


async def test_a_store_that_cannot_take_the_audit_row_does_not_change_the_answer(
    vendor: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(gateway_config(vendor.url, tmp_path / "full.duckdb"), env=SECRET_ENV)

    def refuse(row: dict[str, object]) -> None:
        raise StoreError("store write failed, nothing written: disk full")

    before = AUDIT_WRITE_FAILURES._value.get()
    async with asgi(app) as c:
        monkeypatch.setattr(app.state.mp.data.store, "log_admin_action", refuse)
        assert (await c.post("/admin/reconnect", headers=ADMIN)).status_code == 200
    await close(app)
    assert AUDIT_WRITE_FAILURES._value.get() == before + 1


async def test_readiness_fails_while_the_configured_redis_is_unreachable(vendor: SimServer, tmp_path: Path) -> None:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        cfg = gateway_config(vendor.url, tmp_path / "r.duckdb", cache={"redis_url": f"redis://127.0.0.1:{dead}/0"})
        app = create_app(cfg, env=SECRET_ENV)
        async with asgi(app) as c:
            live, ready = await c.get("/health"), await c.get("/health/ready")
        await close(app)
    assert live.status_code == 200
    assert ready.status_code == 503 and ready.json()["checks"]["cache"]["redis"].startswith("down")
    assert ready.json()["checks"]["store"] == "ok"
