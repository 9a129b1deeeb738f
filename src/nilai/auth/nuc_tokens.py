"""NUC token checks: parse the envelope, validate its chain, read what it grants.

A NUC envelope is ``<invocation>/<proof>/<proof>...``: JWT-like tokens signed with secp256k1.
The invocation is addressed to this gateway (its audience is the gateway's DID, derived from the
same key as ``/v1/public_key``); its proofs delegate the right to call ``/nil/ai`` from the
subscription holder (the subject) to the caller (the invocation's issuer). Usage limits and a
nilDB prompt document ride in the tokens' ``meta``.

Everything here is pure CPU work on the request's own bytes: no I/O, and the validator and its
parameters are built once per process.
"""

from __future__ import annotations

from dataclasses import dataclass

# nuc ships no type information; pyright reads its (annotated) source instead.
from nuc.envelope import (  # pyright: ignore[reportMissingTypeStubs]
    DecodedNucToken,
    NucTokenEnvelope,
)
from nuc.token import Command, Did  # pyright: ignore[reportMissingTypeStubs]
from nuc.validate import (  # pyright: ignore[reportMissingTypeStubs]
    InvocationRequirement,
    NucTokenValidator,
    ValidationException,
    ValidationKind,
    ValidationParameters,
)

from nilai.auth.base import PromptDocument, TokenLimit
from nilai.errors import AuthenticationFailed

REQUIRED_COMMAND = Command(["nil", "ai"])
MAX_CHAIN_LENGTH = 5
_JWT_DOTS = 2
MAX_ENVELOPE_CHARS = 16_384
"""Longer than any chain of ``MAX_CHAIN_LENGTH`` tokens; refused before any parsing."""

_MESSAGES: dict[ValidationKind, str] = {
    ValidationKind.TOKEN_EXPIRED: "the token or one of its proofs has expired",
    ValidationKind.NOT_BEFORE_NOT_MET: "the token is not valid yet (its 'nbf' is in the future)",
    ValidationKind.INVALID_AUDIENCE: "the token's audience is not this gateway",
    ValidationKind.INVALID_SIGNATURES: (
        "a signature in the token chain does not match its issuer's key"
    ),
    ValidationKind.ISSUER_AUDIENCE_MISMATCH: (
        "the delegation chain is broken: a token's issuer is not the audience of its proof"
    ),
    ValidationKind.MISSING_PROOF: "the delegation chain is broken: a proof is missing",
    ValidationKind.UNCHAINED_PROOFS: (
        "the delegation chain is broken: the envelope carries proofs that are not part of it"
    ),
    ValidationKind.DIFFERENT_SUBJECTS: (
        "the delegation chain is broken: its tokens name different subjects"
    ),
    ValidationKind.SUBJECT_NOT_IN_CHAIN: (
        "the delegation chain is broken: its root was not issued by the subject"
    ),
    ValidationKind.COMMAND_NOT_ATTENUATED: (
        "the delegation chain is broken: a token widens the command of its proof"
    ),
    ValidationKind.NOT_BEFORE_BACKWARDS: (
        "the delegation chain is broken: a token's 'nbf' is earlier than its proof's"
    ),
    ValidationKind.TOO_MANY_PROOFS: "a token names more than one proof",
    ValidationKind.PROOFS_MUST_BE_DELEGATIONS: "a proof is an invocation, not a delegation",
    ValidationKind.NEED_INVOCATION: "the token must be an invocation, not a delegation",
    ValidationKind.NEED_DELEGATION: "the token must be a delegation",
    ValidationKind.CHAIN_TOO_LONG: f"the delegation chain is longer than {MAX_CHAIN_LENGTH}",
    ValidationKind.POLICY_NOT_MET: "the invocation does not meet a policy of its delegation",
    ValidationKind.POLICY_TOO_WIDE: "a delegation policy is too wide",
    ValidationKind.POLICY_TOO_DEEP: "a delegation policy is too deep",
    ValidationKind.ROOT_KEY_SIGNATURE_MISSING: (
        "the root of the delegation chain was not issued by a trusted root issuer"
    ),
}


@dataclass(frozen=True, slots=True)
class VerifiedNuc:
    """What a valid envelope grants."""

    subject: str
    """The subscription holder's DID: the account that pays."""
    issuer: str
    """The invoking party's DID."""
    limits: tuple[TokenLimit, ...]
    prompt_document: PromptDocument | None


def gateway_did(public_key: bytes) -> str:
    """The DID a token must be addressed to: ``did:nil:<compressed public key hex>``."""
    return str(Did(public_key))


def looks_like_nuc(credential: str) -> bool:
    """Whether a bearer credential has the shape of a NUC envelope (JWT segments, ES256K)."""
    first = credential.split("/", 1)[0]
    return first.startswith("eyJ") and first.count(".") == _JWT_DOTS


class NucVerifier:
    """Validates envelopes addressed to one gateway."""

    def __init__(self, public_key: bytes, root_issuers: tuple[str, ...] = ()) -> None:
        self.did = gateway_did(public_key)
        self._audience = Did(public_key)
        self._validator = NucTokenValidator([Did.parse(did) for did in root_issuers])
        self._parameters = ValidationParameters(
            max_chain_length=MAX_CHAIN_LENGTH,
            max_policy_width=10,
            max_policy_depth=5,
            token_requirements=InvocationRequirement(self._audience),
        )

    def verify(self, credential: str) -> VerifiedNuc:
        """Check ``credential``; raise ``AuthenticationFailed`` naming the check that failed."""
        if len(credential) > MAX_ENVELOPE_CHARS:
            raise _rejected(f"it is longer than {MAX_ENVELOPE_CHARS} characters")
        try:
            envelope = NucTokenEnvelope.parse(credential)
        except Exception as exc:
            raise _rejected("it is malformed and cannot be parsed") from exc
        token = envelope.token.token
        if token.audience != self._audience:
            raise _rejected(
                f"its audience is {token.audience}, not this gateway ({self.did}); "
                "GET /v1/public_key gives the key to address tokens to",
                code="invalid_nuc_audience",
            )
        if not token.command.is_attenuation_of(REQUIRED_COMMAND):
            raise _rejected(
                f"its command {token.command} is not within {REQUIRED_COMMAND}",
                code="invalid_nuc_command",
            )
        if not envelope.proofs and token.issuer != token.subject:
            # nuc checks that the subject signed the chain only when there are proofs: alone,
            # an invocation could name anyone as the account that pays.
            raise _rejected(_MESSAGES[ValidationKind.SUBJECT_NOT_IN_CHAIN])
        try:
            self._validator.validate(envelope, {}, self._parameters)
        except ValidationException as exc:
            message = _MESSAGES.get(exc.kind, exc.kind.value)
            raise _rejected(message, code=_code(exc.kind)) from exc
        except Exception as exc:
            raise _rejected("a token in it cannot be checked (bad key or signature)") from exc
        return VerifiedNuc(
            subject=str(token.subject),
            issuer=str(token.issuer),
            limits=_usage_limits([envelope.token, *envelope.proofs]),
            # Granted by the delegations, not chosen by the invoking party.
            prompt_document=_prompt_document(envelope.proofs),
        )


def _usage_limits(tokens: list[DecodedNucToken]) -> tuple[TokenLimit, ...]:
    limits: dict[str, TokenLimit] = {}
    for decoded in tokens:
        meta = decoded.token.meta or {}
        uses = meta.get("usage_limit")
        if uses is None:
            continue
        if isinstance(uses, bool) or not isinstance(uses, int) or uses < 0:
            raise _rejected("its 'usage_limit' is not a whole number of at least 0")
        token_id = decoded.compute_hash().hex()
        # A proof repeated in the envelope is one token: count its use once.
        limits[token_id] = TokenLimit(token_id, uses, decoded.token.expires_at)
    return tuple(limits.values())


def _prompt_document(tokens: list[DecodedNucToken]) -> PromptDocument | None:
    for decoded in tokens:
        meta = decoded.token.meta or {}
        document_id = meta.get("document_id")
        if document_id is None:
            continue
        owner = meta.get("document_owner_did")
        if not isinstance(document_id, str) or not isinstance(owner, str):
            raise _rejected("its prompt document needs 'document_id' and 'document_owner_did'")
        return PromptDocument(document_id, owner)
    return None


def _code(kind: ValidationKind) -> str:
    if kind is ValidationKind.TOKEN_EXPIRED:
        return "expired_nuc_token"
    if kind is ValidationKind.INVALID_SIGNATURES:
        return "invalid_nuc_signature"
    if kind is ValidationKind.INVALID_AUDIENCE:
        return "invalid_nuc_audience"
    return "invalid_nuc_token"


def _rejected(reason: str, *, code: str = "invalid_nuc_token") -> AuthenticationFailed:
    return AuthenticationFailed(f"NUC token rejected: {reason}.", code=code)
