"""Typed errors with stable codes.

Every failure in marketpipe surfaces as a :class:`MarketpipeError` subclass. The ``code`` is part
of the public contract (CLI exit lines, API error bodies, metrics labels) and must never change
for an existing error kind; the message is for humans and may change.

Every code marketpipe puts on the wire or compares lives here, once (``tests/core/test_errors.py``
walks ``src`` for stray literals): the exception classes below with their HTTP status, collected in
:data:`ERROR_CODES`, and the router's skip reasons (why a provider was left out of a call, recorded on
an attempt, never raised), collected in :data:`SKIP_REASONS`. Elsewhere, use ``SomeError.code``.
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


class InvalidOptionSymbol(InvalidSymbol):
    """Not an OCC option symbol (ROOT + YYMMDD + C|P + strike x 1000 in 8 digits), or one whose
    fields disagree with the contract it names."""

    code = "INVALID_OPTION_SYMBOL"


class ContractExpired(InvalidArgument):
    """An option contract asked for live data (quote, snapshot, stream) after its expiration date."""

    code = "CONTRACT_EXPIRED"


class PayloadTooLarge(InvalidArgument):
    """A request body over the gateway's bound (it is neither read further nor echoed)."""

    code = "PAYLOAD_TOO_LARGE"
    http_status = 413


class HeadersTooLarge(InvalidArgument):
    code = "HEADERS_TOO_LARGE"
    http_status = 431


class InvalidMessage(InvalidArgument):
    """A live-stream client sent something that is not a JSON object with an action."""

    code = "INVALID_MESSAGE"


class InvalidAction(InvalidMessage):
    """A live-stream client message with an action other than subscribe, unsubscribe or ping."""

    code = "INVALID_ACTION"


class InvalidSymbols(InvalidMessage):
    """A live-stream (un)subscribe whose ``symbols`` is not a non-empty list of strings."""

    code = "INVALID_SYMBOLS"


class MessageTooLarge(InvalidMessage):
    """A live-stream client message over the gateway's size bound."""

    code = "MESSAGE_TOO_LARGE"
    http_status = 413


class UnknownSymbol(InvalidSymbol):
    """A well-formed symbol that no vendor knows (no snapshot anywhere); told as a warning on the live
    stream, where the subscription is kept."""

    code = "UNKNOWN_SYMBOL"
    http_status = 404


class Unauthenticated(MarketpipeError):
    """A gateway request without a client key (or admin token) where one is required."""

    code = "UNAUTHENTICATED"
    http_status = 401


class Forbidden(MarketpipeError):
    """A gateway request whose key (or admin token) is not one the gateway knows."""

    code = "FORBIDDEN"
    http_status = 403


class MethodNotAllowed(MarketpipeError):
    code = "METHOD_NOT_ALLOWED"
    http_status = 405


class HttpError(MarketpipeError):
    """Any other HTTP error status of the web framework, with its own status."""

    code = "HTTP_ERROR"
    http_status = 400


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


class ObjectStoreError(MarketpipeError):
    """The Parquet cold tier's object store (S3 or compatible) failed in a way no subclass names: the
    message carries the store's own error, never a credential."""

    code = "OBJECT_STORE_ERROR"
    http_status = 502


class ObjectStoreUnreachable(ObjectStoreError):
    """The object store's endpoint cannot be connected to (wrong ``AWS_ENDPOINT_URL`` /
    ``[export] endpoint_url``, server down, network)."""

    code = "OBJECT_STORE_UNREACHABLE"
    http_status = 503
    retryable = True


class BucketNotFound(ObjectStoreError):
    """The bucket named in an ``s3://BUCKET/prefix`` URL does not exist (marketpipe never creates one)."""

    code = "BUCKET_NOT_FOUND"
    http_status = 404


class ObjectStoreDenied(ObjectStoreError):
    """The object store refused the credentials (unknown key, bad signature, no permission)."""

    code = "OBJECT_STORE_DENIED"
    http_status = 403


class DatasetNotFound(MarketpipeError):
    """``source="parquet://PATH"`` / ``s3://…``: nothing is there (no directory, no object under the prefix)."""

    code = "DATASET_NOT_FOUND"
    http_status = 404


class NothingToExport(MarketpipeError):
    """``marketpipe export``: the store holds no bars of any of the symbols in the range asked for."""

    code = "NOTHING_TO_EXPORT"
    http_status = 404


class GatewayUnavailable(MarketpipeError):
    """``mp.client(gateway=URL)``: the marketpipe gateway at URL cannot be reached or did not answer in
    its own format (is ``marketpipe serve`` running there?)."""

    code = "GATEWAY_UNAVAILABLE"
    http_status = 503
    retryable = True


class OutputError(MarketpipeError):
    """A file the user asked for (``--output``, ``--html``, ``--png``) cannot be written; nothing partial is left."""

    code = "OUTPUT_ERROR"
    http_status = 500


class AddressInUse(MarketpipeError, OSError):
    """A server (``serve``, ``sim``) cannot listen: another process holds the host and port. Also an
    ``OSError`` (errno EADDRINUSE), as the bind failure it reports always was."""

    code = "ADDRESS_IN_USE"
    http_status = 500


class BusUnavailable(MarketpipeError):
    """The NATS JetStream bus (``[bus] url``) cannot be reached within ``[bus] connect_timeout``, or refused
    a request (stream, consumer, key-value bucket)."""

    code = "BUS_UNAVAILABLE"
    http_status = 503
    retryable = True


class FeatureDisabled(MarketpipeError):
    """A part of the gateway switched off in the configuration (e.g. ``[stream] enabled = false``)."""

    code = "FEATURE_DISABLED"
    http_status = 503


class SlowConsumer(MarketpipeError):
    """A live-stream client that lets its queue fill: warned first, then disconnected."""

    code = "SLOW_CONSUMER"
    http_status = 503


class StreamFailed(MarketpipeError):
    """The live stream a client (``marketpipe stream``) reads from reported an error or ended.
    :class:`marketpipe.cli.stream.StreamError` (a subclass) carries the stream's own code when it sends one."""

    code = "STREAM_ERROR"
    http_status = 502


class StreamClosed(StreamFailed):
    code = "STREAM_CLOSED"


class StreamUnavailable(StreamFailed):
    """The stream cannot be had at all: the gateway's upstream is down and no fallback vendor serves it."""

    code = "STREAM_UNAVAILABLE"
    http_status = 503


class MalformedMessage(StreamFailed):
    """The stream sent a frame that is not JSON, or a message that lacks a value its kind needs (counted
    and logged, never filled in)."""

    code = "MALFORMED_MESSAGE"


class OrderbookNotReset(MarketpipeError):
    """An incremental crypto order-book update arrived before any full book (``r: true``) for its
    symbol: the local book is unknown, so the update cannot be applied. Nothing is changed; the
    message is still delivered as received, and the book is built from the next reset."""

    code = "ORDERBOOK_NOT_RESET"
    http_status = 502


# --- alert sinks (marketpipe.alerts) ---------------------------------------------------------------


class AlertSinkFailed(MarketpipeError):
    """An alert sink refused a notification (a 4xx other than 429, a rejected SMTP command): not retried."""

    code = "ALERT_SINK_FAILED"
    http_status = 502


class AlertSinkUnavailable(AlertSinkFailed):
    """An alert sink could not take a notification now (429, 5xx, connection trouble): retried with backoff,
    honouring ``Retry-After``."""

    code = "ALERT_SINK_UNAVAILABLE"
    retryable = True


# --- router skip reasons ---------------------------------------------------------------------------
# Why the router left a provider out of a call (the ``code`` of a skipped attempt, beside the codes of
# the errors a tried provider raised). Not raised; listed in /health and in ALL_PROVIDERS_FAILED details.

UNSUPPORTED = "UNSUPPORTED"  # the provider does not serve this kind, timeframe, range or feed
PROVIDER_DOWN = "PROVIDER_DOWN"  # the health monitor reports it down
DISABLED = "DISABLED"  # ``enabled = false`` in its config
SKIP_REASONS = frozenset({UNSUPPORTED, PROVIDER_DOWN, DISABLED})


ERROR_CODES: dict[str, type[MarketpipeError]] = {
    cls.code: cls
    for cls in (
        MarketpipeError,
        InvalidArgument,
        InvalidTimeframe,
        InvalidSymbol,
        InvalidRange,
        InvalidOptionSymbol,
        ContractExpired,
        PayloadTooLarge,
        HeadersTooLarge,
        InvalidMessage,
        InvalidAction,
        InvalidSymbols,
        MessageTooLarge,
        UnknownSymbol,
        Unauthenticated,
        Forbidden,
        MethodNotAllowed,
        HttpError,
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
        ObjectStoreError,
        ObjectStoreUnreachable,
        BucketNotFound,
        ObjectStoreDenied,
        DatasetNotFound,
        NothingToExport,
        GatewayUnavailable,
        OutputError,
        AddressInUse,
        FeatureDisabled,
        BusUnavailable,
        SlowConsumer,
        StreamFailed,
        StreamClosed,
        StreamUnavailable,
        MalformedMessage,
        OrderbookNotReset,
        AlertSinkFailed,
        AlertSinkUnavailable,
    )
}
"""Every error code and its class (a code belongs to one class only; the gateway's 404 for a path it
has no route for answers with :class:`NotFound`'s code)."""

# The codes that mean "the gateway's upstream is in trouble": answered 503 whatever the vendor said.
UPSTREAM_DOWN: frozenset[str] = frozenset(
    cls.code
    for cls in (
        AllProvidersFailed,
        ProviderUnavailable,
        CircuitOpen,
        ProviderTimeout,
        RateLimited,
        StaleData,
        AuthFailed,  # the gateway's own vendor credentials: the caller can do nothing about it
        MalformedResponse,
        PaginationLoop,
    )
)

__all__ = [
    "DISABLED",
    "ERROR_CODES",
    "PROVIDER_DOWN",
    "SKIP_REASONS",
    "UNSUPPORTED",
    "UPSTREAM_DOWN",
    "AddressInUse",
    "AlertSinkFailed",
    "AlertSinkUnavailable",
    "AllProvidersFailed",
    "AuthFailed",
    "AuthThrottled",
    "BucketNotFound",
    "BusUnavailable",
    "CircuitOpen",
    "ConfigError",
    "ContractExpired",
    "DataInvalid",
    "DatasetNotFound",
    "DeadlineExceeded",
    "FeatureDisabled",
    "Forbidden",
    "GatewayUnavailable",
    "HeadersTooLarge",
    "HttpError",
    "InvalidAction",
    "InvalidArgument",
    "InvalidMessage",
    "InvalidOptionSymbol",
    "InvalidRange",
    "InvalidSymbol",
    "InvalidSymbols",
    "InvalidTimeframe",
    "MalformedMessage",
    "MalformedResponse",
    "MarketpipeError",
    "MessageTooLarge",
    "MethodNotAllowed",
    "MissingCredentials",
    "NotEntitled",
    "NotFound",
    "NothingToExport",
    "ObjectStoreDenied",
    "ObjectStoreError",
    "ObjectStoreUnreachable",
    "OrderbookNotReset",
    "OutputError",
    "PaginationLoop",
    "PayloadTooLarge",
    "ProviderBadRequest",
    "ProviderError",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RateLimited",
    "SlowConsumer",
    "StaleData",
    "StoreError",
    "StreamClosed",
    "StreamFailed",
    "StreamUnavailable",
    "Unauthenticated",
    "UnknownSymbol",
]
