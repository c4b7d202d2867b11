"""``[providers.polygon]``: the Polygon (Massive) adapter's config, declared beside it
(:mod:`marketpipe.providers.polygon`).

The shared keys come from :class:`marketpipe.core.config.ProviderConfig`; this class adds Polygon's
``plan`` and its own defaults (second in line, the free tier's 5 requests a minute). It registers itself
with core's loader (core cannot import providers/, see ``register_provider_config``).
"""

from __future__ import annotations

from typing import Literal

from marketpipe.core.config import PositiveInt, ProviderConfig, register_provider_config


@register_provider_config("polygon")
class PolygonConfig(ProviderConfig, forbid_unknown_fields=True):
    priority: int = 2
    rate_limit_per_min: PositiveInt = 5  # the free tier's limit
    # "free" (Basic: end-of-day data through the previous session, 5 req/min) or "unlimited" (a paid plan).
    plan: Literal["free", "unlimited"] = "free"
    # Corporate actions from the current /stocks/v1/{splits,dividends} ("v1") or the deprecated
    # /v3/reference/{splits,dividends} ("v3", for keys and proxies that still only have those).
    actions_api: Literal["v1", "v3"] = "v1"


__all__ = ["PolygonConfig"]
