"""Provider construction by name, so configuration can name vendors without importing them all."""

from __future__ import annotations

import importlib
from typing import Any

from marketpipe.core.config import ProviderConfig
from marketpipe.core.errors import ConfigError
from marketpipe.providers.base import BarsProvider

# name -> (module, class); every class has ``from_config(config, env=None, **kw)``.
PROVIDERS: dict[str, tuple[str, str]] = {
    "alpaca": ("marketpipe.providers.alpaca", "AlpacaProvider"),
    "polygon": ("marketpipe.providers.polygon", "PolygonProvider"),
    "yahoo": ("marketpipe.providers.yahoo", "YahooProvider"),
}


def create_provider(name: str, config: ProviderConfig, *, env: dict[str, str] | None = None, **kw: Any) -> BarsProvider:
    """Build the named provider; raises MISSING_CREDENTIALS when its keys are not in the environment."""
    try:
        module, cls = PROVIDERS[name]
    except KeyError:
        raise ConfigError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}") from None
    try:
        factory = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise ConfigError(f"provider {name!r} is not available in this installation ({exc})") from exc
    provider: BarsProvider = factory.from_config(config, env=env, **kw)
    return provider
