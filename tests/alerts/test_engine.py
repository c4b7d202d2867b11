"""The engine over a registry of its own (the same metric names the pipeline exports, set by the test)
and a clock the test steps: each default rule fires, escalates and resolves as its condition comes and
goes, with stable ids, labels and first/last seen."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from marketpipe.alerts import AlertEngine
from marketpipe.core.config import AlertsConfig, config_from_dict
from marketpipe.core.errors import ConfigError
from marketpipe.core.events import Event, EventHub


class Clock:
    def __init__(self) -> None:
        self.at = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.at

    def step(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


class Metrics:
    """The pipeline's series the rules read, in a registry of the test's own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("marketpipe_provider_requests", "h", ["provider", "endpoint", "status"], registry=r)
        self.errors = Counter("marketpipe_provider_errors", "h", ["provider", "code"], registry=r)
        self.circuit = Gauge("marketpipe_circuit_state", "h", ["provider"], registry=r)
        self.stream = Counter("marketpipe_stream_messages", "h", ["provider", "feed", "channel"], registry=r)
        self.connected = Gauge("marketpipe_stream_connected", "h", ["provider", "feed"], registry=r)
        self.quality = Gauge("marketpipe_quality_score", "h", ["symbol", "timeframe"], registry=r)
        self.router = Gauge("marketpipe_stream_router_state", "h", ["router"], registry=r)
        self.cache = Counter("marketpipe_cache_requests", "h", ["tier", "kind", "result"], registry=r)
        self.writes = Counter("marketpipe_store_write_failures", "h", ["writer"], registry=r)
        self.backlog = Gauge("marketpipe_backlog_items", "h", ["queue"], registry=r)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def m() -> Metrics:
    return Metrics()


def engine(m: Metrics, clock: Clock, raw: dict[str, object] | None = None, **kw: object) -> AlertEngine:
    cfg = config_from_dict({"alerts": raw or {}}).alerts
    return AlertEngine(cfg, registry=m.registry, now=clock, events=EventHub(), **kw)  # type: ignore[arg-type]


def fired(e: AlertEngine) -> dict[str, str]:
    return {a.id: a.severity for a in e.active.values()}


def test_provider_availability_fires_below_95_percent_over_its_window_and_resolves(m: Metrics, clock: Clock) -> None:
    e = engine(m, clock)
    assert e.evaluate() == []  # the first sample is the baseline: no verdict yet
    clock.step(60)
    m.requests.labels("alpaca", "bars", "200").inc(8)
    m.requests.labels("alpaca", "bars", "500").inc(1)
    m.requests.labels("alpaca", "bars", "error").inc(1)  # a timeout or reset
    m.requests.labels("polygon", "bars", "200").inc(10)
    (n,) = e.evaluate()
    assert (n.action, n.alert.id, n.alert.severity, n.alert.labels) == (
        "trigger",
        "provider_availability/alpaca",
        "critical",
        {"provider": "alpaca"},
    )
    assert n.alert.value == 0.8 and "80.0 % of 10 requests" in n.alert.summary
    assert n.alert.first_seen == clock.at == n.alert.last_seen
    first = clock.at
    clock.step(60)
    m.requests.labels("alpaca", "bars", "200").inc(5)  # 13 of 15 within the window: still below
    assert e.evaluate() == [] and e.active["provider_availability/alpaca"].last_seen == clock.at
    clock.step(300)  # the failures left the window; only successes in it
    m.requests.labels("alpaca", "bars", "200").inc(50)
    (r,) = e.evaluate()
    assert (r.action, r.alert.id, r.alert.first_seen, r.alert.resolved_at) == (
        "resolve",
        "provider_availability/alpaca",
        first,
        clock.at,
    )
    assert e.active == {} and e.resolved[0].status == "resolved"


def test_too_few_requests_give_no_verdict(m: Metrics, clock: Clock) -> None:
    e = engine(m, clock)
    e.evaluate()
    clock.step(10)
    m.requests.labels("alpaca", "bars", "500").inc(2)  # below min_count (5)
    assert e.evaluate() == []


def test_provider_errors_per_minute(m: Metrics, clock: Clock) -> None:
    e = engine(m, clock)
    e.evaluate()
    clock.step(60)
    m.errors.labels("polygon", "RATE_LIMITED").inc(8)
    m.errors.labels("polygon", "PROVIDER_TIMEOUT").inc(4)
    m.errors.labels("alpaca", "PROVIDER_TIMEOUT").inc(3)
    (n,) = e.evaluate()
    assert (n.alert.id, n.alert.severity, n.alert.value) == ("provider_errors/polygon", "warning", 12.0)
    clock.step(61)
    assert [x.action for x in e.evaluate()] == ["resolve"]


def test_circuit_open_fires_only_after_a_minute(m: Metrics, clock: Clock) -> None:
    e = engine(m, clock)
    m.circuit.labels("alpaca").set(2)
    assert e.evaluate() == []
    clock.step(30)
    assert e.evaluate() == []
    clock.step(30)
    (n,) = e.evaluate()
    assert (n.alert.id, n.alert.severity) == ("circuit_open/alpaca", "critical")
    m.circuit.labels("alpaca").set(1)  # half-open: the trial call may go
    clock.step(15)
    assert [x.action for x in e.evaluate()] == ["resolve"]
    m.circuit.labels("alpaca").set(2)  # open again: the minute starts over
    clock.step(15)
    assert e.evaluate() == []


def test_stream_stale_in_market_hours_only(m: Metrics, clock: Clock) -> None:
    open_ = {"now": True}
    e = engine(m, clock, market_open=lambda _: open_["now"])
    m.connected.labels("alpaca", "iex").set(1)
    m.connected.labels("alpaca", "sip").set(0)  # the feed left after a 409: never stale
    m.stream.labels("alpaca", "sip", "trades").inc()
    m.stream.labels("alpaca", "iex", "trades").inc()
    m.stream.labels("alpaca", "iex", "quotes").inc()
    e.evaluate()
    clock.step(60)
    m.stream.labels("alpaca", "iex", "quotes").inc()
    assert e.evaluate() == []
    clock.step(119)
    assert e.evaluate() == []
    clock.step(1)  # 2 x the minute-bar interval without any message
    (n,) = e.evaluate()
    assert (n.alert.id, n.alert.labels) == ("stream_stale/iex/alpaca", {"provider": "alpaca", "feed": "iex"})
    m.stream.labels("alpaca", "iex", "trades").inc()  # data again
    clock.step(15)
    assert [x.action for x in e.evaluate()] == ["resolve"]
    clock.step(200)
    assert len(e.evaluate()) == 1
    open_["now"] = False  # the close: silence is expected
    clock.step(15)
    assert [x.action for x in e.evaluate()] == ["resolve"]
    open_["now"] = True
    m.connected.labels("alpaca", "iex").set(0)  # disconnected: the router's business, not this rule's
    clock.step(15)
    assert e.evaluate() == []


def test_connected_stream_that_never_sends_is_stale(m: Metrics, clock: Clock) -> None:
    e = engine(m, clock)
    m.connected.labels("alpaca", "sip").set(1)
    e.evaluate()
    clock.step(120)
    assert fired(e) == {} and [n.alert.id for n in e.evaluate()] == ["stream_stale/sip/alpaca"]


def test_quality_score_warns_below_0_9_and_escalates_below_0_8(m: Metrics, clock: Clock) -> None:
    e = engine(m, clock)
    m.quality.labels("AAPL", "1Min").set(0.97)
    m.quality.labels("MSFT", "1Min").set(0.85)
    (n,) = e.evaluate()
    assert (n.alert.id, n.alert.severity, n.alert.labels) == (
        "quality_score/MSFT/1Min",
        "warning",
        {"symbol": "MSFT", "timeframe": "1Min"},
    )
    clock.step(15)
    m.quality.labels("MSFT", "1Min").set(0.7)
    (up,) = e.evaluate()  # a changed severity is sent again, under the same id (PagerDuty updates it)
    assert (up.action, up.alert.severity, up.alert.first_seen) == ("trigger", "critical", n.alert.first_seen)
    clock.step(15)
    m.quality.labels("MSFT", "1Min").set(0.92)
    assert [(x.action, x.alert.id) for x in e.evaluate()] == [("resolve", "quality_score/MSFT/1Min")]


def test_router_fallback_warns_and_both_unavailable_is_critical(m: Metrics, clock: Clock) -> None:
    e = engine(m, clock)
    m.router.labels("live").set(1)
    assert e.evaluate() == []
    m.router.labels("live").set(2)
    assert fired(e) == {} and [n.alert.severity for n in e.evaluate()] == ["warning"]
    m.router.labels("live").set(3)
    assert [n.alert.severity for n in e.evaluate()] == ["critical"]
    m.router.labels("live").set(1)
    assert [n.action for n in e.evaluate()] == ["resolve"]


def test_cache_hit_rate_over_ten_minutes(m: Metrics, clock: Clock) -> None:
    e = engine(m, clock)
    e.evaluate()
    clock.step(300)
    m.cache.labels("memory", "bars", "hit").inc(40)
    m.cache.labels("memory", "bars", "miss").inc(60)
    m.cache.labels("redis", "bars", "hit").inc(1000)  # another tier: not counted
    (n,) = e.evaluate()
    assert (n.alert.id, n.alert.value) == ("cache_hit_rate/memory", 0.4)
    clock.step(300)
    m.cache.labels("memory", "bars", "hit").inc(400)
    assert [x.action for x in e.evaluate()] == ["resolve"]


def test_store_write_failures_and_backlog(m: Metrics, clock: Clock) -> None:
    e = engine(m, clock, {"rules": {"backlog": {"threshold": 100}}})
    e.evaluate()
    clock.step(5)
    m.writes.labels("stream_bars").inc()
    m.backlog.labels("stream_bars").set(250)
    assert fired(e) == {}
    e.evaluate()
    assert fired(e) == {"store_write_failures/stream_bars": "critical", "backlog/stream_bars": "warning"}
    m.backlog.labels("stream_bars").set(0)
    clock.step(301)
    assert sorted(n.alert.id for n in e.evaluate() if n.action == "resolve") == [
        "backlog/stream_bars",
        "store_write_failures/stream_bars",
    ]


def test_store_disk_reads_the_filesystem_holding_the_store(m: Metrics, clock: Clock, tmp_path: Path) -> None:
    store = tmp_path / "not-yet" / "store.duckdb"  # the nearest existing directory is measured
    assert engine(m, clock, {"rules": {"store_disk": {"threshold": 1.0}}}, store_path=store).evaluate() == []
    e = engine(m, clock, {"rules": {"store_disk": {"threshold": 0.0, "critical_threshold": 1.0}}}, store_path=store)
    (n,) = e.evaluate()  # any used byte is above 0 %
    assert n.alert.rule == "store_disk" and n.alert.severity == "warning" and 0 < (n.alert.value or 0) <= 1
    assert n.alert.labels == {"path": str(store)}


def test_events_become_alerts_and_resolve_after_a_quiet_window(m: Metrics, clock: Clock) -> None:
    hub = EventHub()
    e = AlertEngine(config_from_dict({}).alerts, registry=m.registry, now=clock, events=hub)
    e.listen()
    hub.emit(Event("outlier", "critical", "AAPL trade 31 % from the last price", symbol="AAPL", at=clock.at))
    hub.emit(Event("missing_data", "info", "2 gaps", symbol="MSFT", at=clock.at))  # below the least severity
    (n,) = e.evaluate()
    assert (n.alert.id, n.alert.severity, n.alert.labels, n.alert.summary) == (
        "event_outlier/AAPL",
        "critical",
        {"symbol": "AAPL"},
        "AAPL trade 31 % from the last price",
    )
    clock.step(200)
    hub.emit(Event("outlier", "critical", "again", symbol="AAPL", at=clock.at))  # a repeat keeps it open
    assert e.evaluate() == [] and e.active["event_outlier/AAPL"].summary == "again"
    clock.step(299)
    assert e.evaluate() == []
    clock.step(1)
    assert [(x.action, x.alert.id) for x in e.evaluate()] == [("resolve", "event_outlier/AAPL")]


def test_a_disabled_rule_does_not_fire(m: Metrics, clock: Clock) -> None:
    e = engine(m, clock, {"rules": {"quality_score": {"enabled": False}}})
    m.quality.labels("AAPL", "1Day").set(0.1)
    assert e.evaluate() == []


def test_snapshot_lists_active_most_severe_first_and_recent_resolved(m: Metrics, clock: Clock) -> None:
    e = engine(m, clock)
    m.quality.labels("AAPL", "1Min").set(0.85)
    m.quality.labels("MSFT", "1Min").set(0.5)
    e.evaluate()
    clock.step(15)
    m.quality.labels("AAPL", "1Min").set(1.0)
    e.evaluate()
    doc = e.snapshot()
    assert [a["id"] for a in doc["active"]] == ["quality_score/MSFT/1Min"]
    assert doc["active"][0]["status"] == "firing" and doc["active"][0]["resolved_at"] is None
    assert [(a["id"], a["status"]) for a in doc["resolved"]] == [("quality_score/AAPL/1Min", "resolved")]


def test_config_partial_rule_tables_keep_that_rules_defaults_and_bad_values_are_refused() -> None:
    cfg = config_from_dict({"alerts": {"rules": {"quality_score": {"threshold": 0.85}}}}).alerts
    assert (cfg.rules.quality_score.threshold, cfg.rules.quality_score.critical_threshold) == (0.85, 0.8)
    assert cfg.rules.circuit_open.for_seconds == 60.0 and cfg.rules.cache_hit_rate.window_seconds == 600.0
    assert cfg.sinks.pagerduty.min_severity == "critical" and not cfg.sinks.slack.enabled
    for bad, key in (
        ({"rules": {"provider_availability": {"threshold": 1.5}}}, "alerts.rules.provider_availability.threshold"),
        ({"rules": {"events": {"window_seconds": -1}}}, "alerts.rules.events.window_seconds"),
        ({"sinks": {"slack": {"min_severity": "loud"}}}, "alerts.sinks.slack.min_severity"),
        ({"sinks": {"webhook": {"url_env": "not a name"}}}, "alerts.sinks.webhook.url_env"),
        ({"sinks": {"slack": {"url": "https://hooks.slack.com/x"}}}, "alerts.sinks.slack"),  # secrets: env only
        ({"evaluate_seconds": 0}, "alerts.evaluate_seconds"),
    ):
        with pytest.raises(ConfigError) as err:
            config_from_dict({"alerts": bad})
        assert key in str(err.value), str(err.value)
    assert isinstance(AlertsConfig(), AlertsConfig)


async def test_a_running_engine_wakes_on_an_event_from_another_thread(m: Metrics) -> None:
    import asyncio
    import threading

    hub = EventHub()
    cfg = config_from_dict({"alerts": {"evaluate_seconds": 3600}}).alerts  # only the event can wake it
    e = AlertEngine(cfg, registry=m.registry, events=hub)
    e.start()
    try:
        await asyncio.sleep(0.05)  # the first pass
        t = threading.Thread(
            target=hub.emit, args=(Event("source_unavailable", "warning", "polygon failed", source="polygon"),)
        )
        t.start()
        t.join()
        for _ in range(200):  # 2 s at most, though the engine would not look again for an hour
            if "event_source_unavailable/polygon" in e.active:
                break
            await asyncio.sleep(0.01)
        assert e.active["event_source_unavailable/polygon"].labels == {"provider": "polygon"}
    finally:
        await e.aclose()
    hub.emit(Event("outlier", "critical", "after close", symbol="AAPL"))  # unsubscribed: nothing happens
    assert "event_outlier/AAPL" not in e.active
