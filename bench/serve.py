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

Targets (2 cores): (a) >= 5,000 req/s with p99 < 20 ms; (b) p99 < 10 ms; floor 1,000 req/s, p95 < 100 ms.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (8 is always run too)")
    ap.add_argument("--cold", type=int, default=30, help="cold-miss requests")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed for the load (Debian: apt-get install wrk; ./dev bench installs it)")

    from marketpipe.core.calendar import get_calendar
    from marketpipe.core.timeutil import utcnow

    cal = get_calendar()
    now = utcnow()
    days = [s.day for s in cal.sessions(now.replace(year=now.year - 1), now) if s.close < now]
    hot_day, cold_days = days[-2], days[-2 - args.cold : -2]

    sim_port, gw_port = free_port(), free_port()
    sim_url, gw_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{gw_port}"
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "gw.toml"
        cfg.write_text(
            f'[store]\npath = "{tmp}/gw.duckdb"\n[providers.alpaca]\nbase_url = "{sim_url}"\nplan = "unlimited"\n'
            f"rate_limit_per_min = 1000000\n[providers.polygon]\nenabled = false\n"
        )
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
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "marketpipe.cli.main",
                        "serve",
                        "--port",
                        str(gw_port),
                        "--config",
                        str(cfg),
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            wait_http(gw_url + "/health")
            quote = f"{gw_url}/v1/quotes/AAPL/latest"
            bars = f"{gw_url}/v1/bars/AAPL?start={hot_day}&end={hot_day}"
            for u in (quote, bars):
                r = httpx.get(u, timeout=60)
                r.raise_for_status()
            n_bars = len(httpx.get(bars, timeout=60).json()["bars"])
            # The simulator enforces the plan's request rate like the vendor; the peer run measures
            # answering speed, so lift it (the gateway's own upstream calls then go unthrottled too).
            httpx.put(f"{sim_url}/_sim/faults", json={"rules": [], "rate_limit_per_min": 10**9}).raise_for_status()
            rows = []
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
            lat: list[float] = []
            with httpx.Client(timeout=60) as c:
                for d in cold_days:
                    t = time.perf_counter()
                    r = c.get(f"{gw_url}/v1/bars/MSFT", params={"start": str(d), "end": str(d)})
                    r.raise_for_status()
                    lat.append((time.perf_counter() - t) * 1000)
            lat.sort()
            cold = {
                "rps": len(lat) / (sum(lat) / 1000),
                "p50": statistics.median(lat),
                "p90": lat[int(0.9 * (len(lat) - 1))],
                "p99": lat[-1],
                "non2xx": 0.0,
            }
            rows.append((f"(d) cold miss: one day fetched from the vendor ({len(lat)} sequential)", cold))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)

    print(f"\nwrk -t1 -c{args.connections} -d{args.seconds}s on loopback, 2 cores shared by vendor, gateway and load\n")
    print(f"{'run':<66}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'non-2xx':>9}")
    for name, r in rows:
        print(f"{name:<66}{r['rps']:>10,.0f}{r['p50']:>9.2f}{r['p90']:>9.2f}{r['p99']:>9.2f}{r['non2xx']:>9.0f}")
    a = next(r for n, r in rows if n.startswith("(a)") and n.endswith(f"{args.connections} conn"))
    c = next(r for n, r in rows if n.startswith("(c)"))
    print(f"\nlatest quote through the gateway vs straight from the vendor: {a['rps'] / c['rps']:.2f}x the requests/s")
    print("targets: (a) >= 5,000 req/s, p99 < 20 ms; (b) p99 < 10 ms; floor 1,000 req/s, p95 < 100 ms")


if __name__ == "__main__":
    main()
