"""Options through every interface against the simulator: the adapter, the service (checks, quarantine,
quote score), ``mp.*``, the gateway's ``/v1/options`` and Alpaca-compatible ``/v1beta1/options`` routes
(alpaca-py's own clients, unchanged), and the CLI. Above all: a contract the vendor sent without greeks
and IV stays null, with its reason, on every one of them — nothing computes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import requests
from alpaca.common.exceptions import APIError
from alpaca.data.historical.option import OptionHistoricalDataClient
from alpaca.data.requests import OptionBarsRequest, OptionChainRequest, OptionLatestQuoteRequest, OptionSnapshotRequest
from alpaca.data.timeframe import TimeFrame
from alpaca.trading.client import TradingClient
from alpaca.trading.requests import GetOptionContractsRequest

from marketpipe.api.app import create_app
from marketpipe.core.errors import ContractExpired, InvalidArgument, InvalidOptionSymbol, NotEntitled
from marketpipe.core.options import GREEKS, GREEKS_NOT_SENT, OPTION_SNAPSHOT_SCHEMA, parse_occ
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.alpaca_options import AlpacaOptionsProvider
from marketpipe.quality.option_checks import quote_score, split_checked
from marketpipe.service.data import SyncMarketData
from marketpipe.service.options import ChainSnapshot, OptionsData, record_chains
from marketpipe.sim.server import SimServer
from marketpipe.store.duckdb import DuckDBStore
from tests.api.conftest import ENV, gateway_config, serving

AUTH = {"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"}
SIM_KEYS = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"}


@pytest.fixture
async def opt(sim: SimServer) -> AsyncIterator[AlpacaOptionsProvider]:
    async with AlpacaOptionsProvider(
        "SIMKEY", "SIMSECRET", base_url=sim.url, config=AlpacaConfig(plan="unlimited")
    ) as p:
        yield p


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimServer, str]]:
    with SimServer() as vendor:
        cfg = gateway_config(vendor.url, tmp_path_factory.mktemp("gw") / "gw.duckdb")
        with serving(create_app(cfg, env=ENV)) as url:
            yield vendor, url


@contextmanager
def still(server: SimServer) -> Iterator[None]:
    """The simulator's clock held at one instant, so two reads of a chain in market hours see one market
    (its underlying trades on between them otherwise, and every price with it)."""
    at, running = server.face.clock(), server.face.clock
    server.face.clock = lambda: at
    try:
        yield
    finally:
        server.face.clock = running


def vendor_chain(url: str, underlying: str = "SPY") -> dict[str, dict]:  # type: ignore[type-arg]
    """The simulator's own chain, read raw, every page."""
    out: dict[str, dict] = {}  # type: ignore[type-arg]
    token = None
    while True:
        params = {"limit": 1000, **({"page_token": token} if token else {})}
        doc = requests.get(
            f"{url}/v1beta1/options/snapshots/{underlying}", params=params, headers=AUTH, timeout=10
        ).json()
        out.update(doc["snapshots"])
        token = doc["next_page_token"]
        if not token:
            return out


def without_greeks(chain: dict[str, dict]) -> list[str]:  # type: ignore[type-arg]
    """Contracts the vendor quoted with a two-sided market yet sent without greeks and IV."""
    return sorted(
        s for s, v in chain.items() if "greeks" not in v and "impliedVolatility" not in v and v["latestQuote"]["bp"] > 0
    )


# --- the adapter ---------------------------------------------------------------------------------------


async def test_chain_pages_stay_bounded_and_match_the_vendor(sim: SimServer, opt: AlpacaOptionsProvider) -> None:
    with still(sim):
        raw = vendor_chain(sim.url)
        pages = [p async for p in opt.iter_chain("SPY", page_size=500)]
    assert all(p.height <= 500 for p in pages) and len(pages) >= len(raw) // 500
    frame = pl.concat(pages)
    assert frame.schema == pl.Schema(OPTION_SNAPSHOT_SCHEMA)
    assert sorted(frame["contract"]) == sorted(raw)
    assert set(frame["source"]) == {"sim:alpaca"} and set(frame["feed"]) == {"opra"}
    one = frame.filter(pl.col("greeks_missing").is_null()).row(0, named=True)
    sent = raw[one["contract"]]
    assert one["delta"] == sent["greeks"]["delta"] and one["implied_volatility"] == sent["impliedVolatility"]
    assert one["bid_price"] == sent["latestQuote"]["bp"] and one["ask_size"] == sent["latestQuote"]["as"]
    occ = parse_occ(one["contract"])
    assert (one["root"], one["expiration"], one["type"], one["strike"]) == (
        occ.root,
        occ.expiration,
        occ.type,
        occ.strike,
    )


async def test_feed_rule_and_entitlement(sim: SimServer) -> None:
    async with AlpacaOptionsProvider(
        "FREEKEY", "FREESECRET", base_url=sim.url, config=AlpacaConfig(plan="free")
    ) as free:
        spot = sim.market.latest_trade("AAPL")["p"]
        f = await free.chain("AAPL", type="call", strike_price_gte=spot - 5, strike_price_lte=spot + 5)
        assert f.height and set(f["feed"]) == {"indicative"} and set(f["type"]) == {"call"}
        with pytest.raises(NotEntitled) as info:
            await free.chain("AAPL", feed="opra")
        assert info.value.details["reason"] == "opra_not_entitled"


async def test_bad_input_is_typed(opt: AlpacaOptionsProvider) -> None:
    with pytest.raises(InvalidOptionSymbol):
        await opt.bars("TSLA", "1Min", datetime.now(UTC) - timedelta(days=1), datetime.now(UTC))
    with pytest.raises(ContractExpired):
        await opt.snapshots("SPY240119C00400000")
    with pytest.raises(InvalidArgument) as info:
        await opt.chain("SPY", strike_price_gte="500")  # type: ignore[arg-type]
    assert info.value.details["parameter"] == "strike_price_gte"
    with pytest.raises(InvalidArgument):
        await opt.chain("SPY", feed="sip")
    with pytest.raises(InvalidArgument):
        await opt.chain("SPY", expiration_date="2026-13-01")


async def test_history_and_contracts(opt: AlpacaOptionsProvider) -> None:
    chain = await opt.chain("AAPL", type="put")
    syms = sorted(chain["contract"])[:2]
    now = datetime.now(UTC)
    bars = await opt.bars(syms, "1Min", now - timedelta(days=7), now, limit=100)
    assert bars.height > 100 and set(bars["symbol"]) <= set(syms)  # several upstream pages of 100
    assert (bars["low"] <= bars["high"]).all() and set(bars["feed"]) == {"opra"}
    trades = await opt.trades(syms, now - timedelta(days=7), now)
    assert trades.height and trades["condition"].null_count() == 0
    contracts = await opt.contracts("AAPL", type="put")
    assert contracts.height and contracts["open_interest"].null_count() == 0
    assert contracts["open_interest_date"].null_count() == 0 and set(contracts["type"]) == {"put"}


# --- checks -----------------------------------------------------------------------------------------------


async def test_checks_quarantine_bad_rows_and_score_quotes(opt: AlpacaOptionsProvider) -> None:
    good = (await opt.chain("SPY", type="call"))[:6]
    ok, bad = split_checked(good)
    assert ok.height == 6 and bad.height == 0
    broken = pl.concat(
        [
            good[0:1].with_columns(bid_price=pl.col("ask_price") + 1),  # crossed
            good[1:2].with_columns(bid_size=pl.lit(-1, pl.Int64)),  # negative size
            good[2:3].with_columns(strike=pl.lit(-5.0)),  # strike <= 0 (and no longer the OCC strike)
            good[3:4].with_columns(type=pl.lit("put")),  # OCC says call
            good[4:5].with_columns(delta=pl.lit(1.5)),  # |delta| > 1
            good[5:6].with_columns(
                quote_ts=(pl.col("quote_ts") + pl.duration(days=400)).cast(pl.Datetime("ns", "UTC"))
            ),  # quote after expiration
        ]
    )
    ok, bad = split_checked(broken)
    assert ok.height == 0
    assert bad["reasons"].to_list() == [
        "crossed_quote",
        "negative_size",
        "bad_strike,occ_mismatch",
        "occ_mismatch",
        "greek_range",
        "expired_quote",
    ]
    scored = quote_score(good)
    assert scored["quote_score"].is_between(0, 100).all()
    one_sided = quote_score(good[:1].with_columns(bid_price=pl.lit(None, pl.Float64)))
    assert one_sided["quote_score"][0] <= 60


async def test_service_quarantines_into_the_store_instead_of_serving(sim: SimServer, tmp_path: Path) -> None:
    """The vendor crosses some quotes (the simulator's invalid_rows fault): those rows are not served,
    and they persist in the store's quarantine as received, with their reasons and request id."""
    from marketpipe.core.config import config_from_dict
    from marketpipe.sim.faults import FaultRule

    cfg = config_from_dict({"providers": {"alpaca": {"base_url": sim.url, "plan": "unlimited"}}})
    with DuckDBStore(tmp_path / "s.duckdb") as store:
        svc = OptionsData(cfg, env=SIM_KEYS, store=lambda: store)
        try:
            clean = await svc.chain("SPY", type="put")
            assert clean.height and "quote_score" in clean.columns and (await svc.quarantined()).height == 0
            sim.faults.set([FaultRule(kind="invalid_rows", row_ratio=0.01, paths="^/v1beta1/options/snapshots")])
            served = await svc.chain("SPY", type="put")
            held = await svc.quarantined("SPY")
            crossed = set(held["contract"])
            assert crossed and not crossed & set(served["contract"]) and served.height + len(crossed) == clean.height
            assert set(held["reasons"]) == {"crossed_quote"} and held["request_id"].is_not_null().all()
            assert (held["bid_price"] > held["ask_price"]).all()  # as the vendor sent them, not corrected
            await svc.chain("SPY", type="put")  # the same rows refused again are kept once per snapshot time
            assert (await svc.quarantined("SPY")).height == 2 * len(crossed)
        finally:
            await svc.aclose()
    with DuckDBStore(tmp_path / "s.duckdb") as reopened:  # persisted, not held in memory
        assert set(reopened.option_quarantine()["contract"]) == crossed


# --- never computed: every interface ------------------------------------------------------------------------


def test_greeks_never_computed_on_any_interface(gateway: tuple[SimServer, str], tmp_path: Path) -> None:
    vendor, url = gateway
    raw = vendor_chain(vendor.url)
    missing = without_greeks(raw)[:5]
    assert missing, "the simulator must send some quoted contracts without greeks"
    sent = next(s for s, v in raw.items() if "greeks" in v)

    # mp.* (the notebook) over the simulator
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[providers.alpaca]\nbase_url = "{vendor.url}"\nplan = "unlimited"\n')
    from marketpipe.core.config import load_config

    with SyncMarketData(
        config=load_config(cfg), env={"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"}
    ) as mp:
        frame = mp.option_snapshots([*missing, sent])
        chain = mp.option_chain("SPY")
    for f in (frame, chain.filter(pl.col("contract").is_in(missing))):
        rows = f.filter(pl.col("contract").is_in(missing))
        assert rows.height == len(missing)
        assert (
            rows.select(pl.all_horizontal(pl.col(g).is_null() for g in (*GREEKS, "implied_volatility")))
            .to_series()
            .all()
        )
        assert set(rows["greeks_missing"]) == {GREEKS_NOT_SENT}
    assert frame.filter(pl.col("contract") == sent)["greeks_missing"][0] is None

    # the gateway's /v1: null with the reason
    v1 = requests.get(f"{url}/v1/options/snapshots", params={"symbols": ",".join(missing)}, timeout=30).json()
    for row in v1["snapshots"]:
        assert all(row[g] is None for g in (*GREEKS, "implied_volatility")) and row["greeks_missing"] == GREEKS_NOT_SENT
        assert row["source"] == "sim:alpaca" and row["feed"] == "opra"
    v1c = requests.get(f"{url}/v1/options/chain/SPY", timeout=30).json()["contracts"]
    assert {r["contract"]: r["greeks_missing"] for r in v1c if r["contract"] in missing} == dict.fromkeys(
        missing, GREEKS_NOT_SENT
    )

    # the gateway's Alpaca-compatible routes, read by alpaca-py: omitted, as the vendor omits them
    client = OptionHistoricalDataClient("ANY", "ANY", url_override=url)
    snaps = client.get_option_snapshot(OptionSnapshotRequest(symbol_or_symbols=missing))
    assert all(snaps[s].greeks is None and snaps[s].implied_volatility is None for s in missing)
    body = requests.get(f"{url}/v1beta1/options/snapshots", params={"symbols": ",".join(missing)}, timeout=30).json()
    assert all("greeks" not in v and "impliedVolatility" not in v for v in body["snapshots"].values())

    # the CLI
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_"))}
    env.update({"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"})
    r = subprocess.run(
        [sys.executable, "-m", "marketpipe.cli.main", "options", "quote", *missing, "-f", "json", "-c", str(cfg)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == len(missing)
    assert all(all(x[g] is None for g in GREEKS) and x["greeks_missing"] == GREEKS_NOT_SENT for x in rows)


# --- the gateway with alpaca-py, unchanged ----------------------------------------------------------------------


def test_alpaca_py_option_clients_work_against_the_gateway(gateway: tuple[SimServer, str]) -> None:
    vendor, url = gateway
    via_gw = OptionHistoricalDataClient("ANY", "ANY", url_override=url)
    direct = OptionHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=vendor.url)
    req = OptionChainRequest(underlying_symbol="SPY", type="call")
    with still(vendor):
        gw_chain, sim_chain = via_gw.get_option_chain(req), direct.get_option_chain(req)
    assert len(gw_chain) > 1000 and set(gw_chain) == set(sim_chain)  # several gateway pages of 1000
    assert {s for s, v in gw_chain.items() if v.greeks is None} == {s for s, v in sim_chain.items() if v.greeks is None}
    syms = sorted(gw_chain)[:3]
    q = via_gw.get_option_latest_quote(OptionLatestQuoteRequest(symbol_or_symbols=syms))
    assert set(q) == set(syms) and all(v.bid_price <= v.ask_price for v in q.values())
    start = datetime.now(UTC) - timedelta(days=7)
    bars_req = OptionBarsRequest(symbol_or_symbols=syms[:1], timeframe=TimeFrame.Minute, start=start)
    gw_bars, sim_bars = via_gw.get_option_bars(bars_req), direct.get_option_bars(bars_req)
    assert [b.close for b in gw_bars.data[syms[0]]] == [b.close for b in sim_bars.data[syms[0]]]
    trading = TradingClient("ANY", "ANY", url_override=url)
    page = trading.get_option_contracts(GetOptionContractsRequest(underlying_symbols=["SPY"], limit=40))
    assert len(page.option_contracts) == 40 and page.next_page_token
    assert all(c.open_interest is not None and c.open_interest_date is not None for c in page.option_contracts)
    with pytest.raises(APIError):  # a stock symbol where a contract belongs: the vendor's 400 shape
        via_gw.get_option_bars(OptionBarsRequest(symbol_or_symbols="TSLA", timeframe=TimeFrame.Minute, start=start))
    r = requests.get(f"{url}/v1beta1/options/bars", params={"symbols": "TSLA", "timeframe": "1Min"}, timeout=10)
    assert r.status_code == 400 and set(r.json()) == {"message", "code"}
    assert r.headers.get("X-Marketpipe-Source") is None
    ok = requests.get(f"{url}/v1beta1/options/snapshots/SPY", params={"limit": 5}, timeout=10)
    assert ok.headers["X-Marketpipe-Source"] == "sim:alpaca" and ok.headers["X-Marketpipe-Feed"] == "opra"


def leftovers(folder: Path) -> list[Path]:
    return list(folder.rglob("*.tmp"))


# --- stored chain snapshots ------------------------------------------------------------------------------------


async def test_chain_snapshots_stored_over_time_and_read_back(sim: SimServer, tmp_path: Path) -> None:
    from marketpipe.core.config import config_from_dict
    from marketpipe.core.errors import DatasetNotFound

    cfg = config_from_dict({"providers": {"alpaca": {"base_url": sim.url, "plan": "unlimited"}}})
    spot = sim.market.latest_trade("AAPL")["p"]
    told: list[ChainSnapshot] = []
    with DuckDBStore(tmp_path / "s.duckdb") as store:
        svc = OptionsData(cfg, env=SIM_KEYS, store=lambda: store)
        try:
            n = await record_chains(
                svc, "AAPL", every_seconds=0.05, count=2, on_snapshot=told.append, parquet=tmp_path / "pq",
                type="call", strike_gte=spot - 3, strike_lte=spot + 3,
            )  # fmt: skip
            hist = await svc.history("AAPL")
            one = await svc.history(contracts=hist["contract"][0], start=told[1].as_of)
            with pytest.raises(DatasetNotFound):
                await svc.history("MSFT")
        finally:
            await svc.aclose()
    assert n == 2 and [t.stored for t in told] == [t.contracts for t in told] and told[0].contracts > 0
    assert hist["as_of"].n_unique() == 2 and hist.height == 2 * hist["contract"].n_unique()
    assert hist.select("contract", "as_of").equals(hist.sort("contract", "as_of").select("contract", "as_of"))
    assert "quote_score" in hist.columns and one.height == 1 and one["as_of"][0] == told[1].as_of
    # the --parquet export: each snapshot whole, the stored rows
    files = sorted((tmp_path / "pq" / "underlying=AAPL").glob("*.parquet"))
    assert [f for f in told if f.parquet] and len(files) == 2 and not leftovers(tmp_path)
    assert pl.read_parquet(files).sort("contract", "as_of").equals(hist.drop("quote_score"))


async def test_one_snapshot_of_a_chain_of_many_pages_is_one_observation_with_one_as_of(
    sim: SimServer, tmp_path: Path
) -> None:
    """Every page of one snapshot is stamped with the snapshot's start, so the stored history has one
    ``as_of`` per snapshot (not one per page); each page keeps its own ``fetched_at`` and every contract
    the vendor's own quote and trade times."""
    from marketpipe.core.config import config_from_dict

    cfg = config_from_dict({"providers": {"alpaca": {"base_url": sim.url, "plan": "unlimited"}}})
    with DuckDBStore(tmp_path / "s.duckdb") as store:
        svc = OptionsData(cfg, env=SIM_KEYS, store=lambda: store)
        try:
            raw = vendor_chain(sim.url)
            first = await svc.snapshot_chain("SPY", page_size=500)
            second = await svc.snapshot_chain("SPY", page_size=500)
            hist = await svc.history("SPY")
        finally:
            await svc.aclose()
    assert len(raw) > 2 * 500  # several pages each time
    assert first.as_of is not None and second.as_of is not None and first.as_of < second.as_of
    assert sorted(hist["as_of"].unique()) == [first.as_of, second.as_of]  # one as_of a snapshot
    assert first.stored == first.contracts == hist.filter(pl.col("as_of") == first.as_of).height
    assert hist.filter(pl.col("as_of") == first.as_of)["fetched_at"].n_unique() > 1  # the pages' own times
    quoted = hist.filter(pl.col("as_of") == first.as_of, pl.col("quote_ts").is_not_null())
    assert quoted["quote_ts"].n_unique() > 1  # the vendor's own per-contract times, not the snapshot's


def test_cli_snapshot_then_history_reads_it_back_from_the_store(sim: SimServer, tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[providers.alpaca]\nbase_url = "{sim.url}"\nplan = "unlimited"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_", "MARKETPIPE_"))}
    env.update(SIM_KEYS)
    store = tmp_path / "s.duckdb"
    common = ["-c", str(cfg), "--store", str(store)]
    r = subprocess.run(
        [sys.executable, "-m", "marketpipe.cli.main", "options", "snapshot", "SPY", "--count", "1", *common],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "stored" in r.stderr and "1 snapshots stored in" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "marketpipe.cli.main", "options", "history", "SPY", "--type", "put", "-f", "json",
         *common],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    with DuckDBStore(store, read_only=True) as st:
        held = st.read_option_snapshots()
    assert len(rows) == held.filter(pl.col("type") == "put").height > 100
    bare = [x for x in rows if x["greeks_missing"]]
    assert bare and all(x["delta"] is None and x["greeks_missing"] == GREEKS_NOT_SENT for x in bare)


# --- the README, word for word ---------------------------------------------------------------------------------


def test_readme_options_example_runs_against_the_simulator(sim: SimServer, tmp_path: Path) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("<!-- README: options -->\n```python\n", 1)[1].split("```", 1)[0]
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        f'[providers.alpaca]\nbase_url = "{sim.url}"\nplan = "unlimited"\n\n[store]\npath = "{tmp_path}/s.duckdb"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_", "MARKETPIPE_"))}
    env.update({"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET", "MARKETPIPE_CONFIG": str(cfg)})
    check = (
        "\nassert chain.height > 1000 and set(chain['source']) == {'sim:alpaca'} and set(chain['feed']) == {'opra'}\n"
    )
    r = subprocess.run([sys.executable, "-c", block + check], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
