"""Nillion's credit service (nilauth-credit): validate a credential, lock funds, unlock them.

The wire protocol is the one ``nilauth-credit-middleware`` 0.1.3 speaks, with the service's
API token as ``Authorization: Bearer``:

- ``POST /v1/credential/validate`` ``{"credential_key", "is_public"}`` -> 200
  ``{"user_id", "is_valid", "is_public"}``; 404 unknown credential, 401 inactive one.
- ``POST /v1/balance/lock/private`` (an API key) or ``/v1/balance/lock/public`` (a public
  identifier: a NUC subscription holder's DID) ``{"credential", "amount"}`` -> 200
  ``{"lock_id"}``; 404 unknown user, 400 insufficient balance.
- ``POST /v1/balance/unlock`` ``{"lock_id", "real_cost"}`` -> 200; 404 unknown lock, 400 an
  unlock the service refuses (e.g. one already made).
- ``GET /v1/health`` -> 200.

Errors are ``{"error": "..."}``. Amounts are JSON numbers in the service's unit; nilai counts in
integer micro-units and converts only at this edge (``amount_json``), so nothing drifts.

Why not the middleware package itself: it opens its own ``httpx`` client per process (one
shared pooled client is the rule here), prints every lock answer to stdout, raises FastAPI's
``HTTPException`` from a client library, turns every lock failure into 402 (an outage included),
and pulls ``fastapi[standard]`` in. The protocol is four small calls; they are made here, on the
gateway's shared client, with a bounded answer size and a timeout per call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

import httpx
import orjson
from pydantic import SecretStr

from nilai.billing.prices import amount_json
from nilai.upstream.http import read_capped

logger = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024
"""No answer of the credit service is more than a few hundred bytes."""
MAX_ID_CHARS = 190
"""A user id or lock id longer than this is not one the service would make (an account name
is ``credit:<user id>``, at most 200 characters)."""


class CreditUnavailable(Exception):
    """The credit service could not be reached or answered with something unusable.

    The message names the failure's kind only (never a credential, never the service's text).
    """


class CredentialRejected(Exception):
    """The credit service does not know the credential, or it is inactive."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InsufficientBalance(Exception):
    """The credit service refused to lock the amount: the user's balance does not cover it."""


class UnlockRefused(Exception):
    """The credit service refused an unlock (an unknown lock, or one already unlocked)."""


@dataclass(frozen=True, slots=True)
class CreditHolder:
    """Who a valid credential belongs to at the credit service."""

    user_id: str
    public: bool


class CreditService(Protocol):
    """The three calls metering needs; ``HttpCreditService`` is the real one."""

    async def validate(self, credential: str, *, public: bool) -> CreditHolder:
        """The holder of a valid credential; ``CredentialRejected`` or ``CreditUnavailable``."""
        ...

    async def lock(self, credential: str, amount_micro: int, *, public: bool) -> str:
        """Lock ``amount_micro`` of the holder's balance; the lock id.

        Raises ``InsufficientBalance``, ``CredentialRejected`` (unknown holder) or
        ``CreditUnavailable``.
        """
        ...

    async def unlock(self, lock_id: str, cost_micro: int) -> None:
        """Release a lock, charging ``cost_micro``; ``UnlockRefused`` or ``CreditUnavailable``."""
        ...


class HttpCreditService:
    """The credit service over HTTP, on the gateway's shared client."""

    def __init__(
        self, http: httpx.AsyncClient, base_url: str, api_token: SecretStr, *, timeout_s: float
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._token = api_token
        self._timeout_s = timeout_s

    async def validate(self, credential: str, *, public: bool) -> CreditHolder:
        """See ``CreditService.validate``."""
        status, data = await self._post(
            "/v1/credential/validate", {"credential_key": credential, "is_public": public}
        )
        if status == HTTPStatus.NOT_FOUND:
            raise CredentialRejected("unknown")
        if status == HTTPStatus.UNAUTHORIZED:
            raise CredentialRejected("inactive")
        if status != HTTPStatus.OK:
            raise CreditUnavailable(f"validate answered {status}")
        valid = data.get("is_valid")
        user_id = _identifier(data.get("user_id"), "user_id")
        if not isinstance(valid, bool):
            raise CreditUnavailable("validate answered without is_valid")
        if not valid:
            raise CredentialRejected("invalid")
        return CreditHolder(user_id=user_id, public=public)

    async def lock(self, credential: str, amount_micro: int, *, public: bool) -> str:
        """See ``CreditService.lock``."""
        path = "/v1/balance/lock/public" if public else "/v1/balance/lock/private"
        status, data = await self._post(
            path, {"credential": credential, "amount": amount_json(amount_micro)}
        )
        if status == HTTPStatus.BAD_REQUEST:
            raise InsufficientBalance()
        if status == HTTPStatus.NOT_FOUND:
            raise CredentialRejected("unknown")
        if status != HTTPStatus.OK:
            raise CreditUnavailable(f"lock answered {status}")
        return _identifier(data.get("lock_id"), "lock_id")

    async def unlock(self, lock_id: str, cost_micro: int) -> None:
        """See ``CreditService.unlock``."""
        status, _ = await self._post(
            "/v1/balance/unlock", {"lock_id": lock_id, "real_cost": amount_json(cost_micro)}
        )
        if status in (HTTPStatus.BAD_REQUEST, HTTPStatus.NOT_FOUND):
            raise UnlockRefused(f"unlock answered {status}")
        if status != HTTPStatus.OK:
            raise CreditUnavailable(f"unlock answered {status}")

    async def _post(self, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
        """POST ``body``; the status and the answer's JSON object ({} for an error's)."""
        headers = {
            "Authorization": f"Bearer {self._token.get_secret_value()}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        try:
            request = self._http.stream(
                "POST",
                self._base + path,
                content=orjson.dumps(body),
                headers=headers,
                timeout=self._timeout_s,
            )
            async with request as response:
                raw = await read_capped(response, MAX_ANSWER_BYTES)
                status = response.status_code
        except httpx.HTTPError as exc:
            # The kind only: an httpx message may carry the URL.
            raise CreditUnavailable(type(exc).__name__) from exc
        if raw is None:
            raise CreditUnavailable("an answer larger than the cap")
        if status != HTTPStatus.OK:
            return status, {}
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise CreditUnavailable("malformed JSON") from None
        if not isinstance(data, dict):
            raise CreditUnavailable("an answer that is not a JSON object")
        return status, {str(key): value for key, value in data.items()}  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]


def _identifier(value: object, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise CreditUnavailable(f"an answer without a usable {name}")
    if not value.isprintable():
        raise CreditUnavailable(f"an answer with an unprintable {name}")
    return value
