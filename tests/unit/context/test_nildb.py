"""Reading and revealing a prompt document from three MockTransport nilDB nodes.

Each fake node holds one real blindfold share (made exactly as secretvaults does for ``%allot``
with a cluster of N nodes: a ``store`` cluster key without threshold, one XOR share per node)
and answers the way nilDB 1.0.0 does (see /tmp/briefs/nildb_wire.md §3.6).
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import blindfold  # pyright: ignore[reportMissingTypeStubs]
import httpx
import pytest
from nuc.envelope import NucTokenEnvelope  # pyright: ignore[reportMissingTypeStubs]
from nuc.token import InvocationBody  # pyright: ignore[reportMissingTypeStubs]
from secp256k1 import PrivateKey  # pyright: ignore[reportMissingTypeStubs]

from nilai.auth.base import PromptDocument
from nilai.context.nilauth import builder_did, public_key_hex
from nilai.context.nildb import NilDBPromptVault
from nilai.errors import ContextCorrupt, ContextNotAccessible, ContextUnavailable

COLLECTION = "6f1c1b8e-3c3a-4d8e-9a43-1d2b3c4d5e6f"
DOCUMENT = "0b7a52c4-7e6e-4d55-8c1a-2f7a1f8e9d10"
PROMPT = "You are a helpful pirate. Never reveal the treasure map. ☠"
MAX_PROMPT_BYTES = 4096

Answer = Callable[[httpx.Request], httpx.Response]


def encrypt(value: str | int | bytes, nodes: int = 3) -> list[str]:
    """Shares of ``value`` as secretvaults makes them for ``%allot`` on ``nodes`` nodes."""
    key: object = blindfold.ClusterKey.generate({"nodes": [{}] * nodes}, {"store": True})  # pyright: ignore[reportUnknownMemberType]
    shares: object = blindfold.encrypt(key, value)  # pyright: ignore[reportUnknownMemberType]
    assert isinstance(shares, list)
    texts = [share for share in cast("list[object]", shares) if isinstance(share, str)]
    assert len(texts) == nodes
    return texts


def did_text(key: PrivateKey) -> str:
    return "did:nil:" + public_key_hex(key)


@dataclass
class FakeNode:
    """One nilDB node: its key, the documents it holds, and what it was asked."""

    url: str
    key: PrivateKey = field(default_factory=PrivateKey)
    documents: dict[tuple[str, str], dict[str, Any]] = field(
        default_factory=dict[tuple[str, str], dict[str, Any]]
    )
    about_calls: int = 0
    read_calls: int = 0
    authorizations: list[str] = field(default_factory=list[str])
    answer: Answer | None = None
    """When set, answers every read (not ``/about``)."""
    about_answer: Answer | None = None

    @property
    def did(self) -> str:
        return did_text(self.key)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/about":
            self.about_calls += 1
            if self.about_answer is not None:
                return self.about_answer(request)
            return httpx.Response(
                200,
                json={
                    "started": "2025-01-01T00:00:00.000Z",
                    "build": {"time": "2025-01-01T00:00:00.000Z", "commit": "x", "version": "1"},
                    "public_key": public_key_hex(self.key),
                    "url": self.url,
                    "maintenance": {"active": False, "started_at": "2025-01-01T00:00:00.000Z"},
                },
            )
        self.read_calls += 1
        self.authorizations.append(request.headers.get("authorization", ""))
        if self.answer is not None:
            return self.answer(request)
        prefix = "/v1/users/data/"
        assert path.startswith(prefix), path
        collection, document = path.removeprefix(prefix).split("/")
        stored = self.documents.get((collection, document))
        if stored is None:
            return httpx.Response(
                404,
                json={
                    "ts": "2025-01-01T00:00:00.000Z",
                    "errors": ["ResourceAccessDeniedError", "type: collection"],
                },
            )
        return httpx.Response(200, json={"data": stored})


@dataclass
class Cluster:
    """Three nodes behind one MockTransport, routed by host."""

    nodes: list[FakeNode]
    requests: list[httpx.Request] = field(default_factory=list[httpx.Request])

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        for node in self.nodes:
            if str(request.url).startswith(node.url):
                return node.handle(request)
        raise AssertionError(f"no node at {request.url}")

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def store(
        self,
        shares: list[str],
        *,
        owner: str,
        document: str = DOCUMENT,
        builder: str = "",
    ) -> None:
        for node, share in zip(self.nodes, shares, strict=True):
            node.documents[(COLLECTION, document)] = {
                "_id": document,
                "_created": "2025-01-01T00:00:00.000Z",
                "_updated": "2025-01-01T00:00:00.000Z",
                "_owner": owner,
                "_acl": [{"grantee": builder, "read": True, "write": False, "execute": True}],
                "prompt": {"%share": share},
            }

    def reads(self) -> int:
        return sum(node.read_calls for node in self.nodes)

    def abouts(self) -> int:
        return sum(node.about_calls for node in self.nodes)


@dataclass
class World:
    cluster: Cluster
    builder: PrivateKey
    owner: PrivateKey
    vault: NilDBPromptVault
    shares: list[str]
    http: httpx.AsyncClient

    def vault_with_limit(self, max_prompt_bytes: int) -> NilDBPromptVault:
        return NilDBPromptVault(
            self.http,
            self.cluster.urls,
            self.builder,
            COLLECTION,
            timeout_s=2,
            max_prompt_bytes=max_prompt_bytes,
        )

    @property
    def owner_did(self) -> str:
        return did_text(self.owner)

    def document(self, document_id: str = DOCUMENT, owner: str | None = None) -> PromptDocument:
        return PromptDocument(
            document_id=document_id, owner_did=self.owner_did if owner is None else owner
        )

    def node(self, index: int) -> FakeNode:
        return self.cluster.nodes[index]

    def set_share(self, index: int, share: str) -> None:
        self.node(index).documents[(COLLECTION, DOCUMENT)]["prompt"] = {"%share": share}


@pytest.fixture
async def world() -> AsyncIterator[World]:
    cluster = Cluster([FakeNode(f"http://node{i}.test") for i in range(3)])
    builder, owner = PrivateKey(), PrivateKey()
    shares = encrypt(PROMPT)
    cluster.store(shares, owner=did_text(owner), builder=builder_did(builder))
    async with httpx.AsyncClient(transport=httpx.MockTransport(cluster.handle)) as http:
        vault = NilDBPromptVault(
            http,
            cluster.urls,
            builder,
            COLLECTION,
            timeout_s=2,
            max_prompt_bytes=MAX_PROMPT_BYTES,
        )
        yield World(cluster, builder, owner, vault, shares, http)


def refuse_connection(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def answer(status: int, **kwargs: Any) -> Answer:
    return lambda _request: httpx.Response(status, **kwargs)


def flip_first_byte(share: str, mask: int) -> str:
    raw = bytearray(base64.b64decode(share))
    raw[0] ^= mask
    return base64.b64encode(bytes(raw)).decode()


async def reveal_fails[E: Exception](world: World, error: type[E]) -> E:
    with pytest.raises(error) as caught:
        await world.vault.reveal(world.document())
    return caught.value


# --- the happy path --------------------------------------------------------------------------


async def test_the_prompt_is_revealed_from_all_three_nodes(world: World):
    assert await world.vault.reveal(world.document()) == PROMPT
    assert [node.read_calls for node in world.cluster.nodes] == [1, 1, 1]
    assert [node.about_calls for node in world.cluster.nodes] == [1, 1, 1]


async def test_each_read_goes_to_the_document_path_of_the_collection(world: World):
    await world.vault.reveal(world.document())
    paths = sorted(
        str(r.url) for r in world.cluster.requests if r.url.path.startswith("/v1/users/data/")
    )
    assert paths == [f"{url}/v1/users/data/{COLLECTION}/{DOCUMENT}" for url in world.cluster.urls]


async def test_each_node_gets_an_invocation_addressed_to_it_for_the_owner(world: World):
    await world.vault.reveal(world.document())
    for node in world.cluster.nodes:
        (authorization,) = node.authorizations
        scheme, _, raw = authorization.partition(" ")
        assert scheme == "Bearer"
        envelope = NucTokenEnvelope.parse(raw)
        envelope.validate_signatures()
        assert envelope.proofs == []  # a single token, no chain
        token = envelope.token.token
        assert str(token.audience) == node.did
        assert str(token.subject) == world.owner_did
        assert str(token.issuer) == builder_did(world.builder)
        assert str(token.command) == "/nil/db/users/read"
        assert isinstance(token.body, InvocationBody)
        assert token.body.args == {}
        assert token.expires_at is not None


async def test_node_dids_from_about_are_cached_across_reveals(world: World):
    await world.vault.reveal(world.document())
    assert world.cluster.abouts() == 3
    assert await world.vault.reveal(world.document()) == PROMPT
    assert world.cluster.abouts() == 3
    assert world.cluster.reads() == 6


async def test_a_failed_about_is_not_cached(world: World):
    world.node(1).about_answer = answer(503, text="Service Unavailable")
    await reveal_fails(world, ContextUnavailable)
    world.node(1).about_answer = None
    assert await world.vault.reveal(world.document()) == PROMPT


async def test_a_two_node_cluster_reveals_too():
    nodes = [FakeNode(f"http://pair{i}.test") for i in range(2)]
    cluster = Cluster(nodes)
    builder, owner = PrivateKey(), PrivateKey()
    cluster.store(encrypt("two shares", nodes=2), owner=did_text(owner))
    async with httpx.AsyncClient(transport=httpx.MockTransport(cluster.handle)) as http:
        vault = NilDBPromptVault(
            http, cluster.urls, builder, COLLECTION, timeout_s=2, max_prompt_bytes=100
        )
        document = PromptDocument(document_id=DOCUMENT, owner_did=did_text(owner))
        assert await vault.reveal(document) == "two shares"


# --- nodes down: 503, never a share as text ---------------------------------------------------


@pytest.mark.parametrize("index", [0, 2])
async def test_one_node_unreachable_is_503_and_no_share_is_used(world: World, index: int):
    world.node(index).answer = refuse_connection
    error = await reveal_fails(world, ContextUnavailable)
    assert error.status == 503
    assert error.code == "nildb_unavailable"
    for share in world.shares:
        assert share not in error.message


async def test_one_node_timing_out_is_503(world: World):
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    world.node(1).answer = timeout
    error = await reveal_fails(world, ContextUnavailable)
    assert error.code == "nildb_unavailable"


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_a_node_answering_5xx_is_503(world: World, status: int):
    world.node(1).answer = answer(status, text="Internal Server Error")
    error = await reveal_fails(world, ContextUnavailable)
    assert error.status == 503


async def test_a_node_whose_about_is_unreachable_is_503(world: World):
    world.node(2).about_answer = refuse_connection
    await reveal_fails(world, ContextUnavailable)
    assert world.node(2).read_calls == 0


@pytest.mark.parametrize(
    "about",
    [
        answer(200, json={"public_key": "not-hex"}),
        answer(200, json={"public_key": "04" + "ab" * 32}),
        answer(200, json={"no_key": True}),
        answer(200, json=["list"]),
        answer(200, text="not json"),
    ],
    ids=["not-hex", "uncompressed", "missing", "not-object", "not-json"],
)
async def test_a_node_with_an_unusable_about_is_503(world: World, about: Answer):
    world.node(0).about_answer = about
    await reveal_fails(world, ContextUnavailable)


async def test_a_node_down_wins_over_another_node_refusing(world: World):
    world.node(0).answer = refuse_connection
    world.node(1).answer = answer(404, json={"errors": ["ResourceAccessDeniedError"]})
    await reveal_fails(world, ContextUnavailable)


# --- not accessible: 403 ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_one_node_refusing_the_document_is_403(world: World, status: int):
    world.node(1).answer = answer(status, text="Unauthorized")
    error = await reveal_fails(world, ContextNotAccessible)
    assert error.status == 403


async def test_a_document_missing_on_one_node_is_403(world: World):
    del world.node(2).documents[(COLLECTION, DOCUMENT)]
    error = await reveal_fails(world, ContextNotAccessible)
    assert error.status == 403


async def test_an_unknown_document_is_403(world: World):
    with pytest.raises(ContextNotAccessible):
        await world.vault.reveal(world.document(str(uuid.uuid4())))


@pytest.mark.parametrize(
    "document_id",
    [
        "not-a-uuid",
        "../../v1/builders",
        DOCUMENT + "/x",
        DOCUMENT[:-1],
        "",
        DOCUMENT + "\n",
    ],
)
async def test_a_non_uuid_document_id_is_403_without_any_request(world: World, document_id: str):
    with pytest.raises(ContextNotAccessible):
        await world.vault.reveal(world.document(document_id))
    assert world.cluster.requests == []


@pytest.mark.parametrize(
    "owner",
    [
        "did:nil:04" + "ab" * 32,
        "did:nil:02" + "ab" * 31,
        "did:key:02" + "ab" * 32,
        "02" + "ab" * 32,
        "did:nil:02" + "zz" * 32,
        "",
    ],
)
async def test_a_malformed_owner_did_is_403_without_any_request(world: World, owner: str):
    with pytest.raises(ContextNotAccessible):
        await world.vault.reveal(world.document(owner=owner))
    assert world.cluster.requests == []


# --- corrupt: 502 ----------------------------------------------------------------------------


async def test_a_node_returning_another_owner_is_502(world: World):
    world.node(1).documents[(COLLECTION, DOCUMENT)]["_owner"] = did_text(PrivateKey())
    error = await reveal_fails(world, ContextCorrupt)
    assert error.status == 502


async def test_a_node_returning_another_document_id_is_502(world: World):
    world.node(0).documents[(COLLECTION, DOCUMENT)]["_id"] = str(uuid.uuid4())
    await reveal_fails(world, ContextCorrupt)


@pytest.mark.parametrize(
    "prompt",
    [None, "plain text", {"%share": 42}, {"%allot": "x"}, ["list"]],
    ids=["missing", "plain-string", "share-not-string", "other-key", "list"],
)
async def test_a_copy_without_a_share_string_is_502(world: World, prompt: object):
    world.node(2).documents[(COLLECTION, DOCUMENT)]["prompt"] = prompt
    error = await reveal_fails(world, ContextCorrupt)
    assert "plain text" not in error.message


@pytest.mark.parametrize("mask", [0x01, 0x02, 0x03, 0xFF], ids=["int", "type3", "bytes", "0xFE"])
async def test_a_share_with_a_tampered_type_byte_is_502(world: World, mask: int):
    world.set_share(1, flip_first_byte(world.shares[1], mask))
    error = await reveal_fails(world, ContextCorrupt)
    assert error.status == 502


async def test_a_share_from_another_encryption_of_another_length_is_502(world: World):
    world.set_share(0, encrypt(PROMPT + " and more")[0])
    await reveal_fails(world, ContextCorrupt)


async def test_a_share_from_another_encryption_of_the_same_prompt_is_502(world: World):
    # The combination is random bytes: the type byte is 1 with chance 1/256, and ~60 random
    # bytes are then valid UTF-8 with negligible chance, so this fails closed in practice.
    world.set_share(0, encrypt(PROMPT)[0])
    await reveal_fails(world, ContextCorrupt)


@pytest.mark.parametrize(
    "share",
    ["", "!!!!", "AAA", "%%%", "A" * 8],
    ids=["empty", "not-base64", "bad-padding", "garbage", "short"],
)
async def test_a_share_that_is_not_a_share_is_502(world: World, share: str):
    world.set_share(2, share)
    await reveal_fails(world, ContextCorrupt)


async def test_all_shares_empty_is_502(world: World):
    for index in range(3):
        world.set_share(index, "")
    await reveal_fails(world, ContextCorrupt)


async def test_an_xor_tamper_past_the_type_byte_silently_changes_the_text(world: World):
    """Known limitation of blindfold's XOR sharing, documented here: there is no integrity check.

    Flipping bit 0x01 of the last byte of one share turns the last ASCII letter of the prompt
    into another ASCII letter; the reveal succeeds with that other text. Fail-closed only holds
    for tampers that break the type byte, the UTF-8 or the share lengths.
    """
    raw = bytearray(base64.b64decode(world.shares[1]))
    position = 1 + PROMPT.index("map")  # 'm' (0x6d) becomes 'l' (0x6c)
    raw[position] ^= 0x01
    world.set_share(1, base64.b64encode(bytes(raw)).decode())
    revealed = await world.vault.reveal(world.document())
    assert revealed == PROMPT.replace("map", "lap")


async def test_shares_of_an_int_are_502(world: World):
    world.cluster.store(encrypt(1234), owner=world.owner_did)
    await reveal_fails(world, ContextCorrupt)


async def test_shares_of_bytes_are_502(world: World):
    world.cluster.store(encrypt(PROMPT.encode()), owner=world.owner_did)
    await reveal_fails(world, ContextCorrupt)


async def test_a_prompt_over_max_prompt_bytes_is_502(world: World):
    world.cluster.store(encrypt("é" * 51), owner=world.owner_did)  # 102 bytes in 51 chars
    with pytest.raises(ContextCorrupt):
        await world.vault_with_limit(101).reveal(world.document())


async def test_a_prompt_of_exactly_max_prompt_bytes_is_revealed(world: World):
    world.cluster.store(encrypt("é" * 50), owner=world.owner_did)
    assert await world.vault_with_limit(100).reveal(world.document()) == "é" * 50


async def test_the_largest_prompt_blindfold_stores_is_revealed(world: World):
    world.cluster.store(encrypt("é" * 2048), owner=world.owner_did)  # 4096 bytes
    assert await world.vault.reveal(world.document()) == "é" * 2048


async def test_fewer_shares_than_nodes_cannot_be_revealed_by_a_smaller_cluster(world: World):
    # Shares made for a 2-node cluster on a 3-node cluster: two shares plus a stray one.
    two = encrypt(PROMPT, nodes=2)
    world.set_share(0, two[0])
    world.set_share(1, two[1])
    await reveal_fails(world, ContextCorrupt)


async def test_a_node_answering_non_json_200_is_502(world: World):
    world.node(0).answer = answer(200, text="<html>hello</html>")
    error = await reveal_fails(world, ContextCorrupt)
    assert error.status == 502


@pytest.mark.parametrize(
    "body",
    [{"data": None}, {"data": "text"}, {"nodata": {}}, ["list"], "string"],
    ids=["null", "string-data", "no-data", "list", "string"],
)
async def test_a_node_answering_json_without_a_document_is_502(world: World, body: object):
    world.node(0).answer = answer(200, json=body)
    await reveal_fails(world, ContextCorrupt)


@pytest.mark.parametrize("status", [201, 204, 302, 400, 409])
async def test_a_node_answering_an_unexpected_status_is_502(world: World, status: int):
    world.node(0).answer = answer(status, text="")
    await reveal_fails(world, ContextCorrupt)


# --- nothing secret in logs ------------------------------------------------------------------


def _secrets(world: World) -> list[str]:
    return [PROMPT, "treasure", *world.shares]


async def test_no_log_record_holds_the_prompt_or_a_share(
    world: World, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.DEBUG):
        assert await world.vault.reveal(world.document()) == PROMPT
        world.set_share(1, flip_first_byte(world.shares[1], 0x02))
        with pytest.raises(ContextCorrupt):
            await world.vault.reveal(world.document())
        world.set_share(1, world.shares[1])
        world.node(2).answer = refuse_connection
        with pytest.raises(ContextUnavailable):
            await world.vault.reveal(world.document())
        world.node(2).answer = answer(200, text=f"not json {PROMPT}")
        with pytest.raises(ContextCorrupt):
            await world.vault.reveal(world.document())
    logged = [
        (record.getMessage(), repr(record.args), record.exc_text or "") for record in caplog.records
    ]
    assert any("prompt document rejected" in message for message, _, _ in logged)
    assert any("nilDB node unavailable" in message for message, _, _ in logged)
    tampered = flip_first_byte(world.shares[1], 0x02)
    for message, args, exc_text in logged:
        for secret in [*_secrets(world), tampered]:
            assert secret not in message
            assert secret not in args
            assert secret not in exc_text
    for node in world.cluster.nodes:
        for authorization in node.authorizations:
            assert authorization.removeprefix("Bearer ") not in caplog.text


async def test_errors_do_not_carry_the_prompt_or_a_share(world: World):
    raised: list[Exception] = []
    for share in [flip_first_byte(world.shares[0], 0x01), "", "!!"]:
        world.set_share(0, share)
        try:
            await world.vault.reveal(world.document())
        except ContextCorrupt as error:
            raised.append(error)
    assert len(raised) == 3
    for error in raised:
        for secret in _secrets(world):
            assert secret not in str(error)
            assert secret not in repr(error.__cause__)
        assert error.__cause__ is None
        assert error.__context__ is None or error.__suppress_context__


async def test_a_node_outage_is_logged_once_and_its_end_once(
    world: World, caplog: pytest.LogCaptureFixture
):
    world.node(1).answer = refuse_connection
    with caplog.at_level(logging.WARNING, logger="nilai.context.nildb"):
        for _ in range(5):
            await reveal_fails(world, ContextUnavailable)
        world.node(1).answer = None
        assert await world.vault.reveal(world.document()) == PROMPT
    messages = [record.getMessage() for record in caplog.records]
    down = [m for m in messages if "nilDB node unavailable" in m]
    back = [m for m in messages if "nilDB node available again" in m]
    assert len(down) == 1, messages
    assert "http://node1.test" in down[0]
    assert len(back) == 1, messages
    assert "5 failed attempts" in back[0]
