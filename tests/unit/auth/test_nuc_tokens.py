import base64
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from nuc.builder import NucTokenBuilder
from nuc.envelope import DecodedNucToken, NucTokenEnvelope
from nuc.token import Command, DelegationBody, InvocationBody
from secp256k1 import PrivateKey

from nilai.auth.base import PromptDocument, TokenLimit
from nilai.auth.nuc_tokens import (
    DEFAULT_MAX_LIFETIME_S,
    MAX_CHAIN_LENGTH,
    MAX_ENVELOPE_CHARS,
    NucVerifier,
    gateway_did,
    looks_like_nuc,
)
from nilai.errors import AuthenticationFailed
from tests.support.nuc import GENERATE, Holder, did_of, gateway_did_from_b64, invoke


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(key: PrivateKey, message: str) -> bytes:
    return key.ecdsa_serialize_compact(key.ecdsa_sign(message.encode()))


def forged(decoded: DecodedNucToken, key: PrivateKey, **fields: object) -> DecodedNucToken:
    """``decoded`` with payload ``fields`` changed, signed by ``key`` whatever it claims."""
    payload = json.loads(base64.urlsafe_b64decode(decoded.raw_payload + "=="))
    payload.update(fields)
    raw_payload = b64(json.dumps(payload).encode())
    signature = sign(key, f"{decoded.raw_header}.{raw_payload}")
    return DecodedNucToken.parse(f"{decoded.raw_header}.{raw_payload}.{b64(signature)}")


def envelope(token: DecodedNucToken, proofs: list[DecodedNucToken]) -> str:
    return NucTokenEnvelope(token, proofs).serialize()


@dataclass
class World:
    gateway: PrivateKey
    holder: Holder
    caller: PrivateKey
    verifier: NucVerifier

    @property
    def gateway_did(self):
        return did_of(self.gateway)

    def own(self, **root: object) -> str:
        """A nilai-py style invocation: the holder's self-issued root, invoked by the holder."""
        return invoke(self.holder.root(**root), self.holder.key, self.gateway_did)

    def delegated(self, **delegation: object) -> str:
        """The holder delegates to the caller, who invokes."""
        proof = self.holder.delegate(self.caller, **delegation)
        return invoke(proof, self.caller, self.gateway_did)


@pytest.fixture
def world() -> World:
    gateway = PrivateKey()
    return World(gateway, Holder(), PrivateKey(), NucVerifier(gateway.pubkey.serialize()))


def chain(w: World, length: int) -> str:
    """An invocation at the end of a chain of ``length`` tokens (root included)."""
    proof = w.holder.root()
    signer = w.holder.key
    for _ in range(length - 2):
        nxt = PrivateKey()
        token = NucTokenBuilder.extending(proof).audience(did_of(nxt)).build(signer)
        proof, signer = NucTokenEnvelope.parse(token), nxt
    return invoke(proof, signer, w.gateway_did)


def reject(verifier: NucVerifier, credential: str) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as info:
        verifier.verify(credential)
    error = info.value
    assert error.status == 401
    assert error.headers == {"WWW-Authenticate": "Bearer"}
    assert error.message.startswith("NUC token rejected: ")
    assert credential not in error.message
    for segment in credential.replace("/", ".").split("."):
        if len(segment) >= 16:
            assert segment not in error.message
    return error


# --- valid tokens -----------------------------------------------------------------------------


def test_gateway_did_is_the_did_of_the_public_key(world: World):
    public_key = world.gateway.pubkey.serialize()
    assert world.verifier.did == gateway_did(public_key) == str(world.gateway_did)
    assert gateway_did_from_b64(base64.b64encode(public_key).decode()) == world.gateway_did


def test_a_nilai_py_self_issued_invocation_verifies(world: World):
    granted = world.verifier.verify(world.own())
    assert granted.subject == str(world.holder.did)
    assert granted.issuer == str(world.holder.did)
    assert granted.limits == ()
    assert granted.prompt_document is None


def test_a_delegated_invocation_names_the_holder_as_subject_and_the_caller_as_issuer(
    world: World,
):
    granted = world.verifier.verify(world.delegated(uses=3))
    assert granted.subject == str(world.holder.did)
    assert granted.issuer == str(did_of(world.caller))
    assert granted.prompt_document is None


def test_usage_limit_is_keyed_by_the_delegation_and_carries_its_expiry(world: World):
    before = datetime.now(UTC)
    proof = world.holder.delegate(world.caller, uses=3, expires_in=timedelta(minutes=5))
    first = world.verifier.verify(invoke(proof, world.caller, world.gateway_did))
    second = world.verifier.verify(invoke(proof, world.caller, world.gateway_did))
    (limit,) = first.limits
    assert second.limits == (limit,)
    assert isinstance(limit, TokenLimit)
    assert limit.token_id == hashlib.sha256(proof.token.serialize().encode()).hexdigest()
    assert limit.uses == 3
    assert limit.expires_at is not None
    expected = before + timedelta(minutes=5)
    assert abs((limit.expires_at - expected).total_seconds()) <= 2

    other = world.holder.delegate(world.caller, uses=3)
    (other_limit,) = world.verifier.verify(invoke(other, world.caller, world.gateway_did)).limits
    assert other_limit.token_id != limit.token_id


def test_a_usage_limit_lasts_until_the_earliest_expiry_of_its_token_and_those_above(
    world: World,
):
    root = world.holder.root(expires_in=timedelta(minutes=10))
    proof = world.holder.delegate(world.caller, uses=3, root=root, expires_in=timedelta(hours=1))
    (limit,) = world.verifier.verify(invoke(proof, world.caller, world.gateway_did)).limits
    assert limit.expires_at == root.token.token.expires_at


def test_a_usage_limit_on_the_invocation_itself_is_not_honoured(world: World):
    # Each invocation is used once; a count of its own would be one counter per request.
    token = invoke(
        world.holder.root(), world.holder.key, world.gateway_did, meta={"usage_limit": 1}
    )
    assert world.verifier.verify(token).limits == ()
    token = invoke(
        world.holder.root(), world.holder.key, world.gateway_did, meta={"usage_limit": "x"}
    )
    assert world.verifier.verify(token).limits == ()


def test_the_chain_expiry_is_its_earliest_exp_and_the_id_is_the_invocation_hash(world: World):
    root = world.holder.root(expires_in=timedelta(hours=1))
    proof = world.holder.delegate(world.caller, root=root, expires_in=timedelta(minutes=5))
    token = invoke(proof, world.caller, world.gateway_did)
    granted = world.verifier.verify(token)
    assert granted.expires_at == proof.token.token.expires_at
    first = token.split("/")[0]
    assert granted.invocation_id == NucTokenEnvelope.parse(first).token.compute_hash().hex()
    # An exp on the invocation alone bounds the chain too.
    forever = world.holder.root(expires_in=None)
    token = invoke(forever, world.holder.key, world.gateway_did, expires_in=timedelta(minutes=1))
    assert world.verifier.verify(token).expires_at is not None


def test_the_longest_lifetime_is_a_parameter(world: World):
    strict = NucVerifier(world.gateway.pubkey.serialize(), max_lifetime_s=600)
    error = reject(strict, world.own())  # nilai-py's one-hour root
    assert error.code == "nuc_lifetime_too_long"
    assert "600 s" in error.message
    assert strict.verify(world.own(expires_in=timedelta(minutes=9))).subject
    assert DEFAULT_MAX_LIFETIME_S == 86_400


def test_policies_are_not_matched_against_the_invocations_own_args(world: World):
    # The nuc library would refuse this (args is empty); the gateway checks the request.
    proof = world.holder.delegate(world.caller, policies=[["==", ".args.model", "m"]])
    granted = world.verifier.verify(invoke(proof, world.caller, world.gateway_did))
    (policy,) = granted.policies
    assert policy.text == '["==",".args.model","m"]'
    assert policy.allows({"model": "m"})
    assert not policy.allows({"model": "other"})


def test_policies_of_every_delegation_in_the_chain_are_kept(world: World):
    root = world.holder.root(policies=[["==", "$.req.stream", False]])
    proof = world.holder.delegate(world.caller, root=root, policies=[["==", "$.req.model", "m"]])
    granted = world.verifier.verify(invoke(proof, world.caller, world.gateway_did))
    assert [p.text for p in granted.policies] == [
        '["==","$.req.model","m"]',
        '["==","$.req.stream",false]',
    ]


def test_a_usage_limit_of_zero_is_kept(world: World):
    (limit,) = world.verifier.verify(world.delegated(uses=0)).limits
    assert limit.uses == 0


DOCUMENT_ID = "4f0b8a52-3c1d-4e8e-9d51-6a0f2b7c9e11"


def test_prompt_document_meta_is_carried(world: World):
    owner = str(world.holder.did)  # the owner signs the delegation that names the document
    meta = {"document_id": DOCUMENT_ID.upper(), "document_owner_did": owner}
    granted = world.verifier.verify(world.delegated(uses=2, meta=meta))
    assert granted.prompt_document == PromptDocument(DOCUMENT_ID, owner)
    assert [limit.uses for limit in granted.limits] == [2]


def test_a_prompt_document_named_by_someone_other_than_its_owner_is_refused(world: World):
    someone_else = str(did_of(PrivateKey()))
    meta = {"document_id": DOCUMENT_ID, "document_owner_did": someone_else}
    with pytest.raises(AuthenticationFailed) as refused:
        world.verifier.verify(world.delegated(meta=meta))
    assert refused.value.code == "prompt_document_not_owner"
    assert "signed by the document's owner" in refused.value.message


def test_a_prompt_document_id_must_be_a_document_id(world: World):
    meta = {"document_id": "../../admin", "document_owner_did": str(world.holder.did)}
    with pytest.raises(AuthenticationFailed, match="not a document id"):
        world.verifier.verify(world.delegated(meta=meta))


def test_two_delegations_naming_different_documents_are_refused(world: World):
    owner = str(world.holder.did)
    first = world.holder.delegate(
        world.holder.key, meta={"document_id": DOCUMENT_ID, "document_owner_did": owner}
    )
    other = "5f0b8a52-3c1d-4e8e-9d51-6a0f2b7c9e11"
    second = world.holder.delegate(
        world.caller, root=first, meta={"document_id": other, "document_owner_did": owner}
    )
    with pytest.raises(AuthenticationFailed, match="two different prompt documents"):
        world.verifier.verify(invoke(second, world.caller, world.gateway_did))


def test_a_chain_of_the_maximum_length_verifies(world: World):
    granted = world.verifier.verify(chain(world, MAX_CHAIN_LENGTH))
    assert granted.subject == str(world.holder.did)


def test_a_trusted_root_issuer_is_accepted(world: World):
    trusting = NucVerifier(world.gateway.pubkey.serialize(), (str(world.holder.did),))
    assert trusting.verify(world.own()).subject == str(world.holder.did)
    assert trusting.verify(world.delegated(uses=1)).issuer == str(did_of(world.caller))


# --- rejected tokens --------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    kind: str
    build: Callable[[World], str]
    trusted_root: bool = False
    """Check with a verifier that trusts only an unrelated root issuer."""


def _expired_delegation(w: World) -> str:
    return w.delegated(uses=3, expires_in=timedelta(seconds=-30))


def _not_yet(w: World) -> str:
    root = w.holder.root()
    return (
        NucTokenBuilder.extending(root)
        .body(InvocationBody(args={}))
        .audience(w.gateway_did)
        .not_before(datetime.now(UTC) + timedelta(hours=1))
        .build(w.holder.key)
    )


def _widened_command(w: World) -> str:
    root = w.holder.root(command=Command.parse("/nil/db"))
    return (
        NucTokenBuilder.extending(root)
        .body(InvocationBody(args={}))
        .command(GENERATE)
        .audience(w.gateway_did)
        .build(w.holder.key)
    )


def _wrong_invoker(w: World) -> str:
    proof = w.holder.delegate(w.caller, uses=3)
    return invoke(proof, PrivateKey(), w.gateway_did)


def _drop_root(w: World) -> str:
    parsed = NucTokenEnvelope.parse(w.delegated(uses=3))
    return envelope(parsed.token, parsed.proofs[:-1])


def _drop_all_proofs(w: World) -> str:
    return NucTokenEnvelope.parse(w.own()).token.serialize()


def _extra_proof(w: World) -> str:
    parsed = NucTokenEnvelope.parse(w.own())
    return envelope(parsed.token, [*parsed.proofs, Holder().root().token])


def _different_subject(w: World) -> str:
    root = w.holder.root()
    return (
        NucTokenBuilder.extending(root)
        .body(InvocationBody(args={}))
        .subject(did_of(PrivateKey()))
        .audience(w.gateway_did)
        .build(w.holder.key)
    )


def _root_not_by_subject(w: World) -> str:
    stranger = PrivateKey()
    root = NucTokenBuilder(
        body=DelegationBody([]),
        audience=did_of(stranger),
        subject=w.holder.did,
        command=GENERATE,
    ).build(stranger)
    return invoke(NucTokenEnvelope.parse(root), stranger, w.gateway_did)


def _resigned(w: World) -> str:
    parsed = NucTokenEnvelope.parse(w.delegated(uses=3))
    token = parsed.token
    signature = sign(PrivateKey(), f"{token.raw_header}.{token.raw_payload}")
    return envelope(replace(token, signature=signature), parsed.proofs)


def _claims_the_holder(w: World) -> str:
    # Built and signed by a stranger while naming the holder as its issuer.
    parsed = NucTokenEnvelope.parse(invoke(w.holder.root(), PrivateKey(), w.gateway_did))
    token = forged(parsed.token, PrivateKey(), iss=str(w.holder.did))
    return envelope(token, parsed.proofs)


def _forged_proof(w: World) -> str:
    # The root is re-signed by another key, and the invocation re-pointed at it.
    parsed = NucTokenEnvelope.parse(w.own())
    root = forged(parsed.proofs[0], PrivateKey())
    token = forged(parsed.token, w.holder.key, prf=[root.compute_hash().hex()])
    return envelope(token, [root])


def _short_signature(w: World) -> str:
    parsed = NucTokenEnvelope.parse(w.own())
    return envelope(replace(parsed.token, signature=b"\x01" * 10), parsed.proofs)


def _usage(value: object) -> Callable[[World], str]:
    return lambda w: w.delegated(meta={"usage_limit": value})


def _document(meta: dict[str, object]) -> Callable[[World], str]:
    return lambda w: w.delegated(meta=meta)


def _limit_forever(w: World) -> str:
    root = w.holder.root(expires_in=None, meta={"usage_limit": 5})
    return invoke(root, w.holder.key, w.gateway_did, expires_in=timedelta(minutes=1))


def _policies(*policies: list[object]) -> Callable[[World], str]:
    return lambda w: invoke(
        w.holder.delegate(w.caller, policies=[list(p) for p in policies]), w.caller, w.gateway_did
    )


def _too_long(w: World) -> str:
    padding = "x" * MAX_ENVELOPE_CHARS
    return w.delegated(uses=3, meta={"padding": padding})


JWT_HEADER = b64(b'{"alg":"ES256K"}')

BAD: dict[str, Bad] = {
    "random-jwt-shape": Bad(
        "malformed",
        lambda _: (
            f"eyJ{secrets.token_urlsafe(20)}.{secrets.token_urlsafe(80)}."
            f"{secrets.token_urlsafe(64)}"
        ),
    ),
    "bad-base64": Bad("malformed", lambda _: f"{JWT_HEADER}.a.{b64(b'x' * 64)}"),
    "not-ascii": Bad("malformed", lambda _: f"{JWT_HEADER}.\u00e9\u00e9\u00e9\u00e9.abcd"),
    "json-not-a-token": Bad("malformed", lambda _: f"{JWT_HEADER}.{b64(b'{}')}.{b64(b'x' * 64)}"),
    "other-alg": Bad(
        "malformed",
        lambda w: b64(b'{"alg":"HS256"}') + "." + w.own().split(".", 1)[1],
    ),
    "empty-proof": Bad("malformed", lambda w: w.own() + "/"),
    "expired-root": Bad("expired", lambda w: w.own(expires_in=timedelta(seconds=-30))),
    "expired-delegation": Bad("expired", _expired_delegation),
    "not-yet-valid": Bad("not_yet", _not_yet),
    "other-audience": Bad(
        "audience", lambda w: invoke(w.holder.root(), w.holder.key, did_of(PrivateKey()))
    ),
    "nildb-command": Bad("command", lambda w: w.own(command=Command.parse("/nil/db/read"))),
    "widened-command": Bad("widened", _widened_command),
    "delegated-to-someone-else": Bad("mismatch", _wrong_invoker),
    "missing-root": Bad("missing", _drop_root),
    "no-proofs-at-all": Bad("missing", _drop_all_proofs),
    "extra-proof": Bad("unchained", _extra_proof),
    "different-subject": Bad("subjects", _different_subject),
    "root-not-by-subject": Bad("root_subject", _root_not_by_subject),
    "resigned-by-other-key": Bad("signature", _resigned),
    "claims-the-holder": Bad("signature", _claims_the_holder),
    "forged-proof": Bad("signature", _forged_proof),
    "short-signature": Bad("unreadable_signature", _short_signature),
    "negative-usage": Bad("usage", _usage(-1)),
    "float-usage": Bad("usage", _usage(1.5)),
    "string-usage": Bad("usage", _usage("3")),
    "bool-usage": Bad("usage", _usage(True)),
    "list-usage": Bad("usage", _usage([3])),
    "document-without-owner": Bad("document", _document({"document_id": "doc-1"})),
    "document-id-not-text": Bad(
        "document", _document({"document_id": 7, "document_owner_did": "did:nil:x"})
    ),
    "untrusted-root": Bad("untrusted", lambda w: w.own(), trusted_root=True),
    "untrusted-delegation-root": Bad("untrusted", lambda w: w.delegated(uses=1), trusted_root=True),
    "over-long": Bad("too_long", _too_long),
    "over-long-junk": Bad("too_long", lambda _: "eyJ" + "a" * MAX_ENVELOPE_CHARS),
    "chain-too-long": Bad("chain", lambda w: chain(w, MAX_CHAIN_LENGTH + 1)),
    "no-expiry-anywhere": Bad("no_expiry", lambda w: w.own(expires_in=None)),
    "valid-for-too-long": Bad("lifetime", lambda w: w.own(expires_in=timedelta(days=2))),
    "limit-that-never-expires": Bad("count_lifetime", _limit_forever),
    "unsupported-selector": Bad("selector", _policies(["!=", "$.env.region", "eu"])),
    "too-many-policies": Bad("wide", _policies(*[["==", "$.req.stream", False]] * 11)),
    "too-deep-policy": Bad(
        "deep", _policies(["not", ["not", ["not", ["not", ["not", ["==", ".cmd", "x"]]]]]])
    ),
}

FRAGMENT = {
    "malformed": "malformed",
    "expired": "expired",
    "not_yet": "not valid yet",
    "audience": "its audience is",
    "command": "/nil/db/read is not within /nil/ai",
    "widened": "widens the command",
    "mismatch": "not the audience of its proof",
    "missing": "proof is missing",
    "unchained": "not part of it",
    "subjects": "different subjects",
    "root_subject": "not issued by the subject",
    "signature": "does not match its issuer's key",
    "unreadable_signature": "cannot be checked",
    "usage": "usage_limit",
    "document": "document_id",
    "untrusted": "trusted root issuer",
    "too_long": f"longer than {MAX_ENVELOPE_CHARS} characters",
    "chain": f"chain is longer than {MAX_CHAIN_LENGTH}",
    "no_expiry": "no token in its chain has an expiry",
    "lifetime": f"longer than this gateway accepts ({DEFAULT_MAX_LIFETIME_S} s from now)",
    "count_lifetime": "usable for longer than this gateway keeps use counts",
    "selector": 'the selector "$.env.region", which this gateway cannot evaluate',
    "wide": "policy is too wide",
    "deep": "policy is too deep",
}

CODE = {
    "expired": "expired_nuc_token",
    "audience": "invalid_nuc_audience",
    "command": "invalid_nuc_command",
    "signature": "invalid_nuc_signature",
    "no_expiry": "nuc_expiry_required",
    "lifetime": "nuc_lifetime_too_long",
    "count_lifetime": "nuc_lifetime_too_long",
    "selector": "unsupported_nuc_policy",
}


def verifier_for(w: World, bad: Bad) -> NucVerifier:
    if bad.trusted_root:
        return NucVerifier(w.gateway.pubkey.serialize(), (str(did_of(PrivateKey())),))
    return w.verifier


@pytest.mark.parametrize("bad_id", list(BAD))
def test_each_bad_token_is_rejected_with_its_reason(world: World, bad_id: str):
    bad = BAD[bad_id]
    error = reject(verifier_for(world, bad), bad.build(world))
    assert FRAGMENT[bad.kind] in error.message
    assert error.code == CODE.get(bad.kind, "invalid_nuc_token")


def test_each_kind_of_bad_token_has_its_own_message(world: World):
    messages: dict[str, set[str]] = {}
    for bad in BAD.values():
        error = reject(verifier_for(world, bad), bad.build(world))
        messages.setdefault(bad.kind, set()).add(error.message)
    assert set(messages) == set(FRAGMENT)
    for kind, found in messages.items():
        assert len(found) == 1, (kind, found)
    distinct = [found.pop() for found in messages.values()]
    assert len(set(distinct)) == len(distinct)


def test_the_audience_message_says_where_to_find_the_gateway_key(world: World):
    other = did_of(PrivateKey())
    error = reject(world.verifier, invoke(world.holder.root(), world.holder.key, other))
    assert str(other) in error.message
    assert world.verifier.did in error.message
    assert "/v1/public_key" in error.message


def test_an_over_long_envelope_is_refused_before_parsing(world: World):
    valid = world.own()
    error = reject(world.verifier, valid + "/" + "x" * MAX_ENVELOPE_CHARS)
    assert error.__cause__ is None


def test_a_proofless_invocation_cannot_name_someone_elses_subject(world: World):
    attacker = PrivateKey()
    token = NucTokenBuilder(
        body=InvocationBody(args={}),
        audience=world.gateway_did,
        subject=world.holder.did,
        command=GENERATE,
    ).build(attacker)
    reject(world.verifier, token)


# --- shape ------------------------------------------------------------------------------------


def test_looks_like_nuc_for_envelopes(world: World):
    assert looks_like_nuc(world.own())
    assert looks_like_nuc(world.delegated(uses=1))
    assert looks_like_nuc(NucTokenEnvelope.parse(world.own()).token.serialize())


@pytest.mark.parametrize(
    "credential",
    [
        "nilai_0123456789ab_" + "s" * 43,
        "a" * 64,
        "0x" + "f" * 64,
        secrets.token_hex(32),
        "sk-test-alpha-0123456789",
        "hello",
        "",
        "eyJ",
        "eyJ.only-one-dot",
        "a.b.c",
    ],
)
def test_looks_like_nuc_is_false_for_other_credentials(credential: str):
    assert not looks_like_nuc(credential)
