"""The nilauth root token and the delegations minted from it, against a MockTransport nilauth.

The fake nilauth below checks the request the way the real one does (a compact secp256k1
signature over the payload bytes, the payload naming nilauth's key and the ``nildb`` module) and
issues real root NUCs signed with its own key, expiring on the test's clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from coincurve import PublicKey as CoincurvePublicKey
from nuc.builder import NucTokenBuilder  # pyright: ignore[reportMissingTypeStubs]
from nuc.envelope import NucTokenEnvelope  # pyright: ignore[reportMissingTypeStubs]
from nuc.token import Command, DelegationBody, Did  # pyright: ignore[reportMissingTypeStubs]
from secp256k1 import PrivateKey  # pyright: ignore[reportMissingTypeStubs]

from nilai.context.nilauth import (
    DATA_CREATE,
    NilauthRootTokens,
    StaticRootTokens,
    builder_did,
    delegate_data_create,
    load_builder_key,
    parse_user_did,
    public_key_hex,
    sign_compact,
    token_fingerprint,
)
from nilai.errors import ContextUnavailable, ValidationFailed

NILAUTH = "http://nilauth.test"
LIFETIME_S = 3600


class FakeClock:
    """Wall-clock seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeNilauth:
    """nilauth's two endpoints the gateway uses, with knobs for failures."""

    clock: FakeClock
    key: PrivateKey = field(default_factory=PrivateKey)
    lifetime_s: int = LIFETIME_S
    about_calls: int = 0
    create_calls: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])
    failure: Callable[[httpx.Request], httpx.Response] | None = None
    """When set, answers every request (an outage)."""
    create_answer: Callable[[httpx.Request], httpx.Response] | None = None
    """When set, answers token requests only (``/about`` still works)."""
    gate: asyncio.Event | None = None
    """When set, token requests wait for it (to hold callers in flight)."""

    @property
    def public_key_hex(self) -> str:
        return public_key_hex(self.key)

    def issue(self, requester: Did) -> str:
        return (
            NucTokenBuilder.delegation([])
            .command(Command(["nil", "db"]))
            .subject(requester)
            .audience(requester)
            .expires_at(datetime.fromtimestamp(self.clock() + self.lifetime_s, UTC))
            .build(self.key)
        )

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/about":
            self.about_calls += 1
            if self.failure is not None:
                return self.failure(request)
            return httpx.Response(
                200,
                json={
                    "public_key": self.public_key_hex,
                    "build": {"commit": "test", "timestamp": "2025-01-01T00:00:00Z"},
                    "started": "2025-01-01T00:00:00Z",
                },
            )
        assert request.method == "POST"
        assert request.url.path == "/api/v1/nucs/create"
        self.create_calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            return self.failure(request)
        if self.create_answer is not None:
            return self.create_answer(request)
        body = json.loads(request.content)
        self.bodies.append(body)
        requester = Did(bytes.fromhex(body["public_key"]))
        return httpx.Response(200, json={"token": self.issue(requester)})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


@dataclass
class World:
    clock: FakeClock
    nilauth: FakeNilauth
    key: PrivateKey
    tokens: NilauthRootTokens


@pytest.fixture
async def world():
    clock = FakeClock()
    nilauth = FakeNilauth(clock)
    key = PrivateKey()
    async with httpx.AsyncClient(transport=nilauth.transport()) as http:
        yield World(
            clock, nilauth, key, NilauthRootTokens(http, NILAUTH, key, timeout_s=2, clock=clock)
        )


def answer(status: int, **kwargs: Any) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _request: httpx.Response(status, **kwargs)


def refuse_connection(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


# --- the request -----------------------------------------------------------------------------


async def test_the_token_request_is_signed_by_the_builder_over_the_payload_bytes(world: World):
    await world.tokens.root()
    (body,) = world.nilauth.bodies
    assert set(body) == {"public_key", "signature", "payload"}
    assert body["public_key"] == public_key_hex(world.key)
    assert len(body["public_key"]) == 66
    assert len(body["signature"]) == 128
    payload_bytes = bytes.fromhex(body["payload"])
    # coincurve checks compact r||s over sha256(payload), as nilauth does.
    signer = CoincurvePublicKey(bytes.fromhex(body["public_key"]))
    der = _compact_to_der(bytes.fromhex(body["signature"]))
    assert signer.verify(der, payload_bytes)
    assert not signer.verify(der, payload_bytes + b" ")


async def test_the_payload_names_nilauth_and_the_nildb_module(world: World):
    await world.tokens.root()
    payload = json.loads(bytes.fromhex(world.nilauth.bodies[0]["payload"]))
    assert set(payload) == {"nonce", "target_public_key", "expires_at", "blind_module"}
    assert payload["target_public_key"] == world.nilauth.public_key_hex
    assert payload["blind_module"] == "nildb"
    assert payload["expires_at"] == int(world.clock()) + 60
    assert len(payload["nonce"]) == 32
    int(payload["nonce"], 16)


async def test_the_root_is_the_token_nilauth_issued_to_the_builder(world: World):
    root = await world.tokens.root()
    token = root.token.token
    assert str(token.issuer) == "did:nil:" + world.nilauth.public_key_hex
    assert str(token.audience) == builder_did(world.key)
    assert str(token.command) == "/nil/db"
    root.validate_signatures()


def test_sign_compact_is_r_and_s_over_sha256_of_the_message():
    key = PrivateKey()
    signature = sign_compact(key, b"payload")
    assert len(signature) == 64
    signer = CoincurvePublicKey(bytes.fromhex(public_key_hex(key)))
    assert signer.verify(_compact_to_der(signature), b"payload")
    assert not signer.verify(_compact_to_der(signature), b"payloaD")


# --- single flight, reuse, refresh -----------------------------------------------------------


async def test_twenty_concurrent_callers_cause_one_about_and_one_create(world: World):
    world.nilauth.gate = asyncio.Event()
    callers = [asyncio.create_task(world.tokens.root()) for _ in range(20)]
    await _until(lambda: world.nilauth.create_calls == 1)
    await asyncio.sleep(0.01)  # every caller has reached the wait by now
    world.nilauth.gate.set()
    roots = await asyncio.gather(*callers)
    assert world.nilauth.about_calls == 1
    assert world.nilauth.create_calls == 1
    assert len({r.serialize() for r in roots}) == 1


async def test_the_token_is_reused_until_refresh_at_and_fetched_again_after(world: World):
    first = await world.tokens.root()
    # Refresh at exp - 60 s: reused just before, fetched again at that moment.
    world.clock.now += LIFETIME_S - 60 - 1
    assert (await world.tokens.root()).serialize() == first.serialize()
    assert world.nilauth.create_calls == 1
    world.clock.now += 1
    second = await world.tokens.root()
    assert second.serialize() != first.serialize()
    assert world.nilauth.create_calls == 2
    assert (await world.tokens.root()).serialize() == second.serialize()
    assert world.nilauth.create_calls == 2


async def test_a_short_lived_token_is_refreshed_at_half_its_life(world: World):
    world.nilauth.lifetime_s = 60
    await world.tokens.root()
    world.clock.now += 29
    await world.tokens.root()
    assert world.nilauth.create_calls == 1
    world.clock.now += 1
    await world.tokens.root()
    assert world.nilauth.create_calls == 2


# --- nilauth failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        answer(503, json={"message": "down", "error_code": "SERVICE_UNAVAILABLE"}),
        answer(503, text="Service Unavailable"),
        answer(412, json={"message": "no", "error_code": "NOT_SUBSCRIBED"}),
        answer(200, text="<html>not json</html>"),
        answer(200, json={"no_token": True}),
        answer(200, json=["a", "list"]),
        refuse_connection,
    ],
    ids=["503-json", "503-text", "412", "invalid-json", "no-token", "not-an-object", "refused"],
)
async def test_nilauth_failing_is_context_unavailable(world: World, failure: Any):
    world.nilauth.failure = failure
    with pytest.raises(ContextUnavailable) as caught:
        await world.tokens.root()
    assert caught.value.status == 503
    assert caught.value.code == "nilauth_unavailable"


@pytest.mark.parametrize(
    "token",
    ["not-a-jwt", "a.b.c", "eyJhbGciOiJFUzI1NksifQ.e30.AAAA", 42],
    ids=["no-dots", "bad-base64", "empty-payload", "not-a-string"],
)
async def test_a_token_nilauth_garbled_is_context_unavailable(world: World, token: object):
    world.nilauth.create_answer = answer(200, json={"token": token})
    with pytest.raises(ContextUnavailable) as caught:
        await world.tokens.root()
    assert caught.value.code == "nilauth_unavailable"


def _root(issuer: PrivateKey, audience: Did, subject: Did, clock: FakeClock) -> str:
    return (
        NucTokenBuilder.delegation([])
        .command(Command(["nil", "db"]))
        .subject(subject)
        .audience(audience)
        .expires_at(datetime.fromtimestamp(clock() + LIFETIME_S, UTC))
        .build(issuer)
    )


async def test_a_root_token_not_issued_by_nilauth_is_refused(world: World):
    builder = Did(bytes.fromhex(public_key_hex(world.key)))
    world.nilauth.create_answer = lambda _r: httpx.Response(
        200, json={"token": _root(PrivateKey(), builder, builder, world.clock)}
    )
    with pytest.raises(ContextUnavailable):
        await world.tokens.root()


async def test_a_root_token_for_another_builder_is_refused(world: World):
    builder = Did(bytes.fromhex(public_key_hex(world.key)))
    other = Did(bytes.fromhex(public_key_hex(PrivateKey())))
    for audience, subject in ((other, builder), (builder, other)):
        token = _root(world.nilauth.key, audience, subject, world.clock)
        world.nilauth.create_answer = answer(200, json={"token": token})
        with pytest.raises(ContextUnavailable):
            await world.tokens.root()


async def test_a_chain_instead_of_a_root_is_refused(world: World):
    builder = Did(bytes.fromhex(public_key_hex(world.key)))
    root = NucTokenEnvelope.parse(_root(world.nilauth.key, builder, builder, world.clock))
    chained = NucTokenBuilder.extending(root).audience(builder).build(world.nilauth.key)
    world.nilauth.create_answer = answer(200, json={"token": chained})
    with pytest.raises(ContextUnavailable):
        await world.tokens.root()


async def test_a_root_token_with_a_bad_signature_is_context_unavailable(world: World):
    good = world.nilauth.issue(Did(bytes.fromhex(public_key_hex(world.key))))
    header, payload, _signature = good.split(".")
    forged = f"{header}.{payload}.{_b64url(bytes(64))}"
    world.nilauth.create_answer = answer(200, json={"token": forged})
    with pytest.raises(ContextUnavailable):
        await world.tokens.root()


async def test_a_failure_does_not_stick_the_next_call_fetches_again(world: World):
    world.nilauth.failure = answer(503, text="down")
    with pytest.raises(ContextUnavailable):
        await world.tokens.root()
    world.nilauth.failure = None
    root = await world.tokens.root()
    assert str(root.token.token.audience) == builder_did(world.key)


async def test_a_failed_refresh_keeps_serving_the_unexpired_token(world: World):
    first = await world.tokens.root()
    world.clock.now += LIFETIME_S - 30  # past refresh_at, before exp
    world.nilauth.failure = answer(503, text="down")
    assert (await world.tokens.root()).serialize() == first.serialize()
    assert world.nilauth.about_calls == 2  # it did try to refresh


async def test_a_failed_refresh_after_expiry_is_context_unavailable(world: World):
    await world.tokens.root()
    world.clock.now += LIFETIME_S + 1
    world.nilauth.failure = refuse_connection
    with pytest.raises(ContextUnavailable) as caught:
        await world.tokens.root()
    assert caught.value.code == "nilauth_unavailable"


async def test_a_cancelled_caller_does_not_cancel_the_fetch_for_the_others(world: World):
    world.nilauth.gate = asyncio.Event()
    leaving = asyncio.create_task(world.tokens.root())
    staying = asyncio.create_task(world.tokens.root())
    await _until(lambda: world.nilauth.create_calls == 1)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    world.nilauth.gate.set()
    root = await staying
    assert str(root.token.token.audience) == builder_did(world.key)
    assert world.nilauth.create_calls == 1


async def test_a_fetch_whose_only_caller_left_still_completes_and_is_kept(world: World):
    world.nilauth.gate = asyncio.Event()
    leaving = asyncio.create_task(world.tokens.root())
    await _until(lambda: world.nilauth.create_calls == 1)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    world.nilauth.gate.set()
    await _until(lambda: len(world.nilauth.bodies) == 1)
    await asyncio.sleep(0.01)
    await world.tokens.root()
    assert world.nilauth.create_calls == 1


async def test_a_failure_is_logged_without_the_key_or_the_body(
    world: World, caplog: pytest.LogCaptureFixture
):
    world.nilauth.failure = answer(503, text="SECRET-BODY")
    with caplog.at_level(logging.DEBUG), pytest.raises(ContextUnavailable):
        await world.tokens.root()
    text = caplog.text
    assert "status 503" in text
    assert "SECRET-BODY" not in text
    assert world.key.serialize() not in text


# --- delegations -----------------------------------------------------------------------------


async def test_delegate_data_create_extends_the_root_to_the_user(world: World):
    root = await world.tokens.root()
    user = PrivateKey()
    user_did = "did:nil:" + public_key_hex(user)
    now = time.time()
    token = delegate_data_create(
        root, parse_user_did(user_did, param="p"), world.key, ttl_s=60, now=now
    )
    envelope = NucTokenEnvelope.parse(token)
    envelope.validate_signatures()
    delegation = envelope.token.token
    assert str(delegation.command) == "/nil/db/data/create"
    assert delegation.command == DATA_CREATE
    assert str(delegation.audience) == user_did
    assert str(delegation.issuer) == builder_did(world.key)
    assert str(delegation.subject) == builder_did(world.key)
    assert isinstance(delegation.body, DelegationBody)
    assert delegation.body.policies == []
    assert delegation.expires_at is not None
    assert abs(delegation.expires_at.timestamp() - (now + 60)) <= 1
    assert [p.serialize() for p in envelope.proofs] == [root.token.serialize()]
    assert delegation.proofs == [root.token.compute_hash()]


async def test_a_delegation_signed_by_another_key_does_not_validate(world: World):
    root = await world.tokens.root()
    token = delegate_data_create(
        root, parse_user_did("did:nil:02" + "11" * 32, param="p"), world.key, ttl_s=60, now=0
    )
    header, payload, _ = token.split("/")[0].split(".")
    other = PrivateKey()
    resigned = f"{header}.{payload}.{_b64url(sign_compact(other, f'{header}.{payload}'.encode()))}"
    with pytest.raises(Exception, match="signature"):
        NucTokenEnvelope.parse("/".join([resigned, *token.split("/")[1:]])).validate_signatures()


async def test_static_root_tokens_twin():
    with pytest.raises(ContextUnavailable) as caught:
        await StaticRootTokens(None).root()
    assert caught.value.code == "nilauth_unavailable"
    key = PrivateKey()
    root = NucTokenEnvelope.parse(
        NucTokenBuilder.delegation([])
        .command(Command(["nil", "db"]))
        .subject(Did(bytes.fromhex(public_key_hex(key))))
        .audience(Did(bytes.fromhex(public_key_hex(key))))
        .build(key)
    )
    assert await StaticRootTokens(root).root() is root


# --- parsing and keys ------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["02", "03"])
def test_parse_user_did_accepts_a_compressed_key(prefix: str):
    value = f"did:nil:{prefix}" + "aB" * 32
    did = parse_user_did(value, param="prompt_delegation_request")
    assert did.public_key == bytes.fromhex(value.removeprefix("did:nil:"))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "did:nil:",
        "did:nil:04" + "ab" * 32,  # not a compressed key
        "did:nil:02" + "ab" * 31,  # too short
        "did:nil:02" + "ab" * 32 + "a",  # too long
        "did:nil:02" + "zz" * 32,  # not hex
        "did:key:02" + "ab" * 32,
        "DID:NIL:02" + "ab" * 32,
        " did:nil:02" + "ab" * 32,
        "did:nil:02" + "ab" * 32 + "\n",
    ],
)
def test_parse_user_did_rejects_anything_else_with_a_422_naming_the_param(value: str):
    with pytest.raises(ValidationFailed) as caught:
        parse_user_did(value, param="prompt_delegation_request")
    assert caught.value.status == 422
    assert caught.value.param == "prompt_delegation_request"
    assert "prompt_delegation_request" in caught.value.message


def test_load_builder_key_reads_64_hex_digits():
    key = PrivateKey()
    hex_key = key.serialize()
    loaded = load_builder_key(f"  {hex_key.upper()}\n")
    assert public_key_hex(loaded) == public_key_hex(key)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "ab" * 31,
        "ab" * 33,
        "zz" + "ab" * 31,
        "0x" + "ab" * 31,
        "ab" * 16 + " " + "ab" * 16,
    ],
)
def test_load_builder_key_rejects_other_text_without_echoing_it(value: str):
    with pytest.raises(ValueError, match="64 hex digits") as caught:
        load_builder_key(value)
    if value.strip():
        assert value.strip() not in str(caught.value)
        assert value.strip()[:8] not in str(caught.value)


def test_builder_did_and_fingerprint():
    key = PrivateKey()
    assert builder_did(key) == "did:nil:" + public_key_hex(key)
    fingerprint = token_fingerprint("a.b.c")
    assert len(fingerprint) == 12
    assert fingerprint != token_fingerprint("a.b.d")
    assert "a.b.c" not in fingerprint


# --- helpers ---------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _compact_to_der(signature: bytes) -> bytes:
    """DER of a compact r||s signature, which coincurve's verify takes."""

    def integer(value: bytes) -> bytes:
        value = value.lstrip(b"\x00") or b"\x00"
        if value[0] & 0x80:  # DER integers are signed: keep a positive one positive
            value = b"\x00" + value
        return bytes([0x02, len(value)]) + value

    body = integer(signature[:32]) + integer(signature[32:])
    return bytes([0x30, len(body)]) + body


async def _until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout_s)
