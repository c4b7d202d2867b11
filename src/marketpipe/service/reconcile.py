"""``marketpipe reconcile``: the same bars from every provider that serves them, compared with the
highest-priority one, results stored per bar."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from marketpipe.core.errors import InvalidArgument, ProviderError
from marketpipe.core.schema import BAR_SCHEMA
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import utcnow
from marketpipe.providers.base import BarsProvider
from marketpipe.quality.reconcile import Reconciliation, Thresholds, reconcile
from marketpipe.service.router import Attempt, ProviderRouter
from marketpipe.store.base import QualityStore


@dataclass
class ReconcileReport:
    run_id: str
    symbol: str
    timeframe: str
    reference: str | None
    bars: dict[str, int] = field(default_factory=dict)  # per source
    comparisons: dict[str, Reconciliation] = field(default_factory=dict)  # other source -> result
    skipped: list[Attempt] = field(default_factory=list)


async def fetch_all(provider: BarsProvider, symbol: str, tf: Timeframe, start: datetime, end: datetime) -> pl.DataFrame:
    frames = [page.frame async for page in provider.iter_bars([symbol], tf, start, end)]
    frames = [f.select(list(BAR_SCHEMA)) for f in frames if f.height]
    return pl.concat(frames) if frames else pl.DataFrame(schema=BAR_SCHEMA)


async def reconcile_symbol(
    router: ProviderRouter,
    store: QualityStore | None,
    symbol: str,
    timeframe: Timeframe,
    start: datetime,
    end: datetime,
    *,
    thresholds: Thresholds | None = None,
) -> ReconcileReport:
    candidates, skipped = router.candidates("bars", timeframe, start, end)
    if len(candidates) < 2:
        raise InvalidArgument(
            f"reconcile needs at least two providers that serve {timeframe} bars for this range; usable: "
            f"{', '.join(p.name for p in candidates) or 'none'}",
            details={"skipped": [a.to_dict() for a in skipped]},
        )
    report = ReconcileReport(uuid.uuid4().hex[:12], symbol, str(timeframe), None, skipped=list(skipped))
    frames: dict[str, pl.DataFrame] = {}
    for p in candidates:
        try:
            frame = await fetch_all(p, symbol, timeframe, start, end)
        except ProviderError as exc:
            report.skipped.append(Attempt(p.name, exc.code, exc.message))
            continue
        source = frame["source"][0] if frame.height else p.name
        frames[source] = frame
        report.bars[source] = frame.height
    names = list(frames)
    if len(names) < 2:
        raise InvalidArgument(
            "fewer than two providers answered; nothing to compare",
            details={"skipped": [a.to_dict() for a in report.skipped]},
        )
    report.reference = names[0]
    created = utcnow()
    for other in names[1:]:
        result = reconcile(
            frames[names[0]],
            frames[other],
            reference_name=names[0],
            other_name=other,
            timeframe=str(timeframe),
            thresholds=thresholds,
        )
        report.comparisons[other] = result
        if store is not None:
            store.write_reconciliation(report.run_id, created, result.rows)
    return report
