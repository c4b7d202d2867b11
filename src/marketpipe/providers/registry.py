"""Provider construction by name, so configuration can name vendors without importing them all.

Each vendor's config class is declared beside its adapter (``providers/<vendor>_config.py``) and
registered with core's loader, which decodes ``[providers.<vendor>]`` into it (core cannot import this
package; see :func:`marketpipe.core.config.register_provider_config`). :func:`create_provider` checks
that the config it is handed is of that class before the adapter reads vendor keys from it.
"""

from __future__ import annotations

import importlib
from typing import Any

from marketpipe.core.config import ProviderConfig, provider_config_type
from marketpipe.core.errors import ConfigError
from marketpipe.providers.base import BarsProvider

# name -> (module, class); every class has ``from_config(config, env=None, **kw)``.
PROVIDERS: dict[str, tuple[str, str]] = {
    "alpaca": ("marketpipe.providers.alpaca", "AlpacaProvider"),
    "polygon": ("marketpipe.providers.polygon", "PolygonProvider"),
    "yahoo": ("marketpipe.providers.yahoo", "YahooProvider"),
}


def create_provider(name: str, config: ProviderConfig, *, env: dict[str, str] | None = None, **kw: Any) -> BarsProvider:
    """Build the named provider; raises MISSING_CREDENTIALS when its keys are not in the environment,
    CONFIG_ERROR when ``config`` is not the vendor's config class (e.g. a bare ``ProviderConfig``)."""
    try:
        module, cls = PROVIDERS[name]
    except KeyError:
        raise ConfigError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}") from None
    kind = provider_config_type(name)
    if not isinstance(config, kind):
        raise ConfigError(
            f"providers.{name}: the {name} provider needs a {kind.__name__}, got {type(config).__name__}",
            details={"key": f"providers.{name}"},
        )
    try:
        factory = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise ConfigError(f"provider {name!r} is not available in this installation ({exc})") from exc
    provider: BarsProvider = factory.from_config(config, env=env, **kw)
    return provider
