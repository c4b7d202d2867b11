"""Fault injection for the simulator, changeable while it runs.

A :class:`Faults` object holds an ordered list of :class:`FaultRule` and an optional rate-limit
override. For every data request (never the ``/_sim`` admin paths) the server asks
:meth:`Faults.decide`: every matching ``latency`` rule that fires adds its delay, and the first
other rule that fires decides what goes wrong with the response. Which requests a rule hits is
decided by a seeded RNG, so a test run is repeatable.

Kinds:

``latency``         sleep ``latency_ms`` before answering (adds up over rules)
``http_500``        500 with Alpaca's JSON error body
``http_502``        502 with an nginx HTML page
``http_503``        503 with an nginx HTML page (not JSON)
``hang``            sleep ``hang_seconds`` before the normal answer (client timeouts)
``reset``           abort the TCP connection without any response
``truncated_json``  200 whose body stops half-way; Content-Length matches the cut body
``html_200``        200 with an HTML page instead of JSON (captive portal / proxy error page)
``invalid_rows``    bar responses with ``row_ratio`` of their rows corrupted, each in one of
                    ``row_kinds`` (default: all of ``high_lt_low``, ``negative_volume``,
                    ``duplicate_ts``, ``misaligned_ts``, ``nonpositive_price``)
``rate_limit``      429 ``too many requests.`` with ``X-RateLimit-Remaining: 0`` and a reset
                    ``reset_seconds`` ahead
"""

from __future__ import annotations

import random
import re
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Literal, get_args

import msgspec

FaultKind = Literal[
    "latency",
    "http_500",
    "http_502",
    "http_503",
    "hang",
    "reset",
    "truncated_json",
    "html_200",
    "invalid_rows",
    "rate_limit",
]
RowKind = Literal["high_lt_low", "negative_volume", "duplicate_ts", "misaligned_ts", "nonpositive_price"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
ROW_KINDS: tuple[str, ...] = get_args(RowKind)
# Every vendor face's data URLs: Alpaca and Polygon under /v2/, Yahoo's chart under /v8/.
DATA_PATHS = re.compile(r"^/(v2|v8)/")
# invalid_rows only makes sense where bars are returned in bulk: Alpaca bars, Polygon aggregates,
# Yahoo charts.
BAR_PATHS = re.compile(r"^/v2/stocks/(bars|[^/]+/bars)$|^/v2/aggs/ticker/[^/]+/range/|^/v8/finance/chart/")


class FaultRule(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One fault. ``ratio``: chance per matching request; ``times``: fire at most this often;
    ``after``: let this many matching requests through first ("fails mid-backfill");
    ``paths``: regex searched in the request path (default: every vendor data path)."""

    kind: FaultKind
    ratio: float = 1.0
    times: int | None = None
    after: int = 0
    paths: str | None = None
    latency_ms: float = 100.0
    hang_seconds: float = 30.0
    row_kinds: list[RowKind] | None = None  # None: every kind
    row_ratio: float = 0.05
    reset_seconds: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError("ratio must be within 0..1")
        if not 0.0 <= self.row_ratio <= 1.0:
            raise ValueError("row_ratio must be within 0..1")
        if self.times is not None and self.times < 0:
            raise ValueError("times must be >= 0")
        if self.after < 0:
            raise ValueError("after must be >= 0")
        if self.latency_ms < 0 or self.hang_seconds < 0 or self.reset_seconds < 0:
            raise ValueError("durations must be >= 0")
        if self.row_kinds is not None and not self.row_kinds:
            raise ValueError("invalid_rows needs at least one row kind")
        if self.paths is not None:
            try:
                re.compile(self.paths)
            except re.error as exc:
                raise ValueError(f"paths is not a valid regex: {exc}") from exc

    def matches(self, path: str) -> bool:
        if self.paths is not None:
            if not re.search(self.paths, path):
                return False
        elif not DATA_PATHS.match(path):
            return False
        return self.kind != "invalid_rows" or bool(BAR_PATHS.match(path))


class FaultConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``PUT /_sim/faults``."""

    rules: list[FaultRule] = msgspec.field(default_factory=list)
    rate_limit_per_min: int | None = None

    def __post_init__(self) -> None:
        if self.rate_limit_per_min is not None and self.rate_limit_per_min < 0:
            raise ValueError("rate_limit_per_min must be >= 0")


@dataclass
class _State:
    rule: FaultRule
    seen: int = 0
    applied: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do to one request: total added latency, then at most one fault (None = answer normally)."""

    latency_s: float = 0.0
    fault: FaultRule | None = None
    serial: int = 0  # per-Faults request number, seeds which rows invalid_rows corrupts


class Faults:
    """Live, thread-safe fault configuration (tests change it from their own thread while the
    server thread reads it)."""

    def __init__(
        self, rules: list[FaultRule] | None = None, *, rate_limit_per_min: int | None = None, seed: int = 0
    ) -> None:
        self._lock = threading.Lock()
        self.seed = seed
        self._rng = random.Random(seed)
        self._states: list[_State] = [_State(r) for r in rules or []]
        self._rate_limit_per_min = rate_limit_per_min
        self._serial = 0

    # --- configuration -----------------------------------------------------------------------------
    def set(self, rules: list[FaultRule], *, rate_limit_per_min: int | Literal["keep"] | None = "keep") -> None:
        """Replace all rules (their counters start again); ``rate_limit_per_min`` too when given."""
        with self._lock:
            self._states = [_State(r) for r in rules]
            self._rng = random.Random(self.seed)
            if rate_limit_per_min != "keep":
                self._rate_limit_per_min = rate_limit_per_min

    def add(self, rule: FaultRule) -> None:
        with self._lock:
            self._states.append(_State(rule))

    def clear(self) -> None:
        """No rules and no rate-limit override."""
        with self._lock:
            self._states = []
            self._rate_limit_per_min = None
            self._rng = random.Random(self.seed)

    @property
    def rules(self) -> list[FaultRule]:
        with self._lock:
            return [s.rule for s in self._states]

    @property
    def rate_limit_per_min(self) -> int | None:
        return self._rate_limit_per_min

    @rate_limit_per_min.setter
    def rate_limit_per_min(self, value: int | None) -> None:
        with self._lock:
            self._rate_limit_per_min = value

    def load(self, body: bytes) -> None:
        """Apply a ``PUT /_sim/faults`` body; raises ``msgspec.ValidationError``/``DecodeError``."""
        cfg = msgspec.json.decode(body or b"{}", type=FaultConfig)
        self.set(cfg.rules, rate_limit_per_min=cfg.rate_limit_per_min)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rules": [msgspec.to_builtins(s.rule) for s in self._states],
                "rate_limit_per_min": self._rate_limit_per_min,
                "counters": [{"seen": s.seen, "applied": s.applied} for s in self._states],
            }

    # --- per request -------------------------------------------------------------------------------
    def decide(self, path: str) -> Decision:
        with self._lock:
            self._serial += 1
            latency = 0.0
            chosen: FaultRule | None = None
            for st in self._states:
                rule = st.rule
                if not rule.matches(path):
                    continue
                st.seen += 1
                if chosen is not None and rule.kind != "latency":
                    continue  # one fault per request; later rules still count what they saw
                if st.seen <= rule.after or (rule.times is not None and st.applied >= rule.times):
                    continue
                if rule.ratio < 1.0 and self._rng.random() >= rule.ratio:
                    continue
                st.applied += 1
                if rule.kind == "latency":
                    latency += rule.latency_ms / 1000.0
                else:
                    chosen = rule
            return Decision(latency, chosen, self._serial)


# --- invalid_rows ----------------------------------------------------------------------------------


def corrupt_bars(doc: dict[str, Any], rule: FaultRule, seed: int) -> int:
    """Corrupt ``rule.row_ratio`` of the bars in a decoded bars response, in place; returns how
    many rows were hit. Rows are picked by a hash of (seed, symbol, t), so the same bars are hit on
    every request whatever the paging, and at least one row is hit when there are rows at all."""
    bars = doc.get("bars")
    if isinstance(bars, list):
        groups = [(str(doc.get("symbol", "")), bars)]
    elif isinstance(bars, dict):
        groups = [(str(sym), rows) for sym, rows in bars.items() if isinstance(rows, list)]
    else:
        return 0
    threshold = int(rule.row_ratio * 1_000_000)
    hits: list[tuple[list[dict[str, Any]], int, int]] = []
    best: tuple[int, list[dict[str, Any]], int] | None = None
    for sym, rows in groups:
        for idx, row in enumerate(rows):
            h = zlib.crc32(f"{seed}|{sym}|{row.get('t')}".encode())
            if h % 1_000_000 < threshold:
                hits.append((rows, idx, h))
            if best is None or h % 1_000_000 < best[0]:
                best = (h % 1_000_000, rows, idx)
    if not hits and best is not None and threshold > 0:
        hits.append((best[1], best[2], best[0]))
    kinds = rule.row_kinds or ROW_KINDS
    for rows, idx, h in hits:
        _corrupt_row(rows, idx, kinds[(h // 7) % len(kinds)], h)
    return len(hits)


def _corrupt_row(rows: list[dict[str, Any]], idx: int, kind: str, h: int) -> None:
    row = rows[idx]
    if kind == "high_lt_low":
        hi, lo = float(row["h"]), float(row["l"])
        row["h"], row["l"] = min(hi, lo), max(hi, lo)
        if row["h"] == row["l"]:
            row["l"] = round(row["h"] + 0.01, 2)
    elif kind == "negative_volume":
        row["v"] = -(int(row["v"]) or 1)
    elif kind == "duplicate_ts":
        if len(rows) == 1:
            rows.append(dict(row))
        else:
            row["t"] = rows[idx - 1]["t"] if idx > 0 else rows[1]["t"]
    elif kind == "misaligned_ts":
        t = str(row["t"])  # "YYYY-MM-DDTHH:MM:SSZ": put the bar 17 s off its minute
        row["t"] = t[:17] + "17Z"
    elif kind == "nonpositive_price":
        if h % 2:
            row["o"] = row["l"] = 0.0
        else:
            row["c"] = -abs(float(row["c"]))
