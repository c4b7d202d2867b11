"""The metrics the pipeline keeps, sampled over time: each evaluation reads the registry's current
values of the series the rules use and keeps them (bounded by the longest rule window), so a rule can
ask for a counter's increase over its window or how long a gauge has held a value. Time comes from
the engine's injectable clock, so tests move it by hand."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

Labels = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, Labels]  # (sample name, sorted labels)


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float  # seconds on the engine's clock
    values: dict[str, dict[Labels, float]]  # sample name -> labels -> value


class MetricHistory:
    def __init__(self, registry: CollectorRegistry, names: Iterable[str], keep_seconds: float) -> None:
        self.registry = registry
        self.names = frozenset(names)  # sample names, e.g. marketpipe_provider_requests_total
        self.keep_seconds = keep_seconds
        self.snapshots: deque[Snapshot] = deque()
        self.changed_at: dict[SeriesKey, float] = {}  # when each series last changed (or first appeared)

    def _families(self) -> Iterable[Any]:
        """The metric families holding the sampled series: only their collectors when the registry can say
        which they are (collecting every histogram of a busy gateway costs ten times as much), else all."""
        by_name: dict[str, Any] | None = getattr(self.registry, "_names_to_collectors", None)
        if not by_name:
            return self.registry.collect()
        collectors = {id(c): c for n in self.names if (c := by_name.get(n)) is not None}
        return (family for c in collectors.values() for family in c.collect())

    def sample(self, at: float) -> Snapshot:
        values: dict[str, dict[Labels, float]] = {}
        for family in self._families():
            for s in family.samples:
                if s.name in self.names:
                    values.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = float(s.value)
        prev = self.snapshots[-1].values if self.snapshots else {}
        for name, series in values.items():
            before = prev.get(name, {})
            for labels, v in series.items():
                if before.get(labels) != v or (name, labels) not in self.changed_at:
                    self.changed_at[(name, labels)] = at
        snap = Snapshot(at, values)
        self.snapshots.append(snap)
        # keep one snapshot at or before the longest window's start, so a window's base is exact
        while len(self.snapshots) > 2 and self.snapshots[1].at <= at - self.keep_seconds:
            self.snapshots.popleft()
        return snap

    @property
    def now(self) -> Snapshot:
        return self.snapshots[-1]

    def base(self, window: float) -> Snapshot:
        """The snapshot a window ending now starts from: the newest at or before ``now - window``, else
        the oldest held (the engine has not been running that long)."""
        start = self.now.at - window
        chosen = self.snapshots[0]
        for snap in self.snapshots:
            if snap.at > start:
                break
            chosen = snap
        return chosen

    def series(self, name: str) -> dict[Labels, float]:
        """The current value of every series of sample ``name``, by labels."""
        return self.now.values.get(name, {})

    def increase(self, name: str, window: float) -> dict[Labels, float]:
        """Each series' increase over the window (a series that appeared inside it counts from 0; a counter
        reset counts from 0 too)."""
        base = self.base(window).values.get(name, {})
        out: dict[Labels, float] = {}
        for labels, v in self.series(name).items():
            before = base.get(labels, 0.0)
            out[labels] = v - before if v >= before else v
        return out

    def span(self, window: float) -> float:
        """Seconds actually covered by ``increase(…, window)``."""
        return self.now.at - self.base(window).at

    def unchanged_for(self, name: str, labels: Labels) -> float:
        return self.now.at - self.changed_at.get((name, labels), self.now.at)


def label(labels: Labels, name: str, default: str = "") -> str:
    return dict(labels).get(name, default)
