"""The gateway's Alpaca-compatible live stream (``/v2/iex``, ``/v2/sip``, ``/v2/test``): the official
alpaca-py ``StockDataStream``, unchanged, receives what the vendor (the simulator) sent through the
gateway's one upstream connection; raw JSON and msgpack clients see Alpaca's protocol exactly (welcome,
auth, complete subscription replies, batched data, the error codes); a client that reads nothing is
dropped while the others keep receiving."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from alpaca.data.models import Bar as PyBar
from alpaca.data.models import Quote as PyQuote
from alpaca.data.models import Trade as PyTrade
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import marketpipe.api.alpaca_stream as alpaca_stream
from marketpipe.api.app import create_app
from marketpipe.core.metrics import REGISTRY
from marketpipe.core.schema import Bar, Quote, Trade
from marketpipe.core.timeutil import ns_text
from marketpipe.providers.alpaca_stream import StreamMessage
from marketpipe.service.live import LiveHub
from marketpipe.sim.alpaca import DEFAULT_KEYS
from marketpipe.sim.server import SimServer
from marketpipe.sim.stream import StreamConfig
from marketpipe.wire.alpaca_rest import one_ts_ns
from tests.api.conftest import ENV, gateway_config, serving
from tests.conftest import alpaca_py_receive

pytestmark = pytest.mark.timeout(20)

SIM_CONFIG = StreamConfig(rate=1_000, bar_interval_s=0.2)
CLIENT = ("alice", "alicesecret")  # the gateway's client key pair (MARKETPIPE_API_KEYS)
MAX_SYMBOLS = 20
TRADE_KEYS = ["T", "S", "i", "x", "p", "s", "c", "t", "z"]
QUOTE_KEYS = ["T", "S", "bx", "bp", "bs", "ax", "ap", "as", "c", "t", "z"]
BAR_KEYS = ["T", "S", "o", "h", "l", "c", "v", "t", "n", "vw"]
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
CONTROL = {"success", "error", "subscription"}
WIRE = ("trades", "quotes", "bars", "updatedBars", "dailyBars", "statuses", "lulds", "imbalances")


def subscription(**channels: list[str]) -> dict[str, Any]:
    sub: dict[str, Any] = {"T": "subscription", **{c: channels.get(c, []) for c in WIRE}}
    sub["corrections"] = sub["cancelErrors"] = sub["trades"]
    return sub


def gateway_env(upstream_key: str, **extra: str) -> dict[str, str]:
    """Each gateway its own upstream key: the vendor allows one session per key and feed (406)."""
    return {**ENV, "ALPACA_API_KEY": upstream_key, "ALPACA_SECRET_KEY": upstream_key + "SECRET", **extra}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    keys = {**DEFAULT_KEYS, **{f"GW{n}": (f"GW{n}SECRET", "unlimited") for n in range(5)}}
    with SimServer(vendor="alpaca", keys=keys, stream_config=SIM_CONFIG) as s:
        yield s


@pytest.fixture(scope="module")
def gateway(sim: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FastAPI]]:
    """A gateway with client keys on; yields its ws:// base URL and the app (for the hub)."""
    store = tmp_path_factory.mktemp("alpaca_stream") / "gw.duckdb"
    cfg = gateway_config(sim.url, store, stream={"client_queue": 500, "max_symbols_per_client": MAX_SYMBOLS})
    app = create_app(cfg, env=gateway_env("GW0", MARKETPIPE_API_KEYS=f"{CLIENT[0]}:{CLIENT[1]}"))
    with serving(app) as url:
        yield "ws" + url[4:], app


@pytest.fixture
def sim_rate(sim: SimServer) -> Iterator[Callable[[float], None]]:
    assert sim.stream is not None
    stream = sim.stream

    def set_rate(rate: float) -> None:
        stream.configure(rate=rate)

    yield set_rate
    stream.config = SIM_CONFIG


def hub(app: FastAPI) -> LiveHub:
    live: LiveHub | None = app.state.mp.live
    assert live is not None
    return live


class Raw:
    """A plain WebSocket client of the protocol (JSON text or msgpack binary frames)."""

    def __init__(self, ws: ClientConnection, binary: bool) -> None:
        self.ws = ws
        self.binary = binary
        self.data: list[dict[str, Any]] = []  # data messages read while looking for control messages
        self.largest = 0  # most messages in one frame

    async def send(self, obj: Any) -> None:
        await self.ws.send(msgpack.packb(obj) if self.binary else orjson.dumps(obj).decode())

    async def frame(self, wait_s: float = 5.0) -> list[dict[str, Any]]:
        raw = await asyncio.wait_for(self.ws.recv(), wait_s)
        assert isinstance(raw, bytes) == self.binary  # msgpack: binary frames; JSON: text frames
        msgs = msgpack.unpackb(raw) if self.binary else orjson.loads(raw)
        assert isinstance(msgs, list) and msgs  # every frame is an array
        self.largest = max(self.largest, len(msgs))
        return msgs

    async def control(self, wait_s: float = 5.0) -> dict[str, Any]:
        """The next control message (alone in its frame); data read meanwhile goes to ``data``."""
        deadline = time.monotonic() + wait_s
        while True:
            msgs = await self.frame(max(0.01, deadline - time.monotonic()))
            if msgs[0]["T"] in CONTROL:
                assert len(msgs) == 1, msgs
                return msgs[0]
            assert not any(m["T"] in CONTROL for m in msgs)
            self.data.extend(msgs)

    async def ask(self, obj: Any) -> dict[str, Any]:
        await self.send(obj)
        return await self.control()

    async def collect(self, seconds: float) -> list[dict[str, Any]]:
        """Data messages for ``seconds`` (no control message expected)."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                msgs = await self.frame(left)
            except TimeoutError:
                break
            assert not any(m["T"] in CONTROL for m in msgs), msgs
            out.extend(msgs)
        return out

    async def until(self, done: Callable[[list[dict[str, Any]]], bool], wait_s: float = 5.0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + wait_s
        while not done(out):
            msgs = await self.frame(max(0.01, deadline - time.monotonic()))
            assert not any(m["T"] in CONTROL for m in msgs), msgs
            out.extend(msgs)
        return out


@asynccontextmanager
async def raw_client(
    base: str, path: str = "/v2/iex", *, binary: bool = False, auth: tuple[str, str] | None = CLIENT, **kw: Any
) -> AsyncIterator[Raw]:
    headers = {"Content-Type": "application/msgpack"} if binary else {}
    ws = await connect(base + path, additional_headers={**headers, **kw.pop("headers", {})}, **kw)
    try:
        c = Raw(ws, binary)
        assert await c.control() == {"T": "success", "msg": "connected"}
        if auth is not None:
            assert await c.ask({"action": "auth", "key": auth[0], "secret": auth[1]}) == {
                "T": "success",
                "msg": "authenticated",
            }
        yield c
    finally:
        # keep reading while closing: a client whose receive queue is full never sees the server's close
        drain = asyncio.create_task(_drain(ws))
        await ws.close()
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain


async def _drain(ws: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


def dropped_slow_clients() -> float:
    labels = {"protocol": "alpaca", "reason": "slow_consumer"}
    return REGISTRY.get_sample_value("marketpipe_fanout_dropped_clients_total", labels) or 0.0


# --- alpaca-py ------------------------------------------------------------------------------------------


async def test_alpaca_py_stock_data_stream_gets_what_the_vendor_sent(gateway: tuple[str, FastAPI]) -> None:
    base, app = gateway
    upstream: list[StreamMessage] = []  # what the gateway's upstream connection got from the vendor
    stream = hub(app).stream
    assert stream is not None
    remove = stream.add_batch_handler(upstream.extend)
    try:
        got = await alpaca_py_receive(base + "/v2/iex", *CLIENT, wait_s=10)
    finally:
        remove()
    sent = list(upstream)
    trades = {(m.record.symbol, m.record.trade_id): m.record for m in sent if isinstance(m.record, Trade)}
    quotes = {(m.record.symbol, m.record.ts): m.record for m in sent if isinstance(m.record, Quote)}
    bars = {(m.record.symbol, m.record.ts): m.record for m in sent if isinstance(m.record, Bar)}
    for t in got["trades"]:
        assert isinstance(t, PyTrade) and t.symbol == "AAPL"
        v = trades[(t.symbol, t.id)]
        exchange = getattr(t.exchange, "value", t.exchange)
        assert (t.timestamp, t.price, t.size, exchange, tuple(t.conditions or ()), t.tape) == (
            v.ts,
            v.price,
            v.size,
            v.exchange,
            v.conditions,
            v.tape,
        )
    for q in got["quotes"]:
        assert isinstance(q, PyQuote) and q.symbol in ("AAPL", "MSFT")
        w = quotes[(q.symbol, q.timestamp)]
        assert (q.bid_price, q.bid_size, q.ask_price, q.ask_size, q.tape) == (
            w.bid_price,
            w.bid_size,
            w.ask_price,
            w.ask_size,
            w.tape,
        )
        assert getattr(q.bid_exchange, "value", q.bid_exchange) == w.bid_exchange
    for b in got["bars"]:
        assert isinstance(b, PyBar) and b.symbol == "SPY" and b.timestamp.second == 0
        x = bars[(b.symbol, b.timestamp)]
        assert (b.open, b.high, b.low, b.close, b.volume, b.trade_count, b.vwap) == (
            x.open,
            x.high,
            x.low,
            x.close,
            x.volume,
            x.trade_count,
            x.vwap,
        )
    assert len({t.id for t in got["trades"]}) == len(got["trades"])  # each trade once


async def test_the_vendors_nanoseconds_reach_alpaca_py_and_json_clients(gateway: tuple[str, FastAPI]) -> None:
    """Before: the gateway wrote trade and quote times from the records' datetime, so a vendor stamp
    ``…:11.308411571Z`` went out as ``…:11.308411Z`` (msgpack: nanoseconds=308411000). The simulator, like
    the vendor, stamps in nanoseconds (never ending in 0, so every stamp has sub-microsecond digits)."""
    base, app = gateway
    upstream: list[StreamMessage] = []
    stream = hub(app).stream
    assert stream is not None
    remove = stream.add_batch_handler(upstream.extend)
    try:
        got = await alpaca_py_receive(base + "/v2/iex", *CLIENT, wait_s=10, raw_data=True)  # msgpack frames
        async with raw_client(base, "/v2/sip") as c:  # JSON text frames
            await c.ask({"action": "subscribe", "trades": ["AAPL"], "quotes": ["MSFT"]})
            text = [m for m in await c.until(lambda ms: sum(m["T"] in "tq" for m in ms) >= 6) if m["T"] in "tq"]
    finally:
        remove()
    vendor = {
        (type(m.record).__name__, m.record.symbol, m.record.ts_ns)
        for m in upstream
        if isinstance(m.record, Trade | Quote)
    }
    assert all(ns is not None and ns % 1000 for _, _, ns in vendor)  # sub-microsecond digits, kept by the client
    sent = [("Trade", m) for m in got["trades"]] + [("Quote", m) for m in got["quotes"]]
    assert len(sent) >= 6
    for kind, m in sent:
        assert isinstance(m["t"], msgpack.Timestamp) and (kind, m["S"], m["t"].to_unix_nano()) in vendor, m
    for m in text:
        ns = one_ts_ns(m["t"])
        assert re.fullmatch(r".*\.\d{9}Z", m["t"]) and ns_text(ns) == m["t"], m["t"]  # all nine digits
        assert ({"t": "Trade", "q": "Quote"}[m["T"]], m["S"], ns) in vendor, m


# --- raw clients ----------------------------------------------------------------------------------------


def _check_shape(msg: dict[str, Any], binary: bool) -> None:
    keys = {"t": TRADE_KEYS, "q": QUOTE_KEYS, "b": BAR_KEYS, "d": BAR_KEYS}[msg["T"]]
    assert list(msg) == keys  # T first, the reference's order
    if binary:
        assert isinstance(msg["t"], msgpack.Timestamp)
    else:
        assert RFC3339.match(msg["t"]), msg["t"]
    if msg["T"] == "t":
        assert isinstance(msg["i"], int) and isinstance(msg["c"], list) and msg["z"] and msg["x"]
    elif msg["T"] == "q":
        assert msg["ap"] >= msg["bp"] > 0 and isinstance(msg["c"], list)
    else:
        assert msg["h"] >= msg["l"] and msg["v"] >= 0 and msg["n"] >= 0


@pytest.mark.parametrize(("binary", "path"), [(False, "/v2/sip"), (True, "/v2/test")], ids=["json", "msgpack"])
async def test_raw_client_protocol(gateway: tuple[str, FastAPI], binary: bool, path: str) -> None:
    base, _ = gateway
    async with raw_client(base, path, binary=binary) as c:
        sub = {"action": "subscribe", "trades": ["AAPL"], "quotes": ["aapl", "MSFT"], "bars": ["SPY"]}
        assert await c.ask({**sub, "dailyBars": ["SPY"]}) == subscription(
            trades=["AAPL"], quotes=["AAPL", "MSFT"], bars=["SPY"], dailyBars=["SPY"]
        )
        kinds = {("t", "AAPL"), ("q", "AAPL"), ("q", "MSFT"), ("b", "SPY"), ("d", "SPY")}
        data = await c.until(lambda got: kinds <= {(m["T"], m["S"]) for m in got})
        assert {(m["T"], m["S"]) for m in data} == kinds
        for m in data:
            _check_shape(m, binary)
        assert c.largest > 1  # data messages come in batches

        # a symbol and "*" on one channel: each trade arrives once
        assert (await c.ask({"action": "subscribe", "trades": ["*"]}))["trades"] == ["AAPL", "*"]
        trades = [m for m in await c.collect(0.6) if m["T"] == "t"]
        ids = [(m["S"], m["i"]) for m in trades]
        assert len(ids) == len(set(ids)) and {s for s, _ in ids} >= {"AAPL", "MSFT"}

        # unsubscribe: the reply, then nothing of what was removed
        assert await c.ask({"action": "unsubscribe", "trades": ["*", "AAPL"], "quotes": ["MSFT"]}) == subscription(
            quotes=["AAPL"], bars=["SPY"], dailyBars=["SPY"]
        )
        after = await c.collect(0.6)
        assert {m["T"] for m in after} <= {"q", "b", "d"} and {m["S"] for m in after} <= {"AAPL", "SPY"}
        assert any(m["T"] == "q" for m in after)


async def test_errors_and_auth(gateway: tuple[str, FastAPI]) -> None:
    base, _ = gateway
    async with raw_client(base, auth=None) as c:
        assert await c.ask({"action": "subscribe", "trades": ["AAPL"]}) == {
            "T": "error",
            "code": 401,
            "msg": "not authenticated",
        }
        assert (await c.ask({"action": "unsubscribe", "trades": ["AAPL"]}))["code"] == 401
        await c.ws.send("not json")
        assert await c.control() == {"T": "error", "code": 400, "msg": "invalid syntax"}
        await c.ws.send(b"\xc1")  # not msgpack
        assert (await c.control())["code"] == 400
        assert (await c.ask([1, 2]))["code"] == 400
        assert (await c.ask({"action": "dance"}))["code"] == 400
        # still open, and now authenticated
        assert await c.ask({"action": "auth", "key": CLIENT[0], "secret": CLIENT[1]}) == {
            "T": "success",
            "msg": "authenticated",
        }
        assert await c.ask({"action": "auth", "key": CLIENT[0], "secret": CLIENT[1]}) == {
            "T": "error",
            "code": 403,
            "msg": "already authenticated",
        }
        assert await c.ask({"action": "subscribe", "bars": ["SPY"]}) == subscription(bars=["SPY"])
        refused = [
            ({"action": "subscribe", "news": ["AAPL"]}, 410),
            ({"action": "subscribe", "trades": "AAPL"}, 400),
            ({"action": "subscribe", "trades": [1]}, 400),
            ({"action": "subscribe"}, 400),
            ({"action": "subscribe", "bogus": ["AAPL"]}, 400),
            ({"action": "subscribe", "quotes": ["MSFT"], "trades": ["AAPL", "NO SUCH!"]}, 400),
            ({"action": "subscribe", "trades": [f"S{n}" for n in range(MAX_SYMBOLS)]}, 405),
        ]
        for msg, code in refused:
            reply = await c.ask(msg)
            assert reply["T"] == "error" and reply["code"] == code, (msg, reply)
        # none of that changed anything; corrections/cancelErrors cannot be set, they follow trades
        assert await c.ask({"action": "subscribe", "trades": ["MSFT"], "corrections": ["NVDA"]}) == subscription(
            trades=["MSFT"], bars=["SPY"]
        )

    # a wrong secret: 402, then the server closes
    async with raw_client(base, binary=True, auth=None) as c:
        assert await c.ask({"action": "auth", "key": CLIENT[0], "secret": "wrong"}) == {
            "T": "error",
            "code": 402,
            "msg": "auth failed",
        }
        with pytest.raises(ConnectionClosed):
            await c.frame()
        assert c.ws.close_code == 1008

    # keys as headers on the upgrade: authenticated unprompted
    headers = {"APCA-API-KEY-ID": CLIENT[0], "APCA-API-SECRET-KEY": CLIENT[1]}
    async with raw_client(base, auth=None, headers=headers) as c:
        assert await c.control() == {"T": "success", "msg": "authenticated"}
        assert (await c.ask({"action": "subscribe", "quotes": ["AAPL"]}))["quotes"] == ["AAPL"]


async def test_auth_timeout(gateway: tuple[str, FastAPI], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alpaca_stream, "AUTH_TIMEOUT_SECONDS", 0.3)
    base, _ = gateway
    async with raw_client(base, auth=None) as c:
        assert await c.control() == {"T": "error", "code": 404, "msg": "auth timeout"}
        with pytest.raises(ConnectionClosed):
            await c.frame()


async def test_without_gateway_keys_any_pair_is_accepted(sim: SimServer, tmp_path: Path) -> None:
    app = create_app(gateway_config(sim.url, tmp_path / "open.duckdb"), env=gateway_env("GW1"))
    with serving(app) as url:
        base = "ws" + url[4:]
        async with raw_client(base, "/v2/sip", auth=("anything", "goes")) as c:
            assert (await c.ask({"action": "subscribe", "trades": ["AAPL"]}))["trades"] == ["AAPL"]
        async with raw_client(base, auth=None) as c:  # but the auth step is required, with a key
            assert (await c.ask({"action": "subscribe", "trades": ["AAPL"]}))["code"] == 401
            assert (await c.ask({"action": "auth", "key": "", "secret": "x"}))["code"] == 402
    off = gateway_config(sim.url, tmp_path / "off.duckdb", stream={"enabled": False})
    with serving(create_app(off, env=gateway_env("GW2"))) as url, pytest.raises(InvalidStatus):
        async with connect("ws" + url[4:] + "/v2/iex"):  # no live hub: the upgrade is refused
            pass


async def test_apca_api_data_url_alone_points_the_gateway_stream_at_the_simulator(
    sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: with only ``$APCA_API_DATA_URL`` naming the simulator (no base_url in the file), the loaded
    config carries it, so the hub's upstream dials the simulator's stream and alpaca-py gets messages
    through the gateway (before, the hub dialled Alpaca's real stream host and got nothing)."""
    from marketpipe.core.config import load_config

    cfg_file = tmp_path / "env-only.toml"
    cfg_file.write_text(
        f'[store]\npath = "{tmp_path / "env.duckdb"}"\n[providers.alpaca]\nplan = "unlimited"\n'
        "rate_limit_per_min = 100000\n[providers.polygon]\nenabled = false\n"
    )
    monkeypatch.setenv("APCA_API_DATA_URL", sim.url)
    cfg = load_config(cfg_file)
    assert cfg.provider("alpaca").base_url == sim.url
    with serving(create_app(cfg, env=gateway_env("GW4"))) as url:
        got = await alpaca_py_receive("ws" + url[4:] + "/v2/iex", "anyone", "anysecret", wait_s=10)
    assert all(len(got[kind]) >= 3 for kind in ("trades", "quotes", "bars"))


# --- slow clients ---------------------------------------------------------------------------------------


@pytest.fixture
def busy_gateway(sim: SimServer, tmp_path: Path) -> Iterator[str]:
    """A gateway that always streams the whole universe, so that one client leaving does not pour all
    the vendor's messages into another's one symbol. Client queues keep their default size: the hub
    queues an upstream frame (up to 1,000 messages at this rate) at once, so a queue smaller than a
    frame would drop a client that reads perfectly well."""
    universe = list(StreamConfig().universe)
    cfg = gateway_config(sim.url, tmp_path / "busy.duckdb", stream={"symbols": universe})
    with serving(create_app(cfg, env=gateway_env("GW3"))) as url:
        yield "ws" + url[4:]


async def test_a_client_that_does_not_read_is_dropped_and_the_others_keep_receiving(
    busy_gateway: str, sim_rate: Callable[[float], None]
) -> None:
    base = busy_gateway
    host, port = base.removeprefix("ws://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small buffers fill at once
    sock.connect((host, int(port)))
    sock.setblocking(False)
    before = dropped_slow_clients()
    async with (
        raw_client(base, "/v2/iex") as fast,
        raw_client(base, "/v2/iex", sock=sock, compression=None, max_queue=1) as slow,
    ):
        assert (await fast.ask({"action": "subscribe", "quotes": ["AAPL"]}))["quotes"] == ["AAPL"]
        assert (await slow.ask({"action": "subscribe", "trades": ["*"], "quotes": ["*"]}))["trades"] == ["*"]
        sim_rate(40_000)
        t0 = time.monotonic()
        # the slow one stops reading; the fast one reads on until the slow one is dropped
        while dropped_slow_clients() == before:
            assert time.monotonic() - t0 < 10, "the slow client was never dropped"
            await fast.collect(0.05)
        after = await fast.collect(0.5)
        assert after and {(m["T"], m["S"]) for m in after} == {("q", "AAPL")}
        # the slow client: what was buffered, then 407 (when it could still be written) and the close
        seen: list[dict[str, Any]] = []
        with pytest.raises(ConnectionClosed):
            while True:
                seen.extend(await slow.frame())
        assert len(seen) > 1_000  # dropped for not reading, after filling its buffers and its queue
        assert (
            [m for m in seen if m["T"] == "error"] == [seen[-1]] == [{"T": "error", "code": 407, "msg": "slow client"}]
        )
        assert slow.ws.close_code == 1008 and slow.ws.close_reason == "slow client"
