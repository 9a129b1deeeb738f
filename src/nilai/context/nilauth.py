"""The gateway's nilauth root token, and the delegations ``GET /v1/delegation`` mints from it.

nilDB accepts writes into the gateway's collection only under a token chain rooted in a token
that nilauth issued to the gateway (the "builder"). ``NilauthRootTokens`` asks nilauth for that
root token over HTTP (its ``/about`` and ``/api/v1/nucs/create``), once for any number of
concurrent callers, keeps it, and asks again before it expires. ``delegate_data_create`` extends
it to a user: command ``/nil/db/data/create``, audience the user's DID, a short lifetime.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import httpx

# nuc and secp256k1 ship no type information; pyright reads their source instead.
from nuc.builder import NucTokenBuilder  # pyright: ignore[reportMissingTypeStubs]
from nuc.envelope import (  # pyright: ignore[reportMissingTypeStubs]
    InvalidSignatureException,
    MalformedNucJwtException,
    NucTokenEnvelope,
)
from nuc.token import (  # pyright: ignore[reportMissingTypeStubs]
    Command,
    Did,
    MalformedDidException,
    MalformedNucTokenException,
)
from secp256k1 import PrivateKey  # pyright: ignore[reportMissingTypeStubs]

from nilai.errors import ContextUnavailable, ValidationFailed
from nilai.outages import OutageLog, mask_url

logger = logging.getLogger(__name__)

DATA_CREATE = Command(["nil", "db", "data", "create"])
_REFRESH_BEFORE_S = 60.0
"""A root token is replaced once it has less than this left (or half its life, if shorter)."""
_COMPRESSED_KEY = re.compile(r"0[23][0-9a-fA-F]{64}")
"""A compressed secp256k1 public key in hex: what a ``did:nil:`` DID and nilDB's /about carry."""


class NilauthRefused(Exception):
    """Why nilauth gave no usable root token (for the outage log: no token, no key)."""


class RootTokens(Protocol):
    """The gateway's current nilauth root token."""

    async def root(self) -> NucTokenEnvelope:
        """A root token valid for a while yet.

        Raises:
            ContextUnavailable: nilauth cannot be reached or refuses.
        """
        ...


@dataclass(frozen=True, slots=True)
class _Held:
    envelope: NucTokenEnvelope
    refresh_at: float


class NilauthRootTokens:
    """Root tokens from nilauth: fetched once for all callers, kept, renewed before expiry."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        key: PrivateKey,
        *,
        timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._url = url
        self._key = key
        self._timeout_s = timeout_s
        self._clock = clock
        self._held: _Held | None = None
        self._fetching: asyncio.Task[_Held] | None = None
        self._outage = OutageLog(
            logger,
            "nilauth",
            "GET /v1/delegation gets 503 once the root token held expires",
            where=mask_url(url),
        )

    async def root(self) -> NucTokenEnvelope:
        """The root token; see ``RootTokens.root``."""
        held = self._held
        if held is not None and self._clock() < held.refresh_at:
            return held.envelope
        if self._fetching is None:
            # One request to nilauth however many callers wait; shielded, so a caller that
            # gives up does not cancel it for the others.
            self._fetching = asyncio.ensure_future(self._fetch())
            self._fetching.add_done_callback(self._fetched)
        try:
            return (await asyncio.shield(self._fetching)).envelope
        except ContextUnavailable:
            if held is not None and self._clock() < _expiry(held.envelope):
                return held.envelope  # still valid: nilauth is down, the token is not
            raise

    def _fetched(self, task: asyncio.Task[_Held]) -> None:
        self._fetching = None
        if not task.cancelled() and task.exception() is None:
            self._held = task.result()

    async def _fetch(self) -> _Held:
        started = time.monotonic()
        try:
            about = await self._http.get(f"{self._url}/about", timeout=self._timeout_s)
            about.raise_for_status()
            nilauth_key = str(about.json()["public_key"])
            payload = json.dumps(
                {
                    "nonce": secrets.token_hex(16),
                    "target_public_key": nilauth_key,
                    "expires_at": int(self._clock()) + 60,
                    "blind_module": "nildb",
                }
            ).encode()
            signature = sign_compact(self._key, payload)
            response = await self._http.post(
                f"{self._url}/api/v1/nucs/create",
                json={
                    "public_key": public_key_hex(self._key),
                    "signature": signature.hex(),
                    "payload": payload.hex(),
                },
                timeout=self._timeout_s,
            )
            response.raise_for_status()
            envelope = NucTokenEnvelope.parse(str(response.json()["token"]))
            envelope.validate_signatures()
            _check_root(envelope, nilauth_key, builder_did(self._key))
        except (
            httpx.HTTPError,
            ValueError,
            KeyError,
            TypeError,
            MalformedNucJwtException,
            InvalidSignatureException,
            MalformedNucTokenException,
            MalformedDidException,
        ) as exc:
            self._outage.failed(NilauthRefused(_reason(exc)), started=started)
            raise ContextUnavailable(
                "nilauth, which issues this gateway's nilDB tokens, cannot be reached or refused;"
                " try again later.",
                code="nilauth_unavailable",
            ) from None
        self._outage.answered(started=started)
        now = self._clock()
        expires = _expiry(envelope)
        return _Held(envelope, expires - min(_REFRESH_BEFORE_S, (expires - now) / 2))


def sign_compact(key: PrivateKey, message: bytes) -> bytes:
    """The 64-byte ECDSA signature over SHA-256 of ``message``, as nilauth checks it."""
    raw: object = key.ecdsa_sign(message)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    compact: bytes = key.ecdsa_serialize_compact(raw)  # pyright: ignore[reportUnknownMemberType]
    return compact


def public_key_hex(key: PrivateKey) -> str:
    """The compressed public key of ``key``, in hex (what a ``did:nil:`` DID carries)."""
    public_key = key.pubkey
    if public_key is None:  # never for a key made from bytes; secp256k1 types it optional
        raise ValueError("the key has no public key")
    return public_key.serialize().hex()


def _check_root(envelope: NucTokenEnvelope, nilauth_key: str, builder: str) -> None:
    """A ValueError unless nilauth issued this root token to the builder, for nilDB."""
    token = envelope.token.token
    if envelope.proofs or str(token.issuer) != f"did:nil:{nilauth_key}":
        raise ValueError("not a root token issued by nilauth")
    if str(token.audience) != builder or str(token.subject) != builder:
        raise ValueError("not a token for this builder")


def _expiry(envelope: NucTokenEnvelope) -> float:
    expires_at = envelope.token.token.expires_at
    return expires_at.timestamp() if expires_at is not None else float("inf")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"status {exc.response.status_code}"
    return type(exc).__name__


def did_of_key(hex_key: str) -> Did | None:
    """The DID of a compressed secp256k1 public key given in hex; None if it is not one."""
    return Did(bytes.fromhex(hex_key)) if _COMPRESSED_KEY.fullmatch(hex_key) else None


def did_from_text(value: str) -> Did | None:
    """``did:nil:<66 hex digits of a compressed key>`` as a ``Did``; None for anything else."""
    if not value.startswith("did:nil:"):
        return None
    return did_of_key(value.removeprefix("did:nil:"))


def parse_user_did(value: str, *, param: str) -> Did:
    """A ``did:nil:`` DID with a compressed secp256k1 key, or a 422 naming ``param``."""
    did = did_from_text(value)
    if did is None:
        raise ValidationFailed(
            f"'{param}' must be a DID of the form did:nil:<66 hex digits of a compressed "
            "secp256k1 public key>.",
            param=param,
            code="invalid_did",
        )
    return did


def builder_did(key: PrivateKey) -> str:
    """The DID of the gateway's nilDB identity."""
    return "did:nil:" + public_key_hex(key)


def delegate_data_create(
    root: NucTokenEnvelope, user: Did, key: PrivateKey, *, ttl_s: int, now: float
) -> str:
    """A delegation letting ``user`` create documents in the gateway's collections for ``ttl_s``."""
    return (
        NucTokenBuilder.extending(root)
        .command(DATA_CREATE)
        .audience(user)
        .expires_at(datetime.fromtimestamp(now + ttl_s, UTC))
        .build(key)
    )


def load_builder_key(hex_key: str) -> PrivateKey:
    """The builder key from its hex form (64 hex digits), or a ValueError naming no value."""
    text = hex_key.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise ValueError("the nilDB builder key must be 64 hex digits (a secp256k1 private key)")
    return PrivateKey(bytes.fromhex(text))


def token_fingerprint(token: str) -> str:
    """A short, non-secret name for a token in logs (the start of its SHA-256)."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


class StaticRootTokens:
    """The in-memory twin: a fixed root token, or unavailable (``down``)."""

    def __init__(self, envelope: NucTokenEnvelope | None) -> None:
        self.envelope = envelope

    async def root(self) -> NucTokenEnvelope:
        """The fixed token; ``ContextUnavailable`` when there is none."""
        if self.envelope is None:
            raise ContextUnavailable("nilauth is down (test twin).", code="nilauth_unavailable")
        return self.envelope


class DelegationIssuer:
    """Mints ``GET /v1/delegation``'s tokens: the root token extended to a user, briefly."""

    def __init__(
        self,
        roots: RootTokens,
        key: PrivateKey,
        *,
        ttl_s: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._roots = roots
        self._key = key
        self._ttl_s = ttl_s
        self._clock = clock
        self.did = builder_did(key)

    async def issue(self, user: Did) -> str:
        """A delegation for ``user`` to store documents in the gateway's collection.

        Raises:
            ContextUnavailable: nilauth cannot be reached and no root token is held.
        """
        root = await self._roots.root()
        return delegate_data_create(root, user, self._key, ttl_s=self._ttl_s, now=self._clock())
