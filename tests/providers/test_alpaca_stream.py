"""The Alpaca stream client against the simulator's real WebSocket stream over loopback: records,
both encodings, refcounted subscriptions (as the server receives them), reconnects with the outage
window, the stale-data watchdog, and every error code the simulator plays (402, 405, 406, 409,
malformed frames, unknown types). Codes the simulator never sends (401, 404, 407, 500) and the
event messages it never carries (statuses, LULDs, corrections, cancel/errors) are played by a tiny
scripted websockets server speaking the reference protocol."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import msgpack
import msgspec
import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from marketpipe.core.errors import AuthFailed, InvalidArgument, NotEntitled
from marketpipe.core.metrics import REGISTRY
from marketpipe.core.schema import (
    Bar,
    CancelError,
    Correction,
    Imbalance,
    Luld,
    Quote,
    RawMessage,
    Trade,
    TradingStatus,
)
from marketpipe.providers.alpaca_stream import AlpacaStream, MessageIterator, Outage, StreamMessage, _SessionClock
from marketpipe.sim.alpaca import DEFAULT_KEYS
from marketpipe.sim.data import SimMarket
from marketpipe.sim.server import SimServer
from marketpipe.sim.stream import AlpacaStream as SimStream
from marketpipe.sim.stream import StreamConfig
from marketpipe.wire.alpaca_stream import DECODERS, MESSAGE_CHANNELS, encode, message_of

SIM_CONFIG = StreamConfig(rate=2_000, bar_interval_s=0.1)
SOURCE = "sim:alpaca"
N_KEYS = 30
_numbers = itertools.count()


@pytest.fixture(scope="module")
def stream_sim() -> Iterator[SimServer]:
    keys = dict(DEFAULT_KEYS)
    for n in range(N_KEYS):
        keys[f"KEY{n}"] = (f"SECRET{n}", "unlimited")
        keys[f"FREE{n}"] = (f"FREESECRET{n}", "free")
    with SimServer(SimMarket(), keys=keys, stream_config=SIM_CONFIG) as server:
        yield server


@pytest.fixture
def sim_stream(stream_sim: SimServer) -> Iterator[SimStream]:
    assert stream_sim.stream is not None
    yield stream_sim.stream
    stream_sim.stream.config = SIM_CONFIG
    stream_sim.stream.clear_faults()


@pytest.fixture
def received(sim_stream: SimStream, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every client message the simulator receives, decoded, in order."""
    seen: list[dict[str, Any]] = []
    original = sim_stream._on_message

    async def spy(conn: Any, data: bytes, *, binary: bool) -> None:
        seen.append(msgpack.unpackb(data) if binary else orjson.loads(data))
        await original(conn, data, binary=binary)

    monkeypatch.setattr(sim_stream, "_on_message", spy)
    return seen


def _env(free: bool = False) -> dict[str, str]:
    """A key of its own for each test, so that no test meets another's session (406)."""
    n = next(_numbers)
    if free:
        return {"ALPACA_API_KEY": f"FREE{n}", "ALPACA_SECRET_KEY": f"FREESECRET{n}"}
    return {"ALPACA_API_KEY": f"KEY{n}", "ALPACA_SECRET_KEY": f"SECRET{n}"}


def client(sim: SimServer, env: dict[str, str], feed: str = "iex", **kw: Any) -> AlpacaStream:
    opts: dict[str, Any] = {"backoff_initial": 0.05, "backoff_max": 0.2, "source": SOURCE, "env": env}
    opts.update(kw)
    return AlpacaStream(feed, base_url="ws" + sim.url[4:], **opts)


async def first(it: MessageIterator, pred: Callable[[StreamMessage], bool], wait_s: float = 5.0) -> StreamMessage:
    async with asyncio.timeout(wait_s):
        async for msg in it:
            if pred(msg):
                return msg
    raise AssertionError("stream ended")


async def until(cond: Callable[[], bool], wait_s: float = 5.0) -> None:
    deadline = time.monotonic() + wait_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def actions(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in ("key", "secret")} for m in seen]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- records ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_trades_quotes_bars_arrive_as_canonical_records(
    stream_sim: SimServer, received: list[dict[str, Any]], encoding: str
) -> None:
    env = _env()
    handled: list[StreamMessage] = []

    async def on_bar(msg: StreamMessage) -> None:
        handled.append(msg)

    async with client(stream_sim, env, encoding=encoding) as stream:
        stream.add_handler(on_bar, channels=["bars", "daily_bars"])
        await stream.subscribe(trades=["aapl"], quotes=["AAPL"], bars=["AAPL"], daily_bars=["AAPL"])
        it = stream.messages()
        await stream.wait_ready(5)
        got: dict[str, StreamMessage] = {}
        async with asyncio.timeout(5):
            async for msg in it:
                got.setdefault(msg.channel, msg)
                if {"trades", "quotes", "bars", "daily_bars"} <= got.keys():
                    break
        health = stream.health()

    trade, quote, bar, daily = (got[c].record for c in ("trades", "quotes", "bars", "daily_bars"))
    assert isinstance(trade, Trade) and isinstance(quote, Quote)
    assert isinstance(bar, Bar) and isinstance(daily, Bar)
    for rec in (trade, quote, bar, daily):
        assert rec.symbol == "AAPL" and rec.source == SOURCE and rec.feed == "iex"
        assert rec.ts.tzinfo is not None and rec.ts.utcoffset() == UTC.utcoffset(None)
        assert rec.fetched_at.tzinfo is not None
    assert trade.fetched_at >= trade.ts and quote.fetched_at >= quote.ts  # the simulator's fast bars run ahead
    assert trade.price > 0 and trade.size > 0 and isinstance(trade.trade_id, int) and trade.exchange == "V"
    assert isinstance(trade.conditions, tuple) and trade.tape == "C"
    assert 0 < quote.bid_price <= quote.ask_price and quote.bid_exchange == quote.ask_exchange == "V"
    assert bar.timeframe == "1Min" and bar.ts.second == 0 and bar.low <= bar.open <= bar.high
    assert bar.trade_count is not None and bar.vwap is not None
    assert daily.timeframe == "1Day" and daily.volume >= bar.volume
    assert {m.channel for m in handled} <= {"bars", "daily_bars"} and handled

    # the client spoke the connection's encoding, authenticated first, and sent one subscribe
    assert received[0]["action"] == "auth" and received[0]["key"] == env["ALPACA_API_KEY"]
    assert actions(received[1:]) == [
        {"action": "subscribe", "trades": ["AAPL"], "quotes": ["AAPL"], "bars": ["AAPL"], "dailyBars": ["AAPL"]}
    ]
    assert health.connected and health.feed == "iex" and health.encoding == encoding
    assert health.server_subscriptions["trades"] == ["AAPL"] == health.server_subscriptions["corrections"]
    assert health.messages_by_channel["trades"] >= 1 and health.messages_received >= 4
    assert set(health.last_message_at) >= {"trades", "quotes", "bars", "daily_bars"}
    assert health.errors_by_code == {} and health.decode_errors == 0
    assert metric("marketpipe_stream_messages_total", provider=SOURCE, feed="iex", channel="trades") >= 1


async def test_subscriptions_are_reference_counted(stream_sim: SimServer, received: list[dict[str, Any]]) -> None:
    stream = client(stream_sim, _env())
    # two consumers before the connection exists: one subscribe on connect
    await stream.subscribe(trades=["AAPL"])
    await stream.subscribe(trades=["AAPL"], quotes=["MSFT"])
    async with stream:
        await stream.wait_ready(5)
        assert actions(received[1:]) == [{"action": "subscribe", "trades": ["AAPL"], "quotes": ["MSFT"]}]

        await stream.subscribe(trades=["AAPL", "MSFT"])  # AAPL 2 -> 3 (silent), MSFT 0 -> 1
        await stream.unsubscribe(trades=["AAPL"])  # 3 -> 2
        await stream.unsubscribe(trades=["AAPL"])  # 2 -> 1
        await stream.unsubscribe(quotes=["MSFT"])  # 1 -> 0
        await stream.unsubscribe(trades=["AAPL"])  # 1 -> 0
        with pytest.raises(InvalidArgument):
            await stream.unsubscribe(trades=["AAPL"])  # not held: refused, nothing changes
        health = stream.health()

    assert actions(received[2:]) == [
        {"action": "subscribe", "trades": ["MSFT"]},
        {"action": "unsubscribe", "quotes": ["MSFT"]},
        {"action": "unsubscribe", "trades": ["AAPL"]},
    ]
    assert health.subscriptions == {"trades": {"MSFT": 1}}
    assert health.server_subscriptions["trades"] == ["MSFT"] and health.server_subscriptions["quotes"] == []


# --- reconnects and the watchdog ----------------------------------------------------------------------


async def test_reconnect_after_drop_restores_subscriptions_and_reports_outage(
    stream_sim: SimServer, received: list[dict[str, Any]]
) -> None:
    outages: list[Outage] = []
    stream = client(stream_sim, _env(), on_reconnect=outages.append)
    await stream.subscribe(trades=["AAPL"], bars=["MSFT"])
    async with stream:
        it = stream.messages(["trades"])
        await first(it, lambda m: True)
        assert await asyncio.to_thread(stream_sim.drop_streams, "iex", abrupt=True) >= 1
        await until(lambda: bool(outages))
        outage = outages[0]
        after = await first(it, lambda m: m.record.fetched_at > outage.reconnected_at)  # type: ignore[union-attr]
        health = stream.health()

    assert outage.reason == "dropped" and outage.feed == "iex"
    assert outage.last_data_at is not None and outage.last_data_at <= outage.disconnected_at
    assert outage.disconnected_at <= outage.reconnected_at <= datetime.now(UTC)
    assert isinstance(after.record, Trade)
    auths = [i for i, m in enumerate(received) if m["action"] == "auth"]
    assert len(auths) == 2
    restore = {"action": "subscribe", "trades": ["AAPL"], "bars": ["MSFT"]}
    assert actions([received[auths[0] + 1], received[auths[1] + 1]]) == [restore, restore]
    assert health.reconnects == 1 and health.connections == 2 and health.connected


async def test_watchdog_reconnects_a_stalled_stream_while_market_open(
    stream_sim: SimServer, sim_stream: SimStream
) -> None:
    outages: list[Outage] = []
    stream = client(stream_sim, _env(), stale_seconds=0.3, market_open=lambda: True, on_reconnect=outages.append)
    async with stream:
        await stream.subscribe(trades=["AAPL"], statuses=["AAPL"])  # statuses are never watched
        it = stream.messages(["trades"])
        await first(it, lambda m: True)
        sim_stream.set_faults(stall=True)
        await until(lambda: bool(outages), 5)
        sim_stream.clear_faults()
        await first(it, lambda m: m.record.fetched_at > outages[-1].reconnected_at)  # type: ignore[union-attr]
    assert outages[0].reason == "stale"
    assert metric("marketpipe_stream_reconnects_total", provider=SOURCE, reason="stale") >= 1


async def test_watchdog_is_quiet_while_market_closed(stream_sim: SimServer, sim_stream: SimStream) -> None:
    stream = client(stream_sim, _env(), stale_seconds=0.2, market_open=lambda: False)
    async with stream:
        await stream.subscribe(trades=["AAPL"])
        await first(stream.messages(), lambda m: True)
        sim_stream.set_faults(stall=True)
        await asyncio.sleep(1.0)
        health = stream.health()
    assert health.reconnects == 0 and health.connected


# --- vendor errors ----------------------------------------------------------------------------------


async def test_auth_failed_stops_without_a_retry_loop(stream_sim: SimServer, sim_stream: SimStream) -> None:
    env = _env()
    env["ALPACA_SECRET_KEY"] = "wrong"
    before = sim_stream.stats()["connections"]
    stream = client(stream_sim, env)
    it = stream.messages()
    with pytest.raises(AuthFailed) as info:
        await asyncio.wait_for(stream.run(), 5)
    await asyncio.sleep(0.3)
    assert sim_stream.stats()["connections"] - before == 1
    assert info.value.code == "AUTH_FAILED" and info.value.details["vendor_code"] == 402
    health = stream.health()
    assert health.stopped and health.stop_error is not None and health.stop_error["code"] == "AUTH_FAILED"
    assert health.errors_by_code == {402: 1} and health.reconnects == 0
    with pytest.raises(AuthFailed):
        await anext(it)
    with pytest.raises(AuthFailed):
        await stream.wait_ready(1)
    await stream.close()


async def test_connection_limit_waits_the_long_backoff(stream_sim: SimServer, sim_stream: SimStream) -> None:
    env = _env()
    async with client(stream_sim, env) as holder:
        await holder.wait_ready(5)
        waiting = client(stream_sim, env, limit_backoff_seconds=1.0)
        await waiting.start()
        await until(lambda: waiting.health().errors_by_code.get(406) == 1)
        attempts = sim_stream.stats()["connections"]
        health = waiting.health()
        assert not health.connected and health.next_retry_at is not None
        assert health.last_error is not None and health.last_error["code"] == 406
        refused_at = datetime.fromisoformat(health.last_error["at"])
    # the holder is gone; no new attempt before the long backoff is over
    await asyncio.sleep(0.5)
    assert sim_stream.stats()["connections"] == attempts
    await waiting.wait_ready(5)
    health = waiting.health()
    assert health.connected_since is not None and (health.connected_since - refused_at).total_seconds() >= 1.0
    assert health.reconnects == 1 and health.errors_by_code == {406: 1}
    assert metric("marketpipe_stream_reconnects_total", provider=SOURCE, reason="connection_limit") >= 1
    await waiting.close()


async def test_insufficient_subscription_falls_back_to_iex(stream_sim: SimServer) -> None:
    before = metric("marketpipe_stream_feed_fallbacks_total", provider=SOURCE, from_feed="sip", to_feed="iex")
    async with client(stream_sim, _env(free=True), "sip") as stream:
        await stream.subscribe(trades=["AAPL"])
        msg = await first(stream.messages(), lambda m: m.channel == "trades")
        health = stream.health()
    assert stream.feed == "iex" and health.url.endswith("/v2/iex")
    assert isinstance(msg.record, Trade) and msg.record.feed == "iex"
    assert health.errors_by_code == {409: 1}
    after = metric("marketpipe_stream_feed_fallbacks_total", provider=SOURCE, from_feed="sip", to_feed="iex")
    assert after == before + 1

    strict = client(stream_sim, _env(free=True), "sip", fallback_feed=None)
    with pytest.raises(NotEntitled):
        await asyncio.wait_for(strict.run(), 5)
    await strict.close()


async def test_symbol_limit_is_raised_to_the_subscriber_and_the_connection_stays(
    stream_sim: SimServer, sim_stream: SimStream, received: list[dict[str, Any]]
) -> None:
    sim_stream.configure(free_symbol_limit=2)
    async with client(stream_sim, _env(free=True)) as stream:
        await stream.wait_ready(5)
        await stream.subscribe(trades=["AAPL"])
        with pytest.raises(NotEntitled) as info:
            await stream.subscribe(quotes=["MSFT", "AMZN"])
        assert info.value.details["vendor_code"] == 405
        health = stream.health()
        assert health.connected and health.reconnects == 0
        assert health.subscriptions == {"trades": {"AAPL": 1}}  # the refused references were released
        assert health.server_subscriptions["quotes"] == []
        await first(stream.messages(), lambda m: m.channel == "trades")
        await stream.subscribe(quotes=["MSFT"])  # within the limit: fine on the same connection
        assert stream.health().server_subscriptions["quotes"] == ["MSFT"]
    assert [m["action"] for m in received] == ["auth", "subscribe", "subscribe", "subscribe"]


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_malformed_frames_and_unknown_types_do_not_crash(
    stream_sim: SimServer, sim_stream: SimStream, encoding: str
) -> None:
    before = metric("marketpipe_stream_decode_errors_total", provider=SOURCE)
    async with client(stream_sim, _env(), encoding=encoding) as stream:
        await stream.subscribe(trades=["AAPL"])
        it = stream.messages()
        await first(it, lambda m: m.channel == "trades")
        sim_stream.set_faults(malformed="text")
        await until(lambda: stream.health().decode_errors >= 3)
        await first(it, lambda m: m.channel == "trades")
        sim_stream.set_faults(malformed="unknown_type")
        raw = await first(it, lambda m: m.channel == "raw")
        await first(it, lambda m: m.channel == "trades")
        health = stream.health()
    assert isinstance(raw.record, RawMessage)
    assert raw.record.message_type == "zz" and raw.record.symbol == "AAPL"
    assert raw.record.source == SOURCE and raw.record.message["msg"] == "simulated unknown message type"
    assert health.connected and health.reconnects == 0
    assert metric("marketpipe_stream_decode_errors_total", provider=SOURCE) >= before + 3


async def test_close_ends_iterators_and_releases_the_connection(stream_sim: SimServer, sim_stream: SimStream) -> None:
    stream = client(stream_sim, _env())
    await stream.subscribe(trades=["AAPL"])
    await stream.wait_ready(5)
    it = stream.messages()
    await first(it, lambda m: True)
    await stream.close()
    rest = [m async for m in it]  # what was buffered, then the end
    assert all(isinstance(m, StreamMessage) for m in rest)
    health = stream.health()
    assert not health.connected and health.stopped and health.stop_error is None
    await until(lambda: sim_stream.stats()["authenticated"] == 0)
    await stream.close()  # idempotent


async def test_slow_consumer_drops_oldest_and_a_failing_handler_is_counted(stream_sim: SimServer) -> None:
    def broken(msg: StreamMessage) -> None:
        raise RuntimeError("consumer bug")

    async with client(stream_sim, _env()) as stream:
        stream.add_handler(broken, channels="quotes")
        await stream.subscribe(trades=["AAPL"], quotes=["AAPL"])
        slow = stream.messages(maxsize=5)
        fast = stream.messages("trades")
        await until(lambda: slow.dropped > 0 and stream.health().handler_errors > 0)
        assert slow.pending() == 5
        await first(fast, lambda m: m.channel == "trades")
        assert stream.connected and stream.health().reconnects == 0
    assert metric("marketpipe_stream_consumer_dropped_total", provider=SOURCE) >= slow.dropped


def test_default_market_clock_follows_the_xnys_sessions() -> None:
    clock = _SessionClock()
    assert clock.is_open(datetime(2024, 3, 5, 15, 0, tzinfo=UTC))  # Tuesday 10:00 New York
    assert not clock.is_open(datetime(2024, 3, 5, 21, 30, tzinfo=UTC))  # after the close
    assert not clock.is_open(datetime(2024, 3, 9, 15, 0, tzinfo=UTC))  # Saturday
    assert not clock.is_open(datetime(2024, 12, 25, 15, 0, tzinfo=UTC))  # Christmas
    assert clock.is_open(datetime(2024, 11, 29, 17, 30, tzinfo=UTC))  # early close day, 12:30 New York
    assert not clock.is_open(datetime(2024, 11, 29, 18, 30, tzinfo=UTC))  # after the 13:00 early close


# --- a scripted server for what the simulator never sends ----------------------------------------------

Script = Callable[[ServerConnection, int], Awaitable[None]]


async def _handshake(ws: ServerConnection) -> None:
    await ws.send('[{"T":"success","msg":"connected"}]')
    auth = orjson.loads(await ws.recv())
    assert auth["action"] == "auth"
    await ws.send('[{"T":"success","msg":"authenticated"}]')


async def _subscribed(ws: ServerConnection) -> None:
    req = orjson.loads(await ws.recv())
    reply = {"T": "subscription", **{k: v for k, v in req.items() if k != "action"}}
    await ws.send(orjson.dumps([reply]).decode())


async def _error(ws: ServerConnection, code: int, text: str) -> None:
    await ws.send(orjson.dumps([{"T": "error", "code": code, "msg": text}]).decode())


async def _hold(ws: ServerConnection) -> None:
    async for _ in ws:
        pass


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    servers: list[Any] = []

    async def start(script: Script) -> str:
        count = itertools.count()

        async def handler(ws: ServerConnection) -> None:
            await script(ws, next(count))

        server = await serve(handler, "127.0.0.1", 0)
        servers.append(server)
        port = next(iter(server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("code", "text", "after_ready"),
    [
        (401, "not authenticated", False),
        (404, "auth timeout", False),
        (500, "internal error", False),
        (407, "slow client", True),
        (500, "internal error", True),
    ],
)
async def test_reconnecting_codes(
    scripted: Callable[[Script], Awaitable[str]], code: int, text: str, after_ready: bool
) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        if n == 0 and not after_ready:
            await ws.send('[{"T":"success","msg":"connected"}]')
            await ws.recv()
            await _error(ws, code, text)
            await ws.close()
            return
        await _handshake(ws)
        await _subscribed(ws)
        if n == 0:
            await _error(ws, code, text)
            await ws.close()
            return
        await _hold(ws)

    url = await scripted(script)
    stream = AlpacaStream("iex", base_url=url, key="K", secret="S", encoding="json", backoff_initial=0.02)
    await stream.subscribe(trades=["AAPL"])
    async with stream:
        await until(lambda: stream.health().connections == (2 if after_ready else 1) and stream.connected)
        health = stream.health()
    assert health.errors_by_code == {code: 1} and health.reconnects == 1
    assert health.last_error is not None and health.last_error["code"] == code


async def test_invalid_syntax_is_logged_and_the_stream_stays(scripted: Callable[[Script], Awaitable[str]]) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await _handshake(ws)
        await _subscribed(ws)
        await _error(ws, 400, "invalid syntax")
        await ws.send(
            '[{"T":"t","S":"AAPL","i":1,"x":"V","p":1.5,"s":10,"c":["@"],"t":"2024-03-05T15:02:11Z","z":"C"}]'
        )
        await _hold(ws)

    url = await scripted(script)
    stream = AlpacaStream("iex", base_url=url, key="K", secret="S", encoding="json")
    await stream.subscribe(trades=["AAPL"])
    async with stream:
        msg = await first(stream.messages(), lambda m: m.channel == "trades")
        health = stream.health()
    assert isinstance(msg.record, Trade) and msg.record.source == "alpaca"
    assert health.errors_by_code == {400: 1} and health.reconnects == 0 and health.connected


async def test_event_messages_decode_as_tagged_structs(scripted: Callable[[Script], Awaitable[str]]) -> None:
    frame = [  # the reference's constructed examples (§2.8), one frame, plus a data message with a bad price
        {"T": "s", "S": "XYZ", "sc": "H", "sm": "Trading Halt", "rc": "T1", "rm": "Halt News Pending",
         "t": "2024-03-05T15:10:00.0213Z", "z": "C"},
        {"T": "l", "S": "XYZ", "u": 12.74, "d": 11.52, "i": "B", "t": "2024-03-05T15:10:00.51Z", "z": "C"},
        {"T": "c", "S": "AAPL", "x": "D", "oi": 7184, "op": 171.1, "os": 50, "oc": ["@"], "ci": 7191, "cp": 171.11,
         "cs": 50, "cc": ["@"], "z": "C", "t": "2024-03-05T15:02:12.5Z"},
        {"T": "x", "S": "AAPL", "i": 7190, "x": "D", "p": 171.2, "s": 20, "a": "C", "z": "C",
         "t": "2024-03-05T15:02:13.1Z"},
        {"T": "u", "S": "SPY", "o": 510.61, "h": 510.75, "l": 510.52, "c": 510.7, "v": 40112,
         "t": "2024-03-05T15:02:00Z", "n": 388, "vw": 510.6544},
        {"T": "t", "S": "AAPL", "p": "not a price", "s": 1, "t": "2024-03-05T15:02:11.308411136Z"},
    ]  # fmt: skip

    async def script(ws: ServerConnection, n: int) -> None:
        await ws.send(msgpack.packb([{"T": "success", "msg": "connected"}]))
        await ws.recv()
        await ws.send(msgpack.packb([{"T": "success", "msg": "authenticated"}]))
        await ws.send(msgpack.packb(frame))
        await _hold(ws)

    url = await scripted(script)
    stream = AlpacaStream("iex", base_url=url, env={"APCA_API_KEY_ID": "K", "APCA_API_SECRET_KEY": "S"})
    async with stream:
        it = stream.messages()
        got = [await asyncio.wait_for(anext(it), 5) for _ in frame]
        health = stream.health()
    by = {m.channel: m.record for m in got}
    status, luld, corr, cancel, upd, bad = (
        by[c] for c in ("statuses", "lulds", "corrections", "cancel_errors", "updated_bars", "raw")
    )
    assert isinstance(status, TradingStatus) and status.status_code == "H"
    assert status.reason_message == "Halt News Pending" and status.ts == datetime(2024, 3, 5, 15, 10, 0, 21300, UTC)
    assert isinstance(luld, Luld) and (luld.limit_up, luld.limit_down, luld.indicator) == (12.74, 11.52, "B")
    assert isinstance(corr, Correction) and corr.original_id == 7184 and corr.corrected_price == 171.11
    assert corr.corrected_conditions == ("@",)
    assert isinstance(cancel, CancelError) and cancel.action == "C"
    assert isinstance(upd, Bar) and upd.timeframe == "1Min" and upd.symbol == "SPY"
    assert isinstance(bad, RawMessage) and bad.message_type == "t" and bad.error is not None
    # the tags are the record types the stream's events have always had
    assert [msgspec.to_builtins(r)["type"] for r in (status, luld, corr, cancel, bad)] == [
        "status",
        "luld",
        "correction",
        "cancel_error",
        "raw",
    ]
    assert all(m.record.feed == "iex" for m in got if not isinstance(m.record, (Trade, Quote, Bar)))
    assert health.decode_errors == 1 and health.connected


# the §2.8 examples (and an imbalance), and events without a time or some keys: decoded to records and
# encoded back as the compatible stream sends them — these are the bytes it sent while events were dicts
_EVENT_FRAMES: list[tuple[dict[str, Any], bytes, bytes]] = [
    (
        {"T": "s", "S": "XYZ", "sc": "H", "sm": "Trading Halt", "rc": "T1", "rm": "Halt News Pending",
         "t": "2024-03-05T15:10:00.0213Z", "z": "C"},
        b'[{"T":"s","S":"XYZ","sc":"H","sm":"Trading Halt","rc":"T1","rm":"Halt News Pending",'
        b'"t":"2024-03-05T15:10:00.021300Z","z":"C"}]',
        b"\x91\x88\xa1T\xa1s\xa1S\xa3XYZ\xa2sc\xa1H\xa2sm\xacTrading Halt\xa2rc\xa2T1\xa2rm\xb1Halt News Pending"
        b"\xa1t\xd7\xff\x05\x14\x0c\x80e\xe75\xc8\xa1z\xa1C",
    ),
    (
        {"T": "l", "S": "XYZ", "u": 12.74, "d": 11.52, "i": "B", "t": "2024-03-05T15:10:00.51Z", "z": "C"},
        b'[{"T":"l","S":"XYZ","u":12.74,"d":11.52,"i":"B","t":"2024-03-05T15:10:00.510000Z","z":"C"}]',
        b"\x91\x87\xa1T\xa1l\xa1S\xa3XYZ\xa1u\xcb@)z\xe1G\xae\x14{\xa1d\xcb@'\n=p\xa3\xd7\n\xa1i\xa1B"
        b"\xa1t\xd7\xffy\x97\xee\x00e\xe75\xc8\xa1z\xa1C",
    ),
    (
        {"T": "c", "S": "AAPL", "x": "D", "oi": 7184, "op": 171.1, "os": 50, "oc": ["@"], "ci": 7191, "cp": 171.11,
         "cs": 50, "cc": ["@"], "z": "C", "t": "2024-03-05T15:02:12.5Z"},
        b'[{"T":"c","S":"AAPL","x":"D","oi":7184,"op":171.1,"os":50,"oc":["@"],"ci":7191,"cp":171.11,"cs":50,'
        b'"cc":["@"],"z":"C","t":"2024-03-05T15:02:12.500000Z"}]',
        b"\x91\x8d\xa1T\xa1c\xa1S\xa4AAPL\xa1x\xa1D\xa2oi\xcd\x1c\x10\xa2op\xcb@ec33333\xa2os2\xa2oc\x91\xa1@"
        b"\xa2ci\xcd\x1c\x17\xa2cp\xcb@ec\x85\x1e\xb8Q\xec\xa2cs2\xa2cc\x91\xa1@\xa1z\xa1C\xa1t\xd7\xffw5\x94"
        b"\x00e\xe73\xf4",
    ),
    (
        {"T": "x", "S": "AAPL", "i": 7190, "x": "D", "p": 171.2, "s": 20, "a": "C", "z": "C",
         "t": "2024-03-05T15:02:13.1Z"},
        b'[{"T":"x","S":"AAPL","i":7190,"x":"D","p":171.2,"s":20,"a":"C","z":"C","t":"2024-03-05T15:02:13.100000Z"}]',
        b"\x91\x89\xa1T\xa1x\xa1S\xa4AAPL\xa1i\xcd\x1c\x16\xa1x\xa1D\xa1p\xcb@effffff\xa1s\x14\xa1a\xa1C"
        b"\xa1z\xa1C\xa1t\xd7\xff\x17\xd7\x84\x00e\xe73\xf5",
    ),
    (
        {"T": "i", "S": "XYZ", "p": 12.5, "t": "2024-03-05T15:10:00.51Z", "z": "C"},
        b'[{"T":"i","S":"XYZ","p":12.5,"t":"2024-03-05T15:10:00.510000Z","z":"C"}]',
        b"\x91\x85\xa1T\xa1i\xa1S\xa3XYZ\xa1p\xcb@)\x00\x00\x00\x00\x00\x00\xa1t\xd7\xffy\x97\xee\x00e"
        b"\xe75\xc8\xa1z\xa1C",
    ),
    (
        {"T": "s", "S": "XYZ", "sc": "H"},
        b'[{"T":"s","S":"XYZ","sc":"H","sm":null,"rc":null,"rm":null,"z":null}]',
        b"\x91\x87\xa1T\xa1s\xa1S\xa3XYZ\xa2sc\xa1H\xa2sm\xc0\xa2rc\xc0\xa2rm\xc0\xa1z\xc0",
    ),
    (
        {"T": "c", "S": "XYZ", "x": "D", "oi": 1},
        b'[{"T":"c","S":"XYZ","x":"D","oi":1,"op":null,"os":null,"oc":null,"ci":null,"cp":null,"cs":null,"cc":null,'
        b'"z":null}]',
        b"\x91\x8c\xa1T\xa1c\xa1S\xa3XYZ\xa1x\xa1D\xa2oi\x01\xa2op\xc0\xa2os\xc0\xa2oc\xc0\xa2ci\xc0\xa2cp\xc0"
        b"\xa2cs\xc0\xa2cc\xc0\xa1z\xc0",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("message", "json_frame", "msgpack_frame"), _EVENT_FRAMES)
def test_event_records_encode_back_to_the_same_wire_bytes(
    message: dict[str, Any], json_frame: bytes, msgpack_frame: bytes
) -> None:
    fetched = datetime(2024, 3, 5, 15, 10, 1, tzinfo=UTC)
    rec = DECODERS[message["T"]](message, SOURCE, "iex", fetched)
    assert isinstance(rec, (TradingStatus, Luld, Imbalance, Correction, CancelError))
    assert rec.symbol == message["S"] and rec.source == SOURCE and rec.fetched_at == fetched
    msg = message_of(rec, MESSAGE_CHANNELS[message["T"]], message["S"])
    assert encode([msg], binary=False) == json_frame
    assert encode([msg], binary=True) == msgpack_frame


@pytest.mark.parametrize(
    "message",
    [
        {"T": "s", "S": "XYZ", "sc": 5},  # a status code is a string
        {"T": "l", "S": "XYZ", "u": "high"},  # a band is a price
        {"T": "c", "S": "AAPL", "oi": 7184.5},  # a trade id is an integer
        {"T": "x", "S": "AAPL", "a": ["C"]},
    ],
)
def test_an_event_with_a_mistyped_field_is_a_decode_error(message: dict[str, Any]) -> None:
    """Each field's type is checked: a wrong one raises a ValueError, which the stream keeps as a raw
    record with the error (as it does for a trade with a bad price), never a record carrying it."""
    with pytest.raises(ValueError, match=r"Expected"):
        DECODERS[message["T"]](message, SOURCE, "iex", datetime(2024, 3, 5, 15, 10, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    "ns",
    [
        1_709_650_931_308_411_571,  # sub-microsecond digits: timestamp 64
        1_709_650_931_000_000_000,  # a whole second: timestamp 32
        1_709_650_931_308_411_000,  # what a microsecond datetime would have kept
        -1_000_000_001,  # before 1970: timestamp 96
        (1 << 34) * 1_000_000_000 + 5,  # past timestamp 64's seconds: timestamp 96
    ],
)
def test_stream_times_encode_every_nanosecond_as_the_vendor_does(ns: int) -> None:
    """The compatible stream's ``t`` (issue 13 item 15): msgpack's Timestamp ext in its smallest form,
    JSON RFC3339Nano; both decode back to the same nanoseconds, as this side's own client reads them."""
    import msgpack

    from marketpipe.core.timeutil import ns_text
    from marketpipe.wire.alpaca_stream import StreamTime, decode_frame, encode, msgpack_timestamp

    packed = encode([{"t": StreamTime(ns)}], binary=True)
    (got,) = msgpack.unpackb(packed)
    assert got["t"].to_unix_nano() == ns
    sec, nsec = divmod(ns, 1_000_000_000)
    want = 4 if nsec == 0 and 0 <= sec < 1 << 32 else 8 if 0 <= sec < 1 << 34 else 12  # timestamp 32/64/96
    assert len(msgpack_timestamp(ns)) == want
    (again,) = decode_frame(packed)
    assert isinstance(again["t"], msgpack.Timestamp) and again["t"].to_unix_nano() == ns
    if ns >= 0:  # RFC 3339 text is for instants this side can hold
        text = encode([{"t": StreamTime(ns)}], binary=False)
        assert text == b'[{"t":"' + ns_text(ns).encode() + b'"}]'


def _general_path(frame: bytes, fetched: datetime) -> list[tuple[str, Any]]:
    from marketpipe.wire.alpaca_stream import decode_frame

    return [(MESSAGE_CHANNELS[m["T"]], DECODERS[m["T"]](m, SOURCE, "sip", fetched)) for m in decode_frame(frame)]


def _types(recs: list[tuple[str, Any]]) -> list[tuple[str, dict[str, type]]]:
    return [(ch, {f: type(getattr(r, f)) for f in r.__struct_fields__}) for ch, r in recs]


@pytest.mark.parametrize(
    "ns",
    [1_709_650_931_308_411_571, 1_709_650_931_000_000_000, -1_000_000_001, (1 << 34) * 1_000_000_000 + 5],
)
def test_the_fast_frame_decoder_makes_the_general_paths_records(ns: int) -> None:
    """A msgpack frame of trades, quotes and bars decoded straight into records (issue 20) gives the
    records, field types and channels of decode_frame + DECODERS: ints where floats go, optional fields
    missing or null, every timestamp form (32/64/96 bits, before 1970)."""
    from marketpipe.wire.alpaca_stream import StreamTime, decode_data_frame

    t = StreamTime(ns)
    frame = encode(
        [
            {"T": "t", "S": "AAPL", "i": 7, "x": "V", "p": 187, "s": 100, "c": ["@", "I"], "t": t, "z": "C"},
            {"T": "t", "S": "AAPL", "p": 187.5, "s": 3, "t": t},  # no id, exchange, conditions, tape
            {"T": "t", "S": "MSFT", "i": None, "x": None, "p": 1.0, "s": 1, "c": [], "t": t, "z": None},
            {"T": "q", "S": "AAPL", "bx": "V", "bp": 187.1, "bs": 2, "ax": "Q", "ap": 188, "as": 3, "c": ["R"], "t": t},
            {"T": "q", "S": "MSFT", "t": t},  # an empty book side is 0
            {"T": "b", "S": "AAPL", "o": 1, "h": 2.5, "l": 0.5, "c": 2, "v": 900, "t": t, "n": 12, "vw": 1},
            {"T": "u", "S": "AAPL", "o": 1.0, "h": 2.5, "l": 0.5, "c": 2.0, "v": 901, "t": t},
            {"T": "d", "S": "AAPL", "o": 1.0, "h": 2.5, "l": 0.5, "c": 2.0, "v": 9_000, "t": t, "n": None},
        ],
        binary=True,
    )
    fetched = datetime(2024, 3, 5, 15, 10, 1, tzinfo=UTC)
    fast = decode_data_frame(frame, SOURCE, "sip", fetched, tuple)
    slow = _general_path(frame, fetched)
    assert fast == slow
    assert fast is not None and _types(fast) == _types(slow)


def _ts_ext(ns: int) -> msgpack.Timestamp:
    """A msgpack Timestamp extension, as the vendor writes ``t``."""
    return msgpack.Timestamp.from_unix_nano(ns)


@pytest.mark.parametrize(
    "message",
    [
        {"T": "s", "S": "XYZ", "sc": "H"},  # an event: the general path's
        {"T": "success", "msg": "authenticated"},  # a control message
        {"T": "n", "S": "XYZ"},  # a type this side does not know: kept raw
        {"T": "t", "S": "AAPL", "p": "187.5", "s": 1, "t": _ts_ext(0)},  # coerced by the general path
        {"T": "t", "S": "AAPL", "p": 187.5, "s": 1.0, "t": _ts_ext(0)},
        {"T": "t", "S": "AAPL", "p": 187.5, "s": 1, "t": "2024-03-05T15:02:11.308411571Z"},
        {"T": "t", "S": "AAPL", "p": 187.5, "s": 1},  # no timestamp: a decode error there
        {"T": "t", "S": "AAPL", "p": 187.5, "s": 1, "t": msgpack.ExtType(5, b"\x00" * 8)},
        {"T": "q", "S": "AAPL", "bp": None, "t": _ts_ext(0)},
    ],
)
def test_a_frame_the_fast_decoder_does_not_take_goes_the_general_path(message: dict[str, Any]) -> None:
    """Anything but well-formed trades, quotes and bars makes the whole frame go the general path,
    which keeps raw what it does not know and reports what is malformed."""
    from marketpipe.wire.alpaca_stream import decode_data_frame

    trade = {"T": "t", "S": "AAPL", "p": 1.0, "s": 1, "t": _ts_ext(1_709_650_931_308_411_571)}
    frame = msgpack.packb([trade, message])
    fetched = datetime(2024, 3, 5, 15, 10, 1, tzinfo=UTC)
    assert decode_data_frame(frame, SOURCE, "sip", fetched, tuple) is None


async def test_a_frame_decoded_fast_is_delivered_as_the_general_path_delivers_it() -> None:
    """Through the client: a trades-and-quotes frame and the same frame with one unknown message give
    the same records for the messages they share (the fast path, then the general one)."""
    from marketpipe.wire.alpaca_stream import StreamTime

    stream = AlpacaStream("sip", base_url="ws://127.0.0.1:9", key="K", secret="S")
    got: list[list[StreamMessage]] = []
    stream.add_batch_handler(got.append)
    t = StreamTime(1_709_650_931_308_411_571)
    data = [
        {"T": "t", "S": "AAPL", "i": 7, "x": "V", "p": 187.25, "s": 100, "c": ["@"], "t": t, "z": "C"},
        {"T": "q", "S": "AAPL", "bx": "V", "bp": 187.1, "bs": 2, "ax": "Q", "ap": 188.0, "as": 3, "c": ["R"], "t": t},
    ]
    assert await stream._on_frame(encode(data, binary=True)) == []
    assert await stream._on_frame(encode([*data, {"T": "n", "S": "AAPL"}], binary=True)) == []
    fast, slow = got
    assert [m.channel for m in slow] == ["trades", "quotes", "raw"]
    at = datetime(2024, 3, 5, 15, 10, 1, tzinfo=UTC)
    assert [(m.channel, msgspec.structs.replace(m.record, fetched_at=at)) for m in fast] == [
        (m.channel, msgspec.structs.replace(m.record, fetched_at=at)) for m in slow[:2]
    ]
    assert stream.health().to_dict()["messages_received"] == 5
