"""Every fault kind is observable over HTTP, and faults change while the server runs."""

from __future__ import annotations

import time

import httpx
import msgspec
import orjson
import pytest

from marketpipe.sim.faults import ROW_KINDS, FaultRule, Faults
from marketpipe.sim.server import SimServer
from tests.sim.conftest import AUTH

BARS = ("/v2/stocks/bars", {"symbols": "AAPL", "timeframe": "1Min", "start": "2024-03-05", "end": "2024-03-06"})
ONE_BAR = {"timeframe": "1Min", "start": "2024-03-05T14:30:00Z", "end": "2024-03-05T14:30:00Z"}


def bars(http: httpx.Client) -> httpx.Response:
    return http.get(BARS[0], params=BARS[1])


def statuses(http: httpx.Client, n: int) -> list[int]:
    return [http.get("/v2/stocks/AAPL/bars", params=ONE_BAR).status_code for _ in range(n)]


def test_http_500_is_json(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="http_500")])
    r = bars(http)
    assert (r.status_code, r.json()) == (500, {"message": "internal server error"})
    assert r.headers["x-marketpipe-sim"] == "1"


@pytest.mark.parametrize(("kind", "status"), [("http_502", 502), ("http_503", 503)])
def test_gateway_errors_are_html(sim_server: SimServer, http: httpx.Client, kind: str, status: int) -> None:
    sim_server.faults.set([FaultRule(kind=kind)])  # type: ignore[arg-type]
    r = bars(http)
    assert r.status_code == status and r.headers["content-type"].startswith("text/html")
    assert f"<title>{status}" in r.text
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(r.content)


def test_hang_outlasts_a_client_timeout(sim_server: SimServer) -> None:
    sim_server.faults.set([FaultRule(kind="hang", hang_seconds=2)])
    t0 = time.monotonic()
    with httpx.Client(base_url=sim_server.url, headers=AUTH, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        bars(c)
    assert time.monotonic() - t0 < 1.5


def test_hang_then_answers(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="hang", hang_seconds=0.3)])
    t0 = time.monotonic()
    assert bars(http).status_code == 200
    assert time.monotonic() - t0 >= 0.3


def test_reset_drops_the_connection(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="reset", times=1)])
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        bars(http)
    assert bars(http).status_code == 200  # the next request, on a new connection, is fine
    assert sim_server.stats()["by_path"]["/v2/stocks/bars"]["reset"] >= 1


def test_truncated_json(sim_server: SimServer, http: httpx.Client) -> None:
    whole = bars(http).content
    sim_server.faults.set([FaultRule(kind="truncated_json")])
    r = bars(http)
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content) == len(whole) // 2
    assert whole.startswith(r.content)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(r.content)


def test_html_200(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="html_200")])
    r = bars(http)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text.lstrip().startswith("<!DOCTYPE html>")


def test_latency(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="latency", latency_ms=150), FaultRule(kind="latency", latency_ms=100)])
    t0 = time.monotonic()
    assert bars(http).status_code == 200
    assert time.monotonic() - t0 >= 0.25


def test_rate_limit_fault(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="rate_limit", times=1, reset_seconds=2)])
    r = bars(http)
    assert (r.status_code, r.json()) == (429, {"message": "too many requests."})
    assert r.headers["x-ratelimit-remaining"] == "0"
    assert 1 <= int(r.headers["x-ratelimit-reset"]) - time.time() <= 3.1
    assert "retry-after" not in r.headers  # the vendor's own 429 says when by its reset header only
    assert bars(http).status_code == 200


def test_rate_limit_fault_with_retry_after(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="rate_limit", times=1, retry_after=1.2)])
    r = bars(http)
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert bars(http).status_code == 200
    with pytest.raises(ValueError, match="retry_after"):
        FaultRule(kind="http_500", retry_after=1)


def _expected_hits(kind: str, before: list[dict], after: list[dict]) -> int:  # type: ignore[type-arg]
    if kind == "duplicate_ts":
        return len(after) - len({b["t"] for b in after})
    if kind == "misaligned_ts":
        return sum(not b["t"].endswith(":00Z") for b in after)
    if kind == "high_lt_low":
        return sum(b["h"] < b["l"] for b in after)
    if kind == "negative_volume":
        return sum(b["v"] < 0 for b in after)
    return sum(min(b["o"], b["h"], b["l"], b["c"]) <= 0 for b in after)


@pytest.mark.parametrize("kind", ROW_KINDS)
def test_invalid_rows_each_kind_is_visible(sim_server: SimServer, http: httpx.Client, kind: str) -> None:
    clean = bars(http).json()["bars"]["AAPL"]
    sim_server.faults.set([FaultRule(kind="invalid_rows", row_kinds=[kind], row_ratio=0.05)])  # type: ignore[list-item]
    dirty = bars(http).json()["bars"]["AAPL"]
    assert len(dirty) == len(clean) == 390
    hit = _expected_hits(kind, clean, dirty)
    changed = sum(a != b for a, b in zip(clean, dirty, strict=True))
    assert 5 <= hit <= 45 and changed == hit  # about 5 % of the rows, and nothing else touched
    again = bars(http).json()["bars"]["AAPL"]
    assert again == dirty  # the same rows every time (seeded)


def test_invalid_rows_mixed_kinds_and_other_paths_untouched(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="invalid_rows", row_ratio=0.2)])
    dirty = bars(http).json()["bars"]["AAPL"]
    assert any(b["h"] < b["l"] for b in dirty) and any(b["v"] < 0 for b in dirty)
    assert any(not b["t"].endswith(":00Z") for b in dirty)
    trades = http.get("/v2/stocks/AAPL/trades", params={**ONE_BAR, "end": "2024-03-05T14:31:00Z", "limit": 5})
    assert trades.status_code == 200 and all(t["s"] > 0 for t in trades.json()["trades"])
    assert sim_server.faults.to_dict()["counters"][0]["seen"] == 1  # the trades request did not count
    one = http.get("/v2/stocks/AAPL/bars", params=ONE_BAR).json()["bars"]
    assert len(one) in (1, 2)  # at least one row is always hit, even in a one-row page


def test_times_and_after(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="http_500", times=2)])
    assert statuses(http, 4) == [500, 500, 200, 200]
    sim_server.faults.set([FaultRule(kind="http_503", after=2)])
    assert statuses(http, 4) == [200, 200, 503, 503]
    sim_server.faults.set([FaultRule(kind="http_502", after=1, times=1)])
    assert statuses(http, 3) == [200, 502, 200]


def test_ratio_is_seeded_and_repeatable(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="http_500", ratio=0.5)])
    first = statuses(http, 20)
    sim_server.faults.set([FaultRule(kind="http_500", ratio=0.5)])
    assert statuses(http, 20) == first
    assert 3 <= first.count(500) <= 17


def test_paths_select_where_faults_apply(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="http_500", paths=r"/trades")])
    assert bars(http).status_code == 200
    assert http.get("/v2/stocks/AAPL/trades", params=ONE_BAR).status_code == 500
    assert http.get("/_sim/stats").status_code == 200  # admin paths are never faulted


def test_first_firing_rule_wins(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="http_502", times=1), FaultRule(kind="http_503", times=1)])
    assert statuses(http, 3) == [502, 503, 200]


def test_faults_change_at_runtime_over_http(sim_server: SimServer, http: httpx.Client) -> None:
    admin = sim_server.url + "/_sim/faults"
    r = httpx.put(admin, json={"rules": [{"kind": "http_503", "times": 1}], "rate_limit_per_min": 5000})
    assert r.status_code == 200 and r.headers["x-marketpipe-sim"] == "1"
    got = httpx.get(admin).json()
    assert got["rules"] == [{"kind": "http_503", "times": 1}] and got["rate_limit_per_min"] == 5000
    assert sim_server.faults.rules == [FaultRule(kind="http_503", times=1)]
    assert statuses(http, 2) == [503, 200]
    assert httpx.get(admin).json()["counters"] == [{"seen": 2, "applied": 1}]
    assert httpx.post(admin, json={"kind": "http_500"}).status_code == 200
    assert statuses(http, 1) == [500]
    assert httpx.delete(admin).json() == {"rules": [], "rate_limit_per_min": None, "counters": []}
    assert statuses(http, 1) == [200]
    for bad in ({"rules": [{"kind": "meteor"}]}, {"rules": [{"kind": "http_500", "ratio": 2}]}, {"nope": 1}):
        bad_r = httpx.put(admin, json=bad)
        assert bad_r.status_code == 400 and "invalid fault config" in bad_r.json()["message"]
    assert httpx.put(admin, content=b"{not json").status_code == 400


def test_fault_rule_validation() -> None:
    with pytest.raises(ValueError):
        FaultRule(kind="invalid_rows", row_kinds=[])
    with pytest.raises(ValueError):
        FaultRule(kind="http_500", paths="(")
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"kind": "http_500", "after": -1}', type=FaultRule)
    f = Faults([FaultRule(kind="latency", latency_ms=10)], rate_limit_per_min=7)
    assert f.decide("/v2/stocks/bars").latency_s == pytest.approx(0.01)
    assert f.decide("/_sim/stats").latency_s == 0.0
    assert f.rate_limit_per_min == 7
    f.clear()
    assert f.rules == [] and f.rate_limit_per_min is None


# --- envelope faults: empty_json, null_page, token_loop ----------------------------------------------


def test_empty_json_on_every_data_path(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="empty_json")])
    for path, params in (
        BARS,
        ("/v2/stocks/AAPL/bars", ONE_BAR),
        ("/v2/stocks/trades/latest", {"symbols": "AAPL"}),
        ("/v2/stocks/snapshots", {"symbols": "AAPL"}),
    ):
        r = http.get(path, params=params)
        assert (r.status_code, r.content) == (200, b"{}"), path
        assert r.headers["content-type"].startswith("application/json") and r.headers["x-marketpipe-sim"] == "1"
    assert sim_server.faults.to_dict()["counters"] == [{"seen": 4, "applied": 4}]


def test_null_page_has_the_kind_key_only(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([FaultRule(kind="null_page")])
    assert bars(http).json() == {"bars": None}
    assert http.get("/v2/stocks/AAPL/bars", params=ONE_BAR).json() == {"bars": None}
    trades = http.get("/v2/stocks/AAPL/trades", params={**ONE_BAR, "end": "2024-03-05T14:31:00Z"})
    assert (trades.status_code, trades.json()) == (200, {"trades": None})
    # latest values are no page: untouched and not counted
    latest = http.get("/v2/stocks/trades/latest", params={"symbols": "AAPL"}).json()
    assert set(latest) == {"trades"} and "AAPL" in latest["trades"]
    assert sim_server.faults.to_dict()["counters"] == [{"seen": 3, "applied": 3}]


def test_token_loop_repeats_the_token_it_was_given(sim_server: SimServer, http: httpx.Client) -> None:
    params = {**BARS[1], "symbols": "AAPL,MSFT", "limit": 300}
    clean_first = http.get(BARS[0], params=params).json()
    clean_second = http.get(BARS[0], params={**params, "page_token": clean_first["next_page_token"]}).json()
    sim_server.faults.set([FaultRule(kind="token_loop")])
    first = http.get(BARS[0], params=params).json()
    assert first == clean_first  # no token asked for: the first one issued is the real one
    token = first["next_page_token"]
    for _ in range(3):  # a naive client following it gets the same page and the same token for ever
        again = http.get(BARS[0], params={**params, "page_token": token}).json()
        assert again["bars"] == clean_second["bars"] and again["next_page_token"] == token
    assert sim_server.faults.to_dict()["counters"] == [{"seen": 4, "applied": 4}]


def test_token_loop_on_a_last_page_restarts_the_query(sim_server: SimServer, http: httpx.Client) -> None:
    clean = http.get("/v2/stocks/AAPL/bars", params=ONE_BAR).json()
    assert clean["next_page_token"] is None
    sim_server.faults.set([FaultRule(kind="token_loop")])
    looped = http.get("/v2/stocks/AAPL/bars", params=ONE_BAR).json()
    token = looped["next_page_token"]
    assert token and looped["bars"] == clean["bars"] and looped["symbol"] == "AAPL"
    again = http.get("/v2/stocks/AAPL/bars", params={**ONE_BAR, "page_token": token}).json()
    assert again == looped  # the same rows and the same token: the query starts again
    # paths that do not paginate are not matched
    assert set(http.get("/v2/stocks/AAPL/trades/latest").json()) == {"symbol", "trade"}
    assert sim_server.faults.to_dict()["counters"] == [{"seen": 2, "applied": 2}]


def test_envelope_fault_kinds_validate() -> None:
    for kind in ("empty_json", "null_page", "token_loop"):
        rule = msgspec.json.decode(orjson.dumps({"kind": kind, "times": 2}), type=FaultRule)
        assert rule.kind == kind and rule.times == 2
        with pytest.raises(ValueError):
            FaultRule(kind=kind, defect="spike")  # type: ignore[arg-type]
    assert FaultRule(kind="token_loop").matches("/v2/stocks/AAPL/quotes")
    assert FaultRule(kind="token_loop").matches("/v2/aggs/ticker/AAPL/range/1/minute/1/2")
    assert not FaultRule(kind="token_loop").matches("/v8/finance/chart/AAPL")
    assert not FaultRule(kind="token_loop").matches("/v2/stocks/bars/latest")
    assert FaultRule(kind="null_page").matches("/v8/finance/chart/AAPL")
    assert not FaultRule(kind="null_page").matches("/v2/stocks/snapshots")
    assert FaultRule(kind="empty_json").matches("/v2/stocks/snapshots")
