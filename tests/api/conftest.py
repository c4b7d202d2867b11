"""Gateway fixtures: the app pointed at the vendor simulator, in-process (httpx ASGI transport) or
served by uvicorn on a free port (for clients such as alpaca-py that need a real socket)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from marketpipe.api.app import create_app
from marketpipe.core.config import Config, config_from_dict
from marketpipe.sim.server import SimServer

ENV = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET", "MARKETPIPE_ADMIN_TOKEN": "admintoken"}
FAST = {
    "rate_limit_per_min": 100_000,
    "connect_timeout": 2.0,
    "read_timeout": 5.0,
    "retry": {"attempts": 2, "base_seconds": 0.01, "max_seconds": 0.02},
    "circuit": {"failure_threshold": 50, "recovery_seconds": 0.5},
}


def gateway_config(sim_url: str, store: Path, **extra: Any) -> Config:
    cfg = config_from_dict(
        {
            "providers": {
                "alpaca": {"base_url": sim_url, "plan": "unlimited", **FAST},
                "polygon": {"enabled": False},
            },
            **extra,
        }
    )
    cfg.store.path = str(store)
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(url + "/health", timeout=0.5)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start") from None
            time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def vendor() -> Iterator[SimServer]:
    with SimServer(vendor="alpaca") as s:
        yield s


@pytest.fixture(autouse=True)
def _clear_vendor_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "vendor" in request.fixturenames:
        request.getfixturevalue("vendor").faults.clear()


@pytest.fixture
def app(vendor: SimServer, tmp_path: Path) -> FastAPI:
    return create_app(gateway_config(vendor.url, tmp_path / "gw.duckdb"), env=ENV)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
        yield c
    st = app.state.mp
    await st.cache.aclose()
    await st.data.aclose()
