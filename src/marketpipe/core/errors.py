"""Typed errors with stable codes.

Every failure in marketpipe surfaces as a :class:`MarketpipeError` subclass. The ``code`` is part
of the public contract (CLI exit lines, API error bodies, metrics labels) and must never change
for an existing error kind; the message is for humans and may change.
"""

from __future__ import annotations

from typing import Any


class MarketpipeError(Exception):
    """Base of every marketpipe error. ``code`` is stable; ``retryable`` drives the retry policy."""

    code: str = "INTERNAL"
    http_status: int = 500
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
        provider: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.retry_after = retry_after
        self.provider = provider
        if provider is not None:
            self.details.setdefault("provider", provider)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# --- caller errors (never retried) ------------------------------------------------------------


class InvalidArgument(MarketpipeError):
    code = "INVALID_ARGUMENT"
    http_status = 400


class InvalidTimeframe(InvalidArgument):
    code = "INVALID_TIMEFRAME"


class InvalidSymbol(InvalidArgument):
    code = "INVALID_SYMBOL"


class InvalidRange(InvalidArgument):
    code = "INVALID_RANGE"


class PayloadTooLarge(InvalidArgument):
    """A request body over the gateway's bound (it is neither read further nor echoed)."""

    code = "PAYLOAD_TOO_LARGE"
    http_status = 413


class HeadersTooLarge(InvalidArgument):
    code = "HEADERS_TOO_LARGE"
    http_status = 431


class AuthThrottled(MarketpipeError):
    """Too many failed key attempts from one client address: refused for a while, keys not checked."""

    code = "AUTH_THROTTLED"
    http_status = 429


class DeadlineExceeded(MarketpipeError):
    """The gateway's per-request bound (``[server] request_timeout``) passed before an answer was ready."""

    code = "DEADLINE_EXCEEDED"
    http_status = 503


class ConfigError(MarketpipeError):
    code = "CONFIG_ERROR"
    http_status = 500


class MissingCredentials(ConfigError):
    code = "MISSING_CREDENTIALS"


# --- provider errors ---------------------------------------------------------------------------


class ProviderError(MarketpipeError):
    """Something a vendor said or did."""

    code = "PROVIDER_ERROR"
    http_status = 502


class AuthFailed(ProviderError):
    code = "AUTH_FAILED"
    http_status = 401


class NotEntitled(ProviderError):
    """The credentials are valid but the plan does not cover the request (e.g. recent SIP data)."""

    code = "NOT_ENTITLED"
    http_status = 403


class ProviderBadRequest(ProviderError):
    """The vendor rejected the request's parameters; its message is kept verbatim."""

    code = "PROVIDER_BAD_REQUEST"
    http_status = 400


class NotFound(ProviderError):
    code = "NOT_FOUND"
    http_status = 404


class RateLimited(ProviderError):
    code = "RATE_LIMITED"
    http_status = 429
    retryable = True


class ProviderUnavailable(ProviderError):
    """5xx, connection refused or reset, hung connection."""

    code = "PROVIDER_UNAVAILABLE"
    http_status = 503
    retryable = True


class ProviderTimeout(ProviderUnavailable):
    code = "PROVIDER_TIMEOUT"
    http_status = 504


class MalformedResponse(ProviderError):
    """The vendor answered with a body we cannot decode (truncated JSON, HTML page, wrong shape).

    Retryable: a truncated body is usually a transport accident and the next try is whole.
    """

    code = "MALFORMED_RESPONSE"
    http_status = 502
    retryable = True


class PaginationLoop(MalformedResponse):
    """The vendor answered a page with a continuation (``next_page_token``, ``next_url``) that was
    already followed in the same pagination: following it would loop forever.

    A kind of malformed answer, so a router fails over exactly as for one; not retried (asking for
    the same token again gets the same loop).
    """

    code = "PAGINATION_LOOP"
    retryable = False


class CircuitOpen(ProviderError):
    code = "CIRCUIT_OPEN"
    http_status = 503


class AllProvidersFailed(ProviderError):
    code = "ALL_PROVIDERS_FAILED"
    http_status = 503


# --- data and storage --------------------------------------------------------------------------


class DataInvalid(MarketpipeError):
    code = "DATA_INVALID"
    http_status = 422


class StaleData(MarketpipeError):
    code = "STALE_DATA"
    http_status = 503


class StoreError(MarketpipeError):
    code = "STORE_ERROR"
    http_status = 500


class OutputError(MarketpipeError):
    """A file the user asked for (``--output``, ``--html``, ``--png``) cannot be written; nothing partial is left."""

    code = "OUTPUT_ERROR"
    http_status = 500


class AddressInUse(MarketpipeError, OSError):
    """A server (``serve``, ``sim``) cannot listen: another process holds the host and port. Also an
    ``OSError`` (errno EADDRINUSE), as the bind failure it reports always was."""

    code = "ADDRESS_IN_USE"
    http_status = 500


class FeatureDisabled(MarketpipeError):
    """A part of the gateway switched off in the configuration (e.g. ``[stream] enabled = false``)."""

    code = "FEATURE_DISABLED"
    http_status = 503


ERROR_CODES: dict[str, type[MarketpipeError]] = {
    cls.code: cls
    for cls in (
        MarketpipeError,
        InvalidArgument,
        InvalidTimeframe,
        InvalidSymbol,
        InvalidRange,
        PayloadTooLarge,
        HeadersTooLarge,
        AuthThrottled,
        DeadlineExceeded,
        ConfigError,
        MissingCredentials,
        ProviderError,
        AuthFailed,
        NotEntitled,
        ProviderBadRequest,
        NotFound,
        RateLimited,
        ProviderUnavailable,
        ProviderTimeout,
        MalformedResponse,
        PaginationLoop,
        CircuitOpen,
        AllProvidersFailed,
        DataInvalid,
        StaleData,
        StoreError,
        OutputError,
        AddressInUse,
        FeatureDisabled,
    )
}
