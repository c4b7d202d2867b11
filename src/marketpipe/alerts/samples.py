"""The metrics the pipeline keeps, sampled over time: each evaluation reads the registry's current
values of the series the rules use and keeps them (bounded by the longest rule window), so a rule can
ask for a counter's increase over its window or how long a gauge has held a value. Time comes from
the engine's injectable clock, so tests move it by hand."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

Labels = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, Labels]  # (sample name, sorted labels)


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float  # seconds on the engine's clock
    values: dict[SeriesKey, float]


class MetricHistory:
    def __init__(self, registry: CollectorRegistry, names: Iterable[str], keep_seconds: float) -> None:
        self.registry = registry
        self.names = frozenset(names)  # sample names, e.g. marketpipe_provider_requests_total
        self.keep_seconds = keep_seconds
        self.snapshots: deque[Snapshot] = deque()
        self.changed_at: dict[SeriesKey, float] = {}  # when each series last changed (or first appeared)

    def sample(self, at: float) -> Snapshot:
        values: dict[SeriesKey, float] = {}
        for family in self.registry.collect():
            for s in family.samples:
                if s.name in self.names:
                    values[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        prev = self.snapshots[-1].values if self.snapshots else {}
        for key, v in values.items():
            if key not in self.changed_at or prev.get(key) != v:
                self.changed_at[key] = at
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
        return {labels: v for (n, labels), v in self.now.values.items() if n == name}

    def increase(self, name: str, window: float) -> dict[Labels, float]:
        """Each series' increase over the window (a series that appeared inside it counts from 0; a counter
        reset counts from 0 too)."""
        base = self.base(window).values
        out: dict[Labels, float] = {}
        for labels, v in self.series(name).items():
            before = base.get((name, labels), 0.0)
            out[labels] = v - before if v >= before else v
        return out

    def span(self, window: float) -> float:
        """Seconds actually covered by ``increase(…, window)``."""
        return self.now.at - self.base(window).at

    def unchanged_for(self, name: str, labels: Labels) -> float:
        return self.now.at - self.changed_at.get((name, labels), self.now.at)


def label(labels: Labels, name: str, default: str = "") -> str:
    return dict(labels).get(name, default)
