"""Run the simulator: in a background thread (tests, ``marketpipe demo``), inside a running event
loop (``start_async``), or blocking in the foreground (``marketpipe sim``, benchmarks).

    with SimServer() as sim:                      # keys SIMKEY/SIMSECRET (unlimited), FREEKEY/FREESECRET (free)
        client = StockHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=sim.url)
        sim.faults.set([FaultRule(kind="http_503", times=2)])
        stream = StockDataStream("SIMKEY", "SIMSECRET", url_override=sim.ws_url("iex"))
        sim.stream.faults.stall = True            # the Alpaca face's WebSocket stream: see sim/stream.py
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.log import access_logger

from marketpipe.core.errors import InvalidArgument
from marketpipe.core.net import listen_error
from marketpipe.sim.admin import Stats
from marketpipe.sim.alpaca import DEFAULT_KEYS, AlpacaFace
from marketpipe.sim.crypto_stream import CryptoStream
from marketpipe.sim.data import SimMarket
from marketpipe.sim.faults import Faults
from marketpipe.sim.options import OptionsFace
from marketpipe.sim.options_stream import OptionsStream
from marketpipe.sim.stream import AlpacaStream, StreamConfig

VENDORS = ("alpaca", "polygon", "yahoo")


def make_face(vendor: str, market: SimMarket, faults: Faults, keys: dict[str, tuple[str, str]], stats: Stats) -> Any:
    """The vendor face: ``marketpipe.sim.<vendor>.make_face`` (Alpaca is built in). Several servers
    sharing one ``SimMarket`` serve the same series through different vendors' wire formats."""
    if vendor == "alpaca":
        return AlpacaFace(market, faults, keys, stats)
    if vendor not in VENDORS:
        raise ValueError(f"unknown simulator vendor {vendor!r}; one of {', '.join(VENDORS)}")
    import importlib

    module = importlib.import_module(f"marketpipe.sim.{vendor}")
    return module.make_face(market, faults, keys, stats)


# A hung handler (fault "hang") must not hold up stop() for its full sleep.
SHUTDOWN_TIMEOUT = 0.5


class SimServer:
    """An aiohttp server speaking the Alpaca data API v2 (stocks) on ``host:port`` (0 = any free port).

    ``faults`` is live: change it from any thread (or over HTTP at ``/_sim/faults``) while the
    server runs. ``keys`` maps key id -> (secret, plan) with plan ``"unlimited"`` or ``"free"``.

    The Alpaca face also serves the real-time stream (``/v2/iex``, ``/v2/sip``, ``/v2/test``; see
    :mod:`marketpipe.sim.stream`): ``stream`` is its :class:`AlpacaStream` (``None`` for other
    vendors), configured by ``stream_config``, with live ``stream.faults``; ``options_stream`` (once
    started) is the options stream (``/v1beta1/{indicative,opra}``), with live ``options_stream.faults``.
    """

    def __init__(
        self,
        market: SimMarket | None = None,
        faults: Faults | None = None,
        keys: dict[str, tuple[str, str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        access_log: bool = False,
        vendor: str = "alpaca",
        stream_config: StreamConfig | None = None,
    ) -> None:
        self.vendor = vendor
        self.market = market if market is not None else SimMarket()
        self.faults = faults if faults is not None else Faults()
        self.keys = dict(DEFAULT_KEYS if keys is None else keys)
        self.host = host
        self._port = port
        self.access_log = access_log
        self._stats = Stats()
        self.face = make_face(vendor, self.market, self.faults, self.keys, self._stats)
        self.stream: AlpacaStream | None = (
            AlpacaStream(self.market, self.keys, stream_config) if vendor == "alpaca" else None
        )
        # the options face (/v1beta1/options, /v2/options/contracts) rides on the Alpaca face
        self.options = OptionsFace(self.face) if vendor == "alpaca" else None
        self.options_stream: OptionsStream | None = None  # its stream, mounted at start
        # the crypto stream (/v1beta3/crypto/{loc}) over the face's crypto market
        self.crypto_stream: CryptoStream | None = (
            CryptoStream(self.face.crypto, self.keys) if vendor == "alpaca" else None
        )
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- address ---------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    def ws_url(self, feed: str = "iex") -> str:
        """The stream URL of a feed (``iex``, ``sip`` or ``test``; options: ``indicative``, ``opra``), e.g.
        ``ws://127.0.0.1:PORT/v2/iex`` or ``ws://127.0.0.1:PORT/v1beta1/opra``."""
        version = "v1beta1" if feed in ("indicative", "opra") else "v2"
        return "ws" + self.url[4:] + f"/{version}/{feed}"

    def crypto_ws_url(self, loc: str = "us") -> str:
        """The crypto stream URL of a location, e.g. ``ws://127.0.0.1:PORT/v1beta3/crypto/us``."""
        return "ws" + self.url[4:] + f"/v1beta3/crypto/{loc}"

    def drop_streams(self, feed: str | None = None, *, abrupt: bool = True) -> int:
        """Drop the open stream connections (of one feed, or all) from any thread; returns how many."""
        if self.stream is None:
            return 0
        loop = self._loop
        if loop is None:
            return self.stream.drop(feed, abrupt=abrupt)  # start_async: we are on the server's loop
        return self.stream.drop_threadsafe(loop, feed, abrupt=abrupt)

    def drop_option_streams(self, feed: str | None = None, *, abrupt: bool = True) -> int:
        """Drop the open options stream connections (of ``indicative`` or ``opra``, or all) from any
        thread; returns how many."""
        stream = self.options_stream
        if stream is None:
            return 0
        loop = self._loop
        if loop is None:
            return stream.drop(feed, abrupt=abrupt)  # start_async: we are on the server's loop
        return stream.drop_threadsafe(loop, feed, abrupt=abrupt)

    def stats(self) -> dict[str, Any]:
        """``{"requests": total data requests, "by_path": {...}, "by_status": {...}}``"""
        return self._stats.to_dict()

    def reset_stats(self) -> None:
        self._stats.reset()

    # --- in a running loop -----------------------------------------------------------------------------
    async def start_async(self) -> None:
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        if not 0 <= self._port <= 65535:
            raise InvalidArgument(f"port {self._port} is not in 0..65535", details={"parameter": "port"})
        app = self.face.build_app()
        if self.options is not None:
            self.options.add_routes(app.router)
            self.options_stream = OptionsStream(self.options.options, self.keys)
            self.options_stream.mount(app)
        if self.stream is not None:
            self.stream.mount(app)
        if self.crypto_stream is not None:
            self.crypto_stream.mount(app)
        runner = web.AppRunner(
            app,
            access_log=access_logger if self.access_log else None,
            handler_cancellation=True,  # a client that gives up (timeouts vs. "hang") frees its handler
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        try:
            await site.start()
        except OSError as exc:  # port in use, unknown host, ...: a typed error naming the address
            await runner.cleanup()
            raise listen_error(exc, self.host, self._port) from None
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop_async(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # --- in a background thread ------------------------------------------------------------------------
    def start(self) -> SimServer:
        """Start on a private thread with its own event loop; returns once the port is listening."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread and re-raised there
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop_async())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name=f"marketpipe-sim-{id(self):x}", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            raise failure[0]
        self._thread, self._loop = thread, loop
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        self._thread = self._loop = None
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> SimServer:
        await self.start_async()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_async()


def serve_forever(
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    seed: int = 0,
    faults: Faults | None = None,
    on_ready: Callable[[SimServer], None] | None = None,
) -> None:
    """Serve in the foreground until interrupted (Ctrl-C). Prints nothing; the caller announces it in
    ``on_ready``, called once the port is listening (so port 0 is announced as the port it got). A port
    that cannot be bound raises the typed error of :func:`marketpipe.core.net.listen_error`."""

    async def main() -> None:
        server = SimServer(SimMarket(seed=seed), faults, host=host, port=port)
        await server.start_async()
        if on_ready is not None:
            on_ready(server)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop_async()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return


def serve_vendors_forever(
    host: str = "127.0.0.1",
    ports: dict[str, int] | None = None,
    *,
    seed: int = 0,
    on_ready: Callable[[dict[str, SimServer]], None] | None = None,
) -> None:
    """Serve several vendor faces in the foreground until interrupted, one port each, all over one
    ``SimMarket`` (so every vendor plays the same series and ``reconcile`` finds them in agreement).
    ``ports`` maps vendor -> port (0: any free port), default every vendor on any free port. Each face has
    its own faults (``/_sim/faults`` on its port). ``on_ready`` gets the listening servers by vendor once
    every port is bound; a port that cannot be bound stops the ones already started and raises the typed
    error of :func:`marketpipe.core.net.listen_error`."""
    wanted = dict(ports) if ports is not None else dict.fromkeys(VENDORS, 0)
    unknown = [v for v in wanted if v not in VENDORS]
    if unknown:
        raise InvalidArgument(
            f"unknown simulator vendor {unknown[0]!r}; one of {', '.join(VENDORS)}", details={"parameter": "vendor"}
        )

    async def main() -> None:
        market = SimMarket(seed=seed)
        servers: dict[str, SimServer] = {}
        try:
            for vendor, port in wanted.items():
                server = SimServer(market, host=host, port=port, vendor=vendor)
                await server.start_async()
                servers[vendor] = server
            if on_ready is not None:
                on_ready(servers)
            await asyncio.Event().wait()
        finally:
            for server in servers.values():
                await server.stop_async()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return
