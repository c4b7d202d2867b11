"""The live hub end to end against the simulator: one upstream connection for many clients, slow
clients dropped without disturbing others, router failover to polled Polygon and back, both sources
down (last values labelled stale), checks on the stream, stream bars persisted, gap backfill, and the
previous close surviving a restart."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from marketpipe.core.calendar import get_calendar
from marketpipe.core.config import Config, config_from_dict
from marketpipe.core.events import Event, hub
from marketpipe.core.schema import Bar, Quote, Trade
from marketpipe.providers.alpaca_stream import Outage, StreamMessage
from marketpipe.service.data import MarketData
from marketpipe.service.gateway import Gateway
from marketpipe.service.live import ALPACA_PROTOCOL, PRICES, FanoutClient, LiveHub, stream_url
from marketpipe.service.stream_router import SourceState
from marketpipe.sim.data import SimMarket
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from marketpipe.sim.stream import StreamConfig

pytestmark = pytest.mark.timeout(60)

ENV = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET", "POLYGON_API_KEY": "POLYKEY"}
FAST = {
    "rate_limit_per_min": 100_000,
    "connect_timeout": 2.0,
    "read_timeout": 5.0,
    "retry": {"attempts": 1, "base_seconds": 0.01, "max_seconds": 0.02},
    "circuit": {"failure_threshold": 1000, "recovery_seconds": 0.2},
}
STREAM = {
    "failure_threshold": 2,
    "grace_seconds": 0.5,
    "fallback_poll_seconds": 0.2,
    "stale_seconds": 1.0,
    "persist_every_seconds": 0.2,
    "cross_check_seconds": 0,
}


@pytest.fixture(scope="module")
def market() -> SimMarket:
    return SimMarket()


@pytest.fixture(scope="module")
def alpaca(market: SimMarket) -> Iterator[SimServer]:
    with SimServer(market, stream_config=StreamConfig(rate=400, bar_interval_s=0.3)) as s:
        yield s


@pytest.fixture(scope="module")
def polygon(market: SimMarket) -> Iterator[SimServer]:
    with SimServer(market, keys={"POLYKEY": "unlimited"}, vendor="polygon") as s:  # type: ignore[dict-item]
        yield s


@pytest.fixture(autouse=True)
def _clear(alpaca: SimServer, polygon: SimServer) -> Iterator[None]:
    yield
    assert alpaca.stream is not None
    alpaca.stream.clear_faults()
    alpaca.faults.clear()
    polygon.faults.clear()


def live_config(alpaca: SimServer, polygon: SimServer | None, store: Path, **stream: Any) -> Config:
    cfg = config_from_dict(
        {
            "providers": {
                "alpaca": {"base_url": alpaca.url, "plan": "unlimited", "priority": 1, **FAST},
                "polygon": (
                    {"base_url": polygon.url, "plan": "unlimited", "priority": 2, **FAST}
                    if polygon is not None
                    else {"enabled": False}
                ),
                "yahoo": {"enabled": False},
            },
            "stream": {**STREAM, **stream},
        }
    )
    cfg.store.path = str(store)
    return cfg


@pytest.fixture
async def live(alpaca: SimServer, polygon: SimServer, tmp_path: Path) -> AsyncIterator[LiveHub]:
    cfg = live_config(alpaca, polygon, tmp_path / "live.duckdb")
    data = MarketData(cfg, env=ENV)
    h = LiveHub(cfg, Gateway(data), env=ENV, monitor_seconds=0.05, market_open=lambda: True)
    await h.start()
    yield h
    await h.close()
    await data.aclose()


async def drain(client: FanoutClient, seconds: float) -> tuple[list[dict[str, Any]], list[Any]]:
    notices: list[dict[str, Any]] = []
    items: list[Any] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            n, i = await asyncio.wait_for(client.next_batch(), max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            break
        if not n and not i:
            break
        notices += n
        items += i
    return notices, items


async def until(cond: Any, within: float = 10.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


def test_stream_url_follows_the_alpaca_provider(alpaca: SimServer, tmp_path: Path) -> None:
    cfg = live_config(alpaca, None, tmp_path / "x.duckdb")
    assert stream_url(cfg) == "ws://" + alpaca.url.removeprefix("http://")
    assert stream_url(Config()) == "wss://stream.data.alpaca.markets"
    cfg.stream.url = "https://example.test/"
    assert stream_url(cfg) == "wss://example.test"


async def test_many_clients_share_one_upstream_connection(live: LiveHub, alpaca: SimServer) -> None:
    assert alpaca.stream is not None
    before = alpaca.stream.stats()["connections"]
    clients = [live.attach("test", f"c{i}") for i in range(5)]
    for c in clients:
        await live.subscribe(c, PRICES, ["AAPL", "MSFT"])
    await until(lambda: all(len(c.queue) >= 20 for c in clients))
    await until(lambda: live.board(["AAPL"])[0]["prev_close"] is not None)
    await drain(clients[0], 0.05)  # what came before the previous close was known
    assert alpaca.stream.stats()["connections"] - before == 1
    _, items = await drain(clients[0], 0.2)
    docs = [i.record for i in items if i.channel == PRICES]
    assert {d["symbol"] for d in docs} == {"AAPL", "MSFT"}
    d = next(d for d in docs if d["event"] == "trade")
    assert d["source"] == "sim:alpaca" and d["feed"] == "sip" and d["is_real_time"] is True
    assert d["price"] > 0 and d["quality_score"] == 1.0 and d["stale"] is False
    assert d["prev_close"] is not None and d["change"] == pytest.approx(d["price"] - d["prev_close"], abs=1e-6)
    # a client that leaves releases nothing others still use
    for c in clients[1:]:
        await live.detach(c)
    await drain(clients[0], 0.1)
    _, items = await drain(clients[0], 0.3)
    assert items, "the remaining client still receives"
    assert live.datasource()["fanout"]["clients"] == 1


async def test_subscribe_rejects_bad_symbols_and_changes_nothing(live: LiveHub) -> None:
    c = live.attach("test")
    await live.subscribe(c, PRICES, ["AAPL"])
    with pytest.raises(Exception) as err:
        await live.subscribe(c, PRICES, ["AAPL", "no such!"])
    assert getattr(err.value, "code", "") == "INVALID_SYMBOL"
    assert c.subscriptions[PRICES] == {"AAPL"}
    with pytest.raises(Exception) as err:
        await live.subscribe(c, PRICES, ["*"])
    assert getattr(err.value, "code", "") == "INVALID_ARGUMENT"


async def test_slow_client_is_told_then_dropped_and_others_are_not_disturbed(live: LiveHub) -> None:
    slow = live.attach("test", "slow", queue_size=40)
    fast = live.attach("test", "fast")
    await live.subscribe(slow, PRICES, ["AAPL", "MSFT"])
    await live.subscribe(fast, PRICES, ["AAPL", "MSFT"])
    received = 0
    deadline = time.monotonic() + 20
    while slow.closed is None and time.monotonic() < deadline:  # the fast one reads, the slow one never does
        _, items = await drain(fast, 0.1)
        received += len(items)
    assert slow.closed == "slow_consumer"
    notices, items = await slow.next_batch()
    codes = [(n["type"], n.get("code")) for n in notices if n["type"] != "status"]
    assert ("warning", "SLOW_CONSUMER") in codes and codes[-1] == ("error", "SLOW_CONSUMER")
    assert codes.index(("warning", "SLOW_CONSUMER")) < len(codes) - 1  # told first, then dropped
    assert items == []  # its queue was released
    # the close frame it is sent says why (code 1008, a reason within the protocol's 123 bytes)
    code, reason = slow.close_frame
    assert code == 1008 and reason == "SLOW_CONSUMER: the client did not keep up: 40 messages were waiting"
    assert fast.close_frame == (1000, "")
    # the fast client received all along (counting what waits in its queue: on a loaded machine the slow one
    # can be dropped before the loop above has read much) and still does
    deadline = time.monotonic() + 20
    while received < 20 and time.monotonic() < deadline:
        _, items = await drain(fast, 0.2)
        received += len(items)
    _, after = await drain(fast, 0.5)
    assert received >= 20 and after, "the fast client received all along, and still does"


async def test_failover_to_polled_polygon_and_back(live: LiveHub, alpaca: SimServer) -> None:
    assert alpaca.stream is not None
    c = live.attach("test")
    await live.subscribe(c, PRICES, ["AAPL"])
    await until(lambda: live.router.state is SourceState.PRIMARY_ACTIVE)
    alpaca.stream.set_faults(stall=True)  # connected but mute: stale after stale_seconds
    t0 = time.monotonic()
    await until(lambda: live.router.state is SourceState.FALLBACK_ACTIVE)
    took = time.monotonic() - t0
    assert 1.0 <= took < 5.0  # stale_seconds 1 s, then failure_threshold 2 health checks
    notices, items = await drain(c, 1.0)
    polled = [i.record for i in items if i.record.get("source") == "sim:polygon"]
    assert polled, "fallback polling of Polygon published prices"
    assert all(d["is_real_time"] is False and d["quality_score"] == 0.8 for d in polled)
    assert live.datasource()["stats"]["fallback_polls"] >= 1
    alpaca.stream.clear_faults()
    await until(lambda: live.router.state is SourceState.PRIMARY_ACTIVE)
    hist = [(t.from_state, t.to_state) for t in live.router.history()]
    assert (SourceState.PRIMARY_ACTIVE, SourceState.FALLBACK_ACTIVE) in hist
    assert (SourceState.FALLBACK_ACTIVE, SourceState.PRIMARY_ACTIVE) in hist
    snap = live.datasource()
    assert snap["counters"]["failovers"] >= 1 and snap["counters"]["time_in_fallback"] > 0
    _, items = await drain(c, 0.5)
    statuses = [n["state"] for n in notices if n["type"] == "status"]
    assert "fallback_active" in statuses  # the clients were told
    assert any(i.record.get("source") == "sim:alpaca" for i in items)


async def test_both_down_serves_last_values_labelled_stale(
    live: LiveHub, alpaca: SimServer, polygon: SimServer
) -> None:
    assert alpaca.stream is not None
    c = live.attach("test")
    await live.subscribe(c, PRICES, ["MSFT"])
    await until(lambda: live.router.last("MSFT") is not None)
    alpaca.stream.set_faults(stall=True)
    polygon.faults.set([FaultRule(kind="http_503")])
    alpaca.faults.set([FaultRule(kind="http_503")])  # Alpaca's REST API is the fallback of last resort
    await until(lambda: live.router.state is SourceState.BOTH_UNAVAILABLE)
    late = live.attach("test", "late")
    await live.subscribe(late, PRICES, ["MSFT"])
    _, items = await drain(late, 0.2)
    first = items[0].record
    assert first["symbol"] == "MSFT" and first["stale"] is True and first["price"] > 0
    assert first["quality_score"] == pytest.approx(0.5)
    board = live.board(["MSFT"])
    assert board[0]["stale"] is True


async def test_stream_checks_reject_and_alert(live: LiveHub) -> None:
    seen: list[Event] = []
    unsubscribe = hub.subscribe(seen.append)
    try:
        c = live.attach("test")
        await live.subscribe(c, PRICES, ["ZZZZ"])  # a symbol the simulator keeps silent
        await until(lambda: live.router.state is not SourceState.STARTUP)
        now = datetime.now(UTC)

        def trade(price: float, size: int = 10, ts: datetime = now) -> StreamMessage:
            return StreamMessage(
                "trades",
                Trade(symbol="ZZZZ", ts=ts, price=price, size=size, source="sim:alpaca", feed="sip", fetched_at=now),
            )

        for msg in (trade(100.0), trade(-1.0), trade(150.0), trade(101.0, ts=now + timedelta(hours=1)), trade(101.0)):
            live.handle(msg)
        _, items = await drain(c, 0.2)
        prices = [i.record["price"] for i in items if i.record.get("event") == "trade"]
        assert prices == [100.0, 101.0]
        assert live.datasource()["stats"]["rejected_by_reason"] == {
            "price_not_positive": 1,
            "price_jump": 1,
            "timestamp_in_future": 1,
        }
        assert any(e.details.get("check") == "jump_breaker" and e.symbol == "ZZZZ" for e in seen)
    finally:
        unsubscribe()


async def test_stream_minute_bars_are_persisted_and_corrections_revise_them(live: LiveHub) -> None:
    c = live.attach("test")
    await live.subscribe(c, PRICES, ["QQQ"])
    now = datetime.now(UTC)
    t0 = now.replace(second=0, microsecond=0) - timedelta(minutes=10)

    def bar(i: int, close: float, channel: str = "bars", later: float = 0.0) -> StreamMessage:
        return StreamMessage(
            channel,
            Bar(
                symbol="QQQ",
                timeframe="1Min",
                ts=t0 + timedelta(minutes=i),
                open=100,
                high=101,
                low=99,
                close=close,
                volume=1000 + i,
                trade_count=10,
                vwap=100.2,
                source="sim:alpaca",
                feed="sip",
                fetched_at=now + timedelta(seconds=later),
            ),
        )

    for i in range(3):
        live.handle(bar(i, 100.5))
    live.handle(bar(1, 100.7, "updated_bars", later=30))  # a late trade changed minute 1
    await until(lambda: live.datasource()["stats"]["bars_persisted"] >= 4)
    rows = live.data.store.read_bars(["QQQ"], "1Min", t0, t0 + timedelta(minutes=3))
    assert rows["close"].to_list() == [100.5, 100.7, 100.5]  # reads prefer the newest version
    assert set(rows["source"].to_list()) == {"sim:alpaca"} and set(rows["feed"].to_list()) == {"sip"}
    revised = live.data.store.revisions("QQQ")
    assert revised.height == 1 and revised["new_close"][0] == 100.7


async def test_gap_backfill_after_an_outage_fetches_the_missed_bars_over_rest(live: LiveHub) -> None:
    c = live.attach("test")
    await live.subscribe(c, PRICES, ["MSFT"])
    cal = get_calendar("XNYS")
    day = [
        s
        for s in cal.sessions(datetime.now(UTC) - timedelta(days=10), datetime.now(UTC))
        if s.close < datetime.now(UTC)
    ][-1]
    start = day.open + timedelta(minutes=30)
    outage = Outage(
        disconnected_at=start + timedelta(seconds=20),
        reconnected_at=start + timedelta(minutes=10, seconds=5),
        last_data_at=start + timedelta(seconds=15),
        reason="dropped",
        feed="sip",
    )
    await live.on_outage(outage)
    await until(lambda: live.datasource()["stats"]["gap_backfills"] == 1)
    rows = live.data.store.read_bars(["MSFT"], "1Min", start, start + timedelta(minutes=10))
    assert rows.height == 10  # minutes 0..9 of the outage window: fetched, never invented
    assert set(rows["source"].to_list()) == {"sim:alpaca"}


async def test_previous_close_survives_a_restart(alpaca: SimServer, polygon: SimServer, tmp_path: Path) -> None:
    cfg = live_config(alpaca, polygon, tmp_path / "pc.duckdb")
    data = MarketData(cfg, env=ENV)
    first = LiveHub(cfg, Gateway(data), env=ENV, monitor_seconds=0.05)
    await first.start()
    c = first.attach("test")
    await first.subscribe(c, PRICES, ["AAPL"])
    await until(lambda: first.board(["AAPL"])[0]["prev_close"] is not None)
    prev = first.board(["AAPL"])[0]["prev_close"]
    await first.close()
    await data.aclose()
    # the vendors' snapshots are down now: the close comes from the store
    alpaca.faults.set([FaultRule(kind="http_500", paths="snapshots")])
    polygon.faults.set([FaultRule(kind="http_500")])
    data = MarketData(cfg, env=ENV)
    second = LiveHub(cfg, Gateway(data), env=ENV, monitor_seconds=0.05)
    await second.start()
    try:
        c = second.attach("test")
        await second.subscribe(c, PRICES, ["AAPL"])
        await until(lambda: second.board(["AAPL"])[0]["prev_close"] is not None)
        assert second.board(["AAPL"])[0]["prev_close"] == prev
        assert data.store.prev_closes(["AAPL"])["AAPL"][1] == prev
    finally:
        await second.close()
        await data.aclose()


async def test_admin_reconnect_and_forced_failover(live: LiveHub, alpaca: SimServer) -> None:
    assert alpaca.stream is not None
    c = live.attach("test")
    await live.subscribe(c, PRICES, ["AAPL"])
    await until(lambda: live.router.state is SourceState.PRIMARY_ACTIVE)
    stream = live.stream
    assert stream is not None
    connections = stream.health().connections
    live.request_reconnect("test")
    await until(lambda: stream.health().connections > connections and stream.connected)
    live.force_failover("test")
    assert live.router.state is SourceState.FALLBACK_ACTIVE and live.router.forced
    _, items = await drain(c, 0.8)
    sources = [i.record["source"] for i in items if i.record.get("type") == "price"]
    assert "sim:polygon" in sources
    assert set(sources[sources.index("sim:polygon") :]) == {"sim:polygon"}  # the stream no longer serves
    live.release("test")
    await until(lambda: live.router.state is SourceState.PRIMARY_ACTIVE)


async def test_dropped_stream_reconnects_resumes_and_reports_the_outage(live: LiveHub, alpaca: SimServer) -> None:
    assert alpaca.stream is not None
    c = live.attach("test")
    await live.subscribe(c, PRICES, ["AAPL"])
    await until(lambda: live.router.state is SourceState.PRIMARY_ACTIVE and live.router.last("AAPL") is not None)
    stream = live.stream
    assert stream is not None
    assert alpaca.drop_streams() >= 1
    await until(lambda: live.datasource()["stats"]["outages"] == 1)  # reconnected; the hook had the window
    await drain(c, 0.05)
    _, items = await drain(c, 0.5)
    assert any(i.record.get("source") == "sim:alpaca" for i in items), "data flows again after the reconnect"
    assert stream.health().reconnects >= 1


async def test_malformed_and_unknown_frames_disturb_nothing(live: LiveHub, alpaca: SimServer) -> None:
    assert alpaca.stream is not None
    c = live.attach("test")
    await live.subscribe(c, PRICES, ["MSFT"])
    await until(lambda: live.router.last("MSFT") is not None)
    for kind in ("text", "unknown_type"):
        alpaca.stream.set_faults(malformed=kind)
        await drain(c, 0.05)
        _, items = await drain(c, 0.5)
        assert items and all(i.record["type"] == "price" for i in items)
    alpaca.stream.clear_faults()
    health = live.datasource()["primary"]["stream"]
    assert health["decode_errors"] >= 1 and health["connected"] is True
    assert live.datasource()["stats"]["rejected"] == 0


async def test_auth_failure_stops_the_stream_and_the_fallback_serves(
    alpaca: SimServer, polygon: SimServer, tmp_path: Path
) -> None:
    assert alpaca.stream is not None
    alpaca.stream.set_faults(reject_auth=True)
    cfg = live_config(alpaca, polygon, tmp_path / "auth.duckdb")
    data = MarketData(cfg, env=ENV)
    h = LiveHub(cfg, Gateway(data), env=ENV, monitor_seconds=0.05, market_open=lambda: True)
    await h.start()
    try:
        c = h.attach("test")
        await h.subscribe(c, PRICES, ["AAPL"])
        await until(lambda: h.router.state is SourceState.FALLBACK_ACTIVE)
        stream = h.datasource()["primary"]["stream"]
        assert stream["stopped"] is True and stream["stop_error"]["code"] == "AUTH_FAILED"
        _, items = await drain(c, 0.5)
        assert items and {i.record["source"] for i in items} == {"sim:polygon"}
    finally:
        await h.close()
        await data.aclose()


# --- regressions from the review --------------------------------------------------------------------------


def upstream_refs(h: LiveHub) -> dict[str, dict[str, int]]:
    assert h.stream is not None
    return {ch: refs for ch, refs in h.stream.health().subscriptions.items() if refs}


async def test_a_client_leaving_mid_subscribe_leaves_nothing_subscribed(live: LiveHub) -> None:
    c = live.attach("test")
    task = asyncio.create_task(live.subscribe(c, PRICES, ["AMZN", "GOOGL", "META"]))
    await asyncio.sleep(0)  # the subscribe is in flight
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await live.detach(c)
    await until(lambda: not upstream_refs(live) and not live.fanout.routes)
    assert not live.upstream_wanted()


async def test_each_client_subscription_is_one_reference_counted_by_the_stream_only(live: LiveHub) -> None:
    a, b, compat = live.attach("test"), live.attach("test"), live.attach(ALPACA_PROTOCOL)
    await live.subscribe(a, PRICES, ["AAPL"])
    await live.subscribe(b, PRICES, ["AAPL"])
    await live.subscribe(compat, "trades", ["AAPL"])
    # the stream holds one reference per client; what the hub wants is derived from its routes, not counted
    assert upstream_refs(live) == {"trades": {"AAPL": 3}, "quotes": {"AAPL": 2}, "bars": {"AAPL": 2}}
    assert live.upstream_wanted() == Counter({("trades", "AAPL"): 3, ("quotes", "AAPL"): 2, ("bars", "AAPL"): 2})
    stream = live.stream
    assert stream is not None
    await until(lambda: stream.health().server_subscriptions.get("quotes") == ["AAPL"])
    await live.detach(a)
    assert upstream_refs(live) == {"trades": {"AAPL": 2}, "quotes": {"AAPL": 1}, "bars": {"AAPL": 1}}
    assert stream.health().server_subscriptions.get("quotes") == ["AAPL"]  # b still holds it: no unsubscribe
    await live.detach(b)
    assert upstream_refs(live) == {"trades": {"AAPL": 1}}
    await until(lambda: not stream.health().server_subscriptions.get("quotes"))
    assert stream.health().server_subscriptions.get("trades") == ["AAPL"]


async def test_trades_and_quotes_keep_their_own_order_and_source(live: LiveHub) -> None:
    c = live.attach("test")
    await live.subscribe(c, PRICES, ["NOPE"])  # silent in the simulator
    now = datetime.now(UTC)

    def msg(kind: str, ts: datetime, price: float, source: str = "sim:alpaca") -> StreamMessage:
        if kind == "t":
            return StreamMessage(
                "trades", Trade(symbol="NOPE", ts=ts, price=price, size=100, source=source, feed="sip", fetched_at=now)
            )
        q = Quote(
            symbol="NOPE",
            ts=ts,
            bid_price=price - 0.01,
            bid_size=1,
            ask_price=price + 0.01,
            ask_size=1,
            source=source,
            feed="sip",
            fetched_at=now,
        )
        return StreamMessage("quotes", q)

    live.handle_batch(
        [msg("t", now, 10.0), msg("q", now + timedelta(seconds=2), 10.0), msg("t", now + timedelta(seconds=1), 10.1)]
    )
    _, items = await drain(c, 0.2)
    trades = [i.record for i in items if i.record.get("event") == "trade"]
    assert [t["price"] for t in trades] == [10.0, 10.1]  # the quote's later time does not hide the trade
    assert trades[-1]["volume"] == 200
    # the fallback: its quote is newer than its trade; the trade still moves the price, and the quote's
    # source is told apart from the price's
    live.poller.apply(
        {
            "NOPE": Trade(
                symbol="NOPE",
                ts=now + timedelta(seconds=3),
                price=10.2,
                size=5,
                source="sim:polygon",
                feed="sip",
                fetched_at=now,
            )
        },
        {"NOPE": msg("q", now + timedelta(seconds=4), 10.2, "sim:polygon").record},  # type: ignore[dict-item]
    )
    _, items = await drain(c, 0.2)
    last = items[-1].record
    assert last["price"] == 10.2 and last["source"] == "sim:polygon" and last["quote_source"] == "sim:polygon"


async def test_replies_to_a_client_that_never_reads_are_bounded(live: LiveHub) -> None:
    c = live.attach("test", queue_size=20)
    for _ in range(100):
        c.notice({"type": "pong"})
    assert c.closed == "slow_consumer" and [n["type"] for n in c.notices] == ["error"]
    assert c.close_frame == (1008, "SLOW_CONSUMER: the client did not read: 20 replies were waiting")


async def test_a_stopped_stream_is_rebuilt_by_a_reconnect_request(live: LiveHub, alpaca: SimServer) -> None:
    assert alpaca.stream is not None
    alpaca.stream.set_faults(reject_auth=True)
    c = live.attach("test")
    await live.subscribe(c, PRICES, ["AAPL"])
    await until(lambda: live.stream is not None and live.stream.health().stopped)
    alpaca.stream.clear_faults()  # the key was fixed
    live.request_reconnect("key fixed")
    await until(lambda: live.stream is not None and live.stream.connected)
    await until(lambda: live.router.state is SourceState.PRIMARY_ACTIVE)
    assert upstream_refs(live)["trades"] == {"AAPL": 1}


async def test_a_quiet_stream_outside_market_hours_is_not_a_failure(
    alpaca: SimServer, polygon: SimServer, tmp_path: Path
) -> None:
    assert alpaca.stream is not None
    cfg = live_config(alpaca, polygon, tmp_path / "quiet.duckdb")
    data = MarketData(cfg, env=ENV)
    h = LiveHub(cfg, Gateway(data), env=ENV, monitor_seconds=0.05, market_open=lambda: False)
    await h.start()
    try:
        c = h.attach("test")
        await h.subscribe(c, PRICES, ["AAPL"])
        await until(lambda: h.router.state is SourceState.PRIMARY_ACTIVE)
        alpaca.stream.set_faults(stall=True)
        await asyncio.sleep(3.0)  # three stale periods
        assert h.router.state is SourceState.PRIMARY_ACTIVE
    finally:
        await h.close()
        await data.aclose()


async def test_bars_survive_a_failed_store_write(live: LiveHub, monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime.now(UTC)
    t0 = now.replace(second=0, microsecond=0) - timedelta(minutes=5)
    bar = Bar(
        symbol="QQQ",
        timeframe="1Min",
        ts=t0,
        open=1,
        high=1,
        low=1,
        close=1,
        volume=1,
        source="sim:alpaca",
        feed="sip",
        fetched_at=now,
    )
    live.handle(StreamMessage("bars", bar))
    real = live.bars.write
    calls = []

    def failing(bars: list[Bar], refresh: bool) -> int:
        calls.append(len(bars))
        if len(calls) == 1:
            raise OSError("disk full")
        return real(bars, refresh)

    monkeypatch.setattr(live.bars, "write", failing)
    assert await live.flush() == 0
    assert await live.flush() == 1
    assert live.data.store.read_bars(["QQQ"], "1Min", t0, t0 + timedelta(minutes=1)).height == 1


async def test_one_snapshot_request_for_a_subscribe_of_many_symbols(
    live: LiveHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[list[str]] = []
    real = live.gateway.snapshots

    async def counting(symbols: Any, **kw: Any) -> Any:
        asked.append(list(symbols))
        return await real(symbols, **kw)

    monkeypatch.setattr(live.gateway, "snapshots", counting)
    c = live.attach("test")
    await live.subscribe(c, PRICES, ["AAPL", "MSFT", "AMZN", "GOOGL", "META"])
    await until(lambda: bool(asked))
    await asyncio.sleep(0.2)
    assert len(asked) == 1 and sorted(asked[0]) == ["AAPL", "AMZN", "GOOGL", "META", "MSFT"]


def test_a_v1_frame_is_its_messages_encoded_one_by_one() -> None:
    """/v1/stream's frame (issue 20): runs of price updates that went to one client alone are encoded in
    one call, shared ones once per message; the bytes are those of every message encoded on its own."""
    import orjson

    from marketpipe.service.live.board import PriceBoard
    from marketpipe.service.live.fanout import Item, v1_frame, v1_json
    from marketpipe.service.stream_router import DataSourceRouter, RouterConfig

    board = PriceBoard(DataSourceRouter(RouterConfig()), 5)
    board.set_prev_close("AAPL", 180.0)
    at = datetime(2024, 3, 5, 15, 2, 11, 308411, tzinfo=UTC)
    trade = Trade(symbol="AAPL", ts=at, price=181.5, size=10, source="alpaca", feed="sip", fetched_at=at)
    quote = Quote(
        symbol="AAPL", ts=at, bid_price=181.4, bid_size=1, ask_price=181.6, ask_size=2, source="alpaca", fetched_at=at
    )
    docs = [board.update(trade, True, 1.0), board.update(quote, True, 0.8), board.update(trade, False, 0.6)]
    assert all(d is not None for d in docs)
    solo = [Item(PRICES, "AAPL", d, 1.0, True) for d in docs if d is not None]
    shared = Item(PRICES, "AAPL", docs[1], 1.0, False)  # type: ignore[arg-type]
    record = Item("trades", "AAPL", trade, 1.0)
    notices = [{"type": "warning", "code": "SLOW_CONSUMER"}, {"type": "pong"}]

    def one_by_one(notices: list[dict[str, Any]], items: list[Item]) -> bytes:
        return b"[" + b",".join([orjson.dumps(n) for n in notices] + [v1_json(it) for it in items]) + b"]"

    for ns, items in [
        (notices, solo),
        ([], solo),
        (notices, [shared, *solo, record, solo[0], shared]),
        ([], [record, shared]),
        (notices, []),
        ([], [solo[1]]),
    ]:
        assert v1_frame(ns, items) == one_by_one(ns, items)
    # shared updates: encoded together once, each keeps its own piece for the other clients
    odd = {"type": "price", "symbol": 'X},{"Y', "nested": [{"a": 1}, {"b": '},{"'}]}
    for docs_ in ([*docs, odd], [odd, {}, *docs], docs):
        many = [Item(PRICES, "AAPL", d, 1.0, False) for d in docs_]  # type: ignore[arg-type]
        assert v1_frame(notices, [*many, record, solo[0]]) == one_by_one(notices, [*many, record, solo[0]])
        assert [it.encoded("v1", v1_json) for it in many] == [orjson.dumps(d) for d in docs_]
    assert list(orjson.loads(v1_frame([], solo[:1]))[0].items()) == list(
        {
            "type": "price",
            "event": "trade",
            "symbol": "AAPL",
            "price": 181.5,
            "size": 10,
            "bid": None,
            "ask": None,
            "bid_size": None,
            "ask_size": None,
            "change": 1.5,
            "change_pct": 0.8333,
            "prev_close": 180.0,
            "volume": 10,
            "timestamp": "2024-03-05T15:02:11.308411+00:00",
            "received_at": "2024-03-05T15:02:11.308411+00:00",
            "source": "alpaca",
            "quote_source": None,
            "feed": "sip",
            "is_real_time": True,
            "quality_score": 1.0,
            "stale": False,
        }.items()
    )  # the keys in the documented order
    assert [orjson.loads(v1_json(it))["quality_score"] for it in solo] == [1.0, 0.8, 0.6]
