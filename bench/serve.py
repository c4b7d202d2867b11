"""Gateway benchmark: requests/s and latency of the gateway under load, from a separate process.

    ./dev bench serve [--seconds 10] [--connections 32]

Everything runs on loopback: the vendor simulator in its own process, the gateway (`marketpipe
serve`) in its own, and the load generator — wrk (Debian package `wrk`; `./dev bench` installs it)
— in a third. Runs:

(a) latest quote, cache hits            GET /v1/quotes/AAPL/latest
(b) one day of 1-minute bars, hits      GET /v1/bars/AAPL?start=...&end=...   (390 bars, JSON)
(c) the peer: the same latest quote asked of the vendor (the simulator) directly, as an app without
    the gateway would — one upstream call per request
(d) cold misses: one-day bars for days not yet held (each fetched from the vendor, checked, stored,
    encoded, cached), sequential, from an httpx client
(e) the peer of (d): the same one-day request the gateway sends upstream (its path and query, byte
    for byte) asked of the simulator directly, on the same symbol and days, the same number, from the
    same kind of client; the two are interleaved day by day (who goes first alternates), and the
    simulator's own caches are warmed for every one of those days first, so both sides are answered
    from equally warm generated data and neither from a cache the other lacks (each gateway request is
    for a day it does not hold yet). Neither side waits on the simulator's rate limit (lifted), nor on
    the gateway's own limiter (configured far above the load; its headroom is printed after the run).

    ./dev bench serve --quick                 # < 1 min: short wrk runs, 12 cold days
    ./dev bench serve --cold-only [--cold 30] # (d) and (e) only (no wrk needed)
    ./dev bench serve --cold-only --baseline-src /tmp/old/src   # + (d0): a second gateway run from an
                                              # older tree (`git archive REV src | tar -x -C /tmp/old`),
                                              # its cold misses interleaved with (d) and (e): old vs new
                                              # in the same run, on the same simulator

Targets (2 cores): (a) >= 5,000 req/s with p99 < 20 ms; (b) p99 < 10 ms; floor 1,000 req/s, p95 < 100 ms;
(d) p50 <= 1.2x (e) (issue 20).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

from _sim import free_port, wait_up

ENV = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET", "MARKETPIPE_LOG_LEVEL": "ERROR"}
HEADERS = {"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"}


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def wrk(url: str, seconds: int, connections: int, headers: dict[str, str] | None = None) -> dict[str, float]:
    args = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    for k, v in (headers or {}).items():
        args += ["-H", f"{k}: {v}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50": pct("50"),
        "p90": pct("90"),
        "p99": pct("99"),
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


def stats(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {
        "rps": len(lat) / (sum(lat) / 1000),
        "p50": statistics.median(lat),
        "p90": lat[int(0.9 * (len(lat) - 1))],
        "p95": lat[int(0.95 * (len(lat) - 1))],
        "p99": lat[-1],
        "non2xx": 0.0,
    }


def upstream_query(day: date) -> dict[str, str]:
    """The query the gateway's Alpaca adapter sends for one day of 1Min bars (unlimited plan, SIP):
    the request's ``[NY midnight, next NY midnight)`` with Alpaca's inclusive end."""
    from datetime import timedelta

    from marketpipe.core.timeutil import parse_range, rfc3339

    s, e = parse_range(str(day), str(day))
    return {
        "start": rfc3339(s),
        "limit": "10000",
        "feed": "sip",
        "sort": "asc",
        "timeframe": "1Min",
        "adjustment": "raw",
        "end": rfc3339(e - timedelta(microseconds=1)),
    }


def cold_misses(
    gateways: dict[str, str], sim_url: str, symbol: str, days: list[date]
) -> tuple[dict[str, list[float]], int]:
    """(d) and (e), interleaved day by day: each gateway's cold miss (``gateways``: label -> URL, each
    with a store of its own) and the same upstream request asked of the simulator directly (label
    ``peer``); who goes first rotates. Returns the latency lists (ms) per label and the bars per answer."""
    vendor = f"{sim_url}/v2/stocks/{symbol}/bars"
    lat: dict[str, list[float]] = {k: [] for k in [*gateways, "peer"]}
    sides = list(lat)
    n_bars = 0
    with httpx.Client(timeout=60) as c, httpx.Client(timeout=60, headers=HEADERS) as v:
        for d in days:  # warm the simulator's generated data (and its encoded rows) for every day
            v.get(vendor, params=upstream_query(d)).raise_for_status()
        for i, d in enumerate(days):
            for side in sides[i % len(sides) :] + sides[: i % len(sides)]:
                t = time.perf_counter()
                if side == "peer":
                    r = v.get(vendor, params=upstream_query(d))
                else:
                    r = c.get(f"{gateways[side]}/v1/bars/{symbol}", params={"start": str(d), "end": str(d)})
                r.raise_for_status()
                lat[side].append((time.perf_counter() - t) * 1000)
                if side != "peer":
                    if r.headers.get("X-Marketpipe-Cache") != "origin":
                        raise SystemExit(f"{d}: the gateway answered from its cache, not the vendor: {r.headers}")
                    n_bars = len(r.json()["bars"])
    return lat, n_bars


def gateway(port: int, cfg: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "marketpipe.cli.main", "serve", "--port", str(port), "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (8 is always run too)")
    ap.add_argument("--cold", type=int, default=30, help="cold-miss requests (and as many peer requests)")
    ap.add_argument("--quick", action="store_true", help="a short run (< 1 min): 2 s wrk runs, 8 conn, 12 cold")
    ap.add_argument("--cold-only", action="store_true", help="only (d) and (e): no wrk needed")
    ap.add_argument(
        "--baseline-src",
        type=Path,
        help="also run a gateway from this source tree (its src/ directory: an older checkout, e.g. from "
        "`git archive`) and interleave its cold misses with the others (row (d0))",
    )
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.connections, args.cold = 2, 8, min(args.cold, 12)
    if shutil.which("wrk") is None and not args.cold_only:
        raise SystemExit(
            "wrk is needed for the load (Debian: apt-get install wrk; ./dev bench installs it); "
            "--cold-only runs the cold-miss rows without it"
        )

    from marketpipe.core.calendar import get_calendar
    from marketpipe.core.timeutil import utcnow

    cal = get_calendar()
    now = utcnow()
    days = [s.day for s in cal.sessions(now.replace(year=now.year - 1), now) if s.close < now]
    hot_day, cold_days = days[-2], days[-2 - args.cold : -2]

    sim_port, gw_port, base_port = free_port(), free_port(), free_port()
    sim_url, gw_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{gw_port}"
    base_url = f"http://127.0.0.1:{base_port}"
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfgs = []
        for name in ("gw", "base"):
            cfg = Path(tmp) / f"{name}.toml"
            cfg.write_text(
                f'[store]\npath = "{tmp}/{name}.duckdb"\n[providers.alpaca]\nbase_url = "{sim_url}"\n'
                f'plan = "unlimited"\nrate_limit_per_min = 1000000\n[providers.polygon]\nenabled = false\n'
            )
            cfgs.append(cfg)
        env = {**os.environ, **ENV}
        try:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "marketpipe.cli.main", "sim", "--port", str(sim_port)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            wait_up(sim_url)
            procs.append(gateway(gw_port, cfgs[0], env))
            gateways = {"gw": gw_url}
            if args.baseline_src is not None:
                old = str(args.baseline_src.resolve())
                procs.append(
                    gateway(
                        base_port, cfgs[1], {**env, "PYTHONPATH": os.pathsep.join([old, env.get("PYTHONPATH", "")])}
                    )
                )
                gateways["base"] = base_url
            for u in gateways.values():
                wait_http(u + "/health")
                r = httpx.get(f"{u}/v1/bars/IBM", params={"start": str(hot_day), "end": str(hot_day)}, timeout=60)
                r.raise_for_status()  # each gateway's code paths warm before the cold misses
            quote = f"{gw_url}/v1/quotes/AAPL/latest"
            bars = f"{gw_url}/v1/bars/AAPL?start={hot_day}&end={hot_day}"
            for u in (quote, bars):
                r = httpx.get(u, timeout=60)
                r.raise_for_status()
            n_bars = len(httpx.get(bars, timeout=60).json()["bars"])
            # The simulator enforces the plan's request rate like the vendor; the peer runs measure
            # answering speed, so lift it (the gateway's own upstream calls then go unthrottled too).
            httpx.put(f"{sim_url}/_sim/faults", json={"rules": [], "rate_limit_per_min": 10**9}).raise_for_status()
            if not args.cold_only:
                for conns in sorted({8, args.connections}):
                    rows.append((f"(a) latest quote, gateway (cache), {conns} conn", wrk(quote, args.seconds, conns)))
                    rows.append(
                        (
                            f"(b) one day of 1Min bars ({n_bars}), gateway (cache), {conns} conn",
                            wrk(bars, args.seconds, conns),
                        )
                    )
                peer = wrk(f"{sim_url}/v2/stocks/AAPL/quotes/latest", args.seconds, args.connections, HEADERS)
                rows.append((f"(c) latest quote, vendor direct (peer), {args.connections} conn", peer))
            lat, cold_bars = cold_misses(gateways, sim_url, "MSFT", cold_days)
            n = len(lat["peer"])
            rows.append((f"(d) cold miss: one day ({cold_bars} bars) via the gateway ({n} seq.)", stats(lat["gw"])))
            if "base" in lat:
                rows.append((f"(d0) the same via the baseline gateway ({n} seq., interleaved)", stats(lat["base"])))
            rows.append((f"(e) the same upstream request, vendor direct (peer) ({n} seq.)", stats(lat["peer"])))
            headroom = [
                p.get("ratelimit_headroom")
                for p in httpx.get(f"{gw_url}/v1/providers", timeout=10).json()
                if p.get("provider") == "alpaca"
            ]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)

    if args.cold_only:
        print("\ncold misses on loopback, 2 cores shared by vendor, gateway and client\n")
    else:
        print(
            f"\nwrk -t1 -c{args.connections} -d{args.seconds}s on loopback, "
            "2 cores shared by vendor, gateway and load\n"
        )
    print(f"{'run':<72}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'non-2xx':>9}")
    for name, r in rows:
        p95 = f"{r['p95']:>9.2f}" if "p95" in r else f"{'':>9}"
        print(f"{name:<72}{r['rps']:>9,.0f}{r['p50']:>9.2f}{r['p90']:>9.2f}{p95}{r['p99']:>9.2f}{r['non2xx']:>9.0f}")
    if not args.cold_only:
        a = next(r for n, r in rows if n.startswith("(a)") and n.endswith(f"{args.connections} conn"))
        c = next(r for n, r in rows if n.startswith("(c)"))
        print(
            f"\nlatest quote through the gateway vs straight from the vendor: {a['rps'] / c['rps']:.2f}x the requests/s"
        )
    d = next(r for n, r in rows if n.startswith("(d)"))
    e = next(r for n, r in rows if n.startswith("(e)"))
    print(
        f"ratio cold miss (d)/(e): p50 {d['p50'] / e['p50']:.2f}x, p95 {d['p95'] / e['p95']:.2f}x "
        f"(gateway's own limiter headroom after the run: {headroom[0] if headroom else '?'})"
    )
    d0 = next((r for n, r in rows if n.startswith("(d0)")), None)
    if d0 is not None:
        print(
            f"ratio baseline (d0)/(e): p50 {d0['p50'] / e['p50']:.2f}x, p95 {d0['p95'] / e['p95']:.2f}x; "
            f"(d)/(d0): p50 {d['p50'] / d0['p50']:.2f}x, p95 {d['p95'] / d0['p95']:.2f}x"
        )
    print("targets: (a) >= 5,000 req/s, p99 < 20 ms; (b) p99 < 10 ms; floor 1,000 req/s, p95 < 100 ms; (d)/(e) <= 1.2x")


if __name__ == "__main__":
    main()
