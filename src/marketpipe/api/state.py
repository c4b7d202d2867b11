"""The gateway's state: what every route reads (config, services, cache, keys, the live hub), how
it is built from the config and the environment, and how it starts and stops with the app."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from marketpipe.alerts import AlertEngine
from marketpipe.api.middleware import ClientKeys
from marketpipe.cache import TieredCache, build_cache
from marketpipe.core import log as logging_
from marketpipe.core.config import Config
from marketpipe.core.errors import MarketpipeError
from marketpipe.service.actions import invalidate_cached_bars
from marketpipe.service.data import MarketData
from marketpipe.service.gateway import Gateway
from marketpipe.service.live import LiveHub
from marketpipe.service.live.crypto import CryptoHub

if TYPE_CHECKING:  # the bus needs the `bus` extra (nats-py): imported only when [bus] url is set
    from marketpipe.service.live.shared import BusLink

ADMIN_TOKEN_VAR = "MARKETPIPE_ADMIN_TOKEN"
API_KEYS_VAR = "MARKETPIPE_API_KEYS"


@dataclass
class AppState:
    config: Config
    data: MarketData
    gateway: Gateway
    cache: TieredCache
    admin_token: str | None
    started: float
    keys: ClientKeys
    env: dict[str, str] | None = field(default=None, repr=False)  # None: the process environment
    live: LiveHub | None = None  # created by start() (it needs the running loop)
    alerts: AlertEngine | None = None  # [alerts] enabled: rules over the metrics and events, and the sinks
    _unsubscribe: Callable[[], None] | None = field(default=None, repr=False)  # set by start()
    options_live: Any = None  # the options stream's upstreams (api/options_stream.py), made on first use
    crypto_hub: CryptoHub | None = None  # the crypto upstreams (/v1beta3/crypto and pairs on /v1/stream), on first use
    bus: BusLink | None = None  # [bus] url: events onto the bus, and the live hub fed from the one upstream owner

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        data: MarketData | None = None,
        env: dict[str, str] | None = None,
        cache: TieredCache | None = None,
    ) -> AppState:
        """The state for ``config``: client keys and the admin token from ``env`` (default: the
        process environment), every secret among them registered for redaction before any log line."""
        environ = os.environ if env is None else env
        md = data or MarketData(config, env=env)
        keys = ClientKeys.parse(
            environ.get(API_KEYS_VAR), config.server.client_rate_limit_per_min, config.server.auth_failures_per_min
        )
        # never in a log line: the admin token, client key secrets, vendor keys, Redis credentials
        logging_.register_secrets([*logging_.secrets_from_env(environ), *keys.keys.values()])
        gateway = Gateway(md)
        alerts = None
        if config.alerts.enabled:  # an enabled sink without its secret fails here, before the server starts
            alerts = AlertEngine.build(
                config.alerts, environ, market_open=gateway.is_market_hours, store_path=config.store_path()
            )
        return cls(
            config=config,
            data=md,
            gateway=gateway,
            cache=cache or build_cache(config.cache),
            admin_token=environ.get(ADMIN_TOKEN_VAR) or None,
            started=time.time(),
            keys=keys,
            env=env,
            alerts=alerts,
        )

    async def start(self) -> None:
        """On the running loop: provider probes, and the live hub when streaming is on."""
        logging_.guard_stdlib()  # the server's own loggers (configured by now) redact too
        # new corporate actions make cached adjusted bars stale: drop them when one is stored
        self._unsubscribe = invalidate_cached_bars(self.cache, asyncio.get_running_loop())
        with contextlib.suppress(MarketpipeError):  # no usable provider: readiness says so
            self.gateway.start_probes()
        if self.config.bus.target():
            from marketpipe.service.live.shared import BusLink

            self.bus = await BusLink.open(self.config, env=self.env, live=self.config.stream.enabled)
            self.data.events_on_bus = True  # its publisher relays every event, corporate actions included
        if self.config.stream.enabled:
            shared = self.bus.stream if self.bus is not None else None
            self.live = LiveHub(
                self.config,
                self.gateway,
                env=self.env,
                stream=shared,  # type: ignore[arg-type]
                crypto_hub=self.crypto_upstream,  # pairs on /v1/stream: the /v1beta3/crypto upstreams, shared
                options_live=self.options_upstream,  # contracts on /v1/stream: the /v1beta1 options upstreams
            )
            if shared is not None and self.config.stream.gap_backfill:
                shared.on_reconnect = self.live.on_outage  # an owner change: the missed bars over REST
            await self.live.start()
        if self.alerts is not None:
            self.alerts.start()

    def crypto_upstream(self) -> CryptoHub:
        """The app's crypto hub, built on first use (closed by :meth:`aclose`)."""
        if self.crypto_hub is None:
            self.crypto_hub = CryptoHub.from_config(self.config, env=self.env)
        return self.crypto_hub

    def options_upstream(self) -> Any:
        """The app's options upstreams (:class:`~marketpipe.service.live.options.OptionsLive`), built on
        first use (closed by :meth:`aclose`)."""
        if self.options_live is None:
            from marketpipe.service.live.options import OptionsLive

            self.options_live = OptionsLive(self.config, env=self.env)
        return self.options_live

    async def aclose(self) -> None:
        if self.alerts is not None:
            await self.alerts.aclose()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.live is not None:
            await self.live.close()  # first: its crypto lane is a client of the crypto hub
        if self.crypto_hub is not None:
            await self.crypto_hub.aclose()
        if self.options_live is not None:
            await self.options_live.close()
        if self.bus is not None:
            await self.bus.aclose()
        await self.cache.aclose()
        await self.data.aclose()


async def state(request: Request) -> AppState:
    return request.app.state.mp  # type: ignore[no-any-return]


StateDep = Annotated[AppState, Depends(state)]
