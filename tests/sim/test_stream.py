"""The Alpaca real-time stock stream of the simulator, with a real WebSocket client (websockets),
both encodings, every error the reference lists for it, the faults, throughput, and alpaca-py."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from datetime import time as dtime
from typing import Any

import httpx
import msgpack
import numpy as np
import orjson
import pytest
from alpaca.data.models import Bar, Quote, Trade
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from marketpipe.core.timeutil import NY, dt_to_ns
from marketpipe.sim.alpaca import DEFAULT_KEYS
from marketpipe.sim.data import SimMarket
from marketpipe.sim.server import SimServer
from marketpipe.sim.stream import AlpacaStream, StreamConfig, StreamFaults
from tests.conftest import alpaca_py_receive

NS_MIN = 60_000_000_000
TRADE_KEYS = ["T", "S", "i", "x", "p", "s", "c", "t", "z"]
QUOTE_KEYS = ["T", "S", "bx", "bp", "bs", "ax", "ap", "as", "c", "t", "z"]
BAR_KEYS = ["T", "S", "o", "h", "l", "c", "v", "t", "n", "vw"]
STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z$")
CONTROL = {"success", "error", "subscription"}
CONFIG = StreamConfig(rate=2_000, bar_interval_s=0.1)
N_KEYS = 40
_key_numbers = itertools.count()


def empty_subscription(**channels: list[str]) -> dict[str, Any]:
    sub: dict[str, Any] = {"T": "subscription"}
    for c in ("trades", "quotes", "bars", "updatedBars", "dailyBars", "statuses", "lulds", "imbalances"):
        sub[c] = channels.get(c, [])
    sub["corrections"] = sub["cancelErrors"] = sub["trades"]
    return sub


@pytest.fixture(scope="module")
def sim(market: SimMarket) -> Iterator[SimServer]:
    keys = dict(DEFAULT_KEYS)
    for n in range(N_KEYS):
        keys[f"KEY{n}"] = (f"SECRET{n}", "unlimited")
        keys[f"FREE{n}"] = (f"FREESECRET{n}", "free")
    with SimServer(market, keys=keys, stream_config=CONFIG) as server:
        yield server


@pytest.fixture
def stream(sim: SimServer) -> Iterator[AlpacaStream]:
    assert sim.stream is not None
    yield sim.stream
    sim.stream.config = CONFIG
    sim.stream.clear_faults()


@pytest.fixture
def key(stream: AlpacaStream) -> tuple[str, str]:
    """A key of its own for each test, so that no test meets another's session (406)."""
    n = next(_key_numbers)
    return f"KEY{n}", f"SECRET{n}"


@pytest.fixture
def free_key(stream: AlpacaStream) -> tuple[str, str]:
    n = next(_key_numbers)
    return f"FREE{n}", f"FREESECRET{n}"


class Client:
    """A websockets connection that speaks JSON or msgpack and reads message by message."""

    def __init__(self, ws: ClientConnection, binary: bool) -> None:
        self.ws = ws
        self.binary = binary
        self.pending: list[dict[str, Any]] = []

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send(msgpack.packb(obj) if self.binary else orjson.dumps(obj).decode())

    async def frame(self, wait_s: float = 5.0) -> list[dict[str, Any]]:
        raw = await asyncio.wait_for(self.ws.recv(), wait_s)
        if self.binary:
            assert isinstance(raw, bytes), "msgpack connections get binary frames"
            msgs: list[dict[str, Any]] = msgpack.unpackb(raw)
        else:
            assert isinstance(raw, str), "JSON connections get text frames"
            msgs = orjson.loads(raw)
        assert isinstance(msgs, list) and msgs, "every frame is a non-empty array"
        return msgs

    async def next(self, wait_s: float = 5.0) -> dict[str, Any]:
        if not self.pending:
            self.pending = await self.frame(wait_s)
        return self.pending.pop(0)

    async def until(self, pred: Callable[[dict[str, Any]], bool], wait_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + wait_s
        while True:
            msg = await self.next(max(0.01, deadline - time.monotonic()))
            if pred(msg):
                return msg

    async def control(self, wait_s: float = 5.0) -> dict[str, Any]:
        """The next control message; control messages travel alone in their frame."""
        while True:
            if self.pending:
                msg = self.pending.pop(0)
                if msg["T"] in CONTROL:
                    return msg
                continue
            frame = await self.frame(wait_s)
            if frame[0]["T"] in CONTROL:
                assert len(frame) == 1, f"control message batched: {frame}"
                return frame[0]
            self.pending = []

    async def data(self, n: int, wait_s: float = 5.0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < n:
            msg = await self.next(wait_s)
            if msg["T"] not in CONTROL:
                out.append(msg)
        return out


@asynccontextmanager
async def open_stream(
    sim: SimServer,
    feed: str = "iex",
    key: tuple[str, str] | None = None,
    *,
    binary: bool = False,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> AsyncIterator[Client]:
    hdr = dict(headers or {})
    if binary:
        hdr["Content-Type"] = "application/msgpack"
    async with connect(sim.ws_url(feed), additional_headers=hdr, max_size=None, **kw) as ws:
        c = Client(ws, binary)
        assert await c.frame() == [{"T": "success", "msg": "connected"}]
        if key is not None:
            await c.send({"action": "auth", "key": key[0], "secret": key[1]})
            assert await c.control() == {"T": "success", "msg": "authenticated"}
        yield c


async def closed(c: Client, wait_s: float = 3.0) -> ConnectionClosed:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(c.ws.recv(), wait_s)
    return info.value


def rfc3339(ns: int) -> str:
    return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def replay_session(market: SimMarket) -> tuple[int, int]:
    di = int(np.searchsorted(market.closes, time.time_ns(), side="right")) - 1
    return int(market.opens[di]), int(market.closes[di])


# --- session flow and shapes ------------------------------------------------------------------------


async def test_welcome_auth_subscribe_and_exact_shapes(sim: SimServer, key: tuple[str, str]) -> None:
    async with open_stream(sim, "iex") as c:
        await c.send({"action": "auth", "key": key[0], "secret": key[1]})
        assert await c.frame() == [{"T": "success", "msg": "authenticated"}]
        await c.send({"action": "subscribe", "trades": ["AAPL"], "quotes": ["AMD", "MSFT"], "bars": ["*"]})
        sub = await c.control()
        assert sub == empty_subscription(trades=["AAPL"], quotes=["AMD", "MSFT"], bars=["*"])
        assert list(sub) == list(empty_subscription())  # key order too
        before = time.time_ns()
        msgs = await c.data(300)
        trades = [m for m in msgs if m["T"] == "t"]
        quotes = [m for m in msgs if m["T"] == "q"]
        assert trades and quotes and {m["T"] for m in msgs} <= {"t", "q", "b"}
        assert {m["S"] for m in trades} == {"AAPL"} and {m["S"] for m in quotes} == {"AMD", "MSFT"}
        for m in trades:
            assert list(m) == TRADE_KEYS and m["x"] == "V" and m["c"] == ["@"]
        for m in quotes:
            assert list(m) == QUOTE_KEYS and m["bx"] == m["ax"] == "V" and m["c"] == ["R"]
        stamps = [m["t"] for m in msgs if m["T"] != "b"]
        assert all(STAMP.match(s) for s in stamps)
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        first = datetime.fromisoformat(stamps[0][:26] + "+00:00")
        assert abs(dt_to_ns(first) - before) < 5 * 10**9  # stamped now

        # every field but t is the REST face's row of the replay session
        lo, hi = replay_session(sim.market)
        async with httpx.AsyncClient(base_url=sim.url) as http:
            rest = await http.get(
                "/v2/stocks/AAPL/trades",
                params={"start": rfc3339(lo), "end": rfc3339(hi), "feed": "iex", "limit": 10000},
                headers={"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"},
            )
        by_id = {r["i"]: r for r in rest.json()["trades"]}
        for m in trades:
            row = by_id[m["i"]]
            assert {k: m[k] for k in ("x", "p", "s", "c", "z")} == {k: row[k] for k in ("x", "p", "s", "c", "z")}

        await c.send({"action": "unsubscribe", "trades": ["AAPL"], "quotes": ["AMD"]})
        assert await c.control() == empty_subscription(quotes=["MSFT"], bars=["*"])
        after = await c.data(100)
        assert {m["S"] for m in after if m["T"] != "b"} == {"MSFT"}
        await c.send({"action": "subscribe", "trades": ["AAPL", "*"]})
        await c.send({"action": "unsubscribe", "trades": ["AAPL"]})
        await c.control()
        assert (await c.control())["trades"] == ["*"]  # "*" is an entry of its own


async def test_msgpack_frames_and_timestamp_extension(sim: SimServer, key: tuple[str, str]) -> None:
    async with open_stream(sim, "sip", key, binary=True) as c:
        await c.send({"action": "subscribe", "trades": ["SPY"], "quotes": ["SPY"]})
        assert await c.control() == empty_subscription(trades=["SPY"], quotes=["SPY"])
        raw = await asyncio.wait_for(c.ws.recv(), 5)
        assert isinstance(raw, bytes) and b"\xa1t\xd7\xff" in raw  # "t": fixext 8 of type -1
        assert all(isinstance(m["t"], msgpack.Timestamp) for m in msgpack.unpackb(raw))
        msgs = await c.data(200)
        for m in msgs:
            assert list(m) == (TRADE_KEYS if m["T"] == "t" else QUOTE_KEYS) and m["S"] == "SPY"
        ns = [m["t"].to_unix_nano() for m in msgs]
        assert ns == sorted(ns) and abs(ns[0] - time.time_ns()) < 5 * 10**9
        assert {m["x"] for m in msgs if m["T"] == "t"} - {"V"}  # the SIP tape, not only IEX
        # a JSON text command on a msgpack connection is read as well; the answer stays msgpack
        await c.ws.send(orjson.dumps({"action": "unsubscribe", "quotes": ["SPY"]}).decode())
        assert await c.control() == empty_subscription(trades=["SPY"])


async def test_header_auth_pushes_authenticated(sim: SimServer, key: tuple[str, str]) -> None:
    headers = {"APCA-API-KEY-ID": key[0], "APCA-API-SECRET-KEY": key[1]}
    async with open_stream(sim, "iex", headers=headers) as c:
        assert await c.frame() == [{"T": "success", "msg": "authenticated"}]
        await c.send({"action": "auth", "key": key[0], "secret": key[1]})
        assert await c.control() == {"T": "error", "code": 403, "msg": "already authenticated"}
        await c.send({"action": "subscribe", "trades": ["AAPL"]})
        assert (await c.control())["trades"] == ["AAPL"]


# --- errors -----------------------------------------------------------------------------------------


async def test_402_wrong_keys_then_close(sim: SimServer, key: tuple[str, str]) -> None:
    async with open_stream(sim, "iex") as c:
        await c.send({"action": "auth", "key": key[0], "secret": "wrong"})
        assert await c.frame() == [{"T": "error", "code": 402, "msg": "auth failed"}]
        await closed(c)


async def test_404_auth_timeout(sim: SimServer, stream: AlpacaStream) -> None:
    stream.configure(auth_timeout_s=0.3)
    async with open_stream(sim, "iex") as c:
        t0 = time.monotonic()
        assert await c.frame() == [{"T": "error", "code": 404, "msg": "auth timeout"}]
        assert 0.2 < time.monotonic() - t0 < 3
        await closed(c)


async def test_406_second_connection_same_key_same_feed(sim: SimServer, key: tuple[str, str]) -> None:
    async with open_stream(sim, "iex", key) as first:
        async with open_stream(sim, "iex") as second:
            await second.send({"action": "auth", "key": key[0], "secret": key[1]})
            assert await second.frame() == [{"T": "error", "code": 406, "msg": "connection limit exceeded"}]
            await closed(second)
        async with open_stream(sim, "test", key):  # another endpoint counts separately
            pass
        await first.send({"action": "subscribe", "quotes": ["AAPL"]})
        assert (await first.control())["quotes"] == ["AAPL"]
    async with open_stream(sim, "iex", key):  # the slot is free again once the first has gone
        pass


async def test_405_symbol_limit_on_the_free_plan(sim: SimServer, free_key: tuple[str, str]) -> None:
    syms = [f"S{a}{b}" for a, b in itertools.product("ABCDEF", "GHIJKL")][:31]
    async with open_stream(sim, "iex", free_key) as c:
        await c.send({"action": "subscribe", "trades": syms[:20], "quotes": syms[10:30], "bars": syms})
        assert await c.control() == empty_subscription(trades=syms[:20], quotes=syms[10:30], bars=syms)
        await c.send({"action": "subscribe", "quotes": [syms[30]]})  # 31 distinct over trades + quotes
        assert await c.control() == {"T": "error", "code": 405, "msg": "symbol limit exceeded"}
        await c.send({"action": "subscribe", "trades": ["*"]})
        assert (await c.control())["code"] == 405
        await c.send({"action": "subscribe", "dailyBars": []})  # the state is what it was
        assert await c.control() == empty_subscription(trades=syms[:20], quotes=syms[10:30], bars=syms)


async def test_409_free_plan_on_sip(sim: SimServer, free_key: tuple[str, str]) -> None:
    async with open_stream(sim, "sip") as c:
        await c.send({"action": "auth", "key": free_key[0], "secret": free_key[1]})
        assert await c.frame() == [{"T": "error", "code": 409, "msg": "insufficient subscription"}]
        await closed(c)
    async with open_stream(sim, "iex", free_key):  # the free plan has IEX
        pass


async def test_400_401_410_keep_the_connection(sim: SimServer, key: tuple[str, str]) -> None:
    async with open_stream(sim, "iex") as c:
        await c.send({"action": "subscribe", "trades": ["AAPL"]})
        assert await c.control() == {"T": "error", "code": 401, "msg": "not authenticated"}
        await c.send({"action": "auth", "key": key[0], "secret": key[1]})
        assert await c.control() == {"T": "success", "msg": "authenticated"}
        bad: list[Any] = [
            "not json",
            {"action": "listen"},
            {"no": "action"},
            {"action": "subscribe"},
            {"action": "subscribe", "trades": "AAPL"},
            {"action": "subscribe", "trades": ["aapl"]},
            {"action": "subscribe", "trades": ["FAKEPACA"]},
            {"action": "subscribe", "bogus": ["AAPL"]},
            [{"action": "subscribe", "trades": ["AAPL"]}],
        ]
        for msg in bad:
            await c.ws.send(msg if isinstance(msg, str) else orjson.dumps(msg).decode())
            assert await c.control() == {"T": "error", "code": 400, "msg": "invalid syntax"}, msg
        await c.ws.send(b"\xc1")  # never valid msgpack
        assert (await c.control())["code"] == 400
        await c.send({"action": "subscribe", "orderbooks": ["AAPL"]})
        assert await c.control() == {"T": "error", "code": 410, "msg": "invalid subscribe action for this feed"}
        await c.send({"action": "subscribe", "trades": ["BRK.B", "ZZZZ"], "corrections": ["X"]})
        assert await c.control() == empty_subscription(trades=["BRK.B", "ZZZZ"])


async def test_fakepaca_on_the_test_feed(sim: SimServer, free_key: tuple[str, str]) -> None:
    async with open_stream(sim, "test", free_key) as c:
        await c.send({"action": "subscribe", "trades": ["FAKEPACA", "AAPL"], "quotes": ["*"], "bars": ["FAKEPACA"]})
        assert (await c.control())["trades"] == ["FAKEPACA", "AAPL"]
        msgs = await c.data(150)
        assert {m["S"] for m in msgs} == {"FAKEPACA"} and {"t", "q", "b"} >= {m["T"] for m in msgs}
        assert await c.until(lambda m: m["T"] == "b")
        lo, hi = replay_session(sim.market)
        ids = set(sim.market.trades_frame("PACA", lo, hi, "sip")["i"].tolist())
        assert {m["i"] for m in msgs if m["T"] == "t"} <= ids  # the series of PACA, under FAKEPACA


async def test_minute_bars_and_daily_bars(sim: SimServer, key: tuple[str, str]) -> None:
    async with open_stream(sim, "iex", key) as c:
        await c.send({"action": "subscribe", "bars": ["SPY"], "dailyBars": ["SPY"]})
        await c.control()
        msgs = [await c.until(lambda m: m["T"] in "bd", wait_s=3) for _ in range(6)]
    bars = [m for m in msgs if m["T"] == "b"]
    daily = [m for m in msgs if m["T"] == "d"]
    assert len(bars) == len(daily) == 3
    lo, hi = replay_session(sim.market)
    ref = sim.market.bars_frame("SPY", "1Min", lo, hi, "iex")
    stamps = []
    for b, d in zip(bars, daily, strict=True):
        assert list(b) == BAR_KEYS and list(d) == BAR_KEYS and b["S"] == d["S"] == "SPY"
        ns = dt_to_ns(datetime.fromisoformat(b["t"].replace("Z", "+00:00")))
        assert ns % NS_MIN == 0
        stamps.append(ns)
        day = datetime.fromtimestamp(ns / 1e9, NY).date()
        k = (ns - dt_to_ns(datetime.combine(day, dtime(9, 30), NY))) // NS_MIN % len(ref["t"])
        assert (b["o"], b["h"], b["l"], b["c"], b["v"], b["n"]) == tuple(
            ref[f][k].item() for f in ("o", "h", "l", "c", "v", "n")
        )
        assert d["o"] == ref["o"][0] and d["c"] == b["c"] and d["v"] == int(ref["v"][: k + 1].sum())
        assert d["t"].endswith(("T04:00:00Z", "T05:00:00Z"))
    assert np.diff(stamps).tolist() == [NS_MIN, NS_MIN]  # fast mode: one minute per bar


# --- faults -----------------------------------------------------------------------------------------


async def test_stall_keeps_the_socket_and_answers_pings(
    sim: SimServer, stream: AlpacaStream, key: tuple[str, str]
) -> None:
    async with open_stream(sim, "iex", key) as c:
        await c.send({"action": "subscribe", "quotes": ["AAPL"], "bars": ["AAPL"]})
        await c.control()
        await c.data(5)
        stream.faults.stall = True
        await asyncio.sleep(0.1)  # let frames already on their way arrive
        while True:
            try:
                await asyncio.wait_for(c.ws.recv(), 0.1)
            except TimeoutError:
                break
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.ws.recv(), 0.5)
        pong = await c.ws.ping()
        await asyncio.wait_for(pong, 2)
        await c.send({"action": "subscribe", "trades": ["AAPL"]})  # control still answered
        assert (await c.control())["trades"] == ["AAPL"]
        stream.faults.stall = False
        assert len(await c.data(20)) == 20


async def test_slow_rate(sim: SimServer, stream: AlpacaStream, key: tuple[str, str]) -> None:
    stream.set_faults(rate_factor=0.01)  # 2,000/s -> 20/s
    async with open_stream(sim, "iex", key) as c:
        await c.send({"action": "subscribe", "quotes": ["AAPL", "MSFT"]})
        await c.control()
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 0.6:
            try:
                n += len(await c.frame(wait_s=0.1))
            except TimeoutError:
                continue
        assert 1 <= n <= 40


@pytest.mark.parametrize("binary", [False, True])
async def test_malformed_frames(sim: SimServer, stream: AlpacaStream, key: tuple[str, str], binary: bool) -> None:
    async with open_stream(sim, "iex", key, binary=binary) as c:
        await c.send({"action": "subscribe", "quotes": ["AAPL"]})
        await c.control()
        stream.set_faults(malformed="text")
        for _ in range(50):
            raw = await asyncio.wait_for(c.ws.recv(), 5)
            if isinstance(raw, str):
                with pytest.raises(orjson.JSONDecodeError):
                    orjson.loads(raw)
                break
        else:
            pytest.fail("no malformed text frame")
        stream.set_faults(malformed="unknown_type")
        msg = await c.until(lambda m: m["T"] not in ("q", "t"))
        assert msg["T"] == "zz"


async def test_reject_auth(sim: SimServer, stream: AlpacaStream, key: tuple[str, str]) -> None:
    stream.set_faults(StreamFaults(reject_auth=True))
    async with open_stream(sim, "iex") as c:
        await c.send({"action": "auth", "key": key[0], "secret": key[1]})
        assert await c.frame() == [{"T": "error", "code": 402, "msg": "auth failed"}]
        await closed(c)


async def test_drop_now_and_drop_after(sim: SimServer, stream: AlpacaStream, key: tuple[str, str]) -> None:
    async with open_stream(sim, "iex", key) as c:
        await c.send({"action": "subscribe", "quotes": ["AAPL"]})
        await c.control()
        await c.data(5)
        assert await asyncio.to_thread(sim.drop_streams, "iex") >= 1
        exc = await closed(c)
        assert exc.rcvd is None  # no close frame: the TCP connection was cut
    async with open_stream(sim, "iex", key) as c:
        assert await asyncio.to_thread(sim.drop_streams, None, abrupt=False) >= 1
        exc = await closed(c)
        assert exc.rcvd is not None and exc.rcvd.code == 1001
    stream.set_faults(drop_after_s=0.3)
    async with open_stream(sim, "iex", key) as c:
        t0 = time.monotonic()
        await c.send({"action": "subscribe", "quotes": ["AAPL"]})
        exc = await closed(c)
        assert exc.rcvd is None and 0.2 < time.monotonic() - t0 < 3


async def test_a_client_that_stops_reading_is_dropped(
    sim: SimServer, stream: AlpacaStream, key: tuple[str, str]
) -> None:
    stream.configure(rate=200_000, slow_client_timeout_s=0.3)
    async with open_stream(sim, "sip", key, compression=None, max_queue=1) as c:
        await c.send({"action": "subscribe", "trades": ["AAPL"], "quotes": ["AAPL"]})
        await c.control()
        t0 = time.monotonic()
        await asyncio.sleep(1.5)  # read nothing: the socket buffers fill, the server's send stalls
        exc = await closed(c, wait_s=5)
        assert exc.rcvd is None  # cut, as the vendor cuts a slow client
        assert time.monotonic() - t0 < 8  # by the server, well before websockets' own 20 s keepalive


async def test_faults_over_http(sim: SimServer, stream: AlpacaStream, key: tuple[str, str]) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.put("/_sim/stream/faults", json={"stall": True, "rate_factor": 0.5})
        assert r.status_code == 200 and r.json()["faults"]["stall"] is True
        assert stream.faults.stall and stream.faults.rate_factor == 0.5
        assert (await http.put("/_sim/stream/faults", json={"rate_factor": 0})).status_code == 400
        assert (await http.delete("/_sim/stream/faults")).json()["faults"]["stall"] is False
        async with open_stream(sim, "iex", key) as c:
            r = await http.get("/_sim/stream")
            assert r.json()["stats"]["authenticated"] >= 1 and r.headers["X-Marketpipe-Sim"] == "1"
            assert (await http.post("/_sim/stream/drop", json={"feed": "iex"})).json()["dropped"] >= 1
            await closed(c)


# --- lifecycle, throughput, alpaca-py ---------------------------------------------------------------


async def test_server_stop_closes_streams_with_going_away(market: SimMarket) -> None:
    server = SimServer(market).start()
    try:
        async with open_stream(server, "iex", ("SIMKEY", "SIMSECRET")) as c:
            await c.send({"action": "subscribe", "quotes": ["AAPL"]})
            await c.control()
            await asyncio.to_thread(server.stop)
            exc = await closed(c)
            assert exc.rcvd is not None and exc.rcvd.code == 1001
    finally:
        server.stop()


async def test_throughput_to_one_client(sim: SimServer, stream: AlpacaStream, key: tuple[str, str]) -> None:
    stream.configure(rate=1_000_000)  # more than it can send: this measures the emitter (and the client)
    universe = list(stream.config.universe)
    async with open_stream(sim, "sip", key, compression=None) as c:
        await c.send({"action": "subscribe", "trades": universe, "quotes": universe})
        await c.control()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.3:  # warm up: buffers full at both ends of the window
            await asyncio.wait_for(c.ws.recv(), 5)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            raw = await asyncio.wait_for(c.ws.recv(), 5)
            n += raw.count('"T":') if isinstance(raw, str) else 0  # one per message, no decoding
        rate = n / (time.perf_counter() - t0)
    print(f"stream throughput: {rate:,.0f} msgs/s to one JSON client")
    assert rate >= 20_000  # about 300,000/s on an idle 2-core machine


async def test_alpaca_py_stock_data_stream(sim: SimServer, stream: AlpacaStream, key: tuple[str, str]) -> None:
    stream.configure(rate=500)
    got = await alpaca_py_receive(sim.ws_url("iex"), *key)
    trade, quote, bar = got["trades"][0], got["quotes"][0], got["bars"][0]
    assert isinstance(trade, Trade) and trade.symbol == "AAPL" and trade.price > 0 and trade.exchange == "V"
    assert isinstance(quote, Quote) and quote.symbol in ("AAPL", "MSFT") and quote.ask_price > quote.bid_price
    assert isinstance(bar, Bar) and bar.symbol == "SPY" and bar.high >= bar.low and bar.timestamp.second == 0
    assert trade.timestamp.tzinfo is not None and abs(trade.timestamp.timestamp() - time.time()) < 30


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        replace(CONFIG, max_batch=0)
    with pytest.raises(ValueError, match="bar_interval_s"):
        StreamConfig(bar_interval_s=0)
