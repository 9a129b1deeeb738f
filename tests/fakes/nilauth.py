"""A loopback stand-in for Nillion's nilauth, speaking the wire protocol of ``nuc`` 0.1.0.

``nuc.nilauth.NilauthClient`` works against it unchanged. It holds a secp256k1 key made at start
and issues real root NUCs with it, as the real service does for a paid-up subscriber:

- ``GET /about`` -> ``{"public_key": <66 hex>, "build": {...}, "started": <iso>}``
- ``POST /api/v1/nucs/create`` with ``{"public_key", "signature", "payload"}`` (hex; the payload
  is the JSON ``{"nonce", "target_public_key", "expires_at", "blind_module"}`` signed by the
  requester) -> ``{"token": <root NUC>}``: a delegation from this nilauth to the requester,
  ``sub`` = ``aud`` = the requester, ``cmd`` ``/nil/db`` (or ``/nil/ai``), ``pol`` ``[]``.
- ``GET /api/v1/subscriptions/status?public_key=<hex>&blind_module=nildb``
- ``GET /api/v1/payments/cost?blind_module=nildb``
- ``POST /api/v1/revocations/lookup`` with ``{"hashes": [...]}`` -> ``{"revoked": []}``
- ``GET /health`` -> ``OK``

Errors are the real shape: ``{"message": str, "error_code": "UPPER_SNAKE"}`` (``NOT_SUBSCRIBED``
412, ``PAYLOAD_EXPIRED`` 412, ``INVALID_TARGET_PUBLIC_KEY`` 400, ``SIGNATURE_VERIFICATION`` 400,
``MALFORMED_PAYLOAD`` 400), which ``NilauthClient`` raises as ``RequestException``.

Control hook for tests (not part of nilauth):

- ``POST /_control`` with any of ``{"unavailable": bool, "subscribed": bool, "delay_s": float,
  "token_lifetime_s": int}``: ``unavailable`` answers every other request ``503``
  ``{"message": "nilauth is unavailable", "error_code": "SERVICE_UNAVAILABLE"}``;
  ``subscribed: false`` makes token requests fail ``412 NOT_SUBSCRIBED``; ``delay_s`` holds every
  answer that long. Answers the settings now in force.
- ``GET /_control/stats`` -> ``{"requests": n, "tokens_issued": n}``.

Run alone: ``python -m tests.fakes.nilauth --port 18300`` (prints its URL and public key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import uvicorn
from nuc.builder import NucTokenBuilder  # pyright: ignore[reportMissingTypeStubs]
from nuc.token import Command, Did  # pyright: ignore[reportMissingTypeStubs]
from secp256k1 import PrivateKey, PublicKey  # pyright: ignore[reportMissingTypeStubs]
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

BLIND_MODULE_COMMANDS = {"nildb": Command(["nil", "db"]), "nilai": Command(["nil", "ai"])}
"""The root command nilauth grants per blind module (``/nil/db`` for nilDB)."""
SUBSCRIPTION_COST_UNILS = 1_000_000
_PUBLIC_KEY_BYTES = 33
_SIGNATURE_BYTES = 64
_NONCE_BYTES = 16
_PAYLOAD_FIELDS = {"nonce", "target_public_key", "expires_at", "blind_module"}


def public_key_hex(key: PrivateKey) -> str:
    """The 66-hex compressed public key of ``key``, as nilauth and nilDB publish theirs."""
    return key.pubkey.serialize().hex()  # pyright: ignore[reportOptionalMemberAccess]


def did_of(key: PrivateKey) -> Did:
    """The ``did:nil`` of a key's compressed public key."""
    return Did(bytes.fromhex(public_key_hex(key)))


def iso_now() -> str:
    """Now, as JavaScript's ``toISOString`` writes it (what the real services send)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class NilauthState:
    """The stand-in's key, settings (changed over ``/_control``) and what it saw."""

    key: PrivateKey = field(default_factory=PrivateKey)
    token_lifetime_s: int = 3600
    """How long issued root tokens live (the real one uses the subscription's end)."""
    subscribed: bool = True
    """Whether every requester has a paid-up subscription."""
    unavailable: bool = False
    delay_s: float = 0.0
    started: str = field(default_factory=iso_now)
    requests: int = 0
    tokens_issued: int = 0

    @property
    def public_key_hex(self) -> str:
        """The key nilDB nodes trust as the root issuer, 66 hex."""
        return public_key_hex(self.key)

    @property
    def did(self) -> Did:
        """This nilauth's DID: the ``iss`` of every root token it issues."""
        return did_of(self.key)

    def settings(self) -> dict[str, Any]:
        """The control settings in force."""
        return {
            "unavailable": self.unavailable,
            "subscribed": self.subscribed,
            "delay_s": self.delay_s,
            "token_lifetime_s": self.token_lifetime_s,
        }

    def issue_root_token(self, requester: Did, blind_module: str) -> str:
        """A root delegation from this nilauth to ``requester`` for ``blind_module``."""
        expires_at = datetime.fromtimestamp(time.time() + self.token_lifetime_s, UTC)
        token = (
            NucTokenBuilder.delegation([])
            .command(BLIND_MODULE_COMMANDS[blind_module])
            .subject(requester)
            .audience(requester)
            .expires_at(expires_at)
            .build(self.key)
        )
        self.tokens_issued += 1
        return token


class NilauthError(Exception):
    """An error answered in nilauth's shape."""

    def __init__(self, status: int, message: str, error_code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code

    def response(self) -> JSONResponse:
        """The JSON error nilauth sends."""
        body = {"message": self.message, "error_code": self.error_code}
        return JSONResponse(body, status_code=self.status)


def _hex_field(body: dict[str, Any], name: str, length: int | None = None) -> bytes:
    value = body.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or (length is not None and len(raw) != length):
        raise NilauthError(400, f"malformed payload: invalid '{name}'", "MALFORMED_PAYLOAD")
    return raw


def verify_signed_request(body: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """Check a legacy signed request; the signer's compressed public key and the payload."""
    signer = _hex_field(body, "public_key", _PUBLIC_KEY_BYTES)
    signature = _hex_field(body, "signature", _SIGNATURE_BYTES)
    payload = _hex_field(body, "payload")
    try:
        public_key = PublicKey(signer, raw=True)
    except Exception as exc:  # secp256k1 raises bare Exception for a point off the curve
        raise NilauthError(400, "invalid public key", "INVALID_PUBLIC_KEY") from exc
    # The client signs with secp256k1's default: ECDSA over sha256(payload).
    try:
        parsed: object = public_key.ecdsa_deserialize_compact(signature)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        valid = bool(public_key.ecdsa_verify(payload, parsed))  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]
    except Exception as exc:  # secp256k1 raises bare Exception for a malformed signature
        raise NilauthError(400, "invalid signature", "INVALID_SIGNATURE") from exc
    if not valid:
        raise NilauthError(400, "signature verification failed", "SIGNATURE_VERIFICATION")
    try:
        fields = json.loads(payload)
    except ValueError as exc:
        raise NilauthError(400, f"malformed payload: {exc}", "MALFORMED_PAYLOAD") from exc
    if not isinstance(fields, dict) or set(cast(dict[str, Any], fields)) != _PAYLOAD_FIELDS:
        raise NilauthError(400, "malformed payload: unexpected fields", "MALFORMED_PAYLOAD")
    return signer, cast(dict[str, Any], fields)


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise NilauthError(400, f"malformed payload: {exc}", "MALFORMED_PAYLOAD") from exc
    if not isinstance(body, dict):
        raise NilauthError(400, "malformed payload: expected an object", "MALFORMED_PAYLOAD")
    return cast(dict[str, Any], body)


class _Handlers:
    """The routes of one stand-in nilauth, bound to its state."""

    def __init__(self, nilauth: NilauthState) -> None:
        self.nilauth = nilauth

    async def gate(self) -> None:
        """What every non-control request goes through: counting, delay, outage."""
        self.nilauth.requests += 1
        if self.nilauth.delay_s:
            await asyncio.sleep(self.nilauth.delay_s)
        if self.nilauth.unavailable:
            raise NilauthError(503, "nilauth is unavailable", "SERVICE_UNAVAILABLE")

    async def about(self, _request: Request) -> Response:
        await self.gate()
        started = self.nilauth.started
        build = {"commit": "stand-in", "timestamp": started}
        body = {"public_key": self.nilauth.public_key_hex, "build": build, "started": started}
        return JSONResponse(body)

    async def health(self, _request: Request) -> Response:
        await self.gate()
        return PlainTextResponse("OK")

    async def create_nuc(self, request: Request) -> Response:
        await self.gate()
        signer, payload = verify_signed_request(await _json_object(request))
        if payload["blind_module"] not in BLIND_MODULE_COMMANDS:
            raise NilauthError(400, "malformed payload: unknown blind module", "MALFORMED_PAYLOAD")
        _hex_field(payload, "nonce", _NONCE_BYTES)
        expires_at = payload["expires_at"]
        if not isinstance(expires_at, int) or expires_at < time.time():
            raise NilauthError(412, "payload is expired", "PAYLOAD_EXPIRED")
        if payload["target_public_key"] != self.nilauth.public_key_hex:
            raise NilauthError(400, "invalid target public key", "INVALID_TARGET_PUBLIC_KEY")
        if not self.nilauth.subscribed:
            raise NilauthError(412, "not subscribed", "NOT_SUBSCRIBED")
        token = self.nilauth.issue_root_token(Did(signer), str(payload["blind_module"]))
        return JSONResponse({"token": token})

    async def subscription_status(self, request: Request) -> Response:
        await self.gate()
        _hex_field(dict(request.query_params), "public_key", _PUBLIC_KEY_BYTES)
        _require_blind_module(request)
        if not self.nilauth.subscribed:
            return JSONResponse({"subscribed": False, "details": None})
        now = int(time.time())
        details = {"expires_at": now + 30 * 86_400, "renewable_at": now + 23 * 86_400}
        return JSONResponse({"subscribed": True, "details": details})

    async def payment_cost(self, request: Request) -> Response:
        await self.gate()
        _require_blind_module(request)
        return JSONResponse({"cost_unils": SUBSCRIPTION_COST_UNILS})

    async def revocations_lookup(self, request: Request) -> Response:
        await self.gate()
        body = await _json_object(request)
        if not isinstance(body.get("hashes"), list):
            raise NilauthError(400, "malformed payload: expected 'hashes'", "MALFORMED_PAYLOAD")
        # Nothing is ever revoked here; nilDB nodes ask before they accept a builder's chain.
        return JSONResponse({"revoked": []})

    async def control(self, request: Request) -> Response:
        body = await _json_object(request)
        if "unavailable" in body:
            self.nilauth.unavailable = bool(body["unavailable"])
        if "subscribed" in body:
            self.nilauth.subscribed = bool(body["subscribed"])
        if "delay_s" in body:
            self.nilauth.delay_s = float(body["delay_s"])
        if "token_lifetime_s" in body:
            self.nilauth.token_lifetime_s = int(body["token_lifetime_s"])
        return JSONResponse(self.nilauth.settings())

    async def stats(self, _request: Request) -> Response:
        counts = {"requests": self.nilauth.requests, "tokens_issued": self.nilauth.tokens_issued}
        return JSONResponse(counts)


def _require_blind_module(request: Request) -> None:
    if request.query_params.get("blind_module") not in BLIND_MODULE_COMMANDS:
        raise NilauthError(400, "invalid blind module", "MALFORMED_REQUEST")


async def _on_nilauth_error(_request: Request, exc: Exception) -> Response:
    return cast(NilauthError, exc).response()


def create_nilauth_app(state: NilauthState | None = None) -> Starlette:
    """The stand-in nilauth as an ASGI app; its state is ``app.state.nilauth``."""
    nilauth = state or NilauthState()
    handlers = _Handlers(nilauth)
    app = Starlette(
        routes=[
            Route("/about", handlers.about),
            Route("/health", handlers.health),
            Route("/api/v1/nucs/create", handlers.create_nuc, methods=["POST"]),
            Route("/api/v1/subscriptions/status", handlers.subscription_status),
            Route("/api/v1/payments/cost", handlers.payment_cost),
            Route("/api/v1/revocations/lookup", handlers.revocations_lookup, methods=["POST"]),
            Route("/_control", handlers.control, methods=["POST"]),
            Route("/_control/stats", handlers.stats),
        ],
        exception_handlers={NilauthError: _on_nilauth_error},
    )
    app.state.nilauth = nilauth
    return app


def main() -> None:
    """Serve the stand-in nilauth on loopback until interrupted."""
    parser = argparse.ArgumentParser(description="A loopback stand-in for nilauth.")
    parser.add_argument("--port", type=int, default=18300)
    args = parser.parse_args()
    state = NilauthState()
    url = f"http://127.0.0.1:{args.port}"
    print(json.dumps({"nilauth_url": url, "nilauth_public_key": state.public_key_hex}), flush=True)
    uvicorn.run(create_nilauth_app(state), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
