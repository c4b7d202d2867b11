"""The live hub's crypto lane leaves its minute bars in the store as the stock stream does: BTC/USD's
stream bars land in ``crypto_bars`` with the vendor's fractional volume, an ``updated_bars`` revision is
stored as a newer version, and after an upstream outage the minutes it missed are fetched over REST
(never filled in). The vendor is the simulator's crypto face (stream and REST)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from marketpipe.core.schema import CRYPTO_BAR_SCHEMA, Bar
from marketpipe.core.timeframe import Timeframe
from marketpipe.providers.alpaca_stream import Outage, StreamMessage
from marketpipe.service.data import MarketData
from marketpipe.service.gateway import Gateway
from marketpipe.service.live import PRICES, LiveHub
from marketpipe.service.live.crypto import CryptoHub
from marketpipe.sim.server import SimServer
from marketpipe.wire.alpaca_crypto import LOCATIONS
from tests.conftest import SIM_ENV
from tests.crypto.test_store import _asked
from tests.service.test_live import live_config, until

pytestmark = pytest.mark.timeout(60)
MIN = Timeframe.parse("1Min")


@pytest.fixture
async def lane(sim: SimServer, tmp_path: Path) -> AsyncIterator[LiveHub]:
    cfg = live_config(sim, None, tmp_path / "live.duckdb")
    data = MarketData(cfg, env=SIM_ENV)
    crypto = CryptoHub.from_config(cfg, env=SIM_ENV)
    hub = LiveHub(cfg, Gateway(data), env=SIM_ENV, monitor_seconds=0.05, crypto_hub=lambda: crypto)
    await hub.start()
    client = hub.attach("test")
    await hub.subscribe(client, PRICES, ["BTC/USD"])  # prices bring the pair's minute bars upstream too
    assert hub.crypto is not None
    yield hub.crypto
    await hub.close()
    await crypto.aclose()
    await data.aclose()


async def test_stream_bars_of_a_pair_are_stored_with_exact_fractional_volumes(lane: LiveHub) -> None:
    await until(lambda: lane.bars.persisted >= 1, 20)  # the last finished minute, sent on subscribing
    store = lane.data.store
    held = store.read_bars(["BTC/USD"], "1Min", datetime.now(UTC) - timedelta(minutes=10), datetime.now(UTC))
    assert held.height >= 1 and held["volume"].dtype == CRYPTO_BAR_SCHEMA["volume"]
    assert store.counts()["crypto_bars"] == held.height and store.counts()["bars"] == 0
    first = held.row(0, named=True)
    ts = first["ts"]
    vendor = (await lane.data.crypto.page("bars", ["BTC/USD"], ts, ts + MIN.delta, timeframe=MIN)).frame
    assert vendor.height == 1 and first["volume"] == vendor["volume"][0]  # the vendor's float, exactly
    assert first["volume"] != round(first["volume"])  # a fraction of a coin, not a whole number
    assert (first["source"], first["feed"]) == ("sim:alpaca", "us")

    # the pair's bars are already subscribed upstream (by prices): a later bars subscriber still gets the
    # last finished minute at once, as from the vendor on subscribing
    late = lane.attach("late")
    await lane.subscribe(late, "bars", ["BTC/USD"])
    _, items = await asyncio.wait_for(late.next_batch(), 5)
    got = [i.record for i in items if i.channel == "bars"]
    assert got and isinstance(got[0], Bar) and got[0].symbol == "BTC/USD" and isinstance(got[0].volume, float)

    # a revision of that minute (updated_bars) is stored as a newer version, its fraction kept too
    revised = {"high": first["high"] + 1, "close": first["high"] + 1, "volume": 0.123456789}  # a consistent bar
    bar = Bar(**{**first, **revised, "fetched_at": datetime.now(UTC)})
    lane.handle(StreamMessage("updated_bars", bar))
    await until(lambda: store.revisions("BTC/USD").height == 1)
    again = store.read_bars(["BTC/USD"], "1Min", ts, ts + MIN.delta)
    assert again["volume"].to_list() == [0.123456789] and again["close"][0] == first["high"] + 1


async def test_an_upstream_outage_is_reported_and_the_missed_minutes_are_fetched_over_rest(
    lane: LiveHub, sim: SimServer
) -> None:
    stream = sim.crypto_stream
    assert stream is not None and sim._loop is not None
    await until(lambda: lane.bars.persisted >= 1, 20)
    face = stream.face.config
    face.locations = tuple(x for x in LOCATIONS if x != "us")  # the vendor refuses "us" for a while
    try:
        assert asyncio.run_coroutine_threadsafe(stream.drop(), sim._loop).result(5) >= 1
        await until(lambda: lane.router.state.value != "primary_active", 20)
    finally:
        face.locations = LOCATIONS
    await until(lambda: lane.bars.outages == 1, 30)  # reconnected and subscribed again: the hook had the window
    out = lane.bars.last_outage
    assert out is not None and out.feed == "us" and out.disconnected_at < out.reconnected_at
    assert out.last_data_at is not None and out.last_data_at <= out.disconnected_at

    # the window the writer backfills: the whole minutes between the last data and the reconnect
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=2)
    outage = Outage(
        disconnected_at=start + timedelta(seconds=20),
        reconnected_at=start + timedelta(minutes=10, seconds=5),
        last_data_at=start + timedelta(seconds=15),
        reason="dropped",
        feed="us",
    )
    sim.reset_stats()
    before = lane.bars.gap_backfills
    await lane.on_outage(outage)
    await until(lambda: lane.bars.gap_backfills == before + 1)
    assert _asked(sim) >= 1  # fetched from the vendor's REST bars
    end = start + timedelta(minutes=10)
    held = lane.data.store.read_bars(["BTC/USD"], "1Min", start, end)
    assert held.height == 10 and set(held["source"]) == {"sim:alpaca"}  # minutes 0..9: fetched, never invented
    vendor = (await lane.data.crypto.page("bars", ["BTC/USD"], start, end, timeframe=MIN)).frame
    assert held["volume"].to_list() == vendor["volume"].to_list()  # fractions exactly as the vendor sent them
