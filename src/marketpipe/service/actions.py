"""Corporate actions as a service: fetch (ledger first, then the router's one failover path), store
(versioned, impossible values quarantined) and adjust raw bars on read.

* :meth:`Actions.ensure` fetches what the actions ledger lacks for ``[start, end]`` from the first
  provider that answers (``ProviderRouter.first("actions", ...)``) and writes actions, ledger
  entries and quarantined rows in one transaction. New action versions raise a
  ``corporate_action_applied`` event each (symbol, action, factors, the range of bars it touches).
* :meth:`Actions.adjust` adjusts a raw bar frame: per symbol, the actions of ONE provider (the
  preferred one the ledger holds: Alpaca, then Polygon, then Yahoo — vendors disagree, and mixing
  two vendors' copies of one split would apply it twice), point in time with ``as_of``, the raw
  daily closes before each cash dividend read (or fetched) like any bars, one factor table per
  symbol, one as-of join. The answer says which actions were applied (:class:`Adjustment`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import polars as pl

from marketpipe.cache import TieredCache
from marketpipe.core import events
from marketpipe.core.errors import AllProvidersFailed, InvalidSymbol, ProviderError
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import ROWS_QUARANTINED
from marketpipe.core.schema import ACTION_TYPES, WITHDRAWN_KEY, WITHDRAWN_PREFIX, actions_frame, normalize_symbols
from marketpipe.core.tables import (
    ACTION_COVERAGE_SCHEMA,
    ACTION_QUARANTINE_SCHEMA,
    ACTION_RECONCILE_SCHEMA,
    CORPORATE_ACTIONS,
)
from marketpipe.core.timeframe import DAY1
from marketpipe.core.timeutil import NY, parse_time, utcnow
from marketpipe.core.validation import validate_enum
from marketpipe.providers.base import ActionsPage, BarsProvider
from marketpipe.quality.actions import reconcile_actions
from marketpipe.quality.adjust import (
    APPLIED_SCHEMA,
    NEW_CLOSES_SCHEMA,
    PARTS,
    SKIPPED_SCHEMA,
    adjustment_date,
    apply,
    current,
    factors,
    impossible,
    is_withdrawn,
    known_dates_ok,
    parse_adjustment,
    quarantine_rows,
)
from marketpipe.service.router import CLIENT_ERRORS as REFUSED
from marketpipe.store.base import ActionCoverage, AdjustFingerprintStore, Store

if TYPE_CHECKING:
    from marketpipe.service.router import ProviderRouter

__all__ = [
    "ATTR",
    "Actions",
    "Adjustment",
    "adjustment_of",
    "invalidate_cached_bars",
    "one_vendor",
    "parse_adjustment",
    "parse_as_of",
    "validate_types",
]
log = get_logger("marketpipe.actions")
PREFERENCE = ("alpaca", "polygon", "yahoo")
ATTR = "marketpipe_adjustment"  # the attribute of an adjusted frame that holds its Adjustment


def one_vendor(actions: pl.DataFrame, answered: Iterable[str] = ()) -> pl.DataFrame:
    """ONE symbol's actions from one vendor only, never a mix (two vendors' copies of one split would apply
    it twice): the first of ``PREFERENCE`` that lists actions or, by its ledger entries (``answered``:
    the providers of the symbol's ``action_coverage`` rows), answered that there were none."""
    have = set(answered) | set(actions["provider"].to_list())
    vendor = next((p for p in (*PREFERENCE, *sorted(have)) if p in have), None)
    return actions.filter(pl.col("provider") == vendor) if vendor else actions.clear()


@dataclass(slots=True)
class Adjustment:
    """What an adjusted answer was adjusted with: ``applied`` (``APPLIED_SCHEMA``: symbol, action_id,
    version, provider, source, type, ex_date, price and volume factor) and ``skipped`` (actions left
    out, with why)."""

    adjustment: str
    as_of: date | None
    applied: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=APPLIED_SCHEMA))
    skipped: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=SKIPPED_SCHEMA))

    def to_dict(self) -> dict[str, Any]:
        def rows(f: pl.DataFrame) -> list[dict[str, Any]]:
            return [{k: (v.isoformat() if isinstance(v, date) else v) for k, v in r.items()} for r in f.to_dicts()]

        return {
            "adjustment": self.adjustment,
            "as_of": self.as_of.isoformat() if self.as_of else None,
            "applied": rows(self.applied),
            "skipped": rows(self.skipped),
        }

    def header(self) -> str:
        """The ``X-Marketpipe-Adjustment`` header: the adjustment and every applied action id."""
        ids = ",".join(self.applied["action_id"].to_list())
        return f"{self.adjustment}; as_of={self.as_of or 'latest'}; actions={ids or 'none'}"

    def skipped_header(self) -> str | None:
        """The ``X-Marketpipe-Adjustment-Skipped`` header: ``action_id (reason)`` of every action left
        out, comma-separated; None when none was."""
        rows = self.skipped.select("action_id", "reason").iter_rows()
        return ", ".join(f"{i} ({r})" for i, r in rows) or None


@dataclass(slots=True)
class ActionsReport:
    """One cross-vendor comparison of a symbol's actions: rows (``ACTION_RECONCILE_SCHEMA``), the
    reference vendor, the run id they are stored under, providers that failed, actions per provider."""

    symbol: str
    reference: str
    run_id: str
    rows: pl.DataFrame
    failed: dict[str, str]
    counts: dict[str, int]

    @property
    def disagreements(self) -> pl.DataFrame:
        return self.rows.filter(pl.col("status") != "match")


def invalidate_cached_bars(cache: TieredCache, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Subscribe to ``corporate_action_applied``: each event drops the cached bars answers of its
    symbol (and the multi-symbol ones, which may hold it) on ``loop`` — an adjusted answer cached before
    the action was known is stale now. Events come from worker threads (the store write runs in one),
    hence the hop onto the loop. Returns the unsubscribe function."""
    pending: set[asyncio.Task[int]] = set()

    async def drop(symbol: str) -> int:
        n = await cache.invalidate(kind="bars", symbol=symbol) + await cache.invalidate(kind="bars", symbol="_multi")
        log.info("cache_invalidated_for_action", symbol=symbol, entries=n)
        return n

    def start(symbol: str) -> None:
        task = loop.create_task(drop(symbol))
        pending.add(task)
        task.add_done_callback(pending.discard)

    def on(event: events.Event) -> None:
        if event.kind == events.CORPORATE_ACTION_APPLIED and event.symbol and not loop.is_closed():
            loop.call_soon_threadsafe(start, event.symbol)

    return events.hub.subscribe(on)


def adjustment_of(frame: Any) -> Adjustment | None:
    """The :class:`Adjustment` an adjusted frame (polars, or pandas in ``attrs``) carries."""
    got = getattr(frame, ATTR, None)
    if got is None and hasattr(frame, "attrs"):
        got = frame.attrs.get(ATTR)
    return got if isinstance(got, Adjustment) else None


def parse_as_of(value: Any) -> date | None:
    """``as_of``: a day (``YYYY-MM-DD``, a date, a midnight datetime) or an instant, as its New York
    date; None for None. A bad value is ``INVALID_ARGUMENT`` naming ``as_of``."""
    if value is None:
        return None
    return parse_time(value, name="as_of").astimezone(NY).date()


def _covered(entries: pl.DataFrame, start: date, end: date) -> bool:
    """Whether ledger entries (one symbol) cover every day of ``[start, end]``."""
    reach = start
    for s, e in sorted(zip(entries["start"].to_list(), entries["end"].to_list(), strict=True)):
        if s > reach:
            return False
        reach = max(reach, e + timedelta(days=1))
        if reach > end:
            return True
    return reach > end


def _withdrawn(before: pl.DataFrame, page: ActionsPage, now: datetime) -> pl.DataFrame:
    """The actions (newest versions, ``before``) a provider listed earlier for the page's symbols, with an
    adjustment date inside the window it answered now, that the page no longer holds and that are not
    withdrawn already: each as its withdrawn version (content kept, ``raw`` marketpipe's note)."""
    if not before.height:
        return before
    day = adjustment_date()
    listed = page.frame["action_id"].implode()
    gone = before.filter(
        pl.col("symbol").is_in(page.symbols)
        & day.is_between(page.start, page.end)
        & ~pl.col("action_id").is_in(listed)
        & ~is_withdrawn()
    )
    if not gone.height:
        return gone
    head = orjson.dumps({"window": [page.start.isoformat(), page.end.isoformat()], "request_ids": page.request_ids})
    prefix = '{"' + WITHDRAWN_KEY + '":' + head.decode()[:-1] + ',"previous_version":'
    note = pl.concat_str(pl.lit(prefix), pl.col("version").cast(pl.String), pl.lit("}}"))
    return gone.with_columns(
        note.alias("raw"), pl.lit(now).cast(CORPORATE_ACTIONS.columns["fetched_at"]).alias("fetched_at")
    ).select(list(actions_frame([]).columns))


def withdrawn_rows(gone: pl.DataFrame) -> pl.DataFrame:
    """Withdrawn actions as reconciliation rows: the vendor is both sides, status ``withdrawn``."""
    split = pl.col("type").is_in(["forward_split", "reverse_split", "stock_dividend"])
    value = pl.when(split).then(pl.col("new_rate") / pl.col("old_rate")).otherwise(pl.col("cash_amount"))
    return gone.select(
        "symbol",
        pl.when(split).then(pl.lit("split")).otherwise(pl.lit("dividend")).alias("family"),
        pl.col("provider").alias("reference"),
        pl.col("provider").alias("other"),
        pl.lit("withdrawn").alias("status"),
        adjustment_date().alias("reference_date"),
        pl.lit(None, pl.Date()).alias("other_date"),
        value.alias("reference_value"),
        pl.lit(None, pl.Float64()).alias("other_value"),
        pl.col("action_id").alias("reference_id"),
        pl.lit(None, pl.String()).alias("other_id"),
    ).cast(ACTION_RECONCILE_SCHEMA)  # type: ignore[arg-type]


def validate_types(types: list[str] | None) -> list[str] | None:
    if not types:
        return None
    for t in types:
        validate_enum(t, ACTION_TYPES, "type", message="unknown corporate action type {value!r}; allowed: {allowed}")
    return list(dict.fromkeys(types))


PLANS_KEPT = 256  # factor plans kept in-process (oldest dropped first)


@dataclass(frozen=True, slots=True)
class _Plan:
    """A kept :meth:`Actions.plan` answer and the store's fingerprint of what it was computed from."""

    fingerprint: tuple[tuple[object, ...], tuple[object, ...]]
    daily: list[tuple[str, datetime, datetime]]  # the 1Day bar windows whose closes it used
    fetched: bool  # made with fetch=True: missing closes were fetched
    tables: dict[str, pl.DataFrame]
    applied: pl.DataFrame
    skipped: pl.DataFrame


def _close_windows(actions: pl.DataFrame, parts: frozenset[str]) -> dict[str, tuple[date, date]]:
    """The days ``[lo, hi)`` of raw daily closes the factors of one symbol's ``actions`` need, per line:
    the symbol's own before each cash dividend and spin-off (10 days back: the last session before the
    ex-date), and each spin-off's new line on its ex-date."""
    day = adjustment_date()
    kinds = [t for t, part in (("cash_dividend", "dividend"), ("spin_off", "spin-off")) if part in parts]
    events = actions.filter(pl.col("type").is_in(kinds)).select("symbol", "type", "new_symbol", day.alias("_d"))
    events = events.filter(pl.col("_d").is_not_null())
    out: dict[str, tuple[date, date]] = {}
    if not events.height:
        return out
    days = events["_d"].to_list()
    out[events["symbol"][0]] = (min(days) - timedelta(days=10), max(days))
    spins = events.filter((pl.col("type") == "spin_off") & pl.col("new_symbol").is_not_null())
    for line, d in zip(spins["new_symbol"].to_list(), spins["_d"].to_list(), strict=True):
        lo, hi = out.get(line, (d, d + timedelta(days=1)))
        out[line] = (min(lo, d), max(hi, d + timedelta(days=1)))
    return out


def _with_failures(skipped: pl.DataFrame, failed: dict[str, str]) -> pl.DataFrame:
    """``skipped`` with the error code added to the reason of a spin-off whose new line could not be read."""
    for line, code in failed.items():
        missing = f"no raw close of the new line {line} on the ex-date"
        skipped = skipped.with_columns(
            pl.when(pl.col("reason") == missing)
            .then(pl.lit(f"{missing} (reading its bars failed: {code})"))
            .otherwise(pl.col("reason"))
            .alias("reason")
        )
    return skipped


def _span(lo: date, hi: date) -> tuple[datetime, datetime]:
    """Days ``[lo, hi)`` as an instant range wide enough for either reading of a day (UTC or New York)."""
    return (
        datetime.combine(lo - timedelta(days=1), datetime.min.time(), UTC),
        datetime.combine(hi + timedelta(days=1), datetime.min.time(), UTC),
    )


class Actions:
    """Over a store and a router (given as callables: the façade builds them lazily)."""

    def __init__(
        self,
        store: Callable[[], Store],
        router: Callable[[], ProviderRouter],
        daily_bars: Callable[[str, date, date, bool], Awaitable[pl.DataFrame]],
        publish: Callable[[list[events.Event]], Awaitable[object]] | None = None,
    ) -> None:
        self._store = store
        self._router = router
        self._daily = daily_bars  # raw 1Day bars of a symbol over days [lo, hi], fetched unless told not to
        # the corporate_action_applied events of a write onto the bus ([bus] configured and no gateway
        # publisher relaying core.events already), awaited so a CLI call has published before it returns
        self.publish = publish
        self._plans: dict[tuple[object, ...], _Plan] = {}  # kept plan() answers, oldest first

    def forget(self) -> None:
        """Drop the kept factor tables (:meth:`plan`): the next adjusted read computes them again. Never
        needed for correctness (a changed store is seen by its fingerprint); the benchmark's cold read."""
        self._plans.clear()

    async def ensure(
        self, symbols: list[str], start: date, end: date, *, provider: str | None = None, refresh: bool = False
    ) -> list[ActionCoverage]:
        """Fetch the actions the ledger lacks for ``[start, end]`` (per symbol, any provider unless
        ``provider``; ``refresh``: all of them again, whatever the ledger holds — corrections become new
        versions, actions no longer listed become withdrawn versions); returns the ledger entries written."""
        store = self._store()
        held = await asyncio.to_thread(store.action_coverage, symbols, start, end, provider=provider)
        missing = [s for s in symbols if refresh or not _covered(held.filter(pl.col("symbol") == s), start, end)]
        if not missing:
            return []

        async def call(p: BarsProvider) -> ActionsPage:
            return await p.corporate_actions(missing, start, end)

        router = self._router()
        if provider is not None:
            page = await router.get(provider).corporate_actions(missing, start, end)
            name = provider
        else:
            served = await router.first("actions", call, symbols=missing, what="corporate actions", refused=REFUSED)
            page, name = served.value, served.provider.name
        return await self._store_page(page, name)

    async def _store_page(self, page: ActionsPage, provider: str) -> list[ActionCoverage]:
        now = utcnow()
        frame = page.frame
        bad = impossible(frame)
        quarantine = quarantine_rows(frame, bad, now) if bad.height else pl.DataFrame(schema=ACTION_QUARANTINE_SCHEMA)
        if bad.height:
            for r in bad.select("symbol", "action_id", "reason").iter_rows():
                ROWS_QUARANTINED.labels(f"action: {r[2]}").inc()
                log.warning("action_quarantined", provider=provider, symbol=r[0], action_id=r[1], reason=r[2])
        counts = frame.group_by("symbol").len()
        n = dict(zip(counts["symbol"].to_list(), counts["len"].to_list(), strict=True))
        rid = ",".join(page.request_ids)[:200]
        coverage = [
            ActionCoverage(s, provider, page.source, page.start, page.end, int(n.get(s, 0)), rid, page.fetched_at)
            for s in page.symbols
        ]
        store = self._store()
        before = await asyncio.to_thread(
            store.read_actions, page.symbols, date(1900, 1, 1), date(2999, 12, 31), providers=[provider]
        )
        gone = _withdrawn(before, page, now)
        if gone.height:
            for r in gone.select("symbol", "action_id", "type").iter_rows():
                log.warning("action_withdrawn", provider=provider, symbol=r[0], action_id=r[1], type=r[2])
            frame = pl.concat([frame, gone.select(frame.columns)])
        stored = await asyncio.to_thread(store.write_actions, frame, coverage, quarantine)
        if stored:
            announced = await asyncio.to_thread(self._announce, store, page, provider, before)
            if announced and self.publish is not None:
                await self.publish(announced)
        log.info("actions_stored", provider=provider, symbols=len(page.symbols), rows=frame.height, new_versions=stored)
        return coverage

    @staticmethod
    def _announce(store: Store, page: ActionsPage, provider: str, before: pl.DataFrame) -> list[events.Event]:
        """A ``corporate_action_applied`` event per new action version: adjusted reads of the bars
        before its adjustment date change (caches of them are stale). Returns the events raised."""
        after = store.read_actions(page.symbols, date(1900, 1, 1), date(2999, 12, 31), providers=[provider])
        old = set(zip(before["action_id"].to_list(), before["version"].to_list(), strict=True))
        raised: list[events.Event] = []
        for r in after.iter_rows(named=True):
            if (r["action_id"], r["version"]) in old:
                continue
            day = r["ex_date"] or r["effective_date"] or r["process_date"]
            gone = (r["raw"] or "").startswith(WITHDRAWN_PREFIX)
            ev = events.emit(
                events.CORPORATE_ACTION_APPLIED,
                "warning" if gone else "info",
                f"{r['type']} of {r['symbol']} on {day} ({provider}, version {r['version']})"
                + (" withdrawn: the vendor no longer lists it" if gone else ""),
                symbol=r["symbol"],
                source=r["source"],
                action_id=r["action_id"],
                action=r["type"],
                version=r["version"],
                factors={k: r[k] for k in ("old_rate", "new_rate", "cash_amount", "rate")},
                affected={"until": day.isoformat() if day else None},
                withdrawn=gone,
            )
            raised.append(ev)
        return raised

    async def read(
        self,
        symbols: list[str],
        start: date,
        end: date,
        *,
        types: list[str] | None = None,
        as_of: date | None = None,
        fetch: bool = True,
        provider: str | None = None,
        refresh: bool = False,
    ) -> pl.DataFrame:
        """Stored actions (newest version each, withdrawn ones left out) of ``symbols`` in ``[start, end]``,
        fetched first where the ledger lacks them (``refresh``: fetched again); ``as_of``: only those
        known by then."""
        if fetch:
            await self.ensure(symbols, start, end, provider=provider, refresh=refresh)
        store = self._store()
        got = await asyncio.to_thread(
            store.read_actions,
            symbols,
            start,
            end,
            types=validate_types(types),
            providers=[provider] if provider else None,
            known_by=as_of,
        )
        return current(got)

    async def reconcile(self, symbol: str, start: date, end: date, *, refresh: bool = False) -> ActionsReport:
        """Every provider's actions of ``symbol`` in ``[start, end]`` (each fetched where its own ledger
        lacks them; ``refresh``: fetched again) compared with the reference vendor's (the preferred one
        that answered); an action a vendor withdrew is a row of its own (status ``withdrawn``). The rows
        are stored as one run. A provider that fails is reported, not fatal."""
        router = self._router()
        names = [p.name for p in router.providers if p.capabilities.serves("actions")]
        failed: dict[str, str] = {}
        frames: dict[str, pl.DataFrame] = {}
        for name in names:
            try:
                frames[name] = await self.read([symbol], start, end, provider=name, refresh=refresh)
            except ProviderError as exc:
                failed[name] = f"{exc.code}: {exc.message}"
                log.warning("actions_reconcile_provider_failed", provider=name, code=exc.code)
        if not frames:
            raise AllProvidersFailed(
                f"no provider answered for the corporate actions of {symbol}",
                details={"attempts": [{"provider": n, "message": m} for n, m in failed.items()]},
            )
        reference = next(p for p in (*PREFERENCE, *sorted(frames)) if p in frames)
        parts = [
            reconcile_actions(frames[reference], frames[o], reference_name=reference, other_name=o)
            for o in frames
            if o != reference
        ]
        store = self._store()
        stored = await asyncio.to_thread(store.read_actions, [symbol], start, end, providers=list(frames))
        parts.append(withdrawn_rows(stored.filter(is_withdrawn())))
        if "alpaca" in frames:  # the one vendor that serves bars adjusted for splits and dividends
            parts.append(await self._vendor_adjustment(router.get("alpaca"), symbol, start, end))
        rows = pl.concat(parts) if parts else pl.DataFrame(schema=ACTION_RECONCILE_SCHEMA)
        run_id = uuid.uuid4().hex[:12]
        await asyncio.to_thread(store.write_action_reconciliation, run_id, utcnow(), rows)
        return ActionsReport(symbol, reference, run_id, rows, failed, {n: f.height for n, f in frames.items()})

    async def _vendor_adjustment(self, provider: BarsProvider, symbol: str, start: date, end: date) -> pl.DataFrame:
        """The vendor's own ``adjustment=all`` daily closes against marketpipe's adjustment of the raw
        ones with that vendor's actions: where their ratio steps from one day to the next, the vendor
        applied something else at that date (an unadjusted dividend, a split it lists but does not
        apply). One row per such day, family ``adjustment``, status ``different_adjustment``, values
        our step (1) and the vendor's."""
        lo = datetime.combine(start, datetime.min.time(), NY)
        hi = datetime.combine(end + timedelta(days=1), datetime.min.time(), NY)
        raw = await self._daily(symbol, start, end, True)
        ours, _ = await self.adjust(raw, [symbol], lo, frozenset(PARTS), "all")
        pages = [p.frame async for p in provider.iter_bars([symbol], DAY1, lo, hi, adjustment="all")]
        theirs = pl.concat(pages) if pages else raw.clear()
        ratio = (
            ours.select("ts", pl.col("close").alias("_ours"))
            .join(theirs.select("ts", pl.col("close").alias("_theirs")), on="ts")
            .sort("ts")
            .with_columns((pl.col("_theirs") / pl.col("_ours")).alias("_r"))
            .with_columns((pl.col("_r") / pl.col("_r").shift(1)).alias("_step"))
        )
        steps = ratio.filter((pl.col("_step") - 1).abs() > 1e-6)
        return steps.select(
            pl.lit(symbol).alias("symbol"),
            pl.lit("adjustment").alias("family"),
            pl.lit("marketpipe").alias("reference"),
            pl.lit(provider.name).alias("other"),
            pl.lit("different_adjustment").alias("status"),
            pl.col("ts").dt.convert_time_zone(str(NY)).dt.date().alias("reference_date"),
            pl.col("ts").dt.convert_time_zone(str(NY)).dt.date().alias("other_date"),
            pl.lit(1.0).alias("reference_value"),
            pl.col("_step").alias("other_value"),
            pl.lit(None, pl.String()).alias("reference_id"),
            pl.lit(None, pl.String()).alias("other_id"),
        ).cast(ACTION_RECONCILE_SCHEMA)  # type: ignore[arg-type]

    async def plan(
        self,
        symbols: list[str],
        start: datetime,
        parts: frozenset[str],
        adjustment: str,
        *,
        as_of: date | None = None,
        fetch: bool = True,
        order: list[str] | None = None,
    ) -> tuple[dict[str, pl.DataFrame], Adjustment]:
        """The factor table of each symbol (``quality.adjust.factors``) for ``parts`` with the actions known
        by ``as_of`` (default: all known now), and what they apply — before any bar is read, so that a
        store can apply them while it reads (``read_bars_scaled``). Impossible dividends found here are
        quarantined. ``order``: the symbols in the order their bars come (what ``applied`` follows).

        The answer is kept in-process and given again while the store's fingerprint of what it was
        computed from (``AdjustFingerprintStore``: the symbols' actions and their ledger, the 1Day bars
        whose closes it used) is unchanged — one small query instead of the actions, ledger and closes
        reads; a write by anyone, this process or another one on the same store, changes it."""
        today = utcnow().astimezone(NY).date()
        first = start.astimezone(NY).date()
        known_dates_ok(as_of, first, today)
        if not parts:
            return {}, Adjustment(adjustment, as_of)
        until = as_of or today
        syms = normalize_symbols(symbols)
        if fetch:
            await self.ensure(syms, first, until)
        store = self._store()
        prints = store if isinstance(store, AdjustFingerprintStore) else None
        key = (tuple(syms), tuple(order or ()), parts, as_of, first, until)
        kept = self._plans.get(key)
        # a plan made without fetching may lack closes a fetching one would have got: not reused for it
        if kept is not None and prints is not None and (kept.fetched or not fetch):
            now = await asyncio.to_thread(prints.adjust_fingerprint, syms, kept.daily)
            if now == kept.fingerprint:
                return dict(kept.tables), Adjustment(adjustment, as_of, kept.applied, kept.skipped)
        # fingerprints taken BEFORE each read: a write racing the read makes the kept answer's print stale
        # (recomputed next time), never a stale answer under a fresh print
        marks = await asyncio.to_thread(prints.adjust_fingerprint, syms, []) if prints is not None else None

        def held() -> tuple[pl.DataFrame, pl.DataFrame]:
            """The actions, and the ledger where it can change the choice of vendor (a preferred vendor
            that answered "none" wins over a later one's actions): not when every symbol has the first
            vendor's actions."""
            acts = current(store.read_actions(syms, first, until, known_by=as_of))
            top = acts.filter(pl.col("provider") == PREFERENCE[0])["symbol"].unique()
            if top.len() == len(syms):
                return acts, pl.DataFrame(schema=ACTION_COVERAGE_SCHEMA)
            return acts, store.action_coverage(syms, first, until)

        acts, cov = await asyncio.to_thread(held)
        chosen: dict[str, pl.DataFrame] = {}
        for sym in dict.fromkeys(s for s in [*(order or []), *syms] if s in syms):
            answered = cov.filter(pl.col("symbol") == sym)["provider"].to_list()
            chosen[sym] = one_vendor(acts.filter(pl.col("symbol") == sym), answered)
        # the raw daily closes each symbol's factors need: its own before each dividend / spin-off, and
        # each spin-off's new line on the ex-date
        windows = {sym: _close_windows(a, parts) for sym, a in chosen.items()}
        daily = [(s, *_span(lo, hi)) for w in windows.values() for s, (lo, hi) in w.items()]
        if prints is not None:
            marks = (marks[0] if marks else (), (await asyncio.to_thread(prints.adjust_fingerprint, [], daily))[1])
        tables: dict[str, pl.DataFrame] = {}
        applied: list[pl.DataFrame] = []
        skipped: list[pl.DataFrame] = []
        quarantine: list[pl.DataFrame] = []
        for sym, a in chosen.items():
            closes = pl.DataFrame(schema=NEW_CLOSES_SCHEMA)
            new_closes = [closes]
            failed: dict[str, str] = {}
            for line, (lo, hi) in windows[sym].items():
                try:
                    got = await self._daily(line, lo, hi, fetch)
                except (ProviderError, InvalidSymbol) as exc:
                    if line == sym:
                        raise
                    # a new line nobody serves: its spin-off is skipped (never priced by guess), the read goes on
                    failed[line] = exc.code
                    log.warning("spin_off_line_unavailable", symbol=sym, new_symbol=line, code=exc.code)
                    continue
                day = pl.col("ts").dt.convert_time_zone(str(NY)).dt.date().alias("day")
                frame = got.select(pl.lit(line).alias("symbol"), day, "close").cast(NEW_CLOSES_SCHEMA)  # type: ignore[arg-type]
                if line == sym:
                    closes = frame
                else:
                    new_closes.append(frame)
            f = factors(a.select(list(CORPORATE_ACTIONS.columns)), closes.drop("symbol"), parts, pl.concat(new_closes))
            tables[sym] = f.table
            applied.append(f.applied)
            skipped.append(_with_failures(f.skipped, failed))
            bad = f.skipped.filter(pl.col("reason") == "dividend >= previous close")
            if bad.height:
                quarantine.append(quarantine_rows(a, bad, utcnow()))
                for r in bad.iter_rows(named=True):
                    ROWS_QUARANTINED.labels(f"action: {r['reason']}").inc()
                    log.warning("action_quarantined", symbol=sym, action_id=r["action_id"], reason=r["reason"])
        if quarantine:
            await asyncio.to_thread(store.write_actions, actions_frame([]), [], pl.concat(quarantine))
        info = Adjustment(adjustment, as_of)
        info.applied = pl.concat(applied) if applied else info.applied
        info.skipped = pl.concat(skipped) if skipped else info.skipped
        if marks is not None:
            if len(self._plans) >= PLANS_KEPT:
                self._plans.pop(next(iter(self._plans)))
            self._plans.pop(key, None)  # re-inserted: newest last
            self._plans[key] = _Plan(marks, daily, fetch, dict(tables), info.applied, info.skipped)
        return tables, info

    async def adjust(
        self,
        bars: pl.DataFrame,
        symbols: list[str],
        start: datetime,
        parts: frozenset[str],
        adjustment: str,
        *,
        as_of: date | None = None,
        fetch: bool = True,
    ) -> tuple[pl.DataFrame, Adjustment]:
        """``bars`` (raw, ``BAR_SCHEMA``) adjusted for ``parts`` with the actions known by ``as_of``
        (default: all known now), and what was applied."""
        # bars of the one symbol asked for (the callers pass the symbols they read): no filtering, no concat
        alone = len(symbols) == 1
        order = None if alone else bars["symbol"].unique(maintain_order=True).to_list()
        tables, info = await self.plan(symbols, start, parts, adjustment, as_of=as_of, fetch=fetch, order=order)
        if not tables:
            return bars, info
        if alone:
            ((sym, table),) = tables.items()
            mine = bars if bars.height and bars["symbol"][0] == sym else bars.filter(pl.col("symbol") == sym)
            return (apply(mine, table) if mine.height else bars), info
        out = [apply(m, t) for sym, t in tables.items() if (m := bars.filter(pl.col("symbol") == sym)).height]
        rest = bars.filter(~pl.col("symbol").is_in(list(tables)))
        return (pl.concat([*out, rest]) if out else bars), info
