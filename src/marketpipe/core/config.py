"""Configuration: one TOML file plus environment variables. Secrets come only from the environment.

File lookup order: the explicit path, ``$MARKETPIPE_CONFIG``, ``./marketpipe.toml``, the user config
dir (``~/.config/marketpipe/config.toml``). Every key is optional; see README "Configuration".

The environment then fills what the file leaves unset (:data:`ENV_OVERRIDES`): ``$APCA_API_DATA_URL`` becomes
``providers.alpaca.base_url`` when the file gives none, so ``config show``, the adapter and the live hub (whose
stream host follows that URL) all see one URL. A value in the file wins over the variable.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, overload

import msgspec
import msgspec.inspect
import platformdirs
from msgspec import Meta

from marketpipe.core.errors import ConfigError, MissingCredentials

APP = "marketpipe"

# Constrained types: a value that cannot work (a negative timeout, zero attempts, an unknown plan) is refused
# when the file is read, as CONFIG_ERROR naming the key. The finite upper bound keeps inf and nan out.
_FINITE = 1e12
Positive = Annotated[float, Meta(gt=0, le=_FINITE)]  # durations, intervals, thresholds, multiples
NonNegative = Annotated[float, Meta(ge=0, le=_FINITE)]  # durations where 0 means none (no wait, no TTL)
Fraction = Annotated[float, Meta(gt=0, lt=1)]
PositiveInt = Annotated[int, Meta(ge=1)]  # counts, sizes, rates
NonNegativeInt = Annotated[int, Meta(ge=0)]
AtLeast2 = Annotated[int, Meta(ge=2)]  # windows and runs that need two points
Port = Annotated[int, Meta(ge=1, le=65535)]


class RetryPolicy(msgspec.Struct, forbid_unknown_fields=True):
    attempts: PositiveInt = 5  # total tries, including the first
    base_seconds: NonNegative = 0.5  # full-jitter exponential backoff: uniform(0, min(max, base * 2**n))
    max_seconds: NonNegative = 30.0
    max_retry_after_seconds: NonNegative = 120.0  # a Retry-After beyond this is not waited out


class CircuitPolicy(msgspec.Struct, forbid_unknown_fields=True):
    failure_threshold: PositiveInt = 5  # consecutive failures that open the circuit
    recovery_seconds: NonNegative = 30.0  # open -> half-open after this long
    half_open_max_calls: PositiveInt = 1  # trial calls allowed while half-open


class ProviderConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``[providers.<name>]``: what every vendor adapter shares (transport, pacing, resilience, routing).

    A vendor's own keys (Alpaca's ``feed``/``plan``/``recent_sip``, Polygon's ``plan``) live in its config
    class beside its adapter (``providers/<vendor>_config.py``), a subclass of this one registered with
    :func:`register_provider_config`. A ``[providers.<name>]`` table with no registered class is decoded
    as this base (a vendor the registry does not know yet still has its shared keys checked).
    """

    enabled: bool = True
    priority: int = 100
    base_url: str | None = None
    rate_limit_per_min: PositiveInt = 200
    connect_timeout: Positive = 5.0
    read_timeout: Positive = 30.0
    max_in_flight: PositiveInt = 4
    probe_interval: Positive = 30.0  # seconds between active health probes (server mode)
    probe_symbol: str = "SPY"
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    circuit: CircuitPolicy = msgspec.field(default_factory=CircuitPolicy)


P = TypeVar("P", bound=ProviderConfig)

# Layering: core must not import providers/, yet the loader has to decode ``[providers.alpaca]`` into the
# class declared beside the Alpaca adapter. So the dependency is inverted: each vendor config module
# (``marketpipe.providers.<vendor>_config``) registers its class here when it is imported, and
# ``marketpipe.providers`` imports all of them. The package root (``marketpipe/__init__.py``) imports
# ``marketpipe.providers``, so the registry is filled before any code can reach this module. The
# per-vendor defaults (priority, rate limit, Yahoo opt-in) are the defaults of those classes.
PROVIDER_CONFIGS: dict[str, type[ProviderConfig]] = {}


def register_provider_config(name: str) -> Callable[[type[P]], type[P]]:
    """Class decorator: ``[providers.<name>]`` tables decode into the decorated class, and ``Config()``
    holds one (with its defaults) for every registered vendor."""

    def bind(cls: type[P]) -> type[P]:
        known = PROVIDER_CONFIGS.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"provider config {name!r} already registered as {known.__qualname__}")
        PROVIDER_CONFIGS[name] = cls
        return cls

    return bind


def provider_config_type(name: str) -> type[ProviderConfig]:
    """The config class for vendor ``name``: its registered class, else the shared base."""
    return PROVIDER_CONFIGS.get(name, ProviderConfig)


def _default_providers() -> dict[str, ProviderConfig]:
    return {name: cls() for name, cls in PROVIDER_CONFIGS.items()}


STORE_SERVER_SCHEMES = ("postgresql", "postgres")


def url_without_password(url: str) -> str:
    """A server URL for messages and listings: its password (if any) replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class StoreConfig(msgspec.Struct, forbid_unknown_fields=True):
    path: str | None = None  # DuckDB file; default in the user data dir
    url: str | None = None  # a server store, postgresql://user@host:port/db (wins over path)
    # DuckDB: the L1 of bar reads (store/hot.py), MB; a read asked again before any bar write is answered
    # from memory. 0 turns it off. A server store has none (other processes write it).
    read_cache_mb: Annotated[int, Meta(ge=0, le=65536)] = 64


class BackfillConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``circuit_waits``: how many times one backfill run waits out a provider's open circuit (each
    time the circuit opens counts once, whichever units were waiting) and then continues its units
    from where their committed pages end; past that, units fail with CIRCUIT_OPEN. With several
    providers a unit fails over first and waits only when every candidate's circuit is open. 0: never
    wait (fail at once). Each wait lasts until the circuit is half-open (``circuit.recovery_seconds``)."""

    page_limit: Annotated[int, Meta(ge=1, le=10_000)] = 10_000  # the most Alpaca returns a page
    concurrency: PositiveInt = 4  # requests in flight (the rate limiter still governs the pace)
    circuit_waits: Annotated[int, Meta(ge=0, le=1000)] = 3


class AnomalyConfig(msgspec.Struct, forbid_unknown_fields=True):
    z_threshold: Positive = 10.0
    z_high: Positive = 20.0
    vol_span: AtLeast2 = 100  # bars in the EWMA volatility
    min_periods: AtLeast2 = 30  # bars of history before a z-score is trusted
    jump_pct: Positive = 20.0  # bar-to-bar move (percent) flagged whatever the volatility
    split_tolerance: Fraction = 0.02  # relative distance from a split ratio
    split_min_move_pct: Positive = 30.0  # smaller moves are not split candidates
    frozen_bars: AtLeast2 = 15  # intraday run length; daily and longer use max(3, frozen_bars // 5)
    volume_multiple: Positive = 25.0
    min_volume: NonNegativeInt = 100  # volume outliers below this are ignored (thin minutes)
    # What happens to high-severity findings at ingest: "flag" keeps the row and records the finding,
    # "quarantine" moves the row to quarantine with reason "anomaly:<kind>".
    on_high: Literal["flag", "quarantine"] = "flag"

    def __post_init__(self) -> None:
        if self.on_high not in ("flag", "quarantine"):
            raise ValueError("quality.anomaly.on_high must be 'flag' or 'quarantine'")
        if self.z_high < self.z_threshold or self.z_threshold <= 0:
            raise ValueError("quality.anomaly: need 0 < z_threshold <= z_high")
        if self.vol_span < 2 or self.min_periods < 2 or self.frozen_bars < 2:
            raise ValueError("quality.anomaly: vol_span, min_periods and frozen_bars must be >= 2")


class QualityWeights(msgspec.Struct, forbid_unknown_fields=True):
    validity: NonNegative = 0.4
    completeness: NonNegative = 0.3
    timeliness: NonNegative = 0.2
    consistency: NonNegative = 0.1


class QualityConfig(msgspec.Struct, forbid_unknown_fields=True):
    weights: QualityWeights = msgspec.field(default_factory=QualityWeights)
    extended_hours: bool = False  # completeness counts 04:00-20:00 local instead of the regular session
    # Timeliness applies to the most recent sessions only: the lag from a bar's end to its fetch.
    recent_sessions: NonNegativeInt = 1
    fresh_seconds: NonNegative = 120.0  # lag at or below this scores 1
    stale_seconds: Positive = 3600.0  # lag at or above this scores 0 (linear in between)
    anomaly: AnomalyConfig = msgspec.field(default_factory=AnomalyConfig)

    def __post_init__(self) -> None:
        w = self.weights
        if min(w.validity, w.completeness, w.timeliness, w.consistency) < 0:
            raise ValueError("quality.weights must be >= 0")
        if w.validity + w.completeness + w.timeliness + w.consistency <= 0:
            raise ValueError("quality.weights must not all be 0")
        if self.stale_seconds <= self.fresh_seconds:
            raise ValueError("quality.stale_seconds must be greater than fresh_seconds")


class UpdateConfig(msgspec.Struct, forbid_unknown_fields=True):
    # "smart": incremental when the newest covered bar is at most this old, else refresh.
    smart_max_gap_hours: Positive = 72.0
    # A refresh re-fetches this many days before the newest covered point (vendor corrections).
    refresh_days: NonNegative = 5.0
    stale_after_minutes: Positive = 30.0  # during a session, data older than this raises a stale_data event


class JobConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A recurring update (``[[jobs]]`` in the config file)."""

    name: str
    symbols: list[str]
    every: str = "1m"  # 30s, 1m, 15m, 1h, 1d
    timeframe: str = "1Min"
    strategy: Literal["incremental", "full", "smart"] = "smart"  # incremental | full | smart
    feed: str | None = None


MB = 1024 * 1024
# Cache kinds whose request is a time range (fresh for a long time once the range is closed).
RANGE_KINDS = frozenset({"bars", "trades", "quotes"})
LATEST_KINDS = frozenset({"latest_quote", "latest_trade", "latest_bar"})
SNAPSHOT_KINDS = frozenset({"snapshot", "snapshots"})
REFERENCE_KINDS = frozenset({"reference", "assets", "corporate_actions"})
KNOWN_KINDS = RANGE_KINDS | LATEST_KINDS | SNAPSHOT_KINDS | REFERENCE_KINDS


class CacheConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``[cache]`` in the config file. Times in seconds."""

    memory_max_bytes: PositiveInt = 256 * MB
    redis_url: str | None = None  # L2 is used only when set, e.g. "redis://localhost:6379/0"
    redis_prefix: str = "marketpipe:"
    redis_connect_timeout: Positive = 0.25
    redis_socket_timeout: Positive = 0.25
    redis_backoff_initial: Positive = 1.0  # after a Redis error the tier is skipped this long, doubling …
    redis_backoff_max: Positive = 30.0  # … up to this, until Redis answers again
    stale_for: NonNegative = 3600.0  # how long past expiry a copy may still be served labelled stale
    history_ttl: NonNegative = 86400.0 * 7  # ranges that ended before the current session
    bars_open_ttl: NonNegative = 5.0  # ranges reaching into the current session, market open
    bars_closed_ttl: NonNegative = 60.0  # … market closed
    latest_open_ttl: NonNegative = 1.0  # latest_quote / latest_trade / latest_bar, market open
    latest_closed_ttl: NonNegative = 30.0
    snapshot_open_ttl: NonNegative = 2.0
    snapshot_closed_ttl: NonNegative = 30.0
    reference_ttl: NonNegative = 86400.0  # assets, corporate actions

    def __post_init__(self) -> None:
        if self.memory_max_bytes <= 0:
            raise ValueError(f"cache.memory_max_bytes must be > 0, got {self.memory_max_bytes}")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("cache.redis_url must start with redis://, rediss:// or unix://")
        if not self.redis_prefix:
            raise ValueError("cache.redis_prefix must not be empty (it scopes SCAN-based invalidation)")
        for name in ("redis_connect_timeout", "redis_socket_timeout", "redis_backoff_initial"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"cache.{name} must be a finite number > 0, got {value}")
        if not self.redis_backoff_max >= self.redis_backoff_initial:
            raise ValueError(
                f"cache.redis_backoff_max ({self.redis_backoff_max}) must be >= "
                f"cache.redis_backoff_initial ({self.redis_backoff_initial})"
            )
        for name in (
            "stale_for",
            "history_ttl",
            "bars_open_ttl",
            "bars_closed_ttl",
            "latest_open_ttl",
            "latest_closed_ttl",
            "snapshot_open_ttl",
            "snapshot_closed_ttl",
            "reference_ttl",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"cache.{name} must be a finite number >= 0, got {value}")

    def ttl_for(self, kind: str, *, market_open: bool, range_closed: bool) -> float:
        """Freshness in seconds for ``kind``; ``range_closed`` matters only for range kinds (bars, …)."""
        if kind in RANGE_KINDS:
            if range_closed:
                return self.history_ttl
            return self.bars_open_ttl if market_open else self.bars_closed_ttl
        if kind in LATEST_KINDS:
            return self.latest_open_ttl if market_open else self.latest_closed_ttl
        if kind in SNAPSHOT_KINDS:
            return self.snapshot_open_ttl if market_open else self.snapshot_closed_ttl
        if kind in REFERENCE_KINDS:
            return self.reference_ttl
        raise ValueError(f"no cache TTL policy for kind {kind!r}; known kinds: {', '.join(sorted(KNOWN_KINDS))}")


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``marketpipe serve``. Secrets (admin token, client keys) come from the environment only."""

    host: str = "127.0.0.1"
    port: Port = 8000
    workers: PositiveInt = 1
    client_rate_limit_per_min: PositiveInt = 600  # per gateway client key (MARKETPIPE_API_KEYS)
    # permessage-deflate on WebSockets: off, because each client's frames are compressed separately and
    # that cost most of the fan-out's CPU (measured: a third of the gateway at 100 clients)
    ws_compression: bool = False
    # gateway limits (issue 12): the bound on each request, on admin bodies and on headers, and the
    # failed client-key attempts one address may make in a minute before it is refused for a while
    request_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * MB)] = 64 * 1024
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1024 * 1024)] = 16 * 1024
    auth_failures_per_min: Annotated[int, msgspec.Meta(ge=1)] = 10

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("server.port must be 1..65535")
        if self.workers < 1 or self.client_rate_limit_per_min < 1:
            raise ValueError("server.workers and server.client_rate_limit_per_min must be >= 1")


class StreamSettings(msgspec.Struct, forbid_unknown_fields=True):
    """``[stream]``: the live stream the gateway owns and fans out (one upstream connection)."""

    enabled: bool = True
    url: str | None = None  # ws(s)://host; default: Alpaca's, or the simulator's when providers.alpaca is one
    # default providers.alpaca.feed (409 falls back to iex)
    feed: Literal["iex", "sip", "delayed_sip", "test"] | None = None
    encoding: Literal["msgpack", "json"] = "msgpack"  # upstream wire encoding: msgpack | json
    symbols: list[str] = msgspec.field(default_factory=list)  # always streamed (and their minute bars stored)
    client_queue: Annotated[int, Meta(ge=10)] = 2_000  # messages held per client; a client that lets it fill is dropped
    slow_warn_fraction: Fraction = 0.5  # the client is told it is slow when its queue is this full
    max_symbols_per_client: PositiveInt = 500
    persist_bars: bool = True  # minute bars from the stream go to the store
    persist_every_seconds: Positive = 2.0
    gap_backfill: bool = True  # after a reconnect, missed minute bars are fetched over REST
    sparkline_points: AtLeast2 = 120  # recent prices kept per symbol for the dashboard
    # checks on every trade and quote
    max_future_seconds: Positive = 300.0
    jump_pct: Positive = 20.0  # farther than this from the last accepted price: rejected, alert raised
    reanchor_after: AtLeast2 = 5  # consecutive rejected prices that agree with each other become the new level
    cross_source_pct: Positive = 5.0  # primary vs fallback disagreement that raises a warning
    cross_check_seconds: NonNegative = 60.0  # how often the fallback is sampled to compare (0: never)
    # data-source router
    failure_threshold: PositiveInt = 3
    grace_seconds: Positive = 10.0
    fallback_poll_seconds: Positive = 5.0
    stale_seconds: Positive = 30.0  # no primary data this long (market open) counts as one failure

    def __post_init__(self) -> None:
        if self.encoding not in ("msgpack", "json"):
            raise ValueError("stream.encoding must be 'msgpack' or 'json'")
        if self.feed is not None and self.feed not in ("iex", "sip", "delayed_sip", "test"):
            raise ValueError("stream.feed must be iex, sip, delayed_sip or test")
        if self.url is not None and not self.url.startswith(("ws://", "wss://", "http://", "https://")):
            raise ValueError("stream.url must be a ws://, wss://, http:// or https:// URL")
        if self.client_queue < 10 or self.max_symbols_per_client < 1 or self.sparkline_points < 2:
            raise ValueError("stream.client_queue >= 10, max_symbols_per_client >= 1, sparkline_points >= 2")
        if not 0 < self.slow_warn_fraction < 1:
            raise ValueError("stream.slow_warn_fraction must be between 0 and 1")
        if min(self.persist_every_seconds, self.max_future_seconds, self.jump_pct, self.cross_source_pct) <= 0:
            raise ValueError("stream: persist_every_seconds, max_future_seconds, jump_pct, cross_source_pct > 0")
        if self.reanchor_after < 2 or self.failure_threshold < 1 or self.cross_check_seconds < 0:
            raise ValueError("stream: reanchor_after >= 2, failure_threshold >= 1, cross_check_seconds >= 0")
        if min(self.grace_seconds, self.fallback_poll_seconds, self.stale_seconds) <= 0:
            raise ValueError("stream: grace_seconds, fallback_poll_seconds, stale_seconds must be > 0")


# --- alerts (marketpipe.alerts) ----------------------------------------------------------------
AlertSeverity = Literal["info", "warning", "critical"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}


class AlertRule(msgspec.Struct, forbid_unknown_fields=True):
    """One rule of ``[alerts.rules.<name>]``. Each rule's class below holds its own defaults (so a partial
    table keeps the rest of that rule's defaults); what ``threshold`` and ``window_seconds`` mean is
    said beside each class. ``for_seconds``: the condition must hold this long before the alert fires."""

    enabled: bool = True
    severity: AlertSeverity = "warning"
    threshold: Annotated[float, Meta(ge=0, le=_FINITE)] = 0.0
    critical_threshold: Annotated[float, Meta(ge=0, le=_FINITE)] | None = None  # escalates to critical
    window_seconds: Positive = 300.0
    for_seconds: NonNegative = 0.0
    min_count: NonNegativeInt = 0  # fewer observations in the window: no verdict


class ProviderAvailabilityRule(AlertRule, forbid_unknown_fields=True):
    """Share of a provider's requests that did not fail (5xx, timeout, reset) over the window, below
    ``threshold``."""

    severity: AlertSeverity = "critical"
    threshold: Annotated[float, Meta(ge=0, le=1)] = 0.95
    window_seconds: Positive = 300.0
    min_count: NonNegativeInt = 5


class ProviderErrorsRule(AlertRule, forbid_unknown_fields=True):
    """A provider's errors per minute (any stable code) over the window, above ``threshold``."""

    threshold: Annotated[float, Meta(ge=0, le=_FINITE)] = 10.0
    window_seconds: Positive = 60.0


class CircuitOpenRule(AlertRule, forbid_unknown_fields=True):
    """A provider's circuit open (the state gauge at 2) for ``for_seconds``."""

    severity: AlertSeverity = "critical"
    for_seconds: NonNegative = 60.0


class StreamStaleRule(AlertRule, forbid_unknown_fields=True):
    """A connected vendor stream without a message for ``window_seconds`` (2x the expected minute-bar
    interval) while the market is open."""

    window_seconds: Positive = 120.0


class QualityScoreRule(AlertRule, forbid_unknown_fields=True):
    """A series' latest quality score below ``threshold`` (warning) or ``critical_threshold`` (critical)."""

    threshold: Annotated[float, Meta(ge=0, le=1)] = 0.9
    critical_threshold: Annotated[float, Meta(ge=0, le=1)] | None = 0.8


class RouterStateRule(AlertRule, forbid_unknown_fields=True):
    """The live data-source router in fallback (``severity``) or with both sources unavailable (critical)."""


class CacheHitRateRule(AlertRule, forbid_unknown_fields=True):
    """The memory cache's hit share over the window below ``threshold``, once ``min_count`` lookups were made."""

    threshold: Annotated[float, Meta(ge=0, le=1)] = 0.5
    window_seconds: Positive = 600.0
    min_count: NonNegativeInt = 100


class StoreWriteFailuresRule(AlertRule, forbid_unknown_fields=True):
    """Store writes that failed over the window, more than ``threshold``."""

    severity: AlertSeverity = "critical"
    window_seconds: Positive = 300.0


class StoreDiskRule(AlertRule, forbid_unknown_fields=True):
    """The filesystem holding the store fuller than ``threshold`` (share), critical above ``critical_threshold``."""

    threshold: Annotated[float, Meta(ge=0, le=1)] = 0.85
    critical_threshold: Annotated[float, Meta(ge=0, le=1)] | None = 0.95


class BacklogRule(AlertRule, forbid_unknown_fields=True):
    """Items waiting in a pipeline queue (unflushed stream bars, unpublished bus events, alert
    notifications) above ``threshold``."""

    threshold: Annotated[float, Meta(ge=0, le=_FINITE)] = 10_000.0


class EventsRule(AlertRule, forbid_unknown_fields=True):
    """Pipeline events (``core/events.py``: outlier, source_unavailable, stale_data, missing_data) as
    alerts at the event's own severity; resolved after ``window_seconds`` without a repeat. ``severity`` is
    the least severity taken (info events are not alerts by default)."""

    window_seconds: Positive = 300.0


class AlertRules(msgspec.Struct, forbid_unknown_fields=True):
    provider_availability: ProviderAvailabilityRule = msgspec.field(default_factory=ProviderAvailabilityRule)
    provider_errors: ProviderErrorsRule = msgspec.field(default_factory=ProviderErrorsRule)
    circuit_open: CircuitOpenRule = msgspec.field(default_factory=CircuitOpenRule)
    stream_stale: StreamStaleRule = msgspec.field(default_factory=StreamStaleRule)
    quality_score: QualityScoreRule = msgspec.field(default_factory=QualityScoreRule)
    router_state: RouterStateRule = msgspec.field(default_factory=RouterStateRule)
    cache_hit_rate: CacheHitRateRule = msgspec.field(default_factory=CacheHitRateRule)
    store_write_failures: StoreWriteFailuresRule = msgspec.field(default_factory=StoreWriteFailuresRule)
    store_disk: StoreDiskRule = msgspec.field(default_factory=StoreDiskRule)
    backlog: BacklogRule = msgspec.field(default_factory=BacklogRule)
    events: EventsRule = msgspec.field(default_factory=EventsRule)


EnvVar = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


def _sink_retry() -> RetryPolicy:
    """Receivers ask for minutes of patience (PagerDuty: back off "a few minutes" on 429/5xx)."""
    return RetryPolicy(attempts=4, base_seconds=1.0, max_seconds=60.0, max_retry_after_seconds=300.0)


class AlertSink(msgspec.Struct, forbid_unknown_fields=True):
    """What every ``[alerts.sinks.<name>]`` shares. Secrets (webhook URLs, routing keys, passwords) are
    never in the file: each sink names the environment variable that holds them (``*_env``)."""

    enabled: bool = False
    min_severity: AlertSeverity = "warning"  # alerts below this are not sent here
    send_resolved: bool = True
    rate_per_minute: Annotated[int, Meta(ge=1, le=6000)] = 30  # sends beyond this wait their turn
    queue: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000  # notifications held; beyond: dropped, counted
    timeout: Annotated[float, Meta(gt=0, le=300)] = 10.0  # seconds per delivery attempt
    retry: RetryPolicy = msgspec.field(default_factory=lambda: _sink_retry())


class SlackSink(AlertSink, forbid_unknown_fields=True):
    url_env: EnvVar = "MARKETPIPE_SLACK_WEBHOOK_URL"
    rate_per_minute: Annotated[int, Meta(ge=1, le=6000)] = 60  # Slack: about one message a second


class PagerDutySink(AlertSink, forbid_unknown_fields=True):
    min_severity: AlertSeverity = "critical"
    url: str = "https://events.pagerduty.com/v2/enqueue"
    routing_key_env: EnvVar = "MARKETPIPE_PAGERDUTY_ROUTING_KEY"


class EmailSink(AlertSink, forbid_unknown_fields=True):
    host: str = "localhost"
    port: Port = 587
    security: Literal["starttls", "tls", "none"] = "starttls"  # none: only for a relay on localhost
    ca_file: str | None = None  # a private CA for the server's certificate (else the system's)
    username_env: EnvVar = "MARKETPIPE_SMTP_USERNAME"
    password_env: EnvVar = "MARKETPIPE_SMTP_PASSWORD"
    sender: str = "marketpipe@localhost"
    to: list[str] = msgspec.field(default_factory=list)
    rate_per_minute: Annotated[int, Meta(ge=1, le=6000)] = 10


class WebhookSink(AlertSink, forbid_unknown_fields=True):
    url_env: EnvVar = "MARKETPIPE_ALERT_WEBHOOK_URL"
    secret_env: EnvVar = "MARKETPIPE_ALERT_WEBHOOK_SECRET"  # HMAC-SHA256 key for X-Marketpipe-Signature


class AlertSinks(msgspec.Struct, forbid_unknown_fields=True):
    slack: SlackSink = msgspec.field(default_factory=SlackSink)
    pagerduty: PagerDutySink = msgspec.field(default_factory=PagerDutySink)
    email: EmailSink = msgspec.field(default_factory=EmailSink)
    webhook: WebhookSink = msgspec.field(default_factory=WebhookSink)


class AlertsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``[alerts]``: the engine (rules over the metrics and events the pipeline keeps) and its sinks."""

    enabled: bool = True
    evaluate_seconds: Annotated[float, Meta(ge=0.05, le=3600)] = 15.0
    source: str | None = None  # names this gateway in alerts (PagerDuty payload.source); default the hostname
    resolved_keep: Annotated[int, Meta(ge=1, le=100_000)] = 200  # resolved alerts remembered for /v1/alerts
    rules: AlertRules = msgspec.field(default_factory=AlertRules)
    sinks: AlertSinks = msgspec.field(default_factory=AlertSinks)

    def __post_init__(self) -> None:
        email = self.sinks.email
        if email.enabled and not email.to:
            raise ValueError("alerts.sinks.email.to must list at least one address when the sink is enabled")


class ExportConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``[export]``: the Parquet cold tier's object store (``marketpipe export --to s3://…``,
    ``mp.bars(..., source="s3://…")``). Credentials come from the environment only
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``); the endpoint from here or
    ``AWS_ENDPOINT_URL`` (a value here wins), the region from here, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``."""

    endpoint_url: str | None = None  # an S3-compatible server, e.g. http://127.0.0.1:9000; unset: AWS
    region: str | None = None  # unset: the environment's, else us-east-1
    connect_timeout: Annotated[float, Meta(gt=0, le=600)] = 5.0
    attempts: Annotated[int, Meta(ge=1, le=20)] = 3  # per S3 request, the SDK's standard retry


class BusConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``[bus]``: the NATS JetStream event bus (``url = "nats://127.0.0.1:4222"``; unset: no bus, events stay
    in the process). ``MARKETPIPE_BUS_URL`` sets the URL too. Connecting is bounded by ``connect_timeout``
    (nats-py's own default retries for ~120 s against a server that is not up). ``buffer``: events held
    while the bus is unreachable, oldest dropped (and counted) beyond it. Retention per kind in seconds.
    ``ack_wait`` / ``max_deliver``: the distributed backfill's work-queue consumer; ``lease_ttl``: the
    upstream stream owner's lease (renewed every third of it)."""

    url: str | None = None
    connect_timeout: Annotated[float, Meta(gt=0, le=60)] = 2.0
    buffer: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    duplicate_window: Annotated[float, Meta(gt=0, le=86_400)] = 120.0
    raw_max_age: Annotated[float, Meta(gt=0)] = 86_400.0  # raw upstream frames: a day
    norm_max_age: Annotated[float, Meta(gt=0)] = 7 * 86_400.0  # normalized bars: a week
    quality_max_age: Annotated[float, Meta(gt=0)] = 30 * 86_400.0  # data-quality alerts: a month
    corpact_max_age: Annotated[float, Meta(gt=0)] = 365 * 86_400.0  # corporate actions applied: a year
    health_max_age: Annotated[float, Meta(gt=0)] = 86_400.0  # provider health: a day
    ack_wait: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    max_deliver: Annotated[int, Meta(ge=1, le=100)] = 5
    worker_items: Annotated[int, Meta(ge=1, le=64)] = 4  # items one worker runs at once (its requests in flight)
    lease_ttl: Annotated[float, Meta(ge=1, le=600)] = 10.0
    rate_share: bool = True  # workers share the vendor's per-account limit through the KV bucket
    raw_log: bool = False  # the stream owner also keeps each upstream frame in MP_RAW (JetStream: ~20 k msg/s here)

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("nats://", "tls://")):
            raise ValueError("bus.url must start with nats:// or tls://")

    def target(self) -> str | None:
        """The bus URL: ``[bus] url``, else ``MARKETPIPE_BUS_URL``, else None (no bus)."""
        return self.url or os.environ.get("MARKETPIPE_BUS_URL") or None


class Config(msgspec.Struct, forbid_unknown_fields=True):
    calendar: str = "XNYS"
    # Crypto trades around the clock (core/calendar.ContinuousCalendar); its daily bars are stamped at
    # midnight of this zone: UTC today, America/Chicago in Alpaca's older answers.
    crypto_daily_bars: Literal["UTC", "America/Chicago"] = "UTC"
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    backfill: BackfillConfig = msgspec.field(default_factory=BackfillConfig)
    quality: QualityConfig = msgspec.field(default_factory=QualityConfig)
    update: UpdateConfig = msgspec.field(default_factory=UpdateConfig)
    jobs: list[JobConfig] = msgspec.field(default_factory=list)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    stream: StreamSettings = msgspec.field(default_factory=StreamSettings)
    alerts: AlertsConfig = msgspec.field(default_factory=AlertsConfig)
    export: ExportConfig = msgspec.field(default_factory=ExportConfig)
    bus: BusConfig = msgspec.field(default_factory=BusConfig)
    # each value is the vendor's registered config class (AlpacaConfig, …), see register_provider_config
    providers: dict[str, ProviderConfig] = msgspec.field(default_factory=_default_providers)
    source_path: str | None = None

    @overload
    def provider(self, name: str) -> ProviderConfig: ...

    @overload
    def provider(self, name: str, kind: type[P]) -> P: ...

    def provider(self, name: str, kind: type[ProviderConfig] = ProviderConfig) -> ProviderConfig:
        """The effective config of vendor ``name`` (its class's defaults when the file has no table for
        it). With ``kind`` (e.g. ``AlpacaConfig``) the result is typed as that class, and a config of
        another class is a CONFIG_ERROR naming the key (someone put a base ``ProviderConfig`` there)."""
        cfg = self.providers.get(name)
        if cfg is None:
            cfg = provider_config_type(name)()
        if not isinstance(cfg, kind):
            raise ConfigError(
                f"providers.{name}: holds a {type(cfg).__name__}, expected {kind.__name__}",
                details={"key": f"providers.{name}"},
            )
        return cfg

    def store_target(self) -> str:
        """Where the store is: a ``postgresql://`` URL or a DuckDB file path (``duckdb://`` stripped).
        First of ``[store] url``, ``[store] path`` (``--store`` sets it, a path or a URL),
        ``MARKETPIPE_STORE_URL``, ``MARKETPIPE_STORE``, then the default file."""
        for value in (self.store.url, self.store.path, os.environ.get("MARKETPIPE_STORE_URL")):
            if value and value.startswith(STORE_SERVER_SCHEMES):
                return value
            if value:
                break
        return str(self.store_path())

    def store_is_server(self) -> bool:
        """Whether the store is a database server (many processes may use it at once)."""
        return self.store_target().startswith(STORE_SERVER_SCHEMES)

    def store_path(self) -> Path:
        """The DuckDB file: ``[store] path``, ``MARKETPIPE_STORE_URL`` / ``MARKETPIPE_STORE`` (a
        ``duckdb://`` prefix stripped), else the default in the user data dir."""
        for value in (self.store.path, os.environ.get("MARKETPIPE_STORE_URL"), os.environ.get("MARKETPIPE_STORE")):
            if value and not value.startswith(STORE_SERVER_SCHEMES):
                return Path(os.path.expanduser(value.removeprefix("duckdb://")))
        return Path(platformdirs.user_data_dir(APP)) / "marketpipe.duckdb"


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    candidates: list[Path] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}", details={"path": str(p)})
        candidates.append(p)
    else:
        env = os.environ.get("MARKETPIPE_CONFIG")
        if env:
            if not Path(env).is_file():
                raise ConfigError(f"MARKETPIPE_CONFIG points to a missing file: {env}")
            candidates.append(Path(env))
        candidates += [Path("marketpipe.toml"), Path(platformdirs.user_config_dir(APP)) / "config.toml"]
    for p in candidates:
        if p.is_file():
            try:
                raw: dict[str, Any] = tomllib.loads(p.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{p}: not valid TOML: {exc}", details={"path": str(p)}) from exc
            return apply_env(config_from_dict(raw, source=str(p)))
    return apply_env(Config())


# (environment variable, provider, field): the variable is the field's value when the file leaves it unset.
# APCA_API_DATA_URL is the name Alpaca's own SDKs and tools read for the data API's address; alpaca-py itself
# reads no variables (its clients take ``url_override``), and the stream host follows the data URL (see
# ``marketpipe.wire.alpaca_stream.stream_base_url``), so no separate stream variable is needed.
ENV_OVERRIDES: tuple[tuple[str, str, str], ...] = (("APCA_API_DATA_URL", "alpaca", "base_url"),)


def apply_env(cfg: Config, env: Mapping[str, str] | None = None) -> Config:
    """Fill the fields of :data:`ENV_OVERRIDES` the config leaves unset from the environment (file > env).
    Returns ``cfg`` (changed in place)."""
    src = os.environ if env is None else env
    for var, name, field in ENV_OVERRIDES:
        value = (src.get(var) or "").strip()
        if not value:
            continue
        prov = cfg.provider(name)
        if getattr(prov, field) is None:
            setattr(prov, field, value)
            cfg.providers[name] = prov
    return cfg


def config_from_dict(raw: dict[str, Any], *, source: str | None = None) -> Config:
    where = source or "config"
    user_providers = raw.get("providers") or {}
    if not isinstance(user_providers, dict):
        raise ConfigError(
            f"{where}: providers: must be a table of [providers.<name>] sections, got {type(user_providers).__name__}",
            details={"path": source, "key": "providers"},
        )
    for name, prov in user_providers.items():
        if not isinstance(prov, dict):
            raise ConfigError(
                f"{where}: providers.{name}: must be a table ([providers.{name}]), got {type(prov).__name__}",
                details={"path": source, "key": f"providers.{name}"},
            )
    for secretish in ("api_key", "secret_key", "key", "secret"):
        for name, prov in user_providers.items():
            if secretish in prov:
                raise ConfigError(
                    f"providers.{name}.{secretish}: secrets are read from the environment only, "
                    "never from the config file",
                )
    # one by one, each into its vendor's class: msgspec would name a dict key only as "[...]", and the
    # dict's declared value type is the shared base
    names = [*PROVIDER_CONFIGS, *(n for n in user_providers if n not in PROVIDER_CONFIGS)]
    providers = {
        name: _convert(user_providers.get(name) or {}, provider_config_type(name), f"providers.{name}", source)
        for name in names
    }
    rest = {k: v for k, v in raw.items() if k != "providers"}
    cfg = _convert(rest, Config, "", source)
    cfg.providers = providers
    cfg.source_path = source
    return cfg


S = TypeVar("S", bound=msgspec.Struct)


def _convert(raw: Any, kind: type[S], prefix: str, source: str | None) -> S:
    """``msgspec.convert`` whose error leads with the key, e.g. ``providers.alpaca.read_timeout: Expected
    `float` > 0.0``, and lists the allowed values of a ``Literal``."""
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        message, _, at = str(exc).partition(" - at `$")
        key = ".".join(p for p in (prefix, at.rstrip("`").lstrip(".")) if p)
        choices = _choices(kind, at.rstrip("`").lstrip(".")) if message.startswith("Invalid enum value") else None
        if choices:
            message += f"; use one of {', '.join(map(repr, choices))}"
        if key and not message.startswith(key):
            message = f"{key}: {message}"
        raise ConfigError(
            f"{source or 'config'}: {message}", details={"path": source, **({"key": key} if key else {})}
        ) from exc


def _choices(kind: Any, path: str) -> tuple[Any, ...] | None:
    """The values of the ``Literal`` field at ``path`` (``jobs[0].strategy``) under ``kind``, if it is one."""
    node: Any = msgspec.inspect.type_info(kind)
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        while isinstance(node, msgspec.inspect.Metadata | msgspec.inspect.UnionType):
            node = node.type if isinstance(node, msgspec.inspect.Metadata) else node.types[0]
        if part.startswith("["):
            node = getattr(node, "item_type", None)
        elif isinstance(node, msgspec.inspect.StructType):
            node = next((f.type for f in node.fields if f.name == part), None)
        elif isinstance(node, msgspec.inspect.DictType):
            node = node.value_type
        else:
            return None
    while isinstance(node, msgspec.inspect.Metadata | msgspec.inspect.UnionType):
        node = node.type if isinstance(node, msgspec.inspect.Metadata) else node.types[0]
    return tuple(node.values) if isinstance(node, msgspec.inspect.LiteralType) else None


# --- credentials -------------------------------------------------------------------------------

ALPACA_KEY_VARS = ("ALPACA_API_KEY", "APCA_API_KEY_ID")
ALPACA_SECRET_VARS = ("ALPACA_SECRET_KEY", "APCA_API_SECRET_KEY")


def alpaca_credentials(env: dict[str, str] | None = None) -> tuple[str, str]:
    """The Alpaca key pair from the environment; the error names the variables, never a value."""
    src = os.environ if env is None else env
    key = next((src[v] for v in ALPACA_KEY_VARS if src.get(v)), None)
    secret = next((src[v] for v in ALPACA_SECRET_VARS if src.get(v)), None)
    if not key or not secret:
        raise MissingCredentials(
            "Alpaca credentials missing: set ALPACA_API_KEY and ALPACA_SECRET_KEY "
            "(or APCA_API_KEY_ID and APCA_API_SECRET_KEY)",
            details={"env": list(ALPACA_KEY_VARS + ALPACA_SECRET_VARS)},
        )
    return key, secret


def mask(secret: str | None) -> str:
    if not secret:
        return "(unset)"
    return secret[:2] + "…" + "*" * 4 if len(secret) > 6 else "****"
