"""``marketpipe serve``: the gateway (registered on the main app)."""

from __future__ import annotations

import functools
from typing import Annotated, Literal

import typer

from marketpipe.cli.common import ConfigOpt, StoreOpt, app, err, handle_errors, load_config
from marketpipe.core.errors import ConfigError, MarketpipeError

UvicornLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


@app.command()
@handle_errors
def serve(
    host: Annotated[str | None, typer.Option("--host", help="default from \\[server] host (127.0.0.1)")] = None,
    port: Annotated[
        int | None, typer.Option("--port", min=1, max=65535, help="default from \\[server] port (8000)")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="default from \\[server] workers (1)")] = None,
    redis_url: Annotated[
        str | None, typer.Option("--redis-url", help="L2 cache, e.g. redis://localhost:6379/0")
    ] = None,
    log_level: Annotated[UvicornLevel, typer.Option("--server-log-level", case_sensitive=False)] = "warning",
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """The gateway: REST v1, the Alpaca-compatible /v2 API, health, admin and /metrics (docs at /docs).
    Admin endpoints need MARKETPIPE_ADMIN_TOKEN; client keys come from MARKETPIPE_API_KEYS."""
    import uvicorn

    from marketpipe.api.app import create_app
    from marketpipe.core.net import bind_sockets

    cfg = load_config(config, store)
    host = host or cfg.server.host
    port = port or cfg.server.port
    workers = workers or cfg.server.workers
    if redis_url:
        cfg.cache.redis_url = redis_url
    if workers != 1 and not cfg.store_is_server():
        raise ConfigError(
            "the embedded DuckDB store admits one writing process, so the gateway runs one worker process "
            "(it serves concurrently on its event loop); more workers need a server store "
            "(--store postgresql://user@host:port/db, or [store] url)",
            details={"parameter": "workers"},
        )
    # The port is bound before anything is announced: a port in use (or a host that is not this machine's)
    # is one error line, not an announcement followed by uvicorn's own exit 3.
    sockets = bind_sockets(host, port)
    try:
        # Several workers: each process builds its own app (services, store connection, memory cache)
        # from the same config; the parent only supervises them on the shared sockets.
        gateway = None if workers > 1 else create_app(cfg)
        # Opened before the announcement, like the port: a store another process holds (a notebook's
        # backfill, a second gateway) or a database server that cannot be reached is one STORE_ERROR
        # line, not a startup traceback (from each worker, with several).
        if gateway is not None:
            gateway.state.mp.data.store  # noqa: B018  (opening it is the point)
        else:
            from marketpipe.store import open_store

            open_store(cfg).close()
        uv_config = uvicorn.Config(
            functools.partial(create_app, cfg) if gateway is None else gateway,
            factory=gateway is None,
            workers=workers,
            host=host,
            port=port,
            log_level=log_level.lower(),
            access_log=False,
            ws_per_message_deflate=cfg.server.ws_compression,
            timeout_graceful_shutdown=5,  # live streams (SSE, WebSockets) end only when the server closes them
        )
        server = uvicorn.Server(uv_config)
        shown = f"[{host}]" if ":" in host else host
        procs = f", {workers} worker processes" if workers > 1 else ""
        err.print(f"marketpipe gateway on http://{shown}:{port}  (docs /docs, health /health, metrics /metrics{procs})")
        if workers > 1:
            from uvicorn.supervisors import Multiprocess

            if cfg.stream.enabled:
                err.print(
                    "note: each worker keeps its own live hub, and opens its own upstream stream once a client "
                    "subscribes (most Alpaca plans allow one connection per key); [stream] enabled = false "
                    "keeps the workers to REST"
                )

            Multiprocess(uv_config, sockets=sockets).run()
            return
        try:
            server.run(sockets=sockets)
        except KeyboardInterrupt:
            pass
        except SystemExit:  # uvicorn exits when the application's startup fails; it has logged why
            if server.started:
                raise
    finally:
        for sock in sockets:
            sock.close()
    if not server.started:
        raise MarketpipeError("the gateway did not start: its startup failed (see the log above)")
