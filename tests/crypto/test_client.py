"""The crypto adapter and mp.bars("BTC/USD") against the simulator: exact fractional sizes, a weekend
scored complete on the 24/7 calendar, typed errors for bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from marketpipe.core.config import Config
from marketpipe.core.errors import InvalidArgument, InvalidSymbol, NotEntitled
from marketpipe.core.schema import CRYPTO_BAR_SCHEMA
from marketpipe.core.timeframe import Timeframe
from marketpipe.providers.alpaca_crypto import AlpacaCryptoProvider
from marketpipe.service.data import MarketData, SyncMarketData
from marketpipe.sim.server import SimServer
from tests.conftest import provider_config

SAT = datetime(2024, 3, 2, tzinfo=UTC)
MON = datetime(2024, 3, 4, tzinfo=UTC)


@pytest.fixture
async def crypto(sim: SimServer) -> AsyncIterator[AlpacaCryptoProvider]:
    async with AlpacaCryptoProvider(base_url=sim.url) as p:
        yield p


def _config(sim: SimServer, tmp: str) -> Config:
    cfg = Config()
    cfg.providers["alpaca"] = provider_config(sim.url)
    cfg.store.path = f"{tmp}/s.duckdb"
    return cfg


async def test_bars_keep_the_vendors_volumes_exactly(sim: SimServer, crypto: AlpacaCryptoProvider) -> None:
    tf = Timeframe.parse("1Min")
    frame = await crypto.history("bars", "BTC/USD", SAT, SAT + timedelta(hours=3), timeframe=tf, limit=100)
    assert frame.schema == CRYPTO_BAR_SCHEMA and frame.height == 180
    assert set(frame["source"]) == {"sim:alpaca"} and set(frame["feed"]) == {"us"}
    async with httpx.AsyncClient() as http:
        raw = (
            await http.get(
                f"{sim.url}/v1beta3/crypto/us/bars",
                params={
                    "symbols": "BTC/USD",
                    "timeframe": "1Min",
                    "start": "2024-03-02",
                    "end": "2024-03-02T02:59:59Z",  # inclusive
                    "limit": 10000,
                },
            )
        ).json()["bars"]["BTC/USD"]
    assert frame["volume"].to_list() == [r["v"] for r in raw]  # float for float, every digit
    assert frame["volume"].min() < 1  # fractions of a coin


async def test_trades_quotes_latest_books_snapshots(crypto: AlpacaCryptoProvider) -> None:
    trades = await crypto.history("trades", ["BTC/USD", "ETH/USD"], SAT, SAT + timedelta(minutes=2))
    assert set(trades["symbol"]) == {"BTC/USD", "ETH/USD"} and set(trades["taker_side"]) <= {"B", "S"}
    assert (trades["size"] > 0).all() and (trades["size"] < 1).any()
    quotes = await crypto.history("quotes", "ETH/USD", SAT, SAT + timedelta(minutes=1))
    assert (quotes["bid_price"] < quotes["ask_price"]).all()
    book = await crypto.latest("orderbooks", "BTC/USD")
    assert book.filter(book["side"] == "bid").height == 20
    latest = await crypto.latest("trades", ["BTC/USD", "ZZZ/USD"])
    assert latest["symbol"].to_list() == ["BTC/USD"]  # an unlisted pair is absent, not an error
    snaps = await crypto.snapshots(["BTC/USD", "ETH/USD"])
    assert (
        snaps["daily_bar"].height == 2
        and snaps["prev_daily_bar"]["ts"].to_list()[0] < snaps["daily_bar"]["ts"].to_list()[0]
    )


async def test_bad_input_is_typed(sim: SimServer, crypto: AlpacaCryptoProvider) -> None:
    with pytest.raises(InvalidSymbol, match="did you mean 'BTC/USD'"):
        await crypto.latest("trades", "BTCUSD")
    with pytest.raises(InvalidArgument, match="unknown crypto location"):
        await crypto.latest("trades", "BTC/USD", location="mars")
    cfg = sim.face.crypto.config
    cfg.locations = ("us",)
    try:
        with pytest.raises(NotEntitled):
            await crypto.latest("trades", "BTC/EUR", location="eu-1")
    finally:
        cfg.locations = ("us", "us-1", "us-2", "eu-1", "bs-1")


async def test_a_weekend_of_minute_bars_scores_complete(sim: SimServer, tmp_path: object) -> None:
    data = MarketData(_config(sim, str(tmp_path)), env={})
    try:
        bars = await data.bars("BTC/USD", "2024-03-02T00:00:00Z", "2024-03-04T00:00:00Z", timeframe="1Min")
        assert bars.height == 2880
        (done,) = data.crypto.completeness(bars, ["BTC/USD"], Timeframe.parse("1Min"), SAT, MON).values()
        assert (done.expected, done.present, done.ratio) == (2880, 2880, 1.0)
        hole = bars.filter(bars["ts"] != SAT + timedelta(hours=5))
        (gap,) = data.crypto.completeness(hole, ["BTC/USD"], Timeframe.parse("1Min"), SAT, MON).values()
        assert gap.present == 2879 and gap.ratio is not None and gap.ratio < 1
        with pytest.raises(InvalidArgument, match="separately"):
            await data.bars(["BTC/USD", "AAPL"], "2024-03-02")
    finally:
        await data.aclose()


def test_mp_bars_just_works(sim: SimServer, tmp_path: object) -> None:
    with SyncMarketData(MarketData(_config(sim, str(tmp_path)), env={})) as md:
        df = md.bars("btc/usd", "2024-03-02T00:00:00Z", "2024-03-03T00:00:00Z", timeframe="1Day")
    stamp = "timestamp" if "timestamp" in df.columns else "ts"  # the public name of the time column
    assert df["symbol"].to_list() == ["BTC/USD"] and df[stamp].to_list() == [SAT]
    assert df["volume"][0] > 0 and df["volume"][0] != round(df["volume"][0])


async def test_corrupt_rows_from_the_vendor_are_left_out_not_repaired(sim: SimServer, tmp_path: object) -> None:
    from marketpipe.sim.faults import FaultRule

    data = MarketData(_config(sim, f"{tmp_path}/clean"), env={})
    faulty = MarketData(_config(sim, f"{tmp_path}/dirty"), env={})
    try:
        clean = await data.bars("BTC/USD", "2024-03-02T00:00:00Z", "2024-03-02T06:00:00Z", timeframe="1Min")
        sim.faults.set([FaultRule(kind="invalid_rows", row_ratio=0.2)])
        dirty = await faulty.bars("BTC/USD", "2024-03-02T00:00:00Z", "2024-03-02T06:00:00Z", timeframe="1Min")
        quarantined = faulty.store.quarantine("BTC/USD")  # the rejected rows, kept with why
    finally:
        await data.aclose()
        await faulty.aclose()
    assert clean.height == 360 and 0 < dirty.height < 360
    assert quarantined.height == 360 - dirty.height and quarantined["reason"].is_not_null().all()
    # what is kept is exactly the vendor's rows, unchanged
    kept = clean.join(dirty.select("ts"), on="ts").drop("fetched_at")
    assert kept.equals(dirty.drop("fetched_at"))


async def test_latest_values_and_snapshots_of_pairs_come_from_the_crypto_api(sim: SimServer, tmp_path: object) -> None:
    data = MarketData(_config(sim, str(tmp_path)), env={})
    try:
        trades = await data.latest_trades(["BTC/USD", "ZZZ/USD"])  # an unlisted pair is left out, as the vendor does
        vendor = await data.crypto.latest("trades", "BTC/USD")
        (t,) = trades.values()
        assert t.symbol == "BTC/USD" and t.size == vendor["size"][0] and isinstance(t.size, float)
        assert (t.source, t.feed) == ("sim:alpaca", "us")
        q = await data.latest_quote("ETH/USD")
        assert q is not None and 0 < q.bid_price < q.ask_price and isinstance(q.ask_size, float)
        snaps = await data.snapshots(["ETH/USD", "BTC/USD"])
        assert set(snaps) == {"ETH/USD", "BTC/USD"}
        eth = snaps["ETH/USD"]
        assert eth.latest_trade is not None and eth.daily_bar is not None and eth.prev_daily_bar is not None
        assert isinstance(eth.daily_bar.volume, float) and eth.source == "sim:alpaca"
    finally:
        await data.aclose()
