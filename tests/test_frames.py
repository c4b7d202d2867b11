"""Issue 13 item 10: the notebook shapes of ``mp.bars`` — ``tz=`` and ``shape=`` ("long", "alpaca",
"wide") — over bars the simulator serves and a real DuckDB store holds."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import polars as pl
import pytest
from alpaca.data.historical import StockHistoricalDataClient
from alpaca.data.requests import StockBarsRequest
from alpaca.data.timeframe import TimeFrame

import marketpipe as mp
from marketpipe.api.app import create_app
from marketpipe.core.config import Config, config_from_dict
from marketpipe.core.errors import InvalidArgument
from marketpipe.core.timeframe import Timeframe
from marketpipe.service.data import SyncMarketData
from marketpipe.service.frames import shaped
from marketpipe.service.remote import GatewayClient
from marketpipe.sim.server import SimServer
from tests.api.conftest import ENV, gateway_config, serving
from tests.conftest import SIM_ENV

SYMS = ["MSFT", "AAPL"]
# Fri 2024-03-08 .. Wed 2024-03-13 (a date-only end takes in its day); New York's clocks go forward on Sun 03-10
START, END = "2024-03-08", "2024-03-13"
FIELDS = ["Close", "High", "Low", "Open", "Volume"]
ALPACA_COLUMNS = ["open", "high", "low", "close", "volume", "trade_count", "vwap"]


def _config(url: str, store: Path) -> Config:
    return config_from_dict(
        {
            "providers": {"alpaca": {"base_url": url, "plan": "unlimited", "rate_limit_per_min": 100_000}},
            "store": {"path": str(store)},
        }
    )


@pytest.fixture(scope="module")
def client(sim: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncMarketData]:
    with SyncMarketData(config=_config(sim.url, tmp_path_factory.mktemp("frames") / "s.duckdb"), env=SIM_ENV) as c:
        yield c


def test_the_default_stays_the_long_utc_frame(client: SyncMarketData) -> None:
    default = client.bars(SYMS, START, END, timeframe="1Day")
    long = client.bars(SYMS, START, END, timeframe="1Day", tz=None, shape="long")
    assert isinstance(default, pl.DataFrame) and default.equals(long)
    assert default.schema["timestamp"] == pl.Datetime("us", "UTC")
    aapl = default.filter(pl.col("symbol") == "AAPL")["timestamp"].to_list()
    # daily bars are stamped at New York midnight, seen in UTC: 05:00 before the clock change, 04:00 after
    assert [t.hour for t in aapl] == [5, 4, 4, 4]


def test_exchange_time_puts_daily_bars_at_new_york_midnight(client: SyncMarketData) -> None:
    utc = client.bars(SYMS, START, END, timeframe="1Day")
    ny = client.bars(SYMS, START, END, timeframe="1Day", tz="exchange")
    assert client.data.calendar.tz == "America/New_York"
    assert ny.schema["timestamp"] == pl.Datetime("us", "America/New_York")
    assert {(t.hour, t.minute, t.second) for t in ny["timestamp"]} == {(0, 0, 0)}
    assert [t.date().isoformat() for t in ny.filter(pl.col("symbol") == "AAPL")["timestamp"]] == [
        "2024-03-08",
        "2024-03-11",
        "2024-03-12",
        "2024-03-13",
    ]
    # the same instants, the same rows: only the zone of the labels changed
    assert ny["timestamp"].dt.epoch("us").equals(utc["timestamp"].dt.epoch("us"))
    assert ny.drop("timestamp").equals(utc.drop("timestamp"))
    tokyo = client.bars("AAPL", START, END, timeframe="1Day", tz="Asia/Tokyo")
    assert tokyo.schema["timestamp"] == pl.Datetime("us", "Asia/Tokyo") and {t.hour for t in tokyo["timestamp"]} == {
        13,
        14,
    }


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"tz": "America/Nowhere"}, "tz"),
        ({"tz": "EXCHANGE"}, "tz"),
        ({"tz": ""}, "tz"),
        ({"shape": "pandas"}, "shape"),
        ({"shape": "wide", "tz": "Mars/Olympus"}, "tz"),
    ],
)
def test_bad_options_name_their_parameter_before_anything_is_read(
    sim: SimServer, tmp_path: Path, kw: dict[str, str], param: str
) -> None:
    store = tmp_path / "never.duckdb"
    with SyncMarketData(config=_config(sim.url, store), env=SIM_ENV) as c, pytest.raises(InvalidArgument) as exc:
        c.bars("AAPL", START, END, timeframe="1Day", **kw)  # type: ignore[arg-type]
    assert exc.value.code == "INVALID_ARGUMENT" and exc.value.details == {"parameter": param}
    assert exc.value.message.startswith(f"{param} must be")
    assert not store.exists()  # refused before a store was opened or a bar fetched


def test_alpaca_shape_is_the_layout_of_barset_df(client: SyncMarketData) -> None:
    long = client.bars(SYMS, START, END, timeframe="1Hour")
    df = client.bars(SYMS, START, END, timeframe="1Hour", shape="alpaca")
    assert isinstance(df, pd.DataFrame) and len(df) == long.height
    assert list(df.index.names) == ["symbol", "timestamp"] and list(df.columns) == ALPACA_COLUMNS
    assert {str(d) for d in df.dtypes} == {"float64"}
    assert str(df.index.levels[1].dtype) == "datetime64[us, UTC]"
    assert list(df.index.get_level_values("symbol").unique()) == ["AAPL", "MSFT"]
    first = long.row(0, named=True)
    assert df.loc[("AAPL", pd.Timestamp(first["timestamp"]))]["close"] == first["close"]
    ny = client.bars(SYMS, START, END, timeframe="1Hour", shape="alpaca", tz="exchange")
    assert str(ny.index.levels[1].dtype) == "datetime64[us, America/New_York]"


@pytest.mark.parametrize(("tf", "alpaca_tf"), [("1Day", TimeFrame.Day), ("1Min", TimeFrame.Minute)])
def test_alpaca_shape_equals_alpaca_py_for_the_same_bars(
    client: SyncMarketData, sim: SimServer, tf: str, alpaca_tf: TimeFrame
) -> None:
    got = client.bars(SYMS, START, END, timeframe=tf, shape="alpaca")
    req = StockBarsRequest(
        symbol_or_symbols=SYMS,
        timeframe=alpaca_tf,
        start=datetime(2024, 3, 8, tzinfo=UTC),
        end=datetime(2024, 3, 14, tzinfo=UTC),  # a date-only end takes in its day
    )
    want = StockHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=sim.url).get_stock_bars(req).df
    # alpaca-py's stamps carry pydantic's own UTC object (TzInfo(0)); the same zone, named "UTC" here
    want.index = want.index.set_levels(want.index.levels[1].tz_convert("UTC"), level="timestamp")
    assert len(got) == len(want) > 0
    pd.testing.assert_frame_equal(got, want, check_dtype=True, check_index_type=True)


def test_wide_shape_is_the_layout_of_yfinance_download(client: SyncMarketData) -> None:
    long = client.bars(SYMS, START, END, timeframe="1Day")
    df = client.bars(SYMS, START, END, timeframe="1Day", shape="wide")
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns.names) == ["Price", "Ticker"]
    assert list(df.columns) == [(f, s) for f in FIELDS for s in ["AAPL", "MSFT"]]
    assert df.index.name == "Date" and str(df.index.dtype) == "datetime64[us, America/New_York]"
    assert [t.isoformat() for t in df.index] == [
        "2024-03-08T00:00:00-05:00",
        "2024-03-11T00:00:00-04:00",
        "2024-03-12T00:00:00-04:00",
        "2024-03-13T00:00:00-04:00",
    ]
    assert {str(df[("Volume", s)].dtype) for s in SYMS} == {"int64"}
    assert {str(df[(f, s)].dtype) for f in FIELDS[:4] for s in SYMS} == {"float64"}
    msft = long.filter(pl.col("symbol") == "MSFT")
    assert df[("Close", "MSFT")].tolist() == msft["close"].to_list()
    assert df[("Volume", "MSFT")].tolist() == msft["volume"].to_list()
    intraday = client.bars(SYMS, START, END, timeframe="1Hour", shape="wide", tz="UTC")
    assert intraday.index.name == "Datetime" and str(intraday.index.dtype) == "datetime64[us, UTC]"
    assert len(intraday) == client.bars("AAPL", START, END, timeframe="1Hour").height  # both trade every hour


def test_wide_shape_leaves_nan_where_a_symbol_has_no_bar(client: SyncMarketData) -> None:
    """The frame is not reindexed or filled: a bar missing for one symbol is NaN beside the other's."""
    long = client.bars(SYMS, START, END, timeframe="1Day")
    gone = long.filter(pl.col("symbol") == "MSFT")["timestamp"][1]
    holed = long.filter(~((pl.col("symbol") == "MSFT") & (pl.col("timestamp") == gone)))
    df = shaped(holed, Timeframe.parse("1Day"), "America/New_York", "wide")
    assert len(df) == 4  # AAPL still has a bar then: the row stays, MSFT's cells are empty
    row = df.loc[pd.Timestamp(gone).tz_convert("America/New_York")]
    assert row.xs("MSFT", level="Ticker").isna().all() and row.xs("AAPL", level="Ticker").notna().all()
    assert str(df[("Volume", "MSFT")].dtype) == "float64"  # pandas' NaN needs a float column
    assert df[("Volume", "AAPL")].tolist() == long.filter(pl.col("symbol") == "AAPL")["volume"].to_list()
    empty = shaped(long.clear(), Timeframe.parse("1Day"), "America/New_York", "wide")
    assert len(empty) == 0 and list(empty.columns.names) == ["Price", "Ticker"]


def test_mp_bars_and_the_gateway_client_take_the_same_options(
    sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "marketpipe.toml"
    cfg.write_text(
        f'[providers.alpaca]\nbase_url = "{sim.url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n'
        f'[store]\npath = "{tmp_path / "mp.duckdb"}"\n'
    )
    for k, v in {**SIM_ENV, "MARKETPIPE_CONFIG": str(cfg)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(mp, "_default", None)
    try:
        local = mp.bars(SYMS, START, END, timeframe="1Day", shape="wide")
    finally:
        if mp._default is not None:
            mp._default.close()
        monkeypatch.setattr(mp, "_default", None)
    app = create_app(gateway_config(sim.url, tmp_path / "gw.duckdb"), env=ENV)
    with serving(app) as url, GatewayClient(url) as remote:
        pd.testing.assert_frame_equal(remote.bars(SYMS, START, END, timeframe="1Day", shape="wide"), local)
        ny = remote.bars("AAPL", START, END, timeframe="1Day", tz="exchange")
        assert ny.schema["timestamp"] == pl.Datetime("us", "America/New_York")
        with pytest.raises(InvalidArgument) as exc:
            remote.bars("AAPL", START, END, shape="narrow")  # type: ignore[arg-type]
        assert exc.value.details == {"parameter": "shape"}


def test_a_notebook_holds_the_store_only_while_a_call_runs(sim: SimServer, tmp_path: Path) -> None:
    """Before: the first ``mp.bars`` opened the store and kept it (and its lock) for the life of the
    kernel, so ``marketpipe serve`` — the README's next step — could not start beside an open notebook.
    Calls that follow each other keep it open (opening the file costs more than reading a day)."""
    import subprocess
    import sys
    import time

    store = tmp_path / "s.duckdb"
    opens = [sys.executable, "-c", "import sys, marketpipe.store.duckdb as d; d.DuckDBStore(sys.argv[1]).close()"]

    def released_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while c.data._store is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    with SyncMarketData(config=_config(sim.url, store), env=SIM_ENV) as c:
        first = c.bars("AAPL", START, END, timeframe="1Day")  # fetched and stored
        held = c.data._store
        again = c.bars("AAPL", START, END, timeframe="1Day", fetch=False)  # straight after: the same open store
        assert held is not None and c.data._store is held and again.equals(first) and first.height == 4
        assert released_within(SyncMarketData.STORE_LINGER_SECONDS + 2.0)
        assert subprocess.run([*opens, str(store)], capture_output=True, text=True).returncode == 0  # another process
        assert c.bars("AAPL", START, END, timeframe="1Day", fetch=False).equals(first)  # reopened for the next call
        assert released_within(SyncMarketData.STORE_LINGER_SECONDS + 2.0)
        assert subprocess.run([*opens, str(store)], capture_output=True, text=True).returncode == 0
