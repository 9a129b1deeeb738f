"""NUC token checks: parse the envelope, validate its chain, read what it grants.

A NUC envelope is ``<invocation>/<proof>/<proof>...``: JWT-like tokens signed with secp256k1.
The invocation is addressed to this gateway (its audience is the gateway's DID, derived from the
same key as ``/v1/public_key``); its proofs delegate the right to call ``/nil/ai`` from the
subscription holder (the subject) to the caller (the invocation's issuer). Usage limits and a
nilDB prompt document ride in the delegations' ``meta``.

Lifetimes are bounded: some token of the chain must carry an ``exp``, and the earliest one (the
chain's expiry) must be within ``max_lifetime_s`` of now, so whatever is kept about a token (a
use count, a spent invocation) can be forgotten within that time. The delegations' policies are
not matched here but against the request (``nuc_policies``); here they are only checked to be
ones the gateway can evaluate.

Everything here is pure CPU work on the request's own bytes: no I/O, and the validator and its
parameters are built once per process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

# nuc ships no type information; pyright reads its (annotated) source instead.
from nuc.envelope import (  # pyright: ignore[reportMissingTypeStubs]
    DecodedNucToken,
    NucTokenEnvelope,
)
from nuc.token import (  # pyright: ignore[reportMissingTypeStubs]
    Command,
    DelegationBody,
    Did,
)
from nuc.validate import (  # pyright: ignore[reportMissingTypeStubs]
    InvocationRequirement,
    NucTokenValidator,
    ValidationException,
    ValidationKind,
    ValidationParameters,
)

from nilai.auth.base import PromptDocument, TokenLimit
from nilai.auth.nuc_policies import TOKEN_FIELDS, RequestPolicy, compile_policies
from nilai.errors import AuthenticationFailed
from nilai.settings import UUID

REQUIRED_COMMAND = Command(["nil", "ai"])
MAX_CHAIN_LENGTH = 5
_JWT_DOTS = 2
MAX_ENVELOPE_CHARS = 16_384
"""Longer than any chain of ``MAX_CHAIN_LENGTH`` tokens; refused before any parsing."""
DEFAULT_MAX_LIFETIME_S = 86_400
"""``NILAI_NUC_MAX_LIFETIME_S``: a day, well above nilai-py's one-hour roots."""

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
    invocation_id: str
    """The hex SHA-256 of the invocation: what a replay would repeat."""
    expires_at: datetime
    """When the chain stops being valid: the earliest ``exp`` in it."""
    policies: tuple[RequestPolicy, ...] = ()
    """The delegations' policies, for the request to meet."""


def gateway_did(public_key: bytes) -> str:
    """The DID a token must be addressed to: ``did:nil:<compressed public key hex>``."""
    return str(Did(public_key))


def looks_like_nuc(credential: str) -> bool:
    """Whether a bearer credential has the shape of a NUC envelope (JWT segments, ES256K)."""
    first = credential.split("/", 1)[0]
    return first.startswith("eyJ") and first.count(".") == _JWT_DOTS


class NucVerifier:
    """Validates envelopes addressed to one gateway."""

    def __init__(
        self,
        public_key: bytes,
        root_issuers: tuple[str, ...] = (),
        *,
        max_lifetime_s: int = DEFAULT_MAX_LIFETIME_S,
    ) -> None:
        self.did = gateway_did(public_key)
        self._max_lifetime = timedelta(seconds=max_lifetime_s)
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
            # Policies are left out: nuc would match them against the invocation's own args,
            # which say nothing about the request. The signatures cover the raw tokens, so
            # they are checked all the same.
            self._validator.validate(_without_policies(envelope), {}, self._parameters)
        except ValidationException as exc:
            message = _MESSAGES.get(exc.kind, exc.kind.value)
            raise _rejected(message, code=_code(exc.kind)) from exc
        except Exception as exc:
            raise _rejected("a token in it cannot be checked (bad key or signature)") from exc
        chain = _chain(envelope)
        now = datetime.now(UTC)
        expires_at = self._expiry(chain, now)
        claims = token.to_json()
        invocation = {name: str(claims[name]) for name in TOKEN_FIELDS}
        policies: list[RequestPolicy] = []
        for proof in chain[1:]:
            body = proof.token.body
            if isinstance(body, DelegationBody):
                policies += compile_policies(body.policies, invocation)
        return VerifiedNuc(
            subject=str(token.subject),
            issuer=str(token.issuer),
            limits=self._usage_limits(chain, now),
            # Granted by the delegations, not chosen by the invoking party.
            prompt_document=_prompt_document(chain[1:]),
            invocation_id=envelope.token.compute_hash().hex(),
            expires_at=expires_at,
            policies=tuple(policies),
        )

    def _expiry(self, chain: list[DecodedNucToken], now: datetime) -> datetime:
        """The chain's expiry, if it has one within the longest lifetime accepted."""
        expiries = [t.token.expires_at for t in chain if t.token.expires_at is not None]
        if not expiries:
            # Valid forever, it could be replayed forever, and nothing kept about it could
            # ever be forgotten. nilai-py sets 'exp' on its roots and delegations.
            raise _rejected(
                "no token in its chain has an expiry ('exp'); give the root or a delegation one",
                code="nuc_expiry_required",
            )
        earliest = min(expiries)
        if earliest - now > self._max_lifetime:
            raise _rejected(
                f"its chain is valid until {earliest:%Y-%m-%dT%H:%M:%SZ}, longer than this "
                f"gateway accepts ({self._max_lifetime.total_seconds():.0f} s from now); give "
                "a token of the chain an earlier 'exp'",
                code="nuc_lifetime_too_long",
            )
        return earliest

    def _usage_limits(self, chain: list[DecodedNucToken], now: datetime) -> tuple[TokenLimit, ...]:
        """The use counts the chain's delegations ask for (the invocation's own is ignored).

        A count lasts as long as its delegation can be used: until the earliest ``exp`` of the
        delegation and the tokens above it. A delegation usable for longer than the longest
        lifetime (or forever) is refused: its count would have to outlive every bound.
        """
        limits: dict[str, TokenLimit] = {}
        # Earliest expiry of each token and those above it, from the root down.
        above: datetime | None = None
        lineage: list[datetime | None] = []
        for decoded in reversed(chain):
            exp = decoded.token.expires_at
            above = exp if above is None else (above if exp is None else min(above, exp))
            lineage.append(above)
        lineage.reverse()
        # chain[0] is the invocation, made for one request: a limit on it means nothing, and
        # honoured there it would make a counter per request.
        for decoded, ends in zip(chain[1:], lineage[1:], strict=True):
            meta = decoded.token.meta or {}
            uses = meta.get("usage_limit")
            if uses is None:
                continue
            if isinstance(uses, bool) or not isinstance(uses, int) or uses < 0:
                raise _rejected("its 'usage_limit' is not a whole number of at least 0")
            if ends is None or ends - now > self._max_lifetime:
                raise _rejected(
                    "its 'usage_limit' is on a delegation usable for longer than this gateway "
                    f"keeps use counts ({self._max_lifetime.total_seconds():.0f} s); give it "
                    "(or a token above it) an earlier 'exp'",
                    code="nuc_lifetime_too_long",
                )
            token_id = decoded.compute_hash().hex()
            limits[token_id] = TokenLimit(token_id, uses, ends)
        return tuple(limits.values())


def _without_policies(envelope: NucTokenEnvelope) -> NucTokenEnvelope:
    """The same envelope (raw tokens and signatures) with the delegations' policies emptied."""
    proofs = [
        replace(proof, token=replace(proof.token, body=DelegationBody([])))
        if isinstance(proof.token.body, DelegationBody)
        else proof
        for proof in envelope.proofs
    ]
    return NucTokenEnvelope(envelope.token, proofs)


def _chain(envelope: NucTokenEnvelope) -> list[DecodedNucToken]:
    """The invocation, then each proof up to the root.

    A validated envelope may list its proofs in another order, or one twice (it is one token).
    """
    by_hash = {proof.compute_hash(): proof for proof in envelope.proofs}
    chain = [envelope.token]
    while chain[-1].token.proofs:
        chain.append(by_hash[chain[-1].token.proofs[0]])
    return chain


def _prompt_document(tokens: list[DecodedNucToken]) -> PromptDocument | None:
    """The prompt document the delegations name, if any.

    The delegation that names it must be signed by the document's owner: the gateway can read
    any document whose owner granted it access, so a document named by anyone else would let
    them use (and perhaps get the model to repeat) another user's private prompt.
    """
    found: PromptDocument | None = None
    for decoded in tokens:
        meta = decoded.token.meta or {}
        document_id = meta.get("document_id")
        if document_id is None:
            continue
        owner = meta.get("document_owner_did")
        if not isinstance(document_id, str) or not isinstance(owner, str):
            raise _rejected("its prompt document needs 'document_id' and 'document_owner_did'")
        if not UUID.fullmatch(document_id):
            raise _rejected("its prompt document's 'document_id' is not a document id (a UUID)")
        if str(decoded.token.issuer) != owner:
            raise _rejected(
                "the delegation naming a prompt document must be signed by the document's owner "
                "('document_owner_did')",
                code="prompt_document_not_owner",
            )
        document = PromptDocument(document_id.lower(), owner)
        if found is not None and found != document:
            raise _rejected("its delegations name two different prompt documents")
        found = document
    return found


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
