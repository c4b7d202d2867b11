"""Regressions found in review: each was a 5xx or a wrong answer reachable from client input."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx

from marketpipe.api.app import create_app
from marketpipe.api.formats import negotiate
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from tests.api.conftest import ENV, gateway_config

DAY = {"start": "2024-03-05", "end": "2024-03-05"}


async def test_a_partial_answer_is_served_labelled_and_never_cached(
    vendor: SimServer, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/v1/bars/AAPL", params=DAY)).status_code == 200
    vendor.faults.set([FaultRule(kind="http_503")])
    two = {"start": "2024-03-05", "end": "2024-03-06"}
    partial = await client.get("/v1/bars/AAPL", params=two)
    assert partial.status_code == 200 and partial.headers["x-marketpipe-stale"] == "true"
    assert len(partial.json()["bars"]) == 390 and partial.json()["meta"]["warnings"]
    vendor.faults.clear()
    whole = await client.get("/v1/bars/AAPL", params=two)
    assert len(whole.json()["bars"]) == 780 and "x-marketpipe-stale" not in whole.headers


async def test_concurrent_requests_never_collide_on_the_store(client: httpx.AsyncClient) -> None:
    rs = await asyncio.gather(
        *(client.get("/v1/bars/AAPL", params={**DAY, "timeframe": "1Day", "i": str(i)}) for i in range(20))
    )
    assert {r.status_code for r in rs} == {200}


async def test_forged_tokens_huge_dates_and_bad_offsets_are_400(client: httpx.AsyncClient) -> None:
    token = base64.urlsafe_b64encode(b"AAPL|99999999999999999999999").decode()
    assert (await client.get("/v1/bars/AAPL", params={**DAY, "page_token": token})).status_code == 400
    v2 = "/v2/stocks/AAPL/bars"
    huge = await client.get(
        v2, params={"timeframe": "1Min", "start": "2024-03-05", "end": "9999-12-31T23:59:59.999999Z"}
    )
    assert huge.status_code == 400 and huge.json()["message"] == "invalid end"
    offset = await client.get(v2, params={"timeframe": "1Min", "start": "2024-03-05T15:00:00+99:99"})
    assert offset.status_code == 400 and offset.json()["message"] == "invalid start"


async def test_admin_invalidate_names_the_bad_kind(client: httpx.AsyncClient) -> None:
    auth = {"Authorization": "Bearer admintoken"}
    r = await client.post("/admin/cache/invalidate", headers=auth, json={"kind": "BARS"})
    assert r.status_code == 400 and r.json()["error"]["details"]["parameter"] == "kind"


async def test_made_up_methods_share_one_metrics_label(client: httpx.AsyncClient) -> None:
    from marketpipe.api.middleware import _CHILDREN

    before = len(_CHILDREN)
    for i in range(30):
        await client.request(f"X{i}", "/v1/bars/AAPL")
    assert len(_CHILDREN) - before <= 1


def test_accept_negotiation_respects_q_values_and_order() -> None:
    assert negotiate(None, "text/csv;q=0, application/json") == "json"
    assert negotiate(None, "application/json, text/csv") == "json"
    assert negotiate(None, "text/csv;q=0.5, application/vnd.apache.arrow.stream") == "arrow"
    assert negotiate(None, "*/*") == "json" and negotiate(None, None) == "json"


async def test_open_ended_requests_share_one_load(vendor: SimServer, tmp_path: Path) -> None:
    app = create_app(gateway_config(vendor.url, tmp_path / "o.duckdb"), env=ENV)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        rs = await asyncio.gather(
            *(c.get("/v1/bars/AAPL", params={"start": "2024-03-05", "timeframe": "1Day"}) for _ in range(10))
        )
        assert {r.status_code for r in rs} == {200} and len({r.content for r in rs}) == 1
    await app.state.mp.cache.aclose()
    await app.state.mp.data.aclose()
