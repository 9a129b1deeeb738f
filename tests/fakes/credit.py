"""A loopback stand-in for Nillion's credit service (nilauth-credit), and an in-memory twin.

It speaks the wire protocol of ``nilauth-credit-middleware`` 0.1.3 (``CreditLockingClient``):

- ``POST /v1/credential/validate`` ``{"credential_key", "is_public"}`` -> 200
  ``{"user_id", "is_valid", "is_public"}``; 404 unknown credential; 401 inactive.
- ``POST /v1/balance/lock/private`` | ``/v1/balance/lock/public`` ``{"credential", "amount"}``
  -> 200 ``{"lock_id"}``; 404 unknown user; 400 insufficient balance.
- ``POST /v1/balance/unlock`` ``{"lock_id", "real_cost"}`` -> 200 ``{}``; 404 unknown lock;
  400 a lock already unlocked.
- ``GET /v1/health`` -> 200; ``GET /v1/summary`` -> ``{"users": [...], "locks": [...]}``.

Errors are ``{"error": "..."}``; every call needs ``Authorization: Bearer <api token>`` (401
without). Amounts are JSON numbers; the ledger keeps integer micro-units (exact decimal
conversion), so a test can compare them with ``tokens x prices`` exactly.

``Ledger`` holds the state and records every call (each lock's unlocks, in order); the HTTP app
and ``MemoryCreditService`` (the in-memory twin of ``CreditService``) both act on it. Test
controls on the ledger: ``mode`` (``"ok"``, ``"error"``: 500 to everything, ``"garbage"``: 200
with a body that is not JSON), ``delay_s``.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from nilai.billing.credit import (
    CredentialRejected,
    CreditHolder,
    CreditUnavailable,
    InsufficientBalance,
    UnlockRefused,
)

API_TOKEN = "credit-service-token-for-tests"


def to_micro(amount: object) -> int:
    """A JSON amount as exact micro-units (``ValueError`` for anything but a number)."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise ValueError("amount must be a number")
    return int(Decimal(str(amount)) * 1_000_000)


@dataclass
class LockRecord:
    """One lock and what was done with it."""

    lock_id: str
    user_id: str
    amount_micro: int
    public: bool
    unlocks: list[int] = field(default_factory=list[int])
    """The real cost of each accepted unlock (one, if all is well)."""
    refused_unlocks: int = 0
    """Unlocks refused because the lock was already unlocked."""


@dataclass
class Ledger:
    """The credit service's state: users, credentials, balances, locks, and every call."""

    balances: dict[str, int] = field(default_factory=dict[str, int])
    private_keys: dict[str, str] = field(default_factory=dict[str, str])
    public_ids: dict[str, str] = field(default_factory=dict[str, str])
    inactive: set[str] = field(default_factory=set[str])
    locks: dict[str, LockRecord] = field(default_factory=dict[str, LockRecord])
    calls: list[str] = field(default_factory=list[str])
    mode: str = "ok"
    delay_s: float = 0.0
    lock_guard: threading.Lock = field(default_factory=threading.Lock)

    def add_user(
        self, user_id: str, balance_micro: int, *, key: str | None = None, did: str | None = None
    ) -> None:
        """A user with a balance, reachable by a private key and/or a public DID."""
        with self.lock_guard:
            self.balances[user_id] = balance_micro
            if key is not None:
                self.private_keys[key] = user_id
            if did is not None:
                self.public_ids[did] = user_id

    def locked(self, user_id: str) -> int:
        """What the user has locked and not yet unlocked."""
        return sum(
            lock.amount_micro
            for lock in self.locks.values()
            if lock.user_id == user_id and not lock.unlocks
        )

    # --- the operations, shared by the HTTP app and the in-memory twin ----------------------

    def validate(self, credential: str, public: bool) -> tuple[int, dict[str, Any]]:
        """The status and body of a validation."""
        with self.lock_guard:
            self.calls.append("validate")
            user = (self.public_ids if public else self.private_keys).get(credential)
            if user is None:
                return 404, {"error": "Credential not found"}
            if credential in self.inactive:
                return 401, {"error": "Credential is inactive"}
            return 200, {"user_id": user, "is_valid": True, "is_public": public}

    def lock(self, credential: str, amount_micro: int, public: bool) -> tuple[int, dict[str, Any]]:
        """The status and body of a lock."""
        with self.lock_guard:
            self.calls.append("lock")
            user = (self.public_ids if public else self.private_keys).get(credential)
            if user is None:
                return 404, {"error": "User not found"}
            if self.balances[user] - self.locked(user) < amount_micro:
                return 400, {"error": "Insufficient balance"}
            lock_id = str(uuid.uuid4())
            self.locks[lock_id] = LockRecord(lock_id, user, amount_micro, public)
            return 200, {"lock_id": lock_id}

    def unlock(self, lock_id: str, cost_micro: int) -> tuple[int, dict[str, Any]]:
        """The status and body of an unlock (the real cost is taken from the balance)."""
        with self.lock_guard:
            self.calls.append("unlock")
            lock = self.locks.get(lock_id)
            if lock is None:
                return 404, {"error": "Lock not found"}
            if lock.unlocks:
                lock.refused_unlocks += 1
                return 400, {"error": "Lock already unlocked"}
            lock.unlocks.append(cost_micro)
            self.balances[lock.user_id] -= cost_micro
            return 200, {}

    def summary(self) -> dict[str, Any]:
        """``GET /v1/summary``."""
        with self.lock_guard:
            return {
                "users": [{"user_id": u, "balance": b / 1e6} for u, b in self.balances.items()],
                "locks": [{"lock_id": lock_id} for lock_id, lock in self.locks.items()],
            }


def create_credit_app(ledger: Ledger, api_token: str = API_TOKEN) -> Starlette:
    """The HTTP stand-in over ``ledger``."""

    async def answer(request: Request, handle: Any) -> Response:
        if ledger.delay_s:
            await asyncio.sleep(ledger.delay_s)
        if request.headers.get("authorization") != f"Bearer {api_token}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        if ledger.mode == "error":
            return JSONResponse({"error": "Internal error"}, status_code=500)
        if ledger.mode == "garbage":
            return PlainTextResponse("<html>gateway timeout</html>", status_code=200)
        try:
            body = await request.json()
            status, data = handle(body)
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "Invalid request body"}, status_code=422)
        return JSONResponse(data, status_code=status)

    async def validate(request: Request) -> Response:
        return await answer(
            request, lambda b: ledger.validate(str(b["credential_key"]), bool(b["is_public"]))
        )

    async def lock_private(request: Request) -> Response:
        return await answer(
            request, lambda b: ledger.lock(str(b["credential"]), to_micro(b["amount"]), False)
        )

    async def lock_public(request: Request) -> Response:
        return await answer(
            request, lambda b: ledger.lock(str(b["credential"]), to_micro(b["amount"]), True)
        )

    async def unlock(request: Request) -> Response:
        return await answer(
            request, lambda b: ledger.unlock(str(b["lock_id"]), to_micro(b["real_cost"]))
        )

    async def health(_: Request) -> Response:
        return PlainTextResponse("OK")

    async def summary(_: Request) -> Response:
        return JSONResponse(ledger.summary())

    return Starlette(
        routes=[
            Route("/v1/credential/validate", validate, methods=["POST"]),
            Route("/v1/balance/lock/private", lock_private, methods=["POST"]),
            Route("/v1/balance/lock/public", lock_public, methods=["POST"]),
            Route("/v1/balance/unlock", unlock, methods=["POST"]),
            Route("/v1/health", health),
            Route("/v1/summary", summary),
        ]
    )


class MemoryCreditService:
    """The in-memory twin of ``CreditService`` over a ``Ledger`` (``down`` makes it fail)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.down = False

    def _check_up(self) -> None:
        if self.down:
            raise CreditUnavailable("ConnectError")

    async def validate(self, credential: str, *, public: bool) -> CreditHolder:
        """See ``CreditService.validate``."""
        self._check_up()
        status, data = self.ledger.validate(credential, public)
        if status != 200:
            raise CredentialRejected("unknown" if status == 404 else "inactive")
        return CreditHolder(user_id=data["user_id"], public=public)

    async def lock(self, credential: str, amount_micro: int, *, public: bool) -> str:
        """See ``CreditService.lock``."""
        self._check_up()
        status, data = self.ledger.lock(credential, amount_micro, public)
        if status == 400:
            raise InsufficientBalance()
        if status == 404:
            raise CredentialRejected("unknown")
        return str(data["lock_id"])

    async def unlock(self, lock_id: str, cost_micro: int) -> None:
        """See ``CreditService.unlock``."""
        self._check_up()
        status, _ = self.ledger.unlock(lock_id, cost_micro)
        if status != 200:
            raise UnlockRefused(f"unlock answered {status}")
