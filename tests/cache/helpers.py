"""Small helpers shared by the cache tests."""

from __future__ import annotations

from marketpipe.core.metrics import REGISTRY


def sample(name: str, **labels: str) -> float:
    """Current value of a metric sample in marketpipe's registry (0 if never touched)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
