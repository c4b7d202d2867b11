"""``marketpipe stream``: live prices in the terminal (registered on the main app).

Three ways to get them, one table: from a running gateway's ``/v1/stream`` WebSocket (``--gateway``),
from the live hub run in this process against the configured Alpaca stream (the default), or from
the hub run against the vendor simulator (``--sim``, offline). Every message, whichever way it came,
goes through :func:`fold` into one :class:`Board`, which the table (or ``--json``) shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Protocol

import orjson
import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from marketpipe.cli.common import ConfigOpt, StoreOpt, app, err, handle_errors, load_config, out, read_symbols
from marketpipe.core.errors import (
    AuthFailed,
    FeatureDisabled,
    InvalidArgument,
    MalformedMessage,
    MarketpipeError,
    ProviderUnavailable,
    StreamClosed,
    StreamFailed,
    StreamUnavailable,
)
from marketpipe.core.validation import validate_number

API_KEY_VAR = "MARKETPIPE_API_KEY"
REFRESH_SECONDS = 0.25  # the table is redrawn about four times a second
RATE_WINDOW_SECONDS = 5.0
SIM_KEYS = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"}
MAX_FRAME_BYTES = 16 * 1024 * 1024
CLOSE_SECONDS = 1.0  # the WebSocket close handshake on the way out (Ctrl-C, --duration)


class StreamError(StreamFailed):
    """An ``error`` message from the stream, or the stream ending; ``code`` is the stream's own (one of
    the codes of :mod:`marketpipe.core.errors`, e.g. ``StreamClosed.code``)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.code = code


class StreamRequestError(StreamError, InvalidArgument):
    """The stream refused what was asked (a bad symbol, too many symbols): the caller's mistake."""


def stream_error(msg: dict[str, Any]) -> StreamError:
    code = str(msg.get("code") or StreamFailed.code)
    message = str(msg.get("message") or "the stream reported an error")
    details = msg.get("details") if isinstance(msg.get("details"), dict) else None
    cls = StreamRequestError if code.startswith("INVALID") else StreamError
    return cls(code, message, details)


# --- the board: what every message is folded into -----------------------------------------------------


@dataclass(slots=True)
class Row:
    doc: dict[str, Any]  # the last unified price message
    ts: datetime | None  # its timestamp, parsed
    seen: float  # monotonic time it arrived


@dataclass
class Board:
    symbols: list[str]
    rows: dict[str, Row] = field(default_factory=dict)
    state: str | None = None
    active_source: str | None = None
    subscribed: list[str] = field(default_factory=list)
    received: int = 0  # every message
    prices: int = 0  # price messages
    warning: str | None = None
    started: float = field(default_factory=time.monotonic)
    _samples: deque[tuple[float, int]] = field(default_factory=deque)

    def rate(self, now: float) -> float:
        """Messages per second over the last ``RATE_WINDOW_SECONDS``."""
        s = self._samples
        s.append((now, self.received))
        while len(s) > 2 and now - s[1][0] >= RATE_WINDOW_SECONDS:
            s.popleft()
        t0, n0 = s[0]
        return (self.received - n0) / (now - t0) if now > t0 else 0.0


def _parse_ts(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value)
    return None


def fold(board: Board, msg: dict[str, Any], now: float | None = None) -> dict[str, Any] | None:
    """Fold one stream message (the ``/v1/stream`` wire form) into ``board``. Returns the message
    when it is a price update; raises :class:`StreamError` for an ``error`` message."""
    board.received += 1
    kind = msg.get("type")
    if kind == "price":
        sym = str(msg.get("symbol") or "")
        if not sym:
            return None
        board.prices += 1
        board.rows[sym] = Row(msg, _parse_ts(msg.get("timestamp")), time.monotonic() if now is None else now)
        if sym not in board.symbols:
            board.symbols.append(sym)
        return msg
    if kind in ("welcome", "status"):
        board.state = msg.get("state") or board.state
        board.active_source = msg.get("active_source")
    elif kind == "subscribed":
        board.subscribed = list(msg.get("symbols") or [])
    elif kind == "warning":
        board.warning = f"{msg.get('code', 'WARNING')}: {msg.get('message', '')}"
    elif kind == "error":
        raise stream_error(msg)
    return None


# --- the table ------------------------------------------------------------------------------------------


def _num(value: Any, fmt: str = ",.2f") -> str:
    if value is None:
        return "—"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if fmt == ",.2f" and 0 < abs(v) < 1:
        fmt = ",.4f"
    return format(v, fmt)


def _signed(value: Any, fmt: str, suffix: str = "") -> Text:
    if value is None:
        return Text("—", style="dim")
    v = float(value)
    style = "green" if v > 0 else "red" if v < 0 else ""
    return Text(format(v, fmt) + suffix, style=style)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _label(doc: dict[str, Any], state: str | None) -> Text:
    if doc.get("stale") or state == "both_unavailable":
        return Text("STALE", style="bold red")
    if doc.get("is_real_time"):
        return Text("real-time", style="green")
    return Text("delayed", style="yellow")


def _score(value: Any) -> Text:
    if value is None:
        return Text("—", style="dim")
    v = float(value)
    return Text(f"{v:.2f}", style="green" if v >= 0.9 else "yellow" if v >= 0.5 else "red")


def render(board: Board, now: float | None = None, wall: datetime | None = None) -> RenderableType:
    now = time.monotonic() if now is None else now
    wall = datetime.now(UTC) if wall is None else wall
    table = Table(title="marketpipe live prices", title_justify="left", expand=False)
    for col, justify in (
        ("symbol", "left"),
        ("price", "right"),
        ("change", "right"),
        ("change %", "right"),
        ("bid", "right"),
        ("ask", "right"),
        ("size", "right"),
        ("volume", "right"),
        ("source", "left"),
        ("status", "left"),
        ("quality", "right"),
        ("age", "right"),
    ):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for sym in list(board.symbols):
        row = board.rows.get(sym)
        if row is None:
            table.add_row(sym, Text("waiting…", style="dim"), *([""] * 10))
            continue
        d = row.doc
        age = (wall - row.ts).total_seconds() if row.ts is not None else now - row.seen
        source = str(d.get("source") or "—") + (f" ({d['feed']})" if d.get("feed") else "")
        table.add_row(
            Text(sym, style="bold"),
            _num(d.get("price")),
            _signed(d.get("change"), "+,.2f"),
            _signed(d.get("change_pct"), "+.2f", "%"),
            _num(d.get("bid")),
            _num(d.get("ask")),
            _num(d.get("size"), ",.0f"),
            _num(d.get("volume"), ",.0f"),
            source,
            _label(d, board.state),
            _score(d.get("quality_score")),
            _age(age),
        )
    return Group(table, footer(board, now))


def footer(board: Board, now: float) -> Text:
    state = board.state or "connecting"
    style = {"primary_active": "green", "fallback_active": "yellow", "both_unavailable": "bold red"}.get(state, "")
    text = Text("router ")
    text.append(state, style=style)
    text.append(f" (source {board.active_source or '—'})")
    text.append(
        f" · {board.received:,} messages · {board.rate(now):,.1f}/s · {_age(now - board.started)} elapsed",
        style="dim",
    )
    if board.warning:
        text.append(f" · {board.warning}", style="yellow")
    return text


# --- where messages come from -----------------------------------------------------------------------------


class Feed(Protocol):
    async def next(self, within: float) -> list[dict[str, Any]] | None:
        """Messages that arrive within ``within`` seconds (maybe none); ``None`` once the stream has ended."""


def _native(msg: Any) -> Any:
    """The wire (JSON) form of a message built in process: datetimes become ISO strings."""
    return orjson.loads(orjson.dumps(msg, default=str))


class HubFeed:
    """A client of a :class:`~marketpipe.service.live.LiveHub` in this process."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def next(self, within: float) -> list[dict[str, Any]] | None:
        from marketpipe.service.live import PRICES, unified_json

        try:
            notices, items = await asyncio.wait_for(self.client.next_batch(), within)
        except TimeoutError:
            return []
        if not notices and not items:
            return None
        msgs: list[dict[str, Any]] = [_native(n) for n in notices]
        msgs += [orjson.loads(it.encoded("v1", unified_json)) for it in items if it.channel == PRICES]
        return msgs


class GatewayFeed:
    """The gateway's ``/v1/stream`` WebSocket: every frame is a JSON array of messages."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.closed: Any = None

    async def next(self, within: float) -> list[dict[str, Any]] | None:
        from websockets.exceptions import ConnectionClosed

        try:
            raw = await asyncio.wait_for(self.ws.recv(), within)  # cancelling recv() loses nothing
        except TimeoutError:
            return []
        except ConnectionClosed as exc:
            self.closed = exc
            return None
        try:
            msgs = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise StreamError(
                MalformedMessage.code, f"the gateway sent something that is not JSON: {raw[:80]!r}"
            ) from None
        return [m for m in (msgs if isinstance(msgs, list) else [msgs]) if isinstance(m, dict)]


# --- output ---------------------------------------------------------------------------------------------


class View(Protocol):
    def price(self, msg: dict[str, Any]) -> None: ...

    def notice(self, msg: dict[str, Any]) -> None: ...

    def tick(self, now: float, force: bool = False) -> None: ...


class JsonView:
    """One JSON line per price update on stdout (for piping); status and warnings on stderr."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []

    def price(self, msg: dict[str, Any]) -> None:
        self.pending.append(orjson.dumps(msg))

    def notice(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "status":
            err.print(f"status: {msg.get('state')} (source {msg.get('active_source') or '—'})", highlight=False)
        elif kind == "warning":
            err.print(f"[yellow]warning[/]: {escape(str(msg.get('code')))} {escape(str(msg.get('message', '')))}")

    def tick(self, now: float, force: bool = False) -> None:
        if not self.pending:
            return
        data = b"\n".join(self.pending) + b"\n"
        self.pending.clear()
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is not None:
            buffer.write(data)
        else:  # a text-only stream (e.g. a test runner's capture)
            sys.stdout.write(data.decode())
        sys.stdout.flush()


class TableView:
    """The board as a rich table, redrawn about four times a second."""

    def __init__(self, board: Board, live: Live) -> None:
        self.board = board
        self.live = live
        self.drawn = 0.0

    def price(self, msg: dict[str, Any]) -> None:
        pass

    def notice(self, msg: dict[str, Any]) -> None:
        pass

    def tick(self, now: float, force: bool = False) -> None:
        if force or now - self.drawn >= REFRESH_SECONDS:
            self.drawn = now
            self.live.update(render(self.board, now), refresh=True)


async def consume(feed: Feed, board: Board, view: View, duration: float | None) -> None:
    """Read ``feed`` into ``board`` and ``view`` until ``duration`` is up (forever when ``None``)."""
    deadline = None if duration is None else time.monotonic() + duration
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        wait = REFRESH_SECONDS if deadline is None else max(0.0, min(REFRESH_SECONDS, deadline - now))
        msgs = await feed.next(wait)
        if msgs is None:
            raise StreamError(StreamClosed.code, "the stream ended")
        for msg in msgs:
            try:
                doc = fold(board, msg)
            except StreamError:
                view.tick(time.monotonic(), force=True)
                raise
            if doc is not None:
                view.price(doc)
            else:
                view.notice(msg)
        view.tick(time.monotonic())
    view.tick(time.monotonic(), force=True)


@contextlib.contextmanager
def _view(board: Board, as_json: bool) -> Iterator[View]:
    if as_json:
        yield JsonView()
        return
    import structlog

    stderr = sys.stderr
    try:
        with Live(render(board), console=out, auto_refresh=False) as live:
            # log lines (written to the stderr of the moment) go above the table instead of through it
            structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
            yield TableView(board, live)
    finally:
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=stderr))
        if not out.is_terminal:
            out.line()  # a terminal gets its newline from Live; a file or pipe does not


# --- the three sources ----------------------------------------------------------------------------------


async def run_hub(
    config: Any, env: dict[str, str] | None, symbols: list[str], as_json: bool, duration: float | None
) -> None:
    """The live hub in this process: ``LiveHub(config, Gateway(MarketData(config)))``."""
    from marketpipe.service.data import MarketData
    from marketpipe.service.gateway import Gateway
    from marketpipe.service.live import PRICES, LiveHub
    from marketpipe.service.live.crypto import CryptoHub

    data = MarketData(config, env=env)
    crypto: list[CryptoHub] = []  # made on the first pair (BTC/USD): the crypto stream at Alpaca's "us"

    def crypto_hub() -> CryptoHub:
        if not crypto:
            crypto.append(CryptoHub.from_config(config, env=env))
        return crypto[0]

    hub = LiveHub(config, Gateway(data), env=env, crypto_hub=crypto_hub)
    try:
        await hub.start()
        _check_sources(hub)
        client = hub.attach("cli", "cli")
        board = Board(list(symbols))
        board.state, board.active_source = str(hub.router.state), hub.router.active_source  # then `status` messages
        with _view(board, as_json) as view:
            board.subscribed = await hub.subscribe(client, PRICES, symbols)
            await consume(HubFeed(client), board, view, duration)
    finally:
        await hub.close()
        for c in crypto:
            await c.aclose()
        await data.aclose()
        # LiveHub.start() freezes the heap (gc.freeze) for the collector's sake; hand it back, or objects
        # kept alive by frozen cycles (DuckDB's) are still there at exit and nanobind reports leaks.
        gc.unfreeze()


def _check_sources(hub: Any) -> None:
    """No primary stream and no fallback vendor either: say why instead of waiting forever."""
    if hub.stream is not None:
        return
    problem = hub.datasource()["primary"]["stream"].get("error") or {}
    try:
        fallback, _ = hub.gateway.candidates("latest_trade")
    except MarketpipeError:
        fallback = []
    message = problem.get("message") or "the Alpaca stream is unavailable"
    if not fallback:
        raise StreamError(str(problem.get("code") or StreamUnavailable.code), f"{message}; no fallback vendor either")
    err.print(f"[yellow]warning[/]: {escape(message)}; prices come from the polled fallback vendors")


def _ws_url(gateway: str) -> str:
    url = gateway.rstrip("/")
    if url.startswith("http://"):
        url = "ws://" + url[7:]
    elif url.startswith("https://"):
        url = "wss://" + url[8:]
    elif not url.startswith(("ws://", "wss://")):
        raise InvalidArgument(
            f"--gateway must be an http(s):// or ws(s):// URL, got {gateway!r}", details={"parameter": "gateway"}
        )
    return url if url.endswith("/v1/stream") else url + "/v1/stream"


async def run_gateway(
    gateway: str, token: str | None, symbols: list[str], as_json: bool, duration: float | None
) -> None:
    """A running gateway's ``/v1/stream``."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

    url = _ws_url(gateway)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        # close_timeout: on Ctrl-C the frames already sent to us are unread, and the client's read flow
        # control then holds the gateway's close reply behind them; the handshake would take websockets'
        # default 10 s. What is unread is not wanted any more: give the reply a second, then drop it.
        ws = await connect(
            url, additional_headers=headers, max_size=MAX_FRAME_BYTES, open_timeout=10, close_timeout=CLOSE_SECONDS
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise AuthFailed(
                f"the gateway at {gateway} refused the stream (HTTP {status}): it needs an API key "
                f"(--token or {API_KEY_VAR}) or the key is wrong, or live streaming is off there",
                provider="gateway",
            ) from None
        raise ProviderUnavailable(f"the gateway at {gateway} answered HTTP {status}", provider="gateway") from None
    except InvalidURI as exc:
        raise InvalidArgument(f"bad --gateway URL: {exc}", details={"parameter": "gateway"}) from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise ProviderUnavailable(f"cannot reach the gateway at {gateway}: {exc}", provider="gateway") from None
    feed = GatewayFeed(ws)
    try:
        board = Board(list(symbols))
        with _view(board, as_json) as view:
            await ws.send(orjson.dumps({"action": "subscribe", "symbols": symbols}).decode())
            try:
                await consume(feed, board, view, duration)
            except StreamError as exc:
                if exc.code != StreamClosed.code:
                    raise
                closed = feed.closed
                rcvd = getattr(closed, "rcvd", None)
                if rcvd is not None and rcvd.code == 1013:
                    raise FeatureDisabled(f"the gateway does not stream: {rcvd.reason}") from None
                why = f" (close code {rcvd.code}{': ' + rcvd.reason if rcvd.reason else ''})" if rcvd else ""
                raise StreamError(StreamClosed.code, f"the gateway closed the stream{why}") from None
    finally:
        await ws.close()


def _sim_config(store: Path | str, config: Path | None) -> Any:
    """A config with every provider off (the simulator's is added once it listens) and its own store
    (simulated prices are never mixed with real data); ``[stream]`` tuning comes from ``--config``."""
    from marketpipe.core.config import Config

    cfg = Config()
    if config is not None:
        cfg.stream = load_config(config).stream
        cfg.stream.url = None
    cfg.store.path = str(store)
    for name in list(cfg.providers):
        cfg.providers[name].enabled = False  # offline: nothing but the simulator
    return cfg


# --- the command ------------------------------------------------------------------------------------------


@app.command()
@handle_errors
def stream(
    symbols: Annotated[list[str], typer.Argument(help="e.g. AAPL MSFT")],
    gateway: Annotated[
        str | None, typer.Option("--gateway", help="a running gateway, e.g. http://127.0.0.1:8000")
    ] = None,
    sim: Annotated[bool, typer.Option("--sim", help="offline: stream from the built-in vendor simulator")] = False,
    sim_rate: Annotated[float, typer.Option("--sim-rate", help="simulator messages per second")] = 50.0,
    duration: Annotated[
        float | None, typer.Option("--duration", help="stop after this many seconds (default: until Ctrl-C)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON line per price update, for piping")] = False,
    token: Annotated[
        str | None, typer.Option("--token", help=f"the gateway's client key (default ${API_KEY_VAR})")
    ] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Live prices as a table: price, change, bid/ask, volume, source, real-time or STALE, quality score.
    From a running gateway (--gateway), the simulator (--sim), or else the Alpaca stream directly
    (keys from ALPACA_API_KEY / ALPACA_SECRET_KEY)."""
    syms = read_symbols(symbols, None)
    if duration is not None:
        validate_number(duration, "duration", gt=0, message="--duration must be > 0 seconds")
    if gateway and sim:
        raise InvalidArgument("--gateway and --sim exclude each other", details={"parameter": "sim"})
    if sim:
        validate_number(sim_rate, "sim-rate", gt=0, le=100_000, message="--sim-rate must be in (0, 100000]")
    try:
        if gateway:
            asyncio.run(run_gateway(gateway, token or os.environ.get(API_KEY_VAR) or None, syms, as_json, duration))
        elif sim:
            _run_sim(syms, sim_rate, as_json, duration, config, store)
        else:
            asyncio.run(run_hub(load_config(config, store), None, syms, as_json, duration))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a stream without --duration ends
    except BrokenPipeError:  # the reader of --json went away (e.g. `| head`): not an error
        with contextlib.suppress(OSError, ValueError):  # and no complaint when stdout is flushed at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _run_sim(
    syms: list[str], rate: float, as_json: bool, duration: float | None, config: Path | None, store: str | Path | None
) -> None:
    from marketpipe.providers.alpaca_config import AlpacaConfig
    from marketpipe.sim.server import SimServer
    from marketpipe.sim.stream import StreamConfig

    with contextlib.ExitStack() as stack:
        if store is None:  # a throwaway store, removed afterwards
            store = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="marketpipe-stream-"))) / "sim.duckdb"
        cfg = _sim_config(store, config)
        server = stack.enter_context(SimServer(vendor="alpaca", stream_config=StreamConfig(rate=rate)))
        err.print(f"simulator on {server.url} (source sim:alpaca)")
        cfg.providers["alpaca"] = AlpacaConfig(
            priority=1, base_url=server.url, plan="unlimited", rate_limit_per_min=10_000
        )
        asyncio.run(run_hub(cfg, dict(SIM_KEYS), syms, as_json, duration))
