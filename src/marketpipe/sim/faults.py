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
                    ``duplicate_ts``, ``misaligned_ts``, ``nonpositive_price``); on option
                    snapshot answers (chains, snapshots by contract), ``row_ratio`` of the quotes
                    crossed (bid above ask)
``rate_limit``      429 ``too many requests.`` with ``X-RateLimit-Remaining: 0`` and a reset
                    ``reset_seconds`` ahead; with ``retry_after`` (seconds) also ``Retry-After``, as
                    a proxy or CDN in front of the vendor sends it (on every face)
``bad_data``        bar responses (same paths as ``invalid_rows``) with plausible-but-wrong data of
                    one ``defect``; every row still passes the row checks (OHLC order, vwap within
                    [low, high], volume >= 0, prices > 0), so only an anomaly or completeness check
                    can catch it. See below.
``empty_json``      200 with the body ``{}`` (a proxy or cache answering for the vendor), on any data
                    path. Only Alpaca's multi-snapshot has no envelope, so there ``{}`` means "no
                    data"; everywhere else it is a body without the vendor's keys.
``null_page``       200 with the page's kind key set to null and no other key: ``{"bars": null}``
                    (``trades``/``quotes`` on those pages) on Alpaca's historical pages,
                    ``{"results": null}`` on Polygon's aggregates, ``{"chart": null}`` on Yahoo's
                    chart. Other paths are not matched (and not counted).
``token_loop``      paginated answers (Alpaca historical, Polygon aggregates) whose continuation
                    never ends: Alpaca's ``next_page_token`` is the token the request carried, or,
                    on a request without one, the first one issued (the page's real next token, or
                    one that starts the query again when the page was the last); Polygon's
                    ``next_url`` points back at the request's own cursor (a request without a
                    cursor gets its real ``next_url``, or one with a cursor for the same range). The
                    rows are the ones the request asked for, so a client that follows the token
                    fetches the same page for ever. Other paths are not matched (and not counted).

``bad_data`` fields (:func:`apply_defect` does the work on Alpaca-shaped rows; the Polygon and Yahoo
faces convert their rows to that shape and back, so a defect means the same on every face):

``defect``  (required) one of:

            ``spike``             ``c = round(c * factor, 2)``, then ``h = max(h, c)``, ``l = min(l, c)``
                                  (one bad tick; the next bar is normal again). ``factor`` default 1.5.
            ``split``             an unadjusted split: every bar stamped strictly before the split
                                  point has o/h/l/c/vw multiplied by ``factor`` (rounded to 4 dp) and
                                  ``v = max(1, round(v / factor))``; bars at or after it are as
                                  served. ``factor`` (the split ratio) default 2.0. ``at``: exactly one
                                  entry, the first stamp or New York day *after* the split.
            ``frozen``            for each ``at`` start, the ``run`` bars of the symbol from the first
                                  bar stamped at or after it (a date: its first bar that day) get
                                  ``o = h = l = c = vw =`` that first bar's open; ``v`` and ``n`` stay.
                                  The run is counted in the timeframe of the request, across session
                                  breaks, and is the same whatever the paging or window (faces look
                                  the run up in the market). ``at`` is required. ``run`` default 30.
            ``volume_spike``      ``v = round(v * factor)``; ``n`` stays. ``factor`` default 50.
            ``zero_volume_move``  ``v = 0`` and ``n = 0``; prices stay (and still move bar to bar).
            ``drop``              the bars are left out of the answer (still a 200; paging goes on).

``at``      which bars: RFC-3339 times (``"2024-03-05T15:00:00Z"``, exact bar stamps) or New York
            dates ``"YYYY-MM-DD"`` (every bar whose New York date is that day). Empty or absent
            (``spike``, ``volume_spike``, ``zero_volume_move``, ``drop`` only): bars picked by the
            hash of (seed, symbol, stamp) as ``invalid_rows`` picks them, ``row_ratio`` of them, with
            no "at least one" rule, so the picks never depend on paging.
``symbols`` only bars of these symbols (absent: every symbol).
``factor``  see the defects; only ``spike``, ``split`` and ``volume_spike`` take one (> 0).
``run``     ``frozen`` only, >= 1.

Every defect is decided per bar from its own stamp (and, for ``frozen``, the run looked up from
the market), so the same request gives the same answer again, on any page size.
"""

from __future__ import annotations

import random
import re
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, get_args

import msgspec

from marketpipe.sim.data import NS_PER_SEC, ny_midnight_ns, parse_rfc3339_ns

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
    "bad_data",
    "empty_json",
    "null_page",
    "token_loop",
]
Defect = Literal["spike", "split", "frozen", "volume_spike", "zero_volume_move", "drop"]
RowKind = Literal["high_lt_low", "negative_volume", "duplicate_ts", "misaligned_ts", "nonpositive_price"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
ROW_KINDS: tuple[str, ...] = get_args(RowKind)
DEFECTS: tuple[str, ...] = get_args(Defect)
DEFAULT_FACTORS: dict[str, float] = {"spike": 1.5, "split": 2.0, "volume_spike": 50.0}
DEFAULT_RUN = 30
# Every vendor face's data URLs: Alpaca and Polygon under /v2/, Yahoo's chart under /v8/.
DATA_PATHS = re.compile(r"^/(v2|v8|v1beta1|v1beta3/crypto)/")
# invalid_rows and bad_data only make sense where bars are returned in bulk: Alpaca bars, Polygon
# aggregates, Yahoo charts.
BAR_PATHS = re.compile(
    r"^/v2/stocks/(bars|[^/]+/bars)$|^/v2/aggs/ticker/[^/]+/range/|^/v8/finance/chart/|^/v1beta3/crypto/[^/]+/bars$"
)
# invalid_rows also crosses quotes in option snapshot answers (chains and snapshots by contract).
OPTION_SNAPSHOT_PATHS = re.compile(r"^/v1beta1/options/snapshots(/[^/]+)?$")
# token_loop: where answers are paginated (Alpaca historical bars/trades/quotes, Polygon aggregates).
PAGED_PATHS = re.compile(
    r"^/v2/stocks/([^/]+/)?(bars|trades|quotes)$|^/v2/aggs/ticker/[^/]+/range/|^/v1beta3/crypto/[^/]+/(bars|trades|quotes)$"
)
# null_page: the paginated paths and Yahoo's chart, each with its page key.
PAGE_PATHS = re.compile(PAGED_PATHS.pattern + r"|^/v8/finance/chart/")


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
    retry_after: float | None = None  # rate_limit only: also send Retry-After (whole seconds, rounded up)
    defect: Defect | None = None  # bad_data only, from here on
    at: list[str] | None = None
    symbols: list[str] | None = None
    factor: float | None = None  # None: the defect's default (DEFAULT_FACTORS)
    run: int = DEFAULT_RUN

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
        if self.retry_after is not None and (self.kind != "rate_limit" or self.retry_after < 0):
            raise ValueError("retry_after applies to kind rate_limit only, and must be >= 0")
        if self.row_kinds is not None and not self.row_kinds:
            raise ValueError("invalid_rows needs at least one row kind")
        if self.paths is not None:
            try:
                re.compile(self.paths)
            except re.error as exc:
                raise ValueError(f"paths is not a valid regex: {exc}") from exc
        self._check_bad_data()

    def _check_bad_data(self) -> None:
        if self.kind != "bad_data":
            if self.defect is not None or self.at is not None or self.symbols is not None or self.factor is not None:
                raise ValueError("defect, at, symbols and factor apply to kind bad_data only")
            if self.run != DEFAULT_RUN:
                raise ValueError("run applies to kind bad_data (defect frozen) only")
            return
        if self.defect is None:
            raise ValueError(f"bad_data needs a defect, one of {', '.join(DEFECTS)}")
        if self.defect not in DEFECTS:
            raise ValueError(f"unknown defect {self.defect!r}; one of {', '.join(DEFECTS)}")
        for text in self.at or ():
            _parse_at(text)
        if self.defect == "split" and len(self.at or ()) != 1:
            raise ValueError("defect split needs at with exactly one entry: the first stamp or day after the split")
        if self.defect == "frozen" and not self.at:
            raise ValueError("defect frozen needs at: the stamps or days where frozen runs start")
        if self.symbols is not None and not self.symbols:
            raise ValueError("symbols must not be empty (leave it out for every symbol)")
        if self.factor is not None:
            if self.defect not in DEFAULT_FACTORS:
                raise ValueError(f"factor applies to defects {', '.join(DEFAULT_FACTORS)} only, not {self.defect}")
            if not 0.0 < self.factor < float("inf"):
                raise ValueError("factor must be a finite number > 0")
        if self.run != DEFAULT_RUN and self.defect != "frozen":
            raise ValueError("run applies to defect frozen only")
        if self.run < 1:
            raise ValueError("run must be >= 1")

    def matches(self, path: str) -> bool:
        if self.paths is not None:
            if not re.search(self.paths, path):
                return False
        elif not DATA_PATHS.match(path):
            return False
        if self.kind == "invalid_rows":
            return bool(BAR_PATHS.match(path) or OPTION_SNAPSHOT_PATHS.match(path))
        if self.kind == "bad_data":
            return bool(BAR_PATHS.match(path))
        if self.kind == "token_loop":
            return bool(PAGED_PATHS.match(path))
        if self.kind == "null_page":
            return bool(PAGE_PATHS.match(path))
        return True


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


def corrupt_option_quotes(doc: dict[str, Any], rule: FaultRule, seed: int) -> int:
    """``invalid_rows`` on an option snapshots answer: cross the quote (bid above ask) of
    ``rule.row_ratio`` of the two-sided contracts, in place; returns how many. Contracts are picked by
    a hash of (seed, symbol), so the same ones are crossed on every request whatever the paging, and at
    least one is when any has a two-sided quote."""
    snaps = doc.get("snapshots")
    if not isinstance(snaps, dict):
        return 0
    threshold = int(rule.row_ratio * 1_000_000)
    quoted = []
    for sym, snap in snaps.items():
        q = snap.get("latestQuote") if isinstance(snap, dict) else None
        if isinstance(q, dict) and float(q.get("bp") or 0) > 0 and float(q.get("ap") or 0) > float(q.get("bp") or 0):
            quoted.append((zlib.crc32(f"{seed}|{sym}".encode()) % 1_000_000, q))
    hits = [q for h, q in quoted if h < threshold] or (
        [min(quoted, key=lambda x: x[0])[1]] if quoted and threshold else []
    )
    for q in hits:
        q["bp"], q["ap"] = q["ap"], q["bp"]
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


# --- bad_data --------------------------------------------------------------------------------------

RunLookup = Callable[[str, int, int], list[dict[str, Any]]]
"""``(symbol, start_ns, n)`` -> the first ``n`` bars of ``symbol`` stamped at or after ``start_ns``,
Alpaca-shaped and ascending, exactly as the face serves them in the request's timeframe."""


def _parse_at(text: str) -> tuple[int, int]:
    """One ``at`` entry as the half-open ns span of bar stamps it names: a time names itself, a
    New York date its whole day."""
    try:
        ns, date_only = parse_rfc3339_ns(text)
        if date_only:
            day = date.fromisoformat(text.strip())
            return ny_midnight_ns(day), ny_midnight_ns(day + timedelta(days=1))
    except ValueError:
        raise ValueError(f"at: {text!r} is neither an RFC-3339 time with an offset nor a YYYY-MM-DD date") from None
    return ns, ns + 1


def _groups(doc: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    bars = doc.get("bars")
    if isinstance(bars, list):
        return [(str(doc.get("symbol", "")), bars)]
    if isinstance(bars, dict):
        return [(str(sym), rows) for sym, rows in bars.items() if isinstance(rows, list)]
    return []


def _row_ns(row: dict[str, Any]) -> int:
    return parse_rfc3339_ns(str(row["t"]))[0]


def apply_defect(doc: dict[str, Any], rule: FaultRule, seed: int, lookup: RunLookup | None = None) -> int:
    """Apply a ``bad_data`` rule to a decoded Alpaca-shaped bars response (``{"bars": [...],
    "symbol": S}`` or ``{"bars": {S: [...]}}``), in place; returns how many bars were changed or
    dropped. ``drop`` removes symbols left without bars from a ``bars`` mapping; a list may be left
    empty. ``lookup`` lets ``frozen`` see its whole run (and the price at its start) whatever the
    paging; without one the run is counted, and priced, within this response only. Keys a row
    lacks (Yahoo has no ``vw`` or ``n``) are left out."""
    defect = rule.defect
    if rule.kind != "bad_data" or defect is None:
        return 0
    wanted = set(rule.symbols) if rule.symbols is not None else None
    spans = [_parse_at(text) for text in rule.at or ()]
    factor = rule.factor if rule.factor is not None else DEFAULT_FACTORS.get(defect, 1.0)
    threshold = int(rule.row_ratio * 1_000_000)
    hits = 0
    bars = doc.get("bars")
    for sym, rows in _groups(doc):
        if wanted is not None and sym not in wanted:
            continue
        stamps = [_row_ns(row) for row in rows]
        if defect == "split":
            point = spans[0][0]
            hit = [t < point for t in stamps]
        elif defect == "frozen":
            hit = _freeze(sym, rows, stamps, spans, rule.run, lookup)
        elif spans:
            hit = [any(lo <= t < hi for lo, hi in spans) for t in stamps]
        else:
            hit = [zlib.crc32(f"{seed}|{sym}|{row.get('t')}".encode()) % 1_000_000 < threshold for row in rows]
        hits += sum(hit)
        if defect == "drop":
            rows[:] = [row for row, h in zip(rows, hit, strict=True) if not h]
            if not rows and isinstance(bars, dict):
                del bars[sym]
            continue
        for row, h in zip(rows, hit, strict=True):
            if h and defect != "frozen":  # _freeze has set its rows already
                _defect_row(row, defect, factor)
    return hits


def _defect_row(row: dict[str, Any], defect: str, factor: float) -> None:
    if defect == "spike":
        c = max(0.01, round(float(row["c"]) * factor, 2))
        row["c"] = c
        row["h"] = max(float(row["h"]), c)
        row["l"] = min(float(row["l"]), c)
    elif defect == "split":
        for key in ("o", "h", "l", "c", "vw"):
            if row.get(key) is not None:
                # rounding is monotone, so l <= vw <= h survives it
                row[key] = round(float(row[key]) * factor, 4)
        row["v"] = max(1, round(float(row["v"]) / factor))
    elif defect == "volume_spike":
        row["v"] = round(float(row["v"]) * factor)
    elif defect == "zero_volume_move":
        row["v"] = 0
        if "n" in row:
            row["n"] = 0


def _freeze(
    sym: str,
    rows: list[dict[str, Any]],
    stamps: list[int],
    spans: list[tuple[int, int]],
    run: int,
    lookup: RunLookup | None,
) -> list[bool]:
    """Freeze this response's bars of every run (later runs win where runs overlap)."""
    hit = [False] * len(rows)
    for start, _ in spans:
        if lookup is not None:
            run_rows = lookup(sym, start, run)
            if not run_rows:
                continue
            price = float(run_rows[0]["o"])
            members = {_row_ns(r) for r in run_rows}
            idx = [i for i, t in enumerate(stamps) if t in members]
        else:
            idx = sorted((i for i, t in enumerate(stamps) if t >= start), key=lambda i: stamps[i])[:run]
            if not idx:
                continue
            price = float(rows[idx[0]]["o"])
        for i in idx:
            row = rows[i]
            for key in ("o", "h", "l", "c", "vw"):
                if key in row:
                    row[key] = price
            hit[i] = True
    return hit


def first_bars(
    fetch: Callable[[int, int], list[dict[str, Any]]], start_ns: int, n: int, span_ns: int, until_ns: int
) -> list[dict[str, Any]]:
    """The first ``n`` bars from ``fetch(lo, hi)`` (ascending bars stamped in ``[lo, hi)``) at or
    after ``start_ns``, widening the window from ``span_ns`` until there are ``n`` or it passes
    ``until_ns`` (nothing exists after that) — a :data:`RunLookup` for faces that fetch by range."""
    span = max(span_ns, NS_PER_SEC)
    while True:
        rows = fetch(start_ns, start_ns + span)
        if len(rows) >= n or start_ns + span > until_ns:
            return rows[:n]
        span *= 2


def utc_stamp(ns: int) -> str:
    """A bar stamp in Alpaca's form (``2024-03-05T14:30:00Z``), as :func:`apply_defect` reads it."""
    return datetime.fromtimestamp(ns // NS_PER_SEC, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
