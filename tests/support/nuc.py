"""NUC tokens for tests, built with the ``nuc`` package the way nilai-py builds them.

A subscription holder makes a self-issued root delegation for ``/nil/ai/generate``; it may
delegate to a caller (with ``meta`` such as a usage limit); the caller's invocation is addressed
to the gateway's DID.
"""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from nuc.builder import NucTokenBuilder
from nuc.envelope import NucTokenEnvelope
from nuc.policy import Policy
from nuc.token import Command, DelegationBody, Did, InvocationBody
from secp256k1 import PrivateKey

GENERATE = Command(["nil", "ai", "generate"])


def did_of(key: PrivateKey) -> Did:
    """The DID of a private key's compressed public key."""
    return Did(key.pubkey.serialize())


def gateway_did_from_b64(public_key_b64: str) -> Did:
    """The gateway's DID from the body of ``GET /v1/public_key`` (a base64 JSON string)."""
    return Did(base64.b64decode(public_key_b64))


def _policies(policies: list[list[Any]] | None) -> DelegationBody:
    """A delegation body with ``policies`` as written in a token (nuc consumes what it parses)."""
    return DelegationBody([Policy.parse(copy.deepcopy(p)) for p in policies or []])


@dataclass
class Holder:
    """A subscription holder: owns a key and self-issues root delegations."""

    key: PrivateKey = field(default_factory=PrivateKey)

    @property
    def did(self) -> Did:
        """This holder's DID (the account name on the gateway)."""
        return did_of(self.key)

    def root(
        self,
        *,
        command: Command = GENERATE,
        expires_in: timedelta | None = timedelta(hours=1),
        audience: Did | None = None,
        meta: dict[str, Any] | None = None,
        policies: list[list[Any]] | None = None,
    ) -> NucTokenEnvelope:
        """A root delegation from this holder (to itself unless ``audience``)."""
        builder = NucTokenBuilder(
            body=_policies(policies),
            audience=audience or self.did,
            subject=self.did,
            command=command,
            expires_at=datetime.now(UTC) + expires_in if expires_in else None,
            meta=meta,
        )
        return NucTokenEnvelope.parse(builder.build(self.key))

    def delegate(
        self,
        to: PrivateKey,
        *,
        uses: int | None = None,
        expires_in: timedelta = timedelta(minutes=5),
        meta: dict[str, Any] | None = None,
        policies: list[list[Any]] | None = None,
        root: NucTokenEnvelope | None = None,
    ) -> NucTokenEnvelope:
        """A delegation to another key, as nilai-py's DelegationTokenServer makes it.

        ``policies`` restrict what the delegate may ask; ``root`` replaces the default root.
        """
        extra = dict(meta or {})
        if uses is not None:
            extra["usage_limit"] = uses
        token = (
            NucTokenBuilder.extending(root or self.root())
            .audience(did_of(to))
            .expires_at(datetime.now(UTC) + expires_in)
            .meta(extra or None)  # pyright: ignore[reportArgumentType]
            .body(_policies(policies))
            .build(self.key)
        )
        return NucTokenEnvelope.parse(token)


def invoke(
    proof: NucTokenEnvelope,
    signer: PrivateKey,
    gateway: Did,
    *,
    args: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    expires_in: timedelta | None = None,
) -> str:
    """An invocation of ``proof``'s command, addressed to ``gateway`` and signed by ``signer``.

    Like nilai-py's, it has empty ``args``, no ``meta`` and no expiry unless given.
    """
    builder = (
        NucTokenBuilder.extending(proof)
        .body(InvocationBody(args=dict(args or {})))
        .audience(gateway)
    )
    if meta:
        builder = builder.meta(meta)
    if expires_in is not None:
        builder = builder.expires_at(datetime.now(UTC) + expires_in)
    return builder.build(signer)
