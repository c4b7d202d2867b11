"""Live data-source router: every transition and its timing, driven by a fake clock (no sleeping)."""

from __future__ import annotations

import pytest

from marketpipe.core.errors import ConfigError, InvalidArgument
from marketpipe.core.events import Event
from marketpipe.core.metrics import REGISTRY
from marketpipe.service.stream_router import DataSourceRouter, RouterConfig, SourceState

S = SourceState


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, name: str = "test", **cfg: float) -> DataSourceRouter:
    return DataSourceRouter(RouterConfig(**cfg), clock=clock, name=name)  # type: ignore[arg-type]


def on_primary(clock: FakeClock, **cfg: float) -> DataSourceRouter:
    r = make(clock, **cfg)
    r.primary_ok()
    assert r.state is S.PRIMARY_ACTIVE
    return r


def to_fallback(r: DataSourceRouter) -> None:
    for _ in range(r.config.failure_threshold):
        r.primary_failed("disconnect")
    assert r.state is S.FALLBACK_ACTIVE


# --- startup -----------------------------------------------------------------------------------


def test_startup_to_primary_on_first_ok(clock: FakeClock) -> None:
    r = make(clock)
    assert r.state is S.STARTUP
    assert r.active_source is None
    r.primary_ok()
    assert r.state is S.PRIMARY_ACTIVE
    assert r.active_source == "primary"
    assert r.failovers == 0


def test_startup_fails_over_after_threshold_failures(clock: FakeClock, raised: list[Event]) -> None:
    r = make(clock, failure_threshold=3)
    r.primary_failed("connect refused")
    r.primary_failed("connect refused")
    assert r.state is S.STARTUP
    r.primary_failed("connect refused")
    assert r.state is S.FALLBACK_ACTIVE
    assert r.failovers == 1
    assert [e.kind for e in raised] == ["source_unavailable"]
    assert raised[0].details["from_state"] == "startup"


def test_startup_fallback_ok_alone_does_not_leave_startup(clock: FakeClock) -> None:
    r = make(clock)
    r.fallback_ok()
    assert r.state is S.STARTUP


def test_startup_with_fallback_down_goes_to_both_unavailable(clock: FakeClock) -> None:
    r = make(clock, failure_threshold=2)
    r.fallback_failed("http 503")
    r.primary_failed("x")
    r.primary_failed("x")
    assert r.state is S.BOTH_UNAVAILABLE
    assert r.failovers == 0


def test_startup_silence_counts_as_failures(clock: FakeClock) -> None:
    r = make(clock, failure_threshold=2, stale_seconds=5)
    clock.advance(4.9)
    assert r.tick() is S.STARTUP
    clock.advance(0.1)
    assert r.tick() is S.STARTUP  # first stale interval
    clock.advance(4.0)
    assert r.tick() is S.STARTUP  # not yet a second interval
    clock.advance(1.0)
    assert r.tick() is S.FALLBACK_ACTIVE
    assert r.snapshot()["primary"]["last_failure"] == "stale"


# --- failover ----------------------------------------------------------------------------------


def test_n_minus_one_failures_do_not_fail_over_nth_does(clock: FakeClock, raised: list[Event]) -> None:
    r = on_primary(clock, failure_threshold=3)
    r.primary_failed("error")
    r.primary_failed("error")
    assert r.state is S.PRIMARY_ACTIVE
    assert r.snapshot()["consecutive_failures"] == 2
    assert raised == []
    r.primary_failed("error")
    assert r.state is S.FALLBACK_ACTIVE
    assert r.failovers == 1
    assert len(raised) == 1
    ev = raised[0]
    assert (ev.kind, ev.severity, ev.source) == ("source_unavailable", "warning", "primary")
    assert ev.details["to_state"] == "fallback_active"
    assert ev.details["consecutive_failures"] == 3


def test_primary_ok_resets_consecutive_count(clock: FakeClock) -> None:
    r = on_primary(clock, failure_threshold=3)
    r.primary_failed("e")
    r.primary_failed("e")
    r.primary_ok()
    r.primary_failed("e")
    r.primary_failed("e")
    assert r.state is S.PRIMARY_ACTIVE
    r.primary_failed("e")
    assert r.state is S.FALLBACK_ACTIVE


def test_threshold_one_fails_over_immediately(clock: FakeClock) -> None:
    r = on_primary(clock, failure_threshold=1)
    r.primary_failed("e")
    assert r.state is S.FALLBACK_ACTIVE


def test_staleness_in_primary_active(clock: FakeClock) -> None:
    r = on_primary(clock, failure_threshold=2, stale_seconds=3)
    clock.advance(2.9)
    r.primary_ok()  # a heartbeat restarts the silence timer
    clock.advance(2.9)
    assert r.tick() is S.PRIMARY_ACTIVE
    assert r.snapshot()["consecutive_failures"] == 0
    clock.advance(0.1)
    assert r.tick() is S.PRIMARY_ACTIVE
    assert r.snapshot()["consecutive_failures"] == 1
    clock.advance(3)
    assert r.tick() is S.FALLBACK_ACTIVE


def test_failover_with_fallback_known_down_goes_to_both(clock: FakeClock, raised: list[Event]) -> None:
    r = on_primary(clock, failure_threshold=2)
    r.fallback_failed("http 500")
    assert r.state is S.PRIMARY_ACTIVE
    r.primary_failed("e")
    r.primary_failed("e")
    assert r.state is S.BOTH_UNAVAILABLE
    assert r.failovers == 0
    assert [(e.kind, e.severity) for e in raised] == [("source_unavailable", "critical")]


# --- grace (switching back) --------------------------------------------------------------------


def test_recovery_before_grace_does_not_switch_after_grace_does(clock: FakeClock) -> None:
    r = on_primary(clock, grace_seconds=10)
    to_fallback(r)
    r.fallback_ok()
    r.primary_ok()
    assert r.grace_remaining() == 10
    clock.advance(9.9)
    r.primary_ok()
    assert r.state is S.FALLBACK_ACTIVE
    assert r.tick() is S.FALLBACK_ACTIVE
    assert r.grace_remaining() == pytest.approx(0.1)
    clock.advance(0.1)
    assert r.tick() is S.PRIMARY_ACTIVE
    assert r.grace_remaining() is None
    assert r.history()[-1].reason.endswith("grace_elapsed")


def test_grace_switch_on_primary_ok_input(clock: FakeClock) -> None:
    r = on_primary(clock, grace_seconds=5)
    to_fallback(r)
    r.primary_ok()
    clock.advance(5)
    r.primary_ok()
    assert r.state is S.PRIMARY_ACTIVE


def test_failure_during_grace_restarts_it(clock: FakeClock) -> None:
    r = on_primary(clock, grace_seconds=10, failure_threshold=3)
    to_fallback(r)
    r.primary_ok()
    clock.advance(8)
    r.primary_failed("flap")
    assert r.grace_remaining() is None
    clock.advance(1)
    r.primary_ok()
    clock.advance(9)
    assert r.tick() is S.FALLBACK_ACTIVE  # only 9 s since the grace restarted
    assert r.grace_remaining() == pytest.approx(1)
    clock.advance(1)
    assert r.tick() is S.PRIMARY_ACTIVE


def test_staleness_during_grace_restarts_it(clock: FakeClock) -> None:
    r = on_primary(clock, grace_seconds=10, stale_seconds=4)
    to_fallback(r)
    r.primary_ok()
    clock.advance(4)
    assert r.tick() is S.FALLBACK_ACTIVE
    assert r.grace_remaining() is None


def test_zero_grace_switches_back_at_once(clock: FakeClock) -> None:
    r = on_primary(clock, grace_seconds=0)
    to_fallback(r)
    r.primary_ok()
    assert r.state is S.PRIMARY_ACTIVE


def test_fallback_failure_during_grace_takes_primary(clock: FakeClock) -> None:
    r = on_primary(clock, grace_seconds=10)
    to_fallback(r)
    r.primary_ok()
    clock.advance(2)
    r.fallback_failed("http 503")
    assert r.state is S.PRIMARY_ACTIVE


# --- both unavailable --------------------------------------------------------------------------


def test_both_down_labels_last_values_stale(clock: FakeClock, raised: list[Event]) -> None:
    r = on_primary(clock, stale_seconds=60)
    r.record("AAPL", {"price": 190.1})
    assert r.last("AAPL") == {
        "symbol": "AAPL",
        "value": {"price": 190.1},
        "source": "primary",
        "received_at": 1000.0,
        "age_seconds": 0.0,
        "stale": False,
    }
    to_fallback(r)
    clock.advance(1)
    r.record("MSFT", {"price": 400.0})
    r.fallback_failed("timeout")
    assert r.state is S.BOTH_UNAVAILABLE
    aapl, msft = r.last("AAPL"), r.last("MSFT")
    assert aapl is not None and msft is not None
    assert aapl["stale"] is True and aapl["value"] == {"price": 190.1}
    assert msft["stale"] is True and msft["source"] == "fallback"
    assert r.last("TSLA") is None  # never invented
    assert [e.severity for e in raised] == ["warning", "critical"]
    assert raised[1].details["to_state"] == "both_unavailable"


def test_old_value_is_stale_even_with_a_source(clock: FakeClock) -> None:
    r = on_primary(clock, stale_seconds=30)
    r.record("AAPL", {"price": 1.0})
    clock.advance(30)
    entry = r.last("AAPL")
    assert entry is not None and entry["stale"] is False
    clock.advance(0.5)
    entry = r.last("AAPL")
    assert entry is not None and entry["stale"] is True and entry["age_seconds"] == 30.5


def test_record_needs_a_source_and_last_hands_out_copies(clock: FakeClock) -> None:
    r = make(clock)
    with pytest.raises(InvalidArgument):
        r.record("AAPL", {"price": 1.0})
    with pytest.raises(InvalidArgument):
        r.record("", {"price": 1.0}, source="primary")
    r.record("AAPL", {"price": 1.0}, source="primary")  # kept as given (the hot path does not copy)
    entry = r.last("AAPL")
    assert entry is not None
    entry["value"]["price"] = 2.0  # a caller changing what it got changes nothing held
    again = r.last("AAPL")
    assert again is not None and again["value"] == {"price": 1.0}


def test_recovery_from_both_down_primary_first(clock: FakeClock) -> None:
    r = on_primary(clock)
    to_fallback(r)
    r.fallback_failed("down")
    assert r.state is S.BOTH_UNAVAILABLE
    r.primary_ok()
    assert r.state is S.PRIMARY_ACTIVE  # nothing else is serving: no grace wait


def test_recovery_from_both_down_fallback_first_then_primary_after_grace(clock: FakeClock) -> None:
    r = on_primary(clock, grace_seconds=10)
    to_fallback(r)
    r.fallback_failed("down")
    assert r.state is S.BOTH_UNAVAILABLE
    r.fallback_ok()
    assert r.state is S.FALLBACK_ACTIVE
    r.primary_ok()
    clock.advance(9)
    assert r.tick() is S.FALLBACK_ACTIVE
    clock.advance(1)
    assert r.tick() is S.PRIMARY_ACTIVE


def test_primary_fails_again_after_recovery_with_fallback_still_down(clock: FakeClock) -> None:
    r = on_primary(clock, failure_threshold=2)
    to_fallback(r)
    r.fallback_failed("down")
    r.primary_ok()
    assert r.state is S.PRIMARY_ACTIVE
    r.primary_failed("e")
    assert r.state is S.PRIMARY_ACTIVE
    r.primary_failed("e")
    assert r.state is S.BOTH_UNAVAILABLE


# --- fallback polling --------------------------------------------------------------------------


def test_should_poll_fallback(clock: FakeClock) -> None:
    r = on_primary(clock, fallback_poll_seconds=5)
    assert r.should_poll_fallback() is False  # primary serving
    to_fallback(r)
    assert r.should_poll_fallback() is True  # never polled yet
    r.fallback_ok()
    assert r.should_poll_fallback() is False
    clock.advance(4.9)
    assert r.should_poll_fallback() is False
    assert r.should_poll_fallback(clock.t + 0.1) is True
    clock.advance(0.1)
    assert r.should_poll_fallback() is True
    r.fallback_failed("down")
    assert r.state is S.BOTH_UNAVAILABLE
    assert r.should_poll_fallback() is False
    clock.advance(5)
    assert r.should_poll_fallback() is True


# --- admin -------------------------------------------------------------------------------------


def test_force_failover_and_release(clock: FakeClock, raised: list[Event]) -> None:
    r = on_primary(clock, grace_seconds=10, stale_seconds=120)
    r.force_failover("maintenance")
    assert r.state is S.FALLBACK_ACTIVE
    assert r.forced is True
    assert r.failovers == 1
    assert raised[-1].details["forced"] is True
    r.primary_ok()
    clock.advance(60)
    assert r.tick() is S.FALLBACK_ACTIVE  # pinned: grace does not apply
    assert r.snapshot()["forced"] is True
    r.release()
    assert r.state is S.PRIMARY_ACTIVE  # primary was healthy for longer than the grace
    assert r.forced is False


def test_release_waits_for_grace(clock: FakeClock) -> None:
    r = on_primary(clock, grace_seconds=10)
    r.force_failover()
    clock.advance(3)
    r.primary_failed("reconnecting")
    r.primary_ok()
    r.release()
    assert r.state is S.FALLBACK_ACTIVE
    clock.advance(10)
    assert r.tick() is S.PRIMARY_ACTIVE


def test_forced_with_fallback_failing_goes_both_then_back(clock: FakeClock) -> None:
    r = on_primary(clock)
    r.force_failover()
    r.fallback_failed("down")
    assert r.state is S.BOTH_UNAVAILABLE  # pinned off the primary although it is healthy
    r.primary_ok()
    assert r.state is S.BOTH_UNAVAILABLE
    r.fallback_ok()
    assert r.state is S.FALLBACK_ACTIVE


def test_force_failover_from_startup(clock: FakeClock) -> None:
    r = make(clock)
    r.force_failover()
    assert r.state is S.FALLBACK_ACTIVE
    r.primary_ok()
    assert r.state is S.FALLBACK_ACTIVE


def test_request_reconnect(clock: FakeClock) -> None:
    r = on_primary(clock)
    req = r.request_reconnect(reason="operator")
    assert (req.source, req.reason, req.at) == ("primary", "operator", 1000.0)
    assert r.snapshot()["pending_reconnects"] == 1
    assert r.take_reconnects() == [req]
    assert r.take_reconnects() == []
    with pytest.raises(InvalidArgument):
        r.request_reconnect(source="nope")  # type: ignore[arg-type]
    # the owner's client then reports the outcome, which drives the machine as usual
    r.primary_failed("reconnect failed")
    assert r.state is S.PRIMARY_ACTIVE


# --- counters, snapshot, listeners -------------------------------------------------------------


def test_uptime_and_time_in_fallback(clock: FakeClock) -> None:
    r = make(clock, failure_threshold=1, grace_seconds=5)
    clock.advance(10)  # 10 s startup (no source)
    r.primary_ok()
    clock.advance(30)  # 30 s primary
    r.primary_failed("e")
    r.fallback_ok()
    clock.advance(20)  # 20 s fallback
    r.fallback_failed("e")
    clock.advance(15)  # 15 s both down
    r.fallback_ok()
    clock.advance(25)  # 25 s fallback
    times = r.time_in_state()
    assert times == {
        S.STARTUP: 10.0,
        S.PRIMARY_ACTIVE: 30.0,
        S.FALLBACK_ACTIVE: 45.0,
        S.BOTH_UNAVAILABLE: 15.0,
    }
    assert r.time_in_fallback() == 45.0
    assert r.uptime_pct() == pytest.approx(83.333, abs=1e-3)  # (30 + 45) / 90: startup is not downtime
    counters = r.snapshot()["counters"]
    assert counters["time_in_fallback"] == 45.0
    assert counters["uptime_pct"] == pytest.approx(83.333, abs=1e-3)
    assert counters["failovers"] == 1
    assert counters["transitions"] == 4


def test_uptime_at_zero_elapsed(clock: FakeClock) -> None:
    r = make(clock)
    assert r.uptime_pct() == 0.0
    r.primary_ok()
    assert r.uptime_pct() == 100.0


def test_snapshot_shape(clock: FakeClock) -> None:
    r = on_primary(clock, grace_seconds=10)
    to_fallback(r)
    clock.advance(2)
    r.primary_ok()
    clock.advance(3)
    snap = r.snapshot()
    assert snap["state"] == "fallback_active"
    assert snap["active_source"] == "fallback"
    assert snap["since"] == 1000.0
    assert snap["in_state_seconds"] == 5.0
    assert snap["grace_remaining"] == 7.0
    assert snap["forced"] is False
    assert snap["consecutive_failures"] == 0
    assert snap["primary"]["healthy"] is True
    assert snap["fallback"]["up"] is None
    assert [(h["from"], h["to"]) for h in snap["history"]] == [
        ("startup", "primary_active"),
        ("primary_active", "fallback_active"),
    ]


def test_history_is_bounded(clock: FakeClock) -> None:
    r = make(clock, failure_threshold=1, grace_seconds=0, history_limit=3)
    r.primary_ok()
    for _ in range(5):
        r.primary_failed("e")
        r.primary_ok()
    hist = r.history()
    assert len(hist) == 3
    assert r.snapshot()["counters"]["transitions"] == 11


def test_listeners_called_and_isolated(clock: FakeClock) -> None:
    r = make(clock, failure_threshold=1)
    seen: list[tuple[SourceState, SourceState, str]] = []

    def broken(old: SourceState, new: SourceState, reason: str) -> None:
        raise RuntimeError("listener bug")

    r.on_transition(broken)
    unsubscribe = r.on_transition(lambda old, new, reason: seen.append((old, new, reason)))
    r.primary_ok()
    r.primary_failed("socket closed")
    assert seen == [
        (S.STARTUP, S.PRIMARY_ACTIVE, "primary_ok"),
        (S.PRIMARY_ACTIVE, S.FALLBACK_ACTIVE, "primary_failed:socket closed"),
    ]
    unsubscribe()
    r.primary_ok()
    assert len(seen) == 2


def test_metrics_exported(clock: FakeClock) -> None:
    r = make(clock, name="metrics-test", failure_threshold=1)
    r.primary_ok()
    clock.advance(4)
    r.primary_failed("e")
    labels = {"router": "metrics-test"}
    assert REGISTRY.get_sample_value("marketpipe_stream_router_state", labels) == 2
    assert (
        REGISTRY.get_sample_value(
            "marketpipe_stream_router_transitions_total",
            {**labels, "from_state": "primary_active", "to_state": "fallback_active"},
        )
        == 1
    )
    assert (
        REGISTRY.get_sample_value("marketpipe_stream_router_state_seconds_total", {**labels, "state": "primary_active"})
        == 4
    )


# --- config ------------------------------------------------------------------------------------


def test_config_defaults() -> None:
    c = RouterConfig()
    assert (c.failure_threshold, c.grace_seconds, c.fallback_poll_seconds) == (3, 10.0, 5.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_threshold", 0),
        ("grace_seconds", -1.0),
        ("fallback_poll_seconds", 0.0),
        ("stale_seconds", 0.0),
        ("history_limit", 0),
    ],
)
def test_config_validation(field: str, value: float) -> None:
    with pytest.raises(ConfigError) as exc_info:
        RouterConfig(**{field: value})  # type: ignore[arg-type]
    assert field in exc_info.value.details["fields"]
    with pytest.raises(ConfigError):
        RouterConfig.from_mapping({field: value})


def test_config_from_mapping_rejects_unknown_and_bad_types() -> None:
    assert RouterConfig.from_mapping({"grace_seconds": 3}).grace_seconds == 3
    with pytest.raises(ConfigError):
        RouterConfig.from_mapping({"grace": 3})
    with pytest.raises(ConfigError):
        RouterConfig.from_mapping({"failure_threshold": "three"})
