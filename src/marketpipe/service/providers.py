"""Provider status for ``marketpipe providers`` and the Python API."""

from __future__ import annotations

from typing import Any

from marketpipe.service.router import ProviderRouter


def probe_call(provider: Any) -> Any:
    """The cheapest request that proves a provider answers: the latest trade of the probe symbol
    where the provider (and its plan) serves one, otherwise a week of daily bars."""
    from marketpipe.core.timeutil import utcnow

    symbol = getattr(getattr(provider, "config", None), "probe_symbol", "SPY")
    if provider.supports("latest_trade", None, None, None, utcnow()) is None:
        return lambda: provider.latest_trades([symbol])

    async def bars() -> None:
        from datetime import timedelta

        from marketpipe.core.timeframe import DAY1
        from marketpipe.core.timeutil import utcnow

        now = utcnow()
        async for _ in provider.iter_bars([symbol], DAY1, now - timedelta(days=7), now):
            pass

    return bars


async def provider_table(router: ProviderRouter, *, probe: bool = True) -> list[dict[str, Any]]:
    health = router.health
    for p in router.providers:
        health.probes.setdefault(p.name, probe_call(p))
    if probe:
        await health.probe_all()
    rows = health.table()
    for row in rows:
        row["note"] = ""
    for a in router.unavailable:
        rows.append({"provider": a.provider, "state": "unavailable", "circuit": "", "note": f"{a.code}: {a.message}"})
    return rows
