"""Structured logging (structlog) to stderr. Secrets are never passed to a logger — and in case one
reaches it anyway (inside an exception's text, a header in a repr), every rendered line goes through
:func:`redact` before it is written: each registered secret value and every ``Bearer <x>``,
``APCA-API-SECRET-KEY`` value, ``?token=`` and URL password becomes ``***``.

Exceptions are rendered as plain tracebacks: never rich's, never with local variables (those held the
admin token and client keys)."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import structlog

_configured = False
MASK = "***"
MIN_SECRET_LEN = 4  # shorter values are not secrets worth the name and would mask ordinary words
SECRET_VAR = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD)", re.IGNORECASE)
_PATTERNS = (
    # Authorization: Bearer <x> (also inside reprs such as b'Bearer x')
    (re.compile(r"(?i)(bearer\s+)[^\s'\",;\]\)}]+"), r"\1" + MASK),
    # APCA-API-SECRET-KEY: x / 'apca-api-secret-key': 'x' / (b'apca-api-secret-key', b'x')
    (
        re.compile(r"(?i)(apca[-_]api[-_]secret[-_]key['\"]?\s*[:=,]\s*b?['\"]?)[^\s'\",;\]\)}]+"),
        r"\1" + MASK,
    ),
    (re.compile(r"(?i)(x-api-key['\"]?\s*[:=,]\s*b?['\"]?)[^\s'\",;\]\)}]+"), r"\1" + MASK),
    (re.compile(r"(?i)([?&](?:token|apikey|api_key)=)[^&\s'\"]+"), r"\1" + MASK),
    (re.compile(r"(\w+://[^:/@\s'\"]*:)[^@\s'\"/]+@"), r"\1" + MASK + "@"),  # scheme://user:password@
)
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_secret_re: re.Pattern[str] | None = None


def register_secrets(values: Iterable[str | None]) -> None:
    """Values that must never appear in a log line (admin token, client key secrets, vendor keys)."""
    global _secret_re
    with _secrets_lock:
        forms: set[str] = set(_secrets)
        for v in values:
            if not v or len(v) < MIN_SECRET_LEN:
                continue
            forms.add(v)
            forms.add(orjson.dumps(v).decode()[1:-1])  # as it appears inside a JSON line
            forms.add(repr(v)[1:-1])  # as it appears inside a repr
        if forms == _secrets:
            return
        _secrets.clear()
        _secrets.update(forms)
        # longest first: a secret that contains another is masked whole
        _secret_re = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def secrets_from_env(env: Mapping[str, str]) -> list[str]:
    """Every value of a variable whose name says key, secret, token or password (MARKETPIPE_API_KEYS's
    ``id:secret`` pairs included, each secret alone too)."""
    out: list[str] = []
    for name, value in env.items():
        if not value or not SECRET_VAR.search(name):
            continue
        out.append(value)
        for part in value.split(","):
            if ":" in part:
                out.append(part.split(":", 1)[1].strip())
    return out


def redact(text: str) -> str:
    pattern = _secret_re
    if pattern is not None:
        text = pattern.sub(MASK, text)
    for rx, repl in _PATTERNS:
        text = rx.sub(repl, text)
    return text


def _redact_rendered(_logger: Any, _name: str, event: Any) -> Any:
    """The last processor: the rendered line (exception text included) with every secret masked."""
    if isinstance(event, str):
        return redact(event)
    if isinstance(event, bytes):
        return redact(event.decode("utf-8", "replace"))
    return event


class _Stderr:
    """The current ``sys.stderr`` at each write (a test's capture, a redirected stream)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class RedactFilter(logging.Filter):
    """For stdlib loggers (uvicorn's): the message and any exception text, redacted, without locals."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except (TypeError, ValueError):
            msg = str(record.msg)
        record.msg, record.args = redact(msg), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
            record.exc_info = None
        return True


def guard_stdlib(names: Iterable[str] = ("uvicorn", "uvicorn.error", "uvicorn.access", "fastapi")) -> None:
    """Put :class:`RedactFilter` on these loggers and their handlers (idempotent)."""
    for name in names:
        lg = logging.getLogger(name)
        for target in (lg, *lg.handlers):
            if not any(isinstance(f, RedactFilter) for f in target.filters):
                target.addFilter(RedactFilter())


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    global _configured
    lvl = getattr(logging, (level or os.environ.get("MARKETPIPE_LOG_LEVEL", "WARNING")).upper(), 30)
    use_json = json if json is not None else os.environ.get("MARKETPIPE_LOG_FORMAT") == "json"
    register_secrets(secrets_from_env(os.environ))
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_json:
        processors += [
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors.append(
            structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
        )
    processors.append(_redact_rendered)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str) -> Any:
    if not _configured:
        configure()
    return structlog.get_logger(name)
