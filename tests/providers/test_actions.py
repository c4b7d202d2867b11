"""Corporate actions from every adapter against the simulator's faces over real HTTP: one canonical
record kind, real facts (AAPL 4:1 ex 2020-08-31, its 0.205 dividend ex 2020-11-06, NVDA 10:1 ex
2024-06-10, TSLA 3:1 ex 2022-08-25), paging, Alpaca's process-date lag, unknown types kept."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime

import orjson
import polars as pl
import pytest

from marketpipe.core.schema import ACTION_SCHEMA, actions_frame
from marketpipe.providers.alpaca import AlpacaProvider
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.polygon import PolygonProvider
from marketpipe.providers.polygon_config import PolygonConfig
from marketpipe.providers.yahoo import YahooProvider
from marketpipe.providers.yahoo_config import YahooConfig
from marketpipe.sim.server import SimServer
from marketpipe.wire.alpaca_actions import parse_page, to_action
from tests.service.vendors import three_faces

FACTS = {
    ("AAPL", "forward_split", date(2020, 8, 31)): (1.0, 4.0, None),
    ("AAPL", "cash_dividend", date(2020, 11, 6)): (None, None, 0.205),
    ("NVDA", "forward_split", date(2024, 6, 10)): (1.0, 10.0, None),
    ("TSLA", "forward_split", date(2022, 8, 25)): (1.0, 3.0, None),
}


@pytest.fixture(scope="module")
def faces() -> Iterator[dict[str, SimServer]]:
    with three_faces() as f:
        yield f


@pytest.fixture
async def providers(faces: dict[str, SimServer]) -> AsyncIterator[dict[str, object]]:
    fast = {"rate_limit_per_min": 100_000}
    out = {
        "alpaca": AlpacaProvider("SIMKEY", "SIMSECRET", config=AlpacaConfig(base_url=faces["alpaca"].url, **fast)),
        "polygon": PolygonProvider("POLYKEY", config=PolygonConfig(base_url=faces["polygon"].url, **fast)),
        "polygon_v3": PolygonProvider(
            "POLYKEY", config=PolygonConfig(base_url=faces["polygon"].url, actions_api="v3", **fast)
        ),
        "yahoo": YahooProvider(config=YahooConfig(base_url=faces["yahoo"].url, enabled=True, **fast)),
    }
    yield out
    for p in out.values():
        await p.aclose()  # type: ignore[attr-defined]


def _facts(frame: pl.DataFrame) -> dict[tuple[str, str, date], tuple[float | None, float | None, float | None]]:
    return {
        (r["symbol"], r["type"], r["ex_date"]): (r["old_rate"], r["new_rate"], r["cash_amount"])
        for r in frame.iter_rows(named=True)
    }


@pytest.mark.parametrize("name", ["alpaca", "polygon", "polygon_v3", "yahoo"])
async def test_every_adapter_finds_the_real_facts(providers: dict[str, object], name: str) -> None:
    p = providers[name]
    page = await p.corporate_actions(["AAPL", "NVDA", "TSLA"], date(2020, 1, 1), date(2024, 12, 31))  # type: ignore[attr-defined]
    assert page.frame.schema == pl.Schema(ACTION_SCHEMA)
    got = _facts(page.frame)
    for key, value in FACTS.items():
        assert got[key] == value, (name, key)
    provider = name.removesuffix("_v3")
    assert set(page.frame["source"]) == {f"sim:{provider}"} and set(page.frame["provider"]) == {provider}
    assert page.frame["action_id"].str.starts_with(f"{provider}:").all()
    assert page.frame["vendor_id"].is_not_null().all() and page.frame["fetched_at"].is_not_null().all()
    assert page.frame["raw"].is_not_null().all() and page.request_ids
    # AAPL's 20 quarterly dividends of 2020-2024 (ex-dates in the window) are all there
    divs = page.frame.filter((pl.col("symbol") == "AAPL") & (pl.col("type") == "cash_dividend"))
    assert divs.filter(pl.col("ex_date") <= date(2024, 12, 31)).height == 20


async def test_alpaca_queries_past_the_window_for_late_process_dates(providers: dict[str, object]) -> None:
    """Trap 2: the dividend ex 2020-11-06 is processed on 2020-11-13; a window ending on the ex-date
    still finds it because the adapter asks for process dates up to 90 days later."""
    p = providers["alpaca"]
    page = await p.corporate_actions(["AAPL"], date(2020, 11, 1), date(2020, 11, 6), types=["cash_dividend"])  # type: ignore[attr-defined]
    assert [(r["ex_date"], r["process_date"]) for r in page.frame.iter_rows(named=True)] == [
        (date(2020, 11, 6), date(2020, 11, 13))
    ]


async def test_alpaca_pages_are_concatenated(providers: dict[str, object], faces: dict[str, SimServer]) -> None:
    p = providers["alpaca"]
    faces["alpaca"].reset_stats()
    page = await p.corporate_actions(["AAPL"], date(2019, 1, 1), date(2025, 12, 31))  # type: ignore[attr-defined]
    assert page.frame.height == 29  # 28 dividends and the split
    assert page.frame["action_id"].n_unique() == 29


def test_unknown_plural_keys_and_all_fifteen_are_kept() -> None:
    body = orjson.dumps({
        "corporate_actions": {
            "partial_calls": [{"id": "p1", "symbol": "XYZ", "process_date": "2024-01-02", "price": 101.5}],
            "reorganizations": [{"id": "r1", "symbol": "XYZ", "cusip": "1", "process_date": "2024-01-03",
                                 "effective_date": "2024-01-03", "cash_rate": 2.0}],
            "future_things": [{"id": "f1", "symbol": "XYZ", "process_date": "2024-01-04", "brand_new": True}],
        },
        "next_page_token": None,
    })  # fmt: skip
    groups, token = parse_page(body)
    rows = [
        to_action(k, r, source="alpaca", fetched_at=datetime(2026, 1, 1, tzinfo=UTC))
        for k, v in groups.items()
        for r in v
    ]
    frame = actions_frame(rows)
    assert token is None
    assert frame["type"].to_list() == ["partial_call", "reorganization", "future_thing"]
    assert frame["cash_amount"].to_list() == [101.5, 2.0, None]
    assert orjson.loads(frame["raw"][2]) == {
        "id": "f1",
        "symbol": "XYZ",
        "process_date": "2024-01-04",
        "brand_new": True,
    }
    with pytest.raises(ValueError, match="corporate_actions"):
        parse_page(b'{"next_page_token": null}')
