"""Argument checks shared by every entry point (REST v1, the Alpaca-compatible API, the CLI, the
adapters and the services), each naming the parameter it checked.

Modelled on databento-python's ``common/validation.py`` (``validate_enum(value, enum, param)``): a
check either returns the value (canonicalised where that is its job) or raises a typed error whose
``details`` are ``{"parameter": param}``, so a caller can always tell which argument was refused.

A ``message`` given to a check replaces its default wording; it is a :meth:`str.format` template
that may use ``{param}`` and ``{value!r}`` (and, where they apply, ``{allowed}`` — the choices joined
by ", " — ``{choices}`` — "a or b", "one of a, b, c" — and ``{lo}``/``{hi}``). Messages are part of
the interface (tests and the Alpaca wire assert them), so every call site keeps its own."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Sequence, Sized
from datetime import datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from marketpipe.core.errors import InvalidArgument, InvalidSymbol, InvalidTimeframe
from marketpipe.core.schema import normalize_symbol
from marketpipe.core.timeframe import Timeframe, TimeframeLike

S = TypeVar("S", bound=str)
T = TypeVar("T")
N = TypeVar("N", int, float)

SORTS = ("asc", "desc")
_DIGITS = re.compile(r"^\d{1,9}$", re.ASCII)
_FIELD = re.compile(r"\{(\w+)(?:!(r))?\}")


def _details(param: str) -> dict[str, Any]:
    return {"parameter": param}


def _choices(allowed: Sequence[str]) -> str:
    """``a or b`` for two choices, ``one of a, b, c`` for more."""
    if len(allowed) == 2:
        return f"{allowed[0]} or {allowed[1]}"
    return "one of " + ", ".join(allowed)


def _say(template: str, **fields: Any) -> str:
    """``template`` with its ``{name}`` / ``{name!r}`` placeholders filled from ``fields``; any other
    brace is left as it is, so a template may carry text of its own (provider names, say) verbatim."""

    def fill(m: re.Match[str]) -> str:
        name, conv = m.group(1), m.group(2)
        if name not in fields:
            return m.group(0)
        v = fields[name]
        return repr(v) if conv == "r" else str(v)

    return _FIELD.sub(fill, template)


def validate_enum(
    value: str,
    allowed: Iterable[S],
    param: str,
    *,
    message: str | None = None,
    casefold: bool = False,
) -> S:
    """``value`` if it is one of ``allowed`` (with ``casefold``, compared case-insensitively and
    returned in the spelling of ``allowed``); else INVALID_ARGUMENT naming ``param``. The default
    message is ``{param} must be {choices}``."""
    choices = list(allowed)
    if isinstance(value, str):
        want = value.casefold() if casefold else value
        for a in choices:
            if (a.casefold() if casefold else a) == want:
                return a
    template = message if message is not None else "{param} must be {choices}"
    raise InvalidArgument(
        _say(template, param=param, value=value, allowed=", ".join(choices), choices=_choices(choices)),
        details=_details(param),
    )


def validate_sort(value: str, param: str = "sort", *, message: str | None = None) -> str:
    """``asc`` or ``desc`` (default message ``sort must be asc or desc``)."""
    return validate_enum(value, SORTS, param, message=message)


def validate_limit(
    value: int | str,
    lo: int,
    hi: int,
    param: str = "limit",
    *,
    message: str | None = None,
) -> int:
    """An integer in ``[lo, hi]``. A string (a query parameter passed through untouched) must be
    plain decimal digits. Default message ``{param} must be {lo}..{hi}``."""
    n: int | None
    if isinstance(value, bool):
        n = None
    elif isinstance(value, int):
        n = value
    elif isinstance(value, str) and _DIGITS.match(value):
        n = int(value)
    else:
        n = None
    if n is None or not lo <= n <= hi:
        template = message if message is not None else "{param} must be {lo}..{hi}"
        raise InvalidArgument(_say(template, param=param, value=value, lo=lo, hi=hi), details=_details(param))
    return n


def validate_number(
    value: N,
    param: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    message: str | None = None,
) -> N:
    """A finite number within the bounds given (``gt``/``ge`` below, ``lt``/``le`` above)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (gt is None or value > gt) and (ge is None or value >= ge)
    ok = ok and (lt is None or value < lt) and (le is None or value <= le)
    if not ok:
        if message is None:
            bounds = [f"{op} {b:g}" for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None]
            message = "{param} must be " + (" and ".join(bounds) or "a finite number") + ", got {value}"
        raise InvalidArgument(_say(message, param=param, value=value), details=_details(param))
    return value


def validate_required(value: T | None, param: str, *, message: str | None = None) -> T:
    """``value`` unless it is missing (``None``, or an empty string or collection); default message
    ``{param} is required``."""
    if value is None or (isinstance(value, Sized) and len(value) == 0):
        raise InvalidArgument(_say(message or "{param} is required", param=param, value=value), details=_details(param))
    return value


def validate_type(value: Any, types: type | tuple[type, ...], param: str, *, message: str | None = None) -> Any:
    """``value`` if it is an instance of ``types`` (``type(None)`` among them allows null)."""
    if not isinstance(value, types):
        names = [t.__name__ for t in (types if isinstance(types, tuple) else (types,))]
        template = message if message is not None else "{param} must be {choices}"
        raise InvalidArgument(
            _say(template, param=param, value=value, allowed=", ".join(names), choices=_choices(names)),
            details=_details(param),
        )
    return value


def validate_symbol(raw: str, param: str = "symbol", *, message: str | None = None) -> str:
    """One symbol in canonical form; INVALID_SYMBOL (``details={"symbol": raw}``) when malformed, with
    ``message`` (template with ``{value}``) in place of the default wording when given."""
    if message is None:
        return normalize_symbol(raw)
    try:
        return normalize_symbol(raw)
    except InvalidSymbol as exc:
        raise InvalidSymbol(_say(message, value=raw, param=param), details={"symbol": raw}) from exc


def validate_symbols(
    symbols: str | Sequence[str] | None,
    param: str = "symbols",
    *,
    message: str = "no symbols given",
    normalize: bool = True,
    symbol_message: str | None = None,
) -> list[str]:
    """At least one symbol, duplicates dropped (first occurrence kept). A string is split at commas
    and blank items are skipped. With ``normalize`` each is brought to canonical form
    (:func:`~marketpipe.core.schema.normalize_symbol`); a malformed one raises INVALID_SYMBOL, with
    ``symbol_message`` (template with ``{value}``) in place of its own message when given."""
    items = symbols.split(",") if isinstance(symbols, str) else list(symbols or ())
    items = [s.strip() if isinstance(s, str) else s for s in items]
    out: list[str] = []
    for raw in items:
        if isinstance(raw, str) and not raw:
            continue
        sym = validate_symbol(raw, param, message=symbol_message) if normalize else raw
        if sym not in out:
            out.append(sym)
    if not out:
        raise InvalidArgument(_say(message, param=param, value=symbols), details=_details(param))
    return out


def validate_timeframe(
    value: TimeframeLike | Timeframe | None,
    param: str = "timeframe",
    *,
    message: str | None = None,
    allowed: Collection[Timeframe] | None = None,
) -> Timeframe:
    """A :class:`Timeframe` parsed from ``value``: INVALID_TIMEFRAME naming ``param`` when it does
    not parse (its own message unless ``message`` is given) or is not among ``allowed``."""
    try:
        tf = value if isinstance(value, Timeframe) else Timeframe.parse(value or "")
    except InvalidTimeframe as exc:
        raise InvalidTimeframe(
            exc.message if message is None else _say(message, param=param, value=value),
            details={**exc.details, **_details(param)} if message is None else _details(param),
        ) from exc
    if allowed is not None and tf not in allowed:
        names = [str(t) for t in allowed]
        template = message if message is not None else "{param} must be {choices}"
        raise InvalidTimeframe(
            _say(template, param=param, value=tf, allowed=", ".join(names), choices=_choices(names)),
            details={"timeframe": str(tf), **_details(param)},
        )
    return tf


def validate_range(
    start: datetime, end: datetime, param: str = "end", *, message: str | None = None, allow_empty: bool = False
) -> None:
    """``end`` after ``start`` (with ``allow_empty``, not before it); default message
    ``end must be after start``."""
    if end < start or (end == start and not allow_empty):
        template = message or "{param} must be after start"
        raise InvalidArgument(_say(template, param=param, value=end), details=_details(param))


def validate_time_zone(value: str, param: str = "tz", *, message: str | None = None) -> str:
    """``value`` if it names an IANA time zone (``America/New_York``, ``UTC``); else INVALID_ARGUMENT
    naming ``param`` (default message ``{param} must be an IANA time zone name ..., not {value!r}``)."""
    if isinstance(value, str) and value.strip() == value and value:
        try:
            ZoneInfo(value)
            return value
        except (ZoneInfoNotFoundError, ValueError):
            pass
    template = (
        message
        if message is not None
        else "{param} must be an IANA time zone name such as 'America/New_York', not {value!r}"
    )
    raise InvalidArgument(_say(template, param=param, value=value), details=_details(param))


DATASET_SCHEMES = ("parquet://", "s3://")


def validate_dataset_url(value: Any, param: str = "source", *, message: str | None = None) -> str:
    """``value`` if it names a Parquet cold-tier dataset: ``parquet://PATH`` (``parquet:///abs/path``) or
    ``s3://BUCKET[/prefix]``; else INVALID_ARGUMENT naming ``param``."""
    if isinstance(value, str) and value.strip().startswith(DATASET_SCHEMES) and value.strip() not in DATASET_SCHEMES:
        return value.strip()
    template = message if message is not None else "{param} must be parquet://PATH or s3://BUCKET/prefix, not {value!r}"
    raise InvalidArgument(_say(template, param=param, value=value), details=_details(param))
