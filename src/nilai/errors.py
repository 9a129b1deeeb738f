"""The error hierarchy, and the one place HTTP status codes are chosen.

Every failure a client can see is a ``NilaiError``; ``to_error_body`` renders it in the OpenAI
shape ``{"error": {"message", "type", "param", "code"}}`` so the ``openai`` SDK raises the right
exception class with a readable message.

- ``InvalidRequest`` (400), ``ValidationFailed`` (422): the request is wrong; ``param`` names
  the field.
- ``AuthenticationFailed`` (401): missing or bad credentials; sent with ``WWW-Authenticate``.
- ``NotFound`` (404): unknown model or route.
- ``PayloadTooLarge`` (413): the body is over the size limit, or holds too many JSON items.
- ``UnsupportedMediaType`` (415): the body is declared as something other than JSON.
- ``RequestHeadersTooLarge`` (431), ``RequestTimeout`` (408), ``TooManyConnections`` (503):
  answered by the HTTP server itself (``nilai.gateway.server``) before the app sees a request.
- ``UpstreamUnavailable`` (503): no healthy model server could take the request.
- ``ShuttingDown`` (503): the replica is shutting down; another replica can take the request.
- ``UpstreamProtocolError`` (502): the model server answered with something unusable.
- ``UpstreamTimeout`` (504): the time limit passed.
- ``RateLimited`` (429): a rate or concurrency limit is reached; ``Retry-After`` says when, and
  ``x-should-retry: false`` tells SDKs not to sleep out a long wait.
- ``AccountsUnavailable`` (503): stored API keys or NUC accounts cannot be checked now (the
  accounts database is unreachable, or too many unknown keys are being checked); ``Retry-After``.
- ``PaymentRequired`` (402): the credit service holds too little of the caller's balance for
  the request's estimated cost (``insufficient_balance``); ``x-should-retry: false``.
- ``BillingUnavailable`` (503): the credit service (``NILAI_CREDIT_URL``) cannot be reached or
  answered with something unusable; ``Retry-After``.
- ``PricesUnavailable`` (503): ``PUT``/``DELETE /v1/pricing`` while the database is down.
- ``NotSupported`` (501): a nilai extra (web search, nilRAG) this gateway does not offer.
- ``ContextUnavailable`` (503): a service that private context comes from (nilDB, nilauth) is
  not configured or cannot be reached; ``ContextNotAccessible`` (403): the prompt document does
  not exist or this gateway may not read it; ``ContextCorrupt`` (502): what the service sent is
  unusable (shares that do not fit together), and is never used.
- ``InternalError`` (500): anything else; the message never carries internal detail.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from nilai.limits.base import Decision


class NilaiError(Exception):
    """Base of every error a client can see."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None
    log_each: ClassVar[bool] = True
    """Whether each occurrence is worth a log line; False where an outage is logged once."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}


class InvalidRequest(NilaiError):
    """The request cannot be served as sent."""

    status = 400
    type = "invalid_request_error"


class ValidationFailed(NilaiError):
    """A field of the request is missing or out of bounds."""

    status = 422
    type = "invalid_request_error"


class AuthenticationFailed(NilaiError):
    """The credentials are missing or not accepted."""

    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(NilaiError):
    """The caller may not use this endpoint."""

    status = 403
    type = "permission_error"
    default_code = "forbidden"


class PayloadTooLarge(NilaiError):
    """The request body is over the configured limit."""

    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class RequestHeadersTooLarge(NilaiError):
    """The request line and headers are over the configured limit."""

    status = 431
    type = "invalid_request_error"
    default_code = "request_headers_too_large"


class RequestTimeout(NilaiError):
    """The client did not send its request headers or body in time."""

    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class TooManyConnections(NilaiError):
    """This gateway process holds as many client connections as it may; retry shortly."""

    status = 503
    type = "service_unavailable"
    default_code = "too_many_connections"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class UnsupportedMediaType(NilaiError):
    """The body is declared with a ``Content-Type`` other than JSON."""

    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class NotFound(NilaiError):
    """The model or route does not exist."""

    status = 404
    type = "not_found_error"


class UpstreamUnavailable(NilaiError):
    """No healthy model server can take the request."""

    status = 503
    type = "service_unavailable"
    default_code = "model_unavailable"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # Retryable by nature: a model server may be back, or another one announced, shortly.
        super().__init__(
            message, param=param, code=code, headers={"Retry-After": "1", **(headers or {})}
        )


class UpstreamProtocolError(NilaiError):
    """The model server answered with something the gateway cannot relay."""

    status = 502
    type = "upstream_error"
    default_code = "bad_gateway"


class UpstreamTimeout(NilaiError):
    """The request ran past its time limit."""

    status = 504
    type = "timeout_error"
    default_code = "timeout"


class InternalError(NilaiError):
    """An unexpected failure; details stay in the logs."""

    status = 500
    type = "server_error"
    default_code = "internal_error"


def error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """Build the OpenAI error object."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def to_error_body(error: NilaiError) -> dict[str, Any]:
    """Render a ``NilaiError`` as the OpenAI error object."""
    return error_body(error.message, error.type, param=error.param, code=error.code)


class NotSupported(NilaiError):
    """A nilai feature this gateway does not offer (yet)."""

    status = 501
    type = "invalid_request_error"
    default_code = "not_supported"


MAX_RETRYABLE_WAIT_S = 5
"""The longest ``Retry-After`` a client's automatic retry is invited to wait out.

A longer wait (a minute, hour or day window) is answered with ``x-should-retry: false``, which
the openai SDKs obey, so the caller sees the 429 and its message at once instead of a silent
sleep. Short waits (a concurrency slot: 1 s) stay retryable.
"""


class RateLimited(NilaiError):
    """A limit is reached; the decision says which and for how long."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, decision: Decision) -> None:
        limit = decision.limit
        what = f"{limit.count} {limit.name}" if limit else "the rate limit"
        retry = decision.retry_after_s
        resets = limit is None or limit.resets
        when = f"Retry after {retry} s." if resets else "This limit does not reset."
        headers = {"Retry-After": str(retry), **rate_limit_headers(decision)}
        if retry > MAX_RETRYABLE_WAIT_S or not resets:
            # The openai SDKs would otherwise sleep out Retry-After (up to 2 min) per retry and
            # look hung; this header makes them raise RateLimitError with the message at once.
            headers["x-should-retry"] = "false"
        super().__init__(f"Rate limit reached: {what}. {when}", headers=headers)
        self.decision = decision


class ShuttingDown(NilaiError):
    """This replica is shutting down and ended the request before its grace period ran out."""

    status = 503
    type = "service_unavailable"
    default_code = "shutting_down"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class LimitsUnavailable(NilaiError):
    """The rate-limit store cannot be reached and the gateway fails closed."""

    status = 503
    type = "service_unavailable"
    default_code = "rate_limiter_unavailable"
    log_each = False  # the outage is logged when it starts and ends


class AccountsUnavailable(NilaiError):
    """A credential that needs the accounts database cannot be checked now; retry shortly."""

    status = 503
    type = "service_unavailable"
    default_code = "accounts_unavailable"
    log_each = False  # the outage is logged when it starts and ends

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class PaymentRequired(NilaiError):
    """The caller's balance at the credit service does not cover the request's estimated cost."""

    status = 402
    type = "insufficient_quota"
    default_code = "insufficient_balance"

    def __init__(self, message: str) -> None:
        # Retrying will not help until the balance is topped up: SDKs must not sleep on it.
        super().__init__(message, headers={"x-should-retry": "false"})


class BillingUnavailable(NilaiError):
    """The credit service cannot validate the credential or lock funds now; retry later."""

    status = 503
    type = "service_unavailable"
    default_code = "credit_service_unavailable"
    log_each = False  # the outage is logged when it starts and ends

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class PricesUnavailable(NilaiError):
    """The price database cannot be reached to change a price; retry shortly."""

    status = 503
    type = "service_unavailable"
    default_code = "prices_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ContextUnavailable(NilaiError):
    """Private context (a nilDB prompt, a delegation) cannot be had now: unconfigured or down."""

    status = 503
    type = "service_unavailable"
    default_code = "context_unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class ContextNotAccessible(Forbidden):
    """The prompt document does not exist, or its owner has not let this gateway read it."""

    default_code = "prompt_document_not_accessible"


class ContextCorrupt(NilaiError):
    """What nilDB returned does not fit together (inconsistent or tampered shares)."""

    status = 502
    type = "upstream_error"
    default_code = "prompt_document_corrupt"


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """``X-RateLimit-*`` headers for the limit that decided (reset in whole seconds)."""
    if decision.limit is None:
        return {}
    return {
        "X-RateLimit-Limit": str(decision.limit.count),
        "X-RateLimit-Remaining": str(max(0, decision.remaining)),
        "X-RateLimit-Reset": str(math.ceil(max(0.0, decision.reset_s))),
    }
