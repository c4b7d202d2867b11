"""Prometheus metrics. One registry for the process; names follow Prometheus conventions.

Every metric has a help text. States are exported twice: as a numeric gauge whose help text lists the
codes (``marketpipe_circuit_state``: 0 closed, 1 half-open, 2 open), which alert rules compare, and as a
labelled state-set (``marketpipe_circuit_status{provider, marketpipe_circuit_status="open"} 1``, one
series per state, 1 for the current one) that dashboards can show by name. No ``*_created`` series
(``disable_created_metrics``); the process (CPU, memory, file descriptors), the Python runtime and the
build (``marketpipe_build_info``) are exported too.
"""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector

disable_created_metrics()  # the *_created series double every counter's series and nothing here reads them

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, …
PlatformCollector(registry=REGISTRY)  # python_info
GCCollector(registry=REGISTRY)  # python_gc_*


def _version() -> str:
    try:
        return metadata.version("marketpipe")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


BUILD_INFO = Info("marketpipe_build", "The running marketpipe: package version and Python version", registry=REGISTRY)
BUILD_INFO.info({"version": _version(), "python": platform.python_version()})

PROVIDER_REQUESTS = Counter(
    "marketpipe_provider_requests_total",
    "HTTP requests sent to data providers, by outcome status",
    ["provider", "endpoint", "status"],
    registry=REGISTRY,
)
PROVIDER_LATENCY = Histogram(
    "marketpipe_provider_request_seconds",
    "Provider request latency (until the body is read)",
    ["provider", "endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
PROVIDER_ERRORS = Counter(
    "marketpipe_provider_errors_total",
    "Provider failures by stable error code",
    ["provider", "code"],
    registry=REGISTRY,
)
PROVIDER_RETRIES = Counter(
    "marketpipe_provider_retries_total",
    "Retries after a retryable provider error",
    ["provider", "code"],
    registry=REGISTRY,
)
CIRCUIT_STATE = Gauge(
    "marketpipe_circuit_state",
    "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open",
    ["provider"],
    registry=REGISTRY,
)
CIRCUIT_STATUS = Enum(
    "marketpipe_circuit_status",
    "Circuit breaker state per provider as a state-set: 1 on the current state",
    ["provider"],
    states=["closed", "half_open", "open"],
    registry=REGISTRY,
)
RATELIMIT_REMAINING = Gauge(
    "marketpipe_ratelimit_remaining",
    "Requests left in the provider's current rate-limit window, as last reported or estimated",
    ["provider"],
    registry=REGISTRY,
)
ROWS_STORED = Counter(
    "marketpipe_rows_stored_total",
    "Rows written to the store",
    ["kind", "source", "timeframe"],
    registry=REGISTRY,
)
UNKNOWN_CODES = Counter(
    "marketpipe_provider_unknown_codes_total",
    "Vendor codes no table names (kept in a marked form), by provider and table",
    ["provider", "table"],
    registry=REGISTRY,
)
VENDOR_POINTS_DROPPED = Counter(
    "marketpipe_vendor_points_dropped_total",
    "Vendor points that are not bars of the request (outside the range or off the timeframe grid), dropped",
    ["provider", "reason"],
    registry=REGISTRY,
)
ROWS_QUARANTINED = Counter(
    "marketpipe_rows_quarantined_total",
    "Rows that failed a validation check, by reason",
    ["reason"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "marketpipe_errors_total",
    "Errors surfaced to a caller (CLI, API), by stable code",
    ["code"],
    registry=REGISTRY,
)
PROVIDER_STATE = Gauge(
    "marketpipe_provider_health_state",
    "Provider health: 0 healthy, 1 degraded, 2 down",
    ["provider"],
    registry=REGISTRY,
)
FAILOVERS = Counter(
    "marketpipe_failovers_total",
    "Work moved from one provider to the next, by the provider that failed and the error code",
    ["provider", "code"],
    registry=REGISTRY,
)
ANOMALIES = Counter(
    "marketpipe_anomalies_total",
    "Anomalies found in stored or ingested bars, by kind and severity",
    ["kind", "severity"],
    registry=REGISTRY,
)
QUALITY_SCORE = Gauge(
    "marketpipe_quality_score",
    "Latest quality score (0-1) per symbol and timeframe over the range last analysed",
    ["symbol", "timeframe"],
    registry=REGISTRY,
)
COMPLETENESS = Gauge(
    "marketpipe_completeness_ratio",
    "Share of the bars the exchange calendar expects that are held, per symbol and timeframe",
    ["symbol", "timeframe"],
    registry=REGISTRY,
)
EVENTS = Counter(
    "marketpipe_events_total",
    "Internal events raised (missing data, stale data, outlier, source unavailable), by kind and severity",
    ["kind", "severity"],
    registry=REGISTRY,
)
SCHEDULED_RUNS = Counter(
    "marketpipe_scheduled_runs_total",
    "Scheduled update runs per job and symbol outcome",
    ["job", "status"],
    registry=REGISTRY,
)

# --- cache tiers (marketpipe.cache) --------------------------------------------------------------
CACHE_REQUESTS = Counter(
    "marketpipe_cache_requests_total",
    "Cache lookups per tier and kind, by result: hit (fresh), stale (only an expired copy held), miss",
    ["tier", "kind", "result"],
    registry=REGISTRY,
)
CACHE_BYTES = Gauge(
    "marketpipe_cache_bytes",
    "Bytes held by a cache tier (keys + values)",
    ["tier"],
    registry=REGISTRY,
)
CACHE_ENTRIES = Gauge(
    "marketpipe_cache_entries",
    "Entries held by a cache tier (fresh and stale)",
    ["tier"],
    registry=REGISTRY,
)
CACHE_ERRORS = Counter(
    "marketpipe_cache_errors_total",
    "Cache tier operations that failed; the caller carried on without that tier",
    ["tier"],
    registry=REGISTRY,
)
CACHE_EVICTIONS = Counter(
    "marketpipe_cache_evictions_total",
    "Entries dropped by a cache tier, by reason: lru (byte budget), expired (stale window over), oversize",
    ["tier", "reason"],
    registry=REGISTRY,
)
CACHE_LOADS = Counter(
    "marketpipe_cache_loads_total",
    "Loader calls made on a cache miss (one per burst of identical concurrent misses), by outcome",
    ["kind", "result"],
    registry=REGISTRY,
)
CACHE_TIER_UP = Gauge(
    "marketpipe_cache_tier_up",
    "1 while a cache tier is in use, 0 while it is skipped after an error (backing off)",
    ["tier"],
    registry=REGISTRY,
)

# --- vendor real-time streams (marketpipe.providers.alpaca_stream) --------------------------------
STREAM_MESSAGES = Counter(
    "marketpipe_stream_messages_total",
    "Data messages received on a vendor real-time stream, by message channel (trades, quotes, bars, ..., raw)",
    ["provider", "feed", "channel"],
    registry=REGISTRY,
)
STREAM_RECONNECTS = Counter(
    "marketpipe_stream_reconnects_total",
    "Stream reconnects scheduled, by why the previous connection or attempt ended",
    ["provider", "reason"],
    registry=REGISTRY,
)
STREAM_ERRORS = Counter(
    "marketpipe_stream_errors_total",
    "Error messages received from a vendor stream, by the vendor's numeric code",
    ["provider", "code"],
    registry=REGISTRY,
)
STREAM_DECODE_ERRORS = Counter(
    "marketpipe_stream_decode_errors_total",
    "Stream frames or messages that could not be decoded (logged and skipped)",
    ["provider"],
    registry=REGISTRY,
)
STREAM_CONNECTED = Gauge(
    "marketpipe_stream_connected",
    "1 while a vendor stream is connected, authenticated and subscribed, else 0",
    ["provider", "feed"],
    registry=REGISTRY,
)
STREAM_FEED_FALLBACKS = Counter(
    "marketpipe_stream_feed_fallbacks_total",
    "Stream feed switches after the vendor refused the plan's feed (insufficient subscription)",
    ["provider", "from_feed", "to_feed"],
    registry=REGISTRY,
)
STREAM_CONSUMER_DROPPED = Counter(
    "marketpipe_stream_consumer_dropped_total",
    "Stream messages dropped (oldest first) for an iterator consumer that fell behind its buffer",
    ["provider"],
    registry=REGISTRY,
)
STREAM_ROUTER_STATE = Gauge(
    "marketpipe_stream_router_state",
    "Live data-source router state: 0 startup, 1 primary active, 2 fallback active, 3 both unavailable",
    ["router"],
    registry=REGISTRY,
)
STREAM_ROUTER_STATUS = Enum(
    "marketpipe_stream_router_status",
    "Live data-source router state as a state-set: 1 on the current state",
    ["router"],
    states=["startup", "primary_active", "fallback_active", "both_unavailable"],
    registry=REGISTRY,
)
STREAM_ROUTER_TRANSITIONS = Counter(
    "marketpipe_stream_router_transitions_total",
    "Live data-source router state transitions, by the state left and the state entered",
    ["router", "from_state", "to_state"],
    registry=REGISTRY,
)
STREAM_ROUTER_STATE_SECONDS = Counter(
    "marketpipe_stream_router_state_seconds_total",
    "Seconds the live data-source router has spent in each state (accrued on every input)",
    ["router", "state"],
    registry=REGISTRY,
)
STREAM_CHECK_REJECTED = Counter(
    "marketpipe_stream_check_rejected_total",
    "Live trades and quotes rejected by the stream checks, by reason",
    ["reason"],
    registry=REGISTRY,
)
STREAM_CROSS_SOURCE_WARNINGS = Counter(
    "marketpipe_stream_cross_source_warnings_total",
    "Fallback vendor prices that disagreed with the stream by more than stream.cross_source_pct",
    ["source"],
    registry=REGISTRY,
)
FANOUT_CLIENTS = Gauge(
    "marketpipe_fanout_clients",
    "Clients connected to the live fan-out, by protocol (v1 WebSocket, SSE, Alpaca-compatible)",
    ["protocol"],
    registry=REGISTRY,
)
FANOUT_MESSAGES = Counter(
    "marketpipe_fanout_messages_total",
    "Messages queued to live fan-out clients, by protocol",
    ["protocol"],
    registry=REGISTRY,
)
FANOUT_DROPPED_CLIENTS = Counter(
    "marketpipe_fanout_dropped_clients_total",
    "Fan-out clients disconnected by the gateway, by reason (slow_consumer, protocol_error)",
    ["protocol", "reason"],
    registry=REGISTRY,
)
STREAM_BARS_PERSISTED = Counter(
    "marketpipe_stream_bars_persisted_total",
    "Minute bars from the live stream written to the store",
    ["source"],
    registry=REGISTRY,
)
STREAM_GAP_BACKFILLS = Counter(
    "marketpipe_stream_gap_backfills_total",
    "REST backfills of the minute bars a stream outage missed, by outcome",
    ["outcome"],
    registry=REGISTRY,
)
FANOUT_LATENCY = Histogram(
    "marketpipe_fanout_latency_seconds",
    "Time a live message spends in the gateway: from the upstream frame's arrival to the client frame "
    "that carries it being written (the frame's oldest message), by protocol",
    ["protocol"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)

# --- pipeline backlogs and store writes (alert inputs) -------------------------------------------------
BACKLOG = Gauge(
    "marketpipe_backlog_items",
    "Items waiting in a pipeline queue, by queue (stream_bars: live minute bars not yet stored; "
    "alerts_<sink>: notifications not yet delivered)",
    ["queue"],
    registry=REGISTRY,
)
STORE_WRITE_FAILURES = Counter(
    "marketpipe_store_write_failures_total",
    "Store writes that failed (nothing of the failed batch kept), by writer",
    ["writer"],
    registry=REGISTRY,
)

MARKET_OPEN = Gauge(
    "marketpipe_market_open",
    "1 while the exchange calendar has a regular session open, else 0 (set by the alert engine each evaluation)",
    registry=REGISTRY,
)
STORE_DISK_USED = Gauge(
    "marketpipe_store_disk_used_ratio",
    "Share (0-1) of the filesystem holding the store that is used (set by the alert engine each evaluation)",
    registry=REGISTRY,
)

# --- alerts (marketpipe.alerts) ----------------------------------------------------------------------
ALERTS_ACTIVE = Gauge(
    "marketpipe_alerts_active",
    "Alerts firing now, by rule and severity",
    ["rule", "severity"],
    registry=REGISTRY,
)
ALERT_TRANSITIONS = Counter(
    "marketpipe_alert_transitions_total",
    "Alert state changes, by rule and action (trigger: fired or changed severity; resolve: cleared)",
    ["rule", "action"],
    registry=REGISTRY,
)
ALERT_NOTIFICATIONS = Counter(
    "marketpipe_alert_notifications_total",
    "Alert notifications handled per sink, by result: sent, failed (after retries), filtered (below the "
    "sink's severity or a duplicate of the last one sent)",
    ["sink", "result"],
    registry=REGISTRY,
)
ALERT_DROPPED = Counter(
    "marketpipe_alert_notifications_dropped_total",
    "Alert notifications dropped because the sink's queue was full",
    ["sink"],
    registry=REGISTRY,
)
ALERT_SEND_SECONDS = Histogram(
    "marketpipe_alert_send_seconds",
    "Time to deliver one alert notification to a sink, retries included",
    ["sink"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)

EXPORT_FILES = Counter(
    "marketpipe_export_files_total",
    "Parquet cold-tier files an export considered: written (new or changed) or unchanged (skipped)",
    ["result"],
    registry=REGISTRY,
)
EXPORT_ROWS = Counter(
    "marketpipe_export_rows_total",
    "Bars written to Parquet cold-tier files",
    ["timeframe"],
    registry=REGISTRY,
)

AUDIT_WRITE_FAILURES = Counter(
    "marketpipe_audit_write_failures_total",
    "Admin requests whose audit-log row the store could not take (the request itself was answered)",
    registry=REGISTRY,
)
BUS_PUBLISHED = Counter(
    "marketpipe_bus_published_total",
    "Events published on the NATS bus, by kind; duplicate=true when the server de-duplicated it (Nats-Msg-Id)",
    ["kind", "duplicate"],
    registry=REGISTRY,
)
BUS_PUBLISH_FAILURES = Counter(
    "marketpipe_bus_publish_failures_total",
    "Publish attempts on the NATS bus that failed (a gateway's publisher keeps the event buffered and sends it "
    "again; a one-off publish from the CLI or a notebook logs it)",
    registry=REGISTRY,
)
BUS_DROPPED = Counter(
    "marketpipe_bus_dropped_total",
    "Events dropped because the bus buffer was full during an outage (oldest first)",
    registry=REGISTRY,
)
BUS_BUFFERED = Gauge(
    "marketpipe_bus_buffered",
    "Events waiting in the bus publisher's buffer",
    registry=REGISTRY,
)
BUS_CONNECTED = Gauge(
    "marketpipe_bus_connected",
    "1 while the NATS bus connection is up",
    registry=REGISTRY,
)
WORK_ITEMS = Counter(
    "marketpipe_work_items_total",
    "Distributed backfill work items handled by this worker, by outcome (done, retried, dead)",
    ["outcome"],
    registry=REGISTRY,
)
STREAM_LEASE_HELD = Gauge(
    "marketpipe_stream_lease_held",
    "1 while this process holds the upstream stream lease for the feed",
    ["feed"],
    registry=REGISTRY,
)
