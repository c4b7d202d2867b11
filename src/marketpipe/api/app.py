"""The gateway app: ``create_app()`` for tests and ``marketpipe serve``.

This module only wires the rooms together: the state (:mod:`~marketpipe.api.state`), cached
answering and its URL fast path (:mod:`~marketpipe.api.answer`), REST v1 (:mod:`~marketpipe.api.v1`),
the Alpaca-compatible REST and stream routes (:mod:`~marketpipe.api.alpaca`,
:mod:`~marketpipe.api.crypto`, :mod:`~marketpipe.api.alpaca_stream`), the live routes
(:mod:`~marketpipe.api.live`), operations and admin (:mod:`~marketpipe.api.ops`), the dashboard and
the offline API docs (:mod:`~marketpipe.api.docs`); errors and the middleware stack around them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from marketpipe import __version__
from marketpipe.api import errors
from marketpipe.api.actions import actions_router
from marketpipe.api.alerts import alerts_router
from marketpipe.api.alpaca import router as alpaca_router
from marketpipe.api.alpaca_stream import alpaca_stream_router
from marketpipe.api.answer import HitPath
from marketpipe.api.crypto import crypto_router
from marketpipe.api.crypto_stream import crypto_stream_router
from marketpipe.api.dashboard import dashboard_router
from marketpipe.api.docs import install_docs
from marketpipe.api.live import live_router
from marketpipe.api.middleware import ClientAuth, RequestContext
from marketpipe.api.ops import admin_router, ops_router
from marketpipe.api.options import options_router
from marketpipe.api.options_stream import options_stream_router
from marketpipe.api.state import AppState
from marketpipe.api.v1 import v1_router
from marketpipe.cache import TieredCache
from marketpipe.core.config import Config, load_config
from marketpipe.service.data import MarketData


def create_app(
    config: Config | None = None,
    *,
    data: MarketData | None = None,
    env: dict[str, str] | None = None,
    cache: TieredCache | None = None,
) -> FastAPI:
    cfg = config or load_config()
    st = AppState.build(cfg, data=data, env=env, cache=cache)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await st.start()
        yield
        await st.aclose()

    app = FastAPI(
        title="marketpipe gateway",
        version=__version__,
        description="Market data with attribution, checks, caching and failover. Errors are "
        '`{"error": {"code", "message", "details", "request_id"}}` with stable codes.',
        lifespan=lifespan,
        docs_url=None,  # api/docs.py serves Swagger UI and ReDoc from the package, not a CDN
        redoc_url=None,
    )
    app.state.mp = st
    install_docs(app)
    errors.install(app)
    app.add_middleware(HitPath, cache=st.cache)
    app.add_middleware(ClientAuth, keys=st.keys)
    app.add_middleware(
        RequestContext, request_timeout=cfg.server.request_timeout, max_header_bytes=cfg.server.max_header_bytes
    )
    for router in (
        v1_router(),
        actions_router(),
        ops_router(),
        admin_router(),
        alpaca_router(),
        crypto_router(),
        crypto_stream_router(),
        live_router(),
        alpaca_stream_router(),
        dashboard_router(),
        alerts_router(),
        options_router(),
        options_stream_router(),
    ):
        app.include_router(router)
    return app


def create_app_from_env() -> FastAPI:
    """``uvicorn --factory marketpipe.api.app:create_app_from_env`` (config from MARKETPIPE_CONFIG)."""
    return create_app()
