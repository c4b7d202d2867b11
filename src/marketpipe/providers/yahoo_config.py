"""``[providers.yahoo]``: the Yahoo chart adapter's config, declared beside it (:mod:`marketpipe.providers.yahoo`).

Yahoo has no plan and one consolidated feed (``feed`` can only be ``"yahoo"``, the label on its rows), so
this class holds mostly defaults: third in line and
opt-in (``enabled = false``), because the chart endpoint is unofficial and unsupported by Yahoo. It
registers itself with core's loader (core cannot import providers/, see ``register_provider_config``).
"""

from __future__ import annotations

from typing import Literal

from marketpipe.core.config import PositiveInt, ProviderConfig, register_provider_config


@register_provider_config("yahoo")
class YahooConfig(ProviderConfig, forbid_unknown_fields=True):
    enabled: bool = False
    priority: int = 3
    rate_limit_per_min: PositiveInt = 60
    feed: Literal["yahoo"] = "yahoo"  # the one feed Yahoo has


__all__ = ["YahooConfig"]
