"""The default rules, each a function of the sampled metrics (and the context the engine is given:
market hours, the store's path) that returns the conditions it finds now. A rule's thresholds and
windows are its ``[alerts.rules.<name>]`` table (``core/config.py``); ``deploy/prometheus/rules.yml``
states the same rules in PromQL for operators whose Prometheus does the alerting."""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from marketpipe.alerts.model import Condition
from marketpipe.alerts.samples import Labels, MetricHistory, label
from marketpipe.core.config import AlertRule, AlertRules, AlertSeverity

REQUESTS = "marketpipe_provider_requests_total"
ERRORS = "marketpipe_provider_errors_total"
CIRCUIT = "marketpipe_circuit_state"
STREAM_MESSAGES = "marketpipe_stream_messages_total"
STREAM_CONNECTED = "marketpipe_stream_connected"
QUALITY = "marketpipe_quality_score"
ROUTER = "marketpipe_stream_router_state"
CACHE = "marketpipe_cache_requests_total"
WRITE_FAILURES = "marketpipe_store_write_failures_total"
BACKLOG = "marketpipe_backlog_items"
SAMPLED = (
    REQUESTS,
    ERRORS,
    CIRCUIT,
    STREAM_MESSAGES,
    STREAM_CONNECTED,
    QUALITY,
    ROUTER,
    CACHE,
    WRITE_FAILURES,
    BACKLOG,
)
CIRCUIT_OPEN = 2.0
ROUTER_FALLBACK, ROUTER_BOTH_DOWN = 2.0, 3.0


@dataclass(frozen=True, slots=True)
class Context:
    now: datetime
    market_open: bool
    store_path: Path | None = None
    disk: tuple[Path, float] | None = None  # the directory measured and its filesystem's used share


def disk_share(
    store_path: Path, usage: Callable[[Path], tuple[int, int, int]] = shutil.disk_usage
) -> tuple[Path, float] | None:
    """The used share of the filesystem holding ``store_path`` (the nearest existing directory: the store
    file may not exist yet); None when the filesystem reports no size."""
    where = store_path
    while not where.exists() and where != where.parent:
        where = where.parent
    total, used, _free = usage(where)
    return (where, used / total) if total > 0 else None


RuleFn = Callable[[MetricHistory, AlertRule, Context], list[Condition]]


def _escalated(rule: AlertRule, value: float, *, below: bool) -> AlertSeverity:
    crit = rule.critical_threshold
    if crit is not None and (value < crit if below else value > crit):
        return "critical"
    return rule.severity


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %"


def provider_availability(h: MetricHistory, rule: AlertRule, ctx: Context) -> list[Condition]:
    total: dict[str, float] = defaultdict(float)
    failed: dict[str, float] = defaultdict(float)
    for labels, n in h.increase(REQUESTS, rule.window_seconds).items():
        provider, status = label(labels, "provider"), label(labels, "status")
        total[provider] += n
        if not status.isdigit() or status.startswith("5"):  # "error": timeout or connection failure
            failed[provider] += n
    out = []
    for provider, n in total.items():
        if n <= 0 or n < rule.min_count:
            continue
        avail = 1 - failed[provider] / n
        if avail < rule.threshold:
            out.append(
                Condition(
                    "provider_availability",
                    _escalated(rule, avail, below=True),
                    f"{provider}: {_pct(avail)} of {n:.0f} requests succeeded over {rule.window_seconds:.0f} s "
                    f"(below {_pct(rule.threshold)})",
                    {"provider": provider},
                    round(avail, 4),
                )
            )
    return out


def provider_errors(h: MetricHistory, rule: AlertRule, ctx: Context) -> list[Condition]:
    span = h.span(rule.window_seconds)
    if span <= 0:
        return []
    per_provider: dict[str, float] = defaultdict(float)
    for labels, n in h.increase(ERRORS, rule.window_seconds).items():
        per_provider[label(labels, "provider")] += n
    out = []
    for provider, n in per_provider.items():
        rate = n / max(span, rule.window_seconds) * 60  # per minute, over the whole window
        if n >= max(1, rule.min_count) and rate > rule.threshold:
            out.append(
                Condition(
                    "provider_errors",
                    _escalated(rule, rate, below=False),
                    f"{provider}: {rate:.1f} errors per minute (above {rule.threshold:g})",
                    {"provider": provider},
                    round(rate, 3),
                )
            )
    return out


def circuit_open(h: MetricHistory, rule: AlertRule, ctx: Context) -> list[Condition]:
    return [
        Condition(
            "circuit_open",
            rule.severity,
            f"{label(labels, 'provider')}: circuit open (calls to it are refused until a trial succeeds)",
            {"provider": label(labels, "provider")},
            v,
        )
        for labels, v in h.series(CIRCUIT).items()
        if v == CIRCUIT_OPEN
    ]


def stream_stale(h: MetricHistory, rule: AlertRule, ctx: Context) -> list[Condition]:
    """Streams that are connected (``marketpipe_stream_connected`` 1) yet quiet: the time since the newest
    message on any channel, or since the connection came up if that is later. A stream that is down is
    the router's business (``router_state``), and a feed left after a switch is not stale."""
    if not ctx.market_open:
        return []
    quiet: dict[tuple[str, str], float] = {}
    for labels, v in h.series(STREAM_CONNECTED).items():
        if v == 1:
            quiet[(label(labels, "provider"), label(labels, "feed"))] = h.unchanged_for(STREAM_CONNECTED, labels)
    for labels in h.series(STREAM_MESSAGES):
        key = (label(labels, "provider"), label(labels, "feed"))
        if key in quiet:
            quiet[key] = min(quiet[key], h.unchanged_for(STREAM_MESSAGES, labels))
    return [
        Condition(
            "stream_stale",
            rule.severity,
            f"{provider} stream ({feed}): no data for {q:.0f} s in market hours",
            {"provider": provider, "feed": feed},
            round(q, 1),
        )
        for (provider, feed), q in quiet.items()
        if q >= rule.window_seconds
    ]


def quality_score(h: MetricHistory, rule: AlertRule, ctx: Context) -> list[Condition]:
    out = []
    for labels, v in h.series(QUALITY).items():
        if v < rule.threshold:
            symbol, tf = label(labels, "symbol"), label(labels, "timeframe")
            out.append(
                Condition(
                    "quality_score",
                    _escalated(rule, v, below=True),
                    f"{symbol} {tf}: quality score {v:.3f} (below {rule.threshold:g})",
                    {"symbol": symbol, "timeframe": tf},
                    round(v, 4),
                )
            )
    return out


def router_state(h: MetricHistory, rule: AlertRule, ctx: Context) -> list[Condition]:
    out = []
    for labels, v in h.series(ROUTER).items():
        router = label(labels, "router")
        if v == ROUTER_FALLBACK:
            out.append(
                Condition(
                    "router_state",
                    rule.severity,
                    f"live router {router}: on the fallback vendors",
                    {"router": router},
                    v,
                )
            )
        elif v == ROUTER_BOTH_DOWN:
            out.append(
                Condition(
                    "router_state",
                    "critical",
                    f"live router {router}: stream and fallback both unavailable",
                    {"router": router},
                    v,
                )
            )
    return out


def cache_hit_rate(h: MetricHistory, rule: AlertRule, ctx: Context) -> list[Condition]:
    hits = total = 0.0
    for labels, n in h.increase(CACHE, rule.window_seconds).items():
        if label(labels, "tier") != "memory":
            continue
        total += n
        if label(labels, "result") == "hit":
            hits += n
    if total <= 0 or total < max(1, rule.min_count):
        return []
    rate = hits / total
    if rate >= rule.threshold:
        return []
    return [
        Condition(
            "cache_hit_rate",
            rule.severity,
            f"memory cache: {_pct(rate)} hits of {total:.0f} lookups over {rule.window_seconds:.0f} s "
            f"(below {_pct(rule.threshold)})",
            {"tier": "memory"},
            round(rate, 4),
        )
    ]


def store_write_failures(h: MetricHistory, rule: AlertRule, ctx: Context) -> list[Condition]:
    return [
        Condition(
            "store_write_failures",
            rule.severity,
            f"{n:.0f} store writes failed ({label(labels, 'writer')}) over {rule.window_seconds:.0f} s",
            {"writer": label(labels, "writer")},
            n,
        )
        for labels, n in h.increase(WRITE_FAILURES, rule.window_seconds).items()
        if n > rule.threshold
    ]


def store_disk(h: MetricHistory, rule: AlertRule, ctx: Context) -> list[Condition]:
    if ctx.disk is None:
        return []
    where, share = ctx.disk
    if share <= rule.threshold:
        return []
    return [
        Condition(
            "store_disk",
            _escalated(rule, share, below=False),
            f"the store's disk ({where}) is {_pct(share)} full (above {_pct(rule.threshold)})",
            {"path": str(ctx.store_path)},
            round(share, 4),
        )
    ]


def backlog(h: MetricHistory, rule: AlertRule, ctx: Context) -> list[Condition]:
    return [
        Condition(
            "backlog",
            _escalated(rule, v, below=False),
            f"{label(labels, 'queue')}: {v:.0f} items waiting (above {rule.threshold:g})",
            {"queue": label(labels, "queue")},
            v,
        )
        for labels, v in h.series(BACKLOG).items()
        if v > rule.threshold
    ]


METRIC_RULES: dict[str, RuleFn] = {
    "provider_availability": provider_availability,
    "provider_errors": provider_errors,
    "circuit_open": circuit_open,
    "stream_stale": stream_stale,
    "quality_score": quality_score,
    "router_state": router_state,
    "cache_hit_rate": cache_hit_rate,
    "store_write_failures": store_write_failures,
    "store_disk": store_disk,
    "backlog": backlog,
}
RULE_NAMES = (*METRIC_RULES, "events")


def rule_config(rules: AlertRules, name: str) -> AlertRule:
    cfg: AlertRule = getattr(rules, name)
    return cfg


def longest_window(rules: AlertRules) -> float:
    return max(max(rule_config(rules, n).window_seconds, rule_config(rules, n).for_seconds) for n in RULE_NAMES)


__all__ = ["METRIC_RULES", "RULE_NAMES", "SAMPLED", "Context", "Labels", "longest_window", "rule_config"]
