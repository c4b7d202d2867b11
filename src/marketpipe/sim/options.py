"""The simulator's Alpaca options face: ``/v1beta1/options/...`` (data API) and ``/v2/options/contracts``
(Trading API), in the wire format of :mod:`marketpipe.wire.alpaca_options`.

The simulator plays the vendor, so it prices its own contracts: a chain per underlying listed around the
underlying's previous close (weekly and monthly expirations, strikes in steps by price), quoted off the
underlying's latest trade in :class:`~marketpipe.sim.data.SimMarket` with Black-Scholes at a smile of
implied volatilities — here, and only here (the runtime never imports ``sim``). Like the vendor, some
contracts come without ``greeks`` and ``impliedVolatility``: one in ``no_greeks_every`` (by a stable hash
of the symbol) and every contract whose bid is zero (no usable input).

Feeds: ``opra`` (needs the ``unlimited`` plan: a ``free`` key gets 403) and ``indicative`` (spreads widened,
trades 15 minutes late); a request without ``feed`` gets ``opra`` on the ``unlimited`` plan, else
``indicative`` (the vendor's rule). Bars and trades follow the underlying's minute bars (history from
February 2024, nothing after expiration); only minutes with volume have a bar, as for real contracts.
Answers pass through the Alpaca face's authentication, rate limits and faults (a fault rule with
``paths`` matching ``/v1beta1/options`` or ``/v2/options`` hits these routes).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import numpy as np
from aiohttp import web

from marketpipe.core.errors import InvalidOptionSymbol, InvalidTimeframe
from marketpipe.core.options import OccSymbol, format_occ, parse_occ
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import NY, ns_text
from marketpipe.sim.alpaca import AlpacaFace, BadRequest, json_response, parse_time_ns
from marketpipe.sim.data import NS_PER_SEC, stable_seed, valid_symbol
from marketpipe.wire.alpaca_options import (
    BARS_DEFAULT_LIMIT,
    BARS_MAX_LIMIT,
    BARS_PATH,
    CHAIN_PATH,
    CONDITIONS_PATH,
    CONTRACT_STATUSES,
    CONTRACTS_DEFAULT_LIMIT,
    CONTRACTS_MAX_LIMIT,
    CONTRACTS_PATH,
    EXCHANGES_PATH,
    FEEDS,
    HISTORY_FROM,
    LATEST_QUOTES_PATH,
    LATEST_TRADES_PATH,
    MAX_SYMBOLS,
    OPRA_NOT_ENTITLED,
    OPTION_CONDITIONS,
    OPTION_EXCHANGES,
    SNAPSHOT_DEFAULT_LIMIT,
    SNAPSHOT_MAX_LIMIT,
    SNAPSHOTS_PATH,
    TRADES_PATH,
    default_feed,
)
from marketpipe.wire.alpaca_rest import SORTS

DELAY_NS = 15 * 60 * NS_PER_SEC  # indicative trades are 15 minutes late
YEAR_S = 365.0 * 86400
_EXCH = "ABCDEHIJMNPQSTWXZ"
_TRADE_CONDS = "IIIIISae"


@dataclass(frozen=True)
class OptionsConfig:
    weekly: int = 6  # the next N Friday expirations
    monthly: int = 6  # then the third Fridays of the following months
    strike_span: float = 0.3  # strikes listed within +-30 % of the underlying's previous close
    no_greeks_every: int = 9  # one contract in N comes without greeks and IV
    rate: float = 0.04


# --- Black-Scholes (the simulator's own pricing: it plays the vendor) --------------------------------


def _ncdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _npdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def black_scholes(s: float, k: float, t: float, vol: float, r: float, call: bool) -> dict[str, float]:
    """Price and the five greeks (theta per day, vega and rho per 1 %)."""
    sq = math.sqrt(t)
    d1 = (math.log(s / k) + (r + vol * vol / 2) * t) / (vol * sq)
    d2 = d1 - vol * sq
    disc = k * math.exp(-r * t)
    if call:
        price = s * _ncdf(d1) - disc * _ncdf(d2)
        delta = _ncdf(d1)
        theta = (-s * _npdf(d1) * vol / (2 * sq) - r * disc * _ncdf(d2)) / 365
        rho = disc * t * _ncdf(d2) / 100
    else:
        price = disc * _ncdf(-d2) - s * _ncdf(-d1)
        delta = _ncdf(d1) - 1
        theta = (-s * _npdf(d1) * vol / (2 * sq) + r * disc * _ncdf(-d2)) / 365
        rho = -disc * t * _ncdf(-d2) / 100
    return {
        "price": max(price, 0.0),
        "delta": delta,
        "gamma": _npdf(d1) / (s * vol * sq),
        "theta": theta,
        "vega": s * _npdf(d1) * sq / 100,
        "rho": rho,
    }


def _tick(price: float) -> float:
    return 0.01 if price < 3 else 0.05


def _third_friday(y: int, m: int) -> date:
    first = date(y, m, 1)
    return first + timedelta(days=(4 - first.weekday()) % 7 + 14)


def expiry_ns(expiration: date) -> int:
    """16:00 New York on the expiration date."""
    return int(datetime.combine(expiration, time(16), NY).timestamp()) * NS_PER_SEC


# --- the options market --------------------------------------------------------------------------


class OptionsMarket:
    """Contracts and their quotes, trades and bars over a :class:`SimMarket` (deterministic)."""

    def __init__(self, face: AlpacaFace, config: OptionsConfig | None = None) -> None:
        self.face = face
        self.market = face.market
        self.config = config or OptionsConfig()
        self._chains: dict[tuple[str, date], list[OccSymbol]] = {}

    # --- listing ---------------------------------------------------------------------------------
    def _anchor(self, underlying: str, now_ns: int) -> float | None:
        snap = self.market.snapshot(underlying, "sip", now_ns)
        if snap is None:
            return None
        bar = snap.get("prevDailyBar") or snap.get("dailyBar")
        if bar is not None:
            return float(bar["c"])
        trade = snap.get("latestTrade")
        return float(trade["p"]) if trade else None

    def expirations(self, today: date) -> list[date]:
        c = self.config
        friday = today + timedelta(days=(4 - today.weekday()) % 7)
        out = [friday + timedelta(weeks=w) for w in range(c.weekly)]
        y, m = today.year, today.month
        while len(out) < c.weekly + c.monthly:
            m += 1
            if m > 12:
                y, m = y + 1, 1
            tf = _third_friday(y, m)
            if tf > out[-1]:
                out.append(tf)
        return out

    def chain(self, underlying: str, now_ns: int) -> list[OccSymbol]:
        """Every listed contract of an underlying (sorted by symbol); empty for an unknown one."""
        today = datetime.fromtimestamp(now_ns / NS_PER_SEC, NY).date()
        key = (underlying, today)
        cached = self._chains.get(key)
        if cached is not None:
            return cached
        anchor = self._anchor(underlying, now_ns) if self.market.has_data(underlying) else None
        out: list[OccSymbol] = []
        if anchor is not None and len(underlying) <= 6:
            step = 0.5 if anchor < 50 else 1.0 if anchor < 1000 else 5.0
            lo = math.ceil(anchor * (1 - self.config.strike_span) / step)
            hi = math.floor(anchor * (1 + self.config.strike_span) / step)
            for exp in self.expirations(today):
                for n in range(max(lo, 1), hi + 1):
                    strike = n * step
                    for kind in ("call", "put"):
                        sym = format_occ(underlying, exp, kind, strike)  # type: ignore[arg-type]
                        out.append(OccSymbol(symbol=sym, root=underlying, expiration=exp, type=kind, strike=strike))  # type: ignore[arg-type]
            out.sort(key=lambda o: o.symbol)
        if len(self._chains) > 64:
            self._chains.clear()
        self._chains[key] = out
        return out

    @staticmethod
    def underlying_of(occ: OccSymbol) -> str:
        return occ.root.rstrip("0123456789") or occ.root

    def _today(self, now_ns: int) -> date:
        return datetime.fromtimestamp(now_ns / NS_PER_SEC, NY).date()

    # --- pricing -----------------------------------------------------------------------------------
    def vol(self, occ: OccSymbol, spot: float) -> float:
        base = 0.15 + (stable_seed("optvol", self.market.seed, self.underlying_of(occ)) % 25) / 100
        m = math.log(occ.strike / spot)
        return base + 0.4 * m * m + (0.03 if occ.type == "put" else 0.0) * max(0.0, -m) * 10

    def _years(self, occ: OccSymbol, at_ns: int) -> float:
        return max((expiry_ns(occ.expiration) - at_ns) / NS_PER_SEC, 60.0) / YEAR_S

    def snapshot(self, occ: OccSymbol, feed: str, now_ns: int) -> dict[str, Any] | None:
        """The vendor-shaped snapshot of one contract, or None (unknown underlying, expired)."""
        und = self.underlying_of(occ)
        if not self.market.has_data(und) or occ.expiration < self._today(now_ns):
            return None
        trade = self.market.latest_trade(und, "sip", now_ns)
        if trade is None:
            return None
        spot = float(trade["p"])
        at_ns = _ns(trade["t"])
        rng = np.random.default_rng(stable_seed("opt", self.market.seed, occ.symbol, at_ns // (60 * NS_PER_SEC)))
        vol = self.vol(occ, spot)
        bs = black_scholes(spot, occ.strike, self._years(occ, at_ns), vol, self.config.rate, occ.type == "call")
        mid = bs["price"]
        tick = _tick(mid)
        half = max(tick, mid * (0.02 if feed == "opra" else 0.05))
        bid = max(0.0, math.floor((mid - half) / tick) * tick)
        ask = max(tick, math.ceil((mid + half) / tick) * tick)
        q_ns = at_ns - int(rng.integers(1, 2000)) * 1_000_000
        quote = {
            "t": ns_text(q_ns),
            "ax": _EXCH[int(rng.integers(len(_EXCH)))],
            "ap": round(ask, 2),
            "as": int(rng.integers(1, 500)),
            "bx": _EXCH[int(rng.integers(len(_EXCH)))],
            "bp": round(bid, 2),
            "bs": int(rng.integers(1, 500)) if bid > 0 else 0,
            "c": " " if rng.random() < 0.8 else "A",
        }
        snap: dict[str, Any] = {"latestQuote": quote}
        if bid > 0:
            t_ns = at_ns - int(rng.integers(5, 3600)) * NS_PER_SEC - (DELAY_NS if feed == "indicative" else 0)
            snap["latestTrade"] = {
                "t": ns_text(t_ns),
                "x": _EXCH[int(rng.integers(len(_EXCH)))],
                "p": round(float(rng.uniform(bid, ask)), 2),
                "s": int(rng.integers(1, 50)),
                "c": _TRADE_CONDS[int(rng.integers(len(_TRADE_CONDS)))],
            }
        if bid > 0 and stable_seed("nogreeks", occ.symbol) % self.config.no_greeks_every:
            snap["greeks"] = {g: round(bs[g], 4) for g in ("delta", "gamma", "rho", "theta", "vega")}
            snap["impliedVolatility"] = round(vol, 4)
        return snap

    def bars(self, occ: OccSymbol, tf: Timeframe, start_ns: int, end_ns: int, now_ns: int) -> list[dict[str, Any]]:
        """Bars of a contract in [start, end]: the underlying's bars priced at the contract's smile;
        only bars with volume (a stable draw per bar) are kept."""
        und = self.underlying_of(occ)
        start_ns = max(start_ns, int(datetime.combine(HISTORY_FROM, time(), UTC).timestamp()) * NS_PER_SEC)
        end_ns = min(end_ns, expiry_ns(occ.expiration))
        if end_ns < start_ns or not self.market.has_data(und):
            return []
        d = self.market.bars_frame(und, tf, start_ns, end_ns, "sip", now=now_ns)
        out: list[dict[str, Any]] = []
        call = occ.type == "call"
        for t, o, h, lo, c, v in zip(d["t"], d["o"], d["h"], d["l"], d["c"], d["v"], strict=True):
            rng = np.random.default_rng(stable_seed("optbar", self.market.seed, occ.symbol, int(t)))
            vol_n = int(rng.poisson(max(0.2, float(v) / 20000.0)))
            if vol_n == 0:
                continue
            years = self._years(occ, int(t))
            iv = self.vol(occ, float(c))

            def px(s: float, years: float = years, iv: float = iv) -> float:
                return round(black_scholes(s, occ.strike, years, iv, self.config.rate, call)["price"], 2)

            po, pc = px(float(o)), px(float(c))
            ph, pl_ = (px(float(h)), px(float(lo))) if call else (px(float(lo)), px(float(h)))
            ph, pl_ = max(ph, po, pc), min(pl_, po, pc)
            out.append(
                {
                    "t": datetime.fromtimestamp(int(t) // NS_PER_SEC, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "o": po,
                    "h": ph,
                    "l": pl_,
                    "c": pc,
                    "v": vol_n,
                    "n": max(1, vol_n // 3),
                    "vw": round((po + ph + pl_ + pc) / 4, 4),
                }
            )
        return out

    def trades(self, occ: OccSymbol, start_ns: int, end_ns: int, now_ns: int) -> list[dict[str, Any]]:
        """One trade per minute bar with volume, inside that minute, at the bar's close."""
        out = []
        for bar in self.bars(occ, Timeframe.parse("1Min"), start_ns - 60 * NS_PER_SEC, end_ns, now_ns):
            t0 = _ns(bar["t"])
            rng = np.random.default_rng(stable_seed("opttrade", occ.symbol, t0))
            t = t0 + int(rng.integers(0, 60 * NS_PER_SEC))
            if start_ns <= t <= end_ns:
                out.append(
                    {
                        "t": ns_text(t),
                        "x": _EXCH[int(rng.integers(len(_EXCH)))],
                        "p": bar["c"],
                        "s": bar["v"],
                        "c": _TRADE_CONDS[int(rng.integers(len(_TRADE_CONDS)))],
                    }
                )
        return out

    def contract(self, occ: OccSymbol, now_ns: int) -> dict[str, Any]:
        """The Trading API's contract object: open interest and close price as of the last session."""
        und = self.underlying_of(occ)
        prev = self.market.snapshot(und, "sip", now_ns) or {}
        bar = prev.get("prevDailyBar") or prev.get("dailyBar") or {}
        day = str(bar.get("t", ""))[:10] or None
        rng = np.random.default_rng(stable_seed("oi", occ.symbol, day))
        close = None
        if bar:
            spot = float(bar["c"])
            close = black_scholes(
                spot,
                occ.strike,
                self._years(occ, _ns(bar["t"])),
                self.vol(occ, spot),
                self.config.rate,
                occ.type == "call",
            )["price"]
        strike = f"{occ.strike:g}"
        return {
            "id": f"{stable_seed('id', occ.symbol):08x}-0000-4000-8000-{stable_seed('id2', occ.symbol):012x}"[:36],
            "symbol": occ.symbol,
            "name": f"{und} {occ.expiration:%b %d %Y} {strike} {'Call' if occ.type == 'call' else 'Put'}",
            "status": "active" if occ.expiration >= self._today(now_ns) else "inactive",
            "tradable": occ.expiration >= self._today(now_ns),
            "expiration_date": occ.expiration.isoformat(),
            "root_symbol": occ.root,
            "underlying_symbol": und,
            "underlying_asset_id": f"{stable_seed('asset', und):08x}-0000-4000-8000-000000000000",
            "type": occ.type,
            "style": "american",
            "strike_price": strike,
            "size": "100",
            "open_interest": str(int(rng.integers(0, 20000))) if day else None,
            "open_interest_date": day,
            "close_price": f"{round(close, 2):g}" if close is not None else None,
            "close_price_date": day if close is not None else None,
        }


def _ns(text: str) -> int:
    from marketpipe.sim.data import parse_rfc3339_ns

    return parse_rfc3339_ns(text)[0]


# --- parameters --------------------------------------------------------------------------------------


def _contracts(query: Any) -> list[OccSymbol]:
    raw = query.get("symbols", "")
    names = [s.strip() for s in raw.split(",") if s.strip()]
    if not names:
        raise BadRequest("missing symbols")
    if len(names) > MAX_SYMBOLS:
        raise BadRequest(f"too many symbols: at most {MAX_SYMBOLS}")
    out: dict[str, OccSymbol] = {}
    for name in names:
        try:
            occ = parse_occ(name)
        except InvalidOptionSymbol:
            raise BadRequest(f"invalid symbol: {name}") from None
        out.setdefault(occ.symbol, occ)
    return list(out.values())


def _limit(query: Any, default: int, hi: int) -> int:
    raw = query.get("limit", "")
    if raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= hi:
        raise BadRequest("invalid limit")
    return int(raw)


def _float(query: Any, name: str) -> float | None:
    raw = query.get(name, "")
    if raw == "":
        return None
    try:
        v = float(raw)
    except ValueError:
        raise BadRequest(f"invalid {name}") from None
    if not math.isfinite(v):
        raise BadRequest(f"invalid {name}")
    return v


def _date(query: Any, name: str) -> date | None:
    raw = query.get(name, "")
    if raw == "":
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"invalid {name}") from None


def _token(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise BadRequest("invalid page token") from None


def _tok(*parts: object) -> str:
    return base64.b64encode("|".join(map(str, parts)).encode()).decode()


# --- the routes --------------------------------------------------------------------------------------


class OptionsFace:
    """The options routes, added to the Alpaca face's application (same auth, limits and faults)."""

    def __init__(self, face: AlpacaFace, config: OptionsConfig | None = None) -> None:
        self.face = face
        self.options = OptionsMarket(face, config)

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get(BARS_PATH, self._bars)
        r.add_get(TRADES_PATH, self._trades)
        r.add_get(LATEST_TRADES_PATH, self._latest("trades", "latestTrade"))
        r.add_get(LATEST_QUOTES_PATH, self._latest("quotes", "latestQuote"))
        r.add_get(SNAPSHOTS_PATH, self._snapshots)
        r.add_get(EXCHANGES_PATH, self._exchanges)
        r.add_get(CONDITIONS_PATH, self._conditions)
        r.add_get(CHAIN_PATH, self._chain)
        r.add_get(CONTRACTS_PATH, self._contract_list)

    def _feed(self, request: web.Request) -> str:
        client = self.face._client(request)
        entitled = client.plan != "free"
        feed = request.query.get("feed", "") or default_feed(entitled)
        if feed not in FEEDS:
            raise BadRequest("invalid feed")
        if feed == "opra" and not entitled:
            raise BadRequest(OPRA_NOT_ENTITLED, status=403)
        return feed

    # --- historical ----------------------------------------------------------------------------------
    def _range(self, q: Any) -> tuple[int, int]:
        now = self.face.now_ns()
        start = parse_time_ns(q["start"], "start")[0] if q.get("start") else now - 86400 * NS_PER_SEC
        end = parse_time_ns(q["end"], "end")[0] if q.get("end") else now
        if end < start:
            raise BadRequest("end should not be before start")
        return start, min(end, now)

    def _paged(
        self,
        q: Any,
        key: str,
        rows_of: Callable[[OccSymbol, int, int], list[dict[str, Any]]],
        default_limit: int,
    ) -> web.Response:
        contracts = sorted(_contracts(q), key=lambda o: o.symbol)
        limit = _limit(q, default_limit, BARS_MAX_LIMIT)
        sort = q.get("sort", "") or "asc"
        if sort not in SORTS:
            raise BadRequest("invalid sort")
        start, end = self._range(q)
        cursor: tuple[str, str] | None = None
        if q.get("page_token"):
            sym, _, t = _token(q["page_token"]).partition("|")
            if sym not in {c.symbol for c in contracts} or not t:
                raise BadRequest("invalid page token")
            cursor = (sym, t)
        out: dict[str, list[dict[str, Any]]] = {}
        n, nxt = 0, None
        for occ in contracts:
            if cursor is not None and occ.symbol < cursor[0]:
                continue
            rows = rows_of(occ, start, end)
            if sort == "desc":
                rows.reverse()
            if cursor is not None and occ.symbol == cursor[0]:
                rows = [r for r in rows if (r["t"] < cursor[1] if sort == "desc" else r["t"] > cursor[1])]
            for row in rows:
                if n == limit:
                    last_sym = next(reversed(out))
                    nxt = _tok(last_sym, out[last_sym][-1]["t"])
                    break
                out.setdefault(occ.symbol, []).append(row)
                n += 1
            if nxt is not None:
                break
        return json_response({key: out, "next_page_token": nxt})

    async def _bars(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            tf = Timeframe.parse(q.get("timeframe", ""), strict=True)
        except InvalidTimeframe:
            raise BadRequest("invalid timeframe", code=42210000) from None
        now = self.face.now_ns()
        return self._paged(q, "bars", lambda o, s, e: self.options.bars(o, tf, s, e, now), BARS_DEFAULT_LIMIT)

    async def _trades(self, request: web.Request) -> web.Response:
        now = self.face.now_ns()
        return self._paged(
            request.query, "trades", lambda o, s, e: self.options.trades(o, s, e, now), BARS_DEFAULT_LIMIT
        )

    # --- latest and snapshots --------------------------------------------------------------------------
    def _latest(self, key: str, member: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            contracts = _contracts(request.query)
            feed = self._feed(request)
            now = self.face.now_ns()
            found: dict[str, Any] = {}
            for occ in contracts:
                snap = self.options.snapshot(occ, feed, now)
                if snap is not None and member in snap:
                    found[occ.symbol] = snap[member]
            return json_response({key: found})

        return handler

    def _snap_page(self, request: web.Request, contracts: list[OccSymbol]) -> web.Response:
        q = request.query
        feed = self._feed(request)
        limit = _limit(q, SNAPSHOT_DEFAULT_LIMIT, SNAPSHOT_MAX_LIMIT)
        since = parse_time_ns(q["updated_since"], "updated_since")[0] if q.get("updated_since") else None
        after = _token(q["page_token"]) if q.get("page_token") else ""
        now = self.face.now_ns()
        out: dict[str, Any] = {}
        nxt = None
        for occ in sorted(contracts, key=lambda o: o.symbol):
            if occ.symbol <= after:
                continue
            snap = self.options.snapshot(occ, feed, now)
            if snap is None:
                continue
            if since is not None:
                stamps = [_ns(snap[m]["t"]) for m in ("latestTrade", "latestQuote") if m in snap]
                if not any(t >= since for t in stamps):
                    continue
            if len(out) == limit:
                nxt = _tok(next(reversed(out)))
                break
            out[occ.symbol] = snap
        return json_response({"snapshots": out, "next_page_token": nxt})

    async def _snapshots(self, request: web.Request) -> web.Response:
        return self._snap_page(request, _contracts(request.query))

    async def _chain(self, request: web.Request) -> web.Response:
        und = request.match_info["underlying_symbol"]
        if not valid_symbol(und):
            raise BadRequest(f"invalid symbol: {und}")
        q = request.query
        kind = q.get("type", "")
        if kind not in ("", "call", "put"):
            raise BadRequest("invalid type")
        lo, hi = _float(q, "strike_price_gte"), _float(q, "strike_price_lte")
        exp, exp_lo, exp_hi = (
            _date(q, "expiration_date"),
            _date(q, "expiration_date_gte"),
            _date(q, "expiration_date_lte"),
        )
        root = q.get("root_symbol", "")
        picked = [
            c
            for c in self.options.chain(und, self.face.now_ns())
            if (not kind or c.type == kind)
            and (lo is None or c.strike >= lo)
            and (hi is None or c.strike <= hi)
            and (exp is None or c.expiration == exp)
            and (exp_lo is None or c.expiration >= exp_lo)
            and (exp_hi is None or c.expiration <= exp_hi)
            and (not root or c.root == root)
        ]
        return self._snap_page(request, picked)

    # --- contracts (Trading API) -------------------------------------------------------------------------
    async def _contract_list(self, request: web.Request) -> web.Response:
        q = request.query
        now = self.face.now_ns()
        today = self.options._today(now)
        status = q.get("status", "") or "active"
        if status not in CONTRACT_STATUSES:
            raise BadRequest("invalid status")
        kind = q.get("type", "")
        if kind not in ("", "call", "put"):
            raise BadRequest("invalid type")
        style = q.get("style", "")
        if style not in ("", "american", "european"):
            raise BadRequest("invalid style")
        limit = _limit(q, CONTRACTS_DEFAULT_LIMIT, CONTRACTS_MAX_LIMIT)
        lo, hi = _float(q, "strike_price_gte"), _float(q, "strike_price_lte")
        exp, exp_lo = _date(q, "expiration_date"), _date(q, "expiration_date_gte")
        exp_hi = _date(q, "expiration_date_lte")
        if exp is None and exp_hi is None:
            exp_hi = today + timedelta(days=(6 - today.weekday()) % 7 or 7)  # the vendor's default: next weekend
        root = q.get("root_symbol", "")
        unds = [s.strip() for s in q.get("underlying_symbols", "").split(",") if s.strip()]
        for u in unds:
            if not valid_symbol(u):
                raise BadRequest(f"invalid symbol: {u}")
        after = _token(q["page_token"]) if q.get("page_token") else ""
        rows: list[dict[str, Any]] = []
        nxt = None
        if status == "active" and style != "european":
            listed = sorted((c for u in unds for c in self.options.chain(u, now)), key=lambda o: o.symbol)
            for c in listed:
                if c.symbol <= after:
                    continue
                if (
                    (kind and c.type != kind)
                    or (lo is not None and c.strike < lo)
                    or (hi is not None and c.strike > hi)
                    or (exp is not None and c.expiration != exp)
                    or (exp_lo is not None and c.expiration < exp_lo)
                    or (exp_hi is not None and c.expiration > exp_hi)
                    or (root and c.root != root)
                ):
                    continue
                if len(rows) == limit:
                    nxt = _tok(rows[-1]["symbol"])
                    break
                rows.append(self.options.contract(c, now))
        return json_response({"option_contracts": rows, "next_page_token": nxt})

    # --- meta ------------------------------------------------------------------------------------------------
    async def _exchanges(self, request: web.Request) -> web.Response:
        return json_response(OPTION_EXCHANGES)

    async def _conditions(self, request: web.Request) -> web.Response:
        ticktype = request.match_info["ticktype"]
        if ticktype not in OPTION_CONDITIONS:
            raise BadRequest("invalid ticktype")
        return json_response(OPTION_CONDITIONS[ticktype])
