"""The bus's subjects and streams, declared once.

| subject | stream | retention | what |
|---|---|---|---|
| ``mp.raw.<vendor>.<kind>.<sym>`` | ``MP_RAW`` | limits, ``raw_max_age`` (1 d) | raw market data as received |
| ``mp.norm.<kind>.<sym>`` | ``MP_NORM`` | limits, ``norm_max_age`` (7 d) | normalized bars (pages stored) |
| ``mp.quality.<severity>.<sym>`` | ``MP_QUALITY`` | limits, ``quality_max_age`` (30 d) | data-quality alerts |
| ``mp.corpact.<type>.<sym>`` | ``MP_CORPACT`` | limits, ``corpact_max_age`` (365 d) | corporate actions applied |
| ``mp.health.<provider>`` | ``MP_HEALTH`` | limits, ``health_max_age`` (1 d) | provider health |
| ``mp.backfill.work.<key>`` | ``MP_BACKFILL`` | work queue | distributed backfill items |
| ``mp.backfill.dead.<key>`` | ``MP_DEAD`` | limits, 30 d | items that ran out of ``max_deliver``, with the error |
| ``mp.backfill.progress.<run>`` | core NATS | none | worker progress (the coordinator's bar) |
| ``mp.live.<feed>`` | core NATS | none | one message per upstream stream frame |

NATS subject tokens cannot hold ``.`` (``BRK.B``), ``*``, ``>`` or whitespace: :func:`token` encodes a
symbol (``.`` → ``_``, the others percent-style), and :func:`symbol_of` reverses it.
"""

from __future__ import annotations

import hashlib

from marketpipe.core.config import BusConfig

PREFIX = "mp"
WORK_STREAM = "MP_BACKFILL"
DEAD_STREAM = "MP_DEAD"
WORK_SUBJECTS = f"{PREFIX}.backfill.work.>"
DEAD_SUBJECTS = f"{PREFIX}.backfill.dead.>"
WORK_DURABLE = "workers"
KV_LEASES = "mp_leases"
KV_RATE = "mp_rate"

_ESCAPES = {"*": "%2A", ">": "%3E", " ": "%20", "\t": "%09", "%": "%25"}


def token(symbol: str) -> str:
    """``symbol`` as one subject token: ``BRK.B`` → ``BRK_B``; ``BTC/USD`` stays (``/`` is legal)."""
    out = "".join(_ESCAPES.get(c, c) for c in symbol).replace(".", "_")
    return out or "_"


def symbol_of(tok: str) -> str:
    """The symbol a token names (stock symbols hold no ``_``, so ``_`` is always a dot)."""
    s = tok.replace("_", ".")
    for c, esc in _ESCAPES.items():
        if c != "%":
            s = s.replace(esc, c)
    return s.replace("%25", "%")


def raw(vendor: str, kind: str, symbol: str) -> str:
    return f"{PREFIX}.raw.{vendor}.{kind}.{token(symbol)}"


def norm(kind: str, symbol: str) -> str:
    return f"{PREFIX}.norm.{kind}.{token(symbol)}"


def quality(severity: str, symbol: str | None) -> str:
    return f"{PREFIX}.quality.{severity}.{token(symbol) if symbol else '_all'}"


def corpact(kind: str, symbol: str) -> str:
    return f"{PREFIX}.corpact.{kind}.{token(symbol)}"


def health(provider: str) -> str:
    return f"{PREFIX}.health.{token(provider)}"


def live(feed: str) -> str:
    return f"{PREFIX}.live.{token(feed)}"


def key_hash(msg_id: str) -> str:
    """A subject-safe, fixed-length stand-in for a message id (work items are addressed by it)."""
    return hashlib.sha256(msg_id.encode()).hexdigest()[:24]


def work(msg_id: str) -> str:
    return f"{PREFIX}.backfill.work.{key_hash(msg_id)}"


def dead(msg_id: str) -> str:
    return f"{PREFIX}.backfill.dead.{key_hash(msg_id)}"


def progress(run: str) -> str:
    return f"{PREFIX}.backfill.progress.{token(run)}"


def event_streams(cfg: BusConfig) -> dict[str, tuple[str, float]]:
    """Stream name → (its subjects, max age in seconds) of the event kinds (LIMITS retention)."""
    return {
        "MP_RAW": (f"{PREFIX}.raw.>", cfg.raw_max_age),
        "MP_NORM": (f"{PREFIX}.norm.>", cfg.norm_max_age),
        "MP_QUALITY": (f"{PREFIX}.quality.>", cfg.quality_max_age),
        "MP_CORPACT": (f"{PREFIX}.corpact.>", cfg.corpact_max_age),
        "MP_HEALTH": (f"{PREFIX}.health.>", cfg.health_max_age),
        DEAD_STREAM: (DEAD_SUBJECTS, 30 * 86_400.0),
    }
