"""Structured logging (structlog) to stderr. Secrets are never passed to a logger."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    global _configured
    lvl = getattr(logging, (level or os.environ.get("MARKETPIPE_LOG_LEVEL", "WARNING")).upper(), 30)
    use_json = json if json is not None else os.environ.get("MARKETPIPE_LOG_FORMAT") == "json"
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str) -> Any:
    if not _configured:
        configure()
    return structlog.get_logger(name)
