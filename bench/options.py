"""Option chain benchmark: a SPY-sized chain decoded, checked and stored, marketpipe vs alpaca-py, same run.

    ./dev bench options [--underlying SPY] [--repeat 3] [--weekly 6] [--monthly 6] [--store URL]

The simulator lists the chain of ``--underlying`` (about 3,400 contracts for SPY with the defaults; more
expirations make it larger) and serves it in pages of 1,000, as the vendor does. Each ``--repeat`` times:

(a) marketpipe: ``OptionsData.snapshot_chain`` (every page fetched, decoded into the canonical frame,
    checked with ``quality/option_checks``, quote-scored) and the snapshot stored in the store's
    ``option_snapshots`` with its quarantine in one transaction (a DuckDB file in a temporary directory,
    or ``--store postgresql://...``)
(b) marketpipe, fetch + decode only: ``AlpacaOptionsProvider.chain``
(c) the peer: alpaca-py ``OptionHistoricalDataClient.get_option_chain`` on the same simulator (fetch and
    decode into its pydantic models; it neither checks nor stores)

and, on the same pages captured once (no HTTP: the simulator's own pricing no longer counts):

(d) marketpipe: decode (msgspec into the canonical polars frame) + check + score
(e) the peer: alpaca-py's own parsing of the same pages (``json`` + ``parse_obj_as_symbol_dict(OptionsSnapshot)``)

Figures: min / median / max seconds and contracts/s at the median, with the ratio of (a) and (b) to (c).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--underlying", default="SPY")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--weekly", type=int, default=6)
    ap.add_argument("--monthly", type=int, default=6)
    ap.add_argument("--store", default=None, help="a PostgreSQL URL (default: a DuckDB file in a temp dir)")
    args = ap.parse_args()

    from alpaca.data.historical.option import OptionHistoricalDataClient
    from alpaca.data.requests import OptionChainRequest

    from marketpipe.core.config import config_from_dict
    from marketpipe.providers.alpaca_config import AlpacaConfig
    from marketpipe.providers.alpaca_options import AlpacaOptionsProvider
    from marketpipe.service.options import OptionsData
    from marketpipe.sim.options import OptionsConfig
    from marketpipe.sim.server import SimServer

    env = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"}
    times: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": [], "e": []}
    sizes: dict[str, int] = {}
    with SimServer() as sim, tempfile.TemporaryDirectory() as tmp:
        assert sim.options is not None
        sim.options.options.config = OptionsConfig(weekly=args.weekly, monthly=args.monthly)
        fast = {"rate_limit_per_min": 1_000_000}
        target = args.store or str(Path(tmp) / "bench.duckdb")
        cfg = config_from_dict(
            {"providers": {"alpaca": {"base_url": sim.url, "plan": "unlimited", **fast}}, "store": {"path": target}}
        )
        peer = OptionHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=sim.url)
        peer.get_option_chain(OptionChainRequest(underlying_symbol=args.underlying))  # warm the listing

        async def ours(n: int) -> None:
            svc = OptionsData(cfg, env=env)
            try:
                t = time.perf_counter()
                snap = await svc.snapshot_chain(args.underlying)
                times["a"].append(time.perf_counter() - t)
                assert snap.stored == snap.contracts, "each run is a new snapshot: every row is stored"
                sizes["a"] = snap.contracts
            finally:
                await svc.aclose()
            async with AlpacaOptionsProvider(
                "SIMKEY", "SIMSECRET", base_url=sim.url, config=AlpacaConfig(plan="unlimited", **fast)
            ) as p:
                t = time.perf_counter()
                raw = await p.chain(args.underlying)
                times["b"].append(time.perf_counter() - t)
                sizes["b"] = raw.height

        for n in range(args.repeat):
            asyncio.run(ours(n))
            t = time.perf_counter()
            chain = peer.get_option_chain(OptionChainRequest(underlying_symbol=args.underlying))
            times["c"].append(time.perf_counter() - t)
            sizes["c"] = len(chain)

        import json
        from datetime import UTC, datetime

        import requests
        from alpaca.data.historical.utils import parse_obj_as_symbol_dict
        from alpaca.data.models.snapshots import OptionsSnapshot

        from marketpipe.quality.option_checks import quote_score, split_checked
        from marketpipe.wire.alpaca_options import SnapshotsPage, decode, snapshots_to_frame

        pages, token = [], None
        while True:
            q = {"limit": 1000, "feed": "opra", **({"page_token": token} if token else {})}
            r = requests.get(
                f"{sim.url}/v1beta1/options/snapshots/{args.underlying}",
                params=q,
                headers={"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"},
                timeout=60,
            )
            pages.append(r.content)
            token = r.json()["next_page_token"]
            if not token:
                break
        for _ in range(args.repeat):
            t = time.perf_counter()
            now = datetime.now(UTC)
            n = 0
            for body in pages:
                page = decode(body, SnapshotsPage, "bench")
                ok, _bad = split_checked(
                    snapshots_to_frame(page.snapshots, args.underlying, now, "sim:alpaca", "opra", now)
                )
                n += quote_score(ok).height
            times["d"].append(time.perf_counter() - t)
            sizes["d"] = n
            t = time.perf_counter()
            n = 0
            for body in pages:
                n += len(parse_obj_as_symbol_dict(OptionsSnapshot, json.loads(body)["snapshots"]))
            times["e"].append(time.perf_counter() - t)
            sizes["e"] = n

    names = {
        "a": "(a) marketpipe: fetch, decode, check, score, store",
        "b": "(b) marketpipe: fetch + decode",
        "c": "(c) alpaca-py get_option_chain (fetch + decode)",
        "d": "(d) marketpipe: decode + check + score, no HTTP",
        "e": "(e) alpaca-py: parse the same pages, no HTTP",
    }
    print(f"\n{args.underlying} chain, {sizes['c']:,} contracts; {args.repeat} runs; min / median / max")
    print(f"{'':52} {'seconds':>26} {'contracts/s':>12}")
    for k, name in names.items():
        lo, med, hi = min(times[k]), statistics.median(times[k]), max(times[k])
        print(f"{name:52} {lo:8.3f} / {med:7.3f} / {hi:7.3f} {sizes[k] / med:12,.0f}")
    peer_med = statistics.median(times["c"])
    print(
        f"\nratio contracts/s vs alpaca-py: (a) {peer_med / statistics.median(times['a']):.2f}x"
        f"  (b) {peer_med / statistics.median(times['b']):.2f}x"
        f"  (d) vs (e) {statistics.median(times['e']) / statistics.median(times['d']):.2f}x"
    )
    if len(set(sizes.values())) != 1:
        raise SystemExit(f"the three disagree on the chain's size: {sizes}")


if __name__ == "__main__":
    main()
