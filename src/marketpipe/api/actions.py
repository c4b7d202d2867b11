"""Corporate actions over HTTP: marketpipe's own ``/v1/actions`` and the Alpaca-compatible
``/v1/corporate-actions`` (wire format: ``wire/alpaca_actions.py``), both over the actions service
(ledger first, then the providers with failover; versioned store).

The compatible route answers as the vendor does: ``start``/``end`` (days, default today) filter on
``process_date`` (an action from a vendor without process dates: on its adjustment date), every one of
the 15 plural keys is present (empty arrays included), an action of a type outside them appears under
its own plural key, pages are ``limit`` rows of all types together (default 100, at most 1000) with a
``next_page_token``. ``symbols`` is required (marketpipe fetches actions per symbol), ``ids`` and
``cusips`` are refused rather than faked. Actions Alpaca sent are served as received; ones from another
vendor are written in Alpaca's fields, their ``id`` marketpipe's action id."""

from __future__ import annotations

import base64
import binascii
from datetime import date
from typing import Annotated, Any

import orjson
import polars as pl
from fastapi import APIRouter, Query
from starlette.responses import Response

from marketpipe.api.state import StateDep
from marketpipe.core.errors import InvalidArgument
from marketpipe.core.schema import ACTION_TYPES, normalize_symbols
from marketpipe.core.timeutil import NY, utcnow
from marketpipe.core.validation import validate_enum
from marketpipe.wire.alpaca_actions import DEFAULT_LIMIT, MAX_LIMIT, PLURAL, PROCESS_LAG, SORTS, page_body, to_record

JSON = "application/json; charset=utf-8"
Q = Annotated[str | None, Query()]


def _day(text: str | None, name: str, default: date) -> date:
    if not text:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"invalid {name}", details={"parameter": name}) from None


def _rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    return [
        {k: (v.isoformat() if isinstance(v, date) else v) for k, v in r.items() if k not in ("raw", "content_hash")}
        for r in frame.to_dicts()
    ]


def actions_router() -> APIRouter:
    r = APIRouter(tags=["corporate actions"])

    @r.get("/v1/actions", summary="Corporate actions: stored (fetched first where the ledger lacks them), attributed")
    async def actions(
        st: StateDep,
        symbols: Annotated[str, Query(description="comma-separated, e.g. AAPL,NVDA")],
        start: Annotated[str, Query(description="YYYY-MM-DD: adjustment dates from")],
        end: Q = None,
        types: Annotated[str | None, Query(description="comma-separated canonical types")] = None,
        as_of: Annotated[str | None, Query(description="only actions known by this day")] = None,
        provider: Q = None,
    ) -> Response:
        frame = await st.data.corporate_actions(symbols, start, end, types=types, as_of=as_of, provider=provider)
        doc = {
            "actions": _rows(frame),
            "sources": sorted(set(frame["source"].drop_nulls().to_list())),
            "count": frame.height,
        }
        return Response(orjson.dumps(doc), media_type=JSON)

    @r.get("/v1/corporate-actions", summary="Alpaca-compatible corporate actions (alpaca-py CorporateActionsClient)")
    async def corporate_actions(
        st: StateDep,
        symbols: Q = None,
        types: Q = None,
        start: Q = None,
        end: Q = None,
        limit: Q = None,
        sort: Q = None,
        page_token: Q = None,
        ids: Q = None,
        cusips: Q = None,
    ) -> Response:
        if ids or cusips:
            raise InvalidArgument(
                "ids and cusips are not served: marketpipe looks corporate actions up by symbol",
                details={"parameter": "ids" if ids else "cusips"},
            )
        if not symbols:
            message = "symbols is required: marketpipe fetches corporate actions per symbol"
            raise InvalidArgument(message, details={"parameter": "symbols"})
        syms = normalize_symbols(symbols)
        kinds = [t.strip() for t in (types or "").split(",") if t.strip()]
        for t in kinds:
            validate_enum(t, ACTION_TYPES, "types", message="invalid types")
        raw_limit = limit or str(DEFAULT_LIMIT)
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise InvalidArgument("invalid limit", details={"parameter": "limit"})
        order = sort or "asc"
        validate_enum(order, SORTS, "sort", message="invalid sort")
        today = utcnow().astimezone(NY).date()
        s, e = _day(start, "start", today), _day(end, "end", today)
        if e < s:
            raise InvalidArgument("end should not be before start", details={"parameter": "end"})
        offset = 0
        if page_token:
            try:
                offset = int(base64.b64decode(page_token, validate=True).decode())
            except (ValueError, binascii.Error, UnicodeDecodeError):
                raise InvalidArgument("invalid page token", details={"parameter": "page_token"}) from None
        # process dates trail adjustment dates: ask for adjustment dates back to start - lag, then filter
        frame = await st.data.corporate_actions(syms, s - PROCESS_LAG, min(e, today), types=kinds or None)
        when = pl.coalesce("process_date", "ex_date", "effective_date")
        frame = frame.filter(when.is_between(s, e)).with_columns(when.alias("_when"))
        frame = frame.sort(["_when", "type", "action_id"], descending=order == "desc")
        n = int(raw_limit)
        page = frame.slice(offset, n)
        groups: dict[str, list[dict[str, Any]]] = {key: [] for key in PLURAL.values()}
        for row in page.drop("_when").to_dicts():
            key, rec = to_record(row)
            groups.setdefault(key, []).append(rec)
        more = offset + n < frame.height
        token = base64.b64encode(str(offset + n).encode()).decode() if more else None
        headers = {"X-Marketpipe-Source": ",".join(sorted(set(frame["source"].drop_nulls().to_list())))}
        return Response(page_body(groups, token), media_type=JSON, headers=headers)

    return r


__all__ = ["actions_router"]
