"""Operating (issue 19): readiness fails while the configured bus is unreachable and comes back when NATS
does; liveness stays up throughout."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from marketpipe.api.app import create_app
from marketpipe.sim.server import SimServer
from tests.api.conftest import gateway_config, serving
from tests.conftest import SIM_ENV
from tests.nats_server import NatsServer


def ready_until(url: str, status: int, within: float = 20.0) -> httpx.Response:
    began = time.monotonic()
    while True:
        r = httpx.get(url + "/health/ready", timeout=5)
        if r.status_code == status or time.monotonic() - began > within:
            return r
        time.sleep(0.2)


def test_readiness_follows_the_bus_connection(sim: SimServer, nats: NatsServer, tmp_path: Path) -> None:
    cfg = gateway_config(sim.url, tmp_path / "bus.duckdb", bus={"url": nats.url}, stream={"enabled": False})
    app = create_app(cfg, env=SIM_ENV)
    with serving(app) as url:
        r = ready_until(url, 200)
        assert r.status_code == 200 and r.json()["checks"]["bus"] == "ok"
        nats.stop()
        down = ready_until(url, 503)
        assert down.status_code == 503 and down.json()["checks"]["bus"].startswith("down")
        assert httpx.get(url + "/health", timeout=5).status_code == 200  # alive all along
        nats.start()
        back = ready_until(url, 200, within=30.0)
        assert back.status_code == 200 and back.json()["checks"]["bus"] == "ok"
