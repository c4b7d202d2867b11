"""``[providers.alpaca]``: the Alpaca adapter's config, declared beside it (:mod:`marketpipe.providers.alpaca`).

The shared keys (timeouts, retry, circuit, rate limit, priority, ``enabled``, ``base_url``) come from
:class:`marketpipe.core.config.ProviderConfig`; this class adds only what Alpaca has. It registers itself
with core's loader (core cannot import providers/, see ``register_provider_config``), so a
``[providers.alpaca]`` table is decoded into it with the same CONFIG_ERROR messages naming the key.
"""

from __future__ import annotations

from typing import Literal

from marketpipe.core.config import PositiveInt, ProviderConfig, register_provider_config


@register_provider_config("alpaca")
class AlpacaConfig(ProviderConfig, forbid_unknown_fields=True):
    priority: int = 1
    rate_limit_per_min: PositiveInt = 200  # Basic plan: 200 requests/min
    feed: str = "sip"  # default feed for bars and latest values (sip, iex, delayed_sip, …)
    # "free" (Basic: 200 req/min, SIP only up to 15 min ago) or "unlimited" (paid SIP plan).
    plan: Literal["free", "unlimited"] = "free"
    # What to do when the free plan meets the 15-minute SIP restriction: clamp `end` to now-15min
    # (keep SIP) or switch to the real-time IEX feed.
    recent_sip: Literal["clamp", "iex"] = "clamp"


__all__ = ["AlpacaConfig"]
