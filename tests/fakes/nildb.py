"""A loopback stand-in for one nilDB node, speaking the API that secretvaults 0.3.2 calls.

Run two or three of them (each holds its own secret share of every ``%allot`` value) beside the
stand-in nilauth (``tests.fakes.nilauth``); ``start_cluster`` does it for tests. The real
``SecretVaultBuilderClient`` and ``SecretVaultUserClient`` (and nilai-py on top of them) work
against them unchanged. Paths, bodies and error shapes follow nilDB 1.0.0, the API secretvaults
0.3.2 was written for; state is kept in memory.

Endpoints (``NUC`` = ``Authorization: Bearer <envelope>``, an invocation whose ``aud`` is this
node's DID, ``did:nil:<public_key from /about>``):

- ``GET /about``, ``GET /health``
- ``POST /v1/builders/register`` ``{"did", "name"}`` (no auth) -> ``201``
- ``GET /v1/builders/me`` (builder NUC, ``/nil/db/builders/read``)
- ``POST /v1/collections`` ``{"_id", "type", "name", "schema"}`` (``/nil/db/collections/create``)
- ``GET /v1/collections``, ``GET /v1/collections/{id}`` (``/nil/db/collections/read``)
- ``POST /v1/data/owned`` ``{"collection", "owner", "data": [...], "acl"}``
  (``/nil/db/data/create``; in practice a user's invocation over the builder's delegation)
- ``GET /v1/users/me``, ``GET /v1/users/data``, ``GET /v1/users/data/{collection}/{document}``
  (user NUC, ``/nil/db/users/read``)
- ``DELETE /v1/users/data/{collection}/{document}`` (``/nil/db/users/delete``)
- ``POST /v1/users/data/acl/grant`` / ``.../revoke`` (``/nil/db/users/update``)

Auth is enforced for real with the ``nuc`` package: signatures over the whole chain, expiry,
audience = this node, the command being within the token's, and:

- builder routes: the chain's root must be issued by the configured nilauth key (else ``402``, as
  the real node answers), the subject must be a registered builder, and, when the node knows its
  nilauth URL, no token in the chain may be revoked there (nilauth unreachable -> ``401``);
- user routes: the subject must be a user this node knows (one who owns data here). The caller
  acts as the owner when it is the subject or holds a chain the subject signed; anyone else (the
  builder reading with ``sub`` = the owner, as the nilai gateway does) may only *read* a document
  whose ``_acl`` grants it ``read``. The real nilDB 1.0.0 only checks signatures on user routes;
  this one is stricter, on purpose, and compatible with every client flow.

Failures answer like the real node: ``401``/``402``/``403`` as ``text/plain`` reason phrases,
domain errors as ``{"ts": <iso>, "errors": ["<ErrorTag>", ...]}`` (``ResourceAccessDeniedError``
404 for a document the caller may not see, ``DocumentNotFoundError`` 404,
``DuplicateEntryError`` 400, ``DataValidationError`` 400, ``GrantAccessError`` 401,
``RevokeAccessError`` 401).

Control hook for tests (not part of nilDB):

- ``POST /_control`` with any of:
  ``{"unavailable": bool}`` (every other request answers ``503 Service Unavailable``),
  ``{"delay_s": float}`` (every other request is held that long first),
  ``{"tamper": {"collection": id, "document": id}}`` (flip the bytes of every ``%share`` stored
  for that document on this node, so a reveal gives garbage),
  ``{"drop": {"collection": id, "document": id}}`` (forget that document on this node only).
  Answers ``{"unavailable", "delay_s", "tampered", "dropped"}``.
- ``GET /_control/stats`` -> request counts, reads served and reads refused.

For a node that refuses connections outright, stop its server (``FakeNildbCluster.stop_node``).

Run a whole cluster for a demo (prints what a gateway needs as one JSON line, never keys):
``python -m tests.fakes.nildb --ports 18301,18302,18303 --nilauth-port 18300
--builder-key-file /tmp/nilai-builder.key`` (the file is created with a new key when missing;
the builder is registered and owns a new ``owned`` collection on every node).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import os
import signal
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
from jsonschema import Draft202012Validator  # pyright: ignore[reportMissingTypeStubs]
from nuc.envelope import NucTokenEnvelope  # pyright: ignore[reportMissingTypeStubs]
from nuc.token import Command, Did  # pyright: ignore[reportMissingTypeStubs]
from nuc.validate import (  # pyright: ignore[reportMissingTypeStubs]
    InvocationRequirement,
    NucTokenValidator,
    ValidationException,
    ValidationKind,
    ValidationParameters,
)
from secp256k1 import PrivateKey  # pyright: ignore[reportMissingTypeStubs]
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.fakes.nilauth import NilauthState, create_nilauth_app, iso_now, public_key_hex
from tests.support.servers import ServerThread

NODE_VERSION = "1.0.0"
"""The nilDB release whose API this stand-in follows."""

BUILDERS_READ = Command(["nil", "db", "builders", "read"])
COLLECTIONS_CREATE = Command(["nil", "db", "collections", "create"])
COLLECTIONS_READ = Command(["nil", "db", "collections", "read"])
DATA_CREATE = Command(["nil", "db", "data", "create"])
USERS_READ = Command(["nil", "db", "users", "read"])
USERS_UPDATE = Command(["nil", "db", "users", "update"])
USERS_DELETE = Command(["nil", "db", "users", "delete"])

PROMPT_COLLECTION_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "_id": {"type": "string", "format": "uuid"},
            "prompt": {
                "type": "object",
                "properties": {"%share": {"type": "string"}},
                "required": ["%share"],
            },
        },
        "required": ["_id", "prompt"],
    },
}
"""A schema for nilai's private prompts as nodes store them (one ``%share`` per node)."""

_BUILDER_FIELDS = {"did", "name"}
_COLLECTION_TYPES = {"standard", "owned"}


class NodeError(Exception):
    """An answer in the real node's shape: plain reason phrase or ``{"ts", "errors"}``."""

    def __init__(self, status: int, errors: list[str] | None = None, text: str = "") -> None:
        super().__init__(text or (errors[0] if errors else str(status)))
        self.status = status
        self.errors = errors
        self.text = text

    def response(self) -> Response:
        """The HTTP answer for this error."""
        if self.errors is None:
            return PlainTextResponse(self.text, status_code=self.status)
        return JSONResponse({"ts": iso_now(), "errors": self.errors}, status_code=self.status)


UNAUTHORIZED = NodeError(401, text="Unauthorized")
PAYMENT_REQUIRED = NodeError(402, text="Payment Required")
FORBIDDEN = NodeError(403, text="Forbidden")


def access_denied(kind: str, object_id: str, user: str) -> NodeError:
    """``ResourceAccessDeniedError``: the real node's 404 for what the caller may not touch."""
    return NodeError(
        404, ["ResourceAccessDeniedError", f"type: {kind}", f"object: {object_id}", f"user: {user}"]
    )


def not_found(collection: str, filter_: dict[str, Any]) -> NodeError:
    """``DocumentNotFoundError`` 404."""
    return NodeError(
        404,
        ["DocumentNotFoundError", f"collection: {collection}", f"filter: {json.dumps(filter_)}"],
    )


def invalid(*issues: str) -> NodeError:
    """``DataValidationError`` 400."""
    return NodeError(400, ["DataValidationError", *issues])


@dataclass
class BuilderRecord:
    """A registered builder."""

    did: str
    name: str
    created: str = field(default_factory=iso_now)
    updated: str = field(default_factory=iso_now)
    collections: list[str] = field(default_factory=list[str])


@dataclass
class CollectionRecord:
    """A collection and this node's copy of its documents (shares, for ``%allot`` values)."""

    id: str
    owner: str
    type: str
    name: str
    schema: dict[str, Any]
    created: str = field(default_factory=iso_now)
    documents: dict[str, dict[str, Any]] = field(default_factory=dict[str, dict[str, Any]])


@dataclass
class UserRecord:
    """A user: someone who owns documents on this node."""

    did: str
    created: str = field(default_factory=iso_now)
    updated: str = field(default_factory=iso_now)
    data: list[dict[str, str]] = field(default_factory=list[dict[str, str]])
    """References ``{"builder", "collection", "document"}`` to the documents the user owns."""
    logs: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])

    def owns(self, collection: str, document: str) -> bool:
        """Whether a reference to that document is on this user's list."""
        return any(r["collection"] == collection and r["document"] == document for r in self.data)


@dataclass
class NodeStats:
    """What the node saw (control requests aside)."""

    requests: int = 0
    reads_served: int = 0
    reads_refused: int = 0
    by_route: Counter[str] = field(default_factory=Counter[str])


@dataclass
class NodeState:
    """One node: its key, what it trusts, its data, its injected faults."""

    nilauth_public_key: str
    """The 66-hex key whose root tokens builders must hold."""
    nilauth_url: str | None = None
    """When set, builder chains are checked for revocations there (as the real node does)."""
    key: PrivateKey = field(default_factory=PrivateKey)
    url: str = "http://127.0.0.1"
    started: str = field(default_factory=iso_now)
    builders: dict[str, BuilderRecord] = field(default_factory=dict[str, BuilderRecord])
    collections: dict[str, CollectionRecord] = field(default_factory=dict[str, CollectionRecord])
    users: dict[str, UserRecord] = field(default_factory=dict[str, UserRecord])
    unavailable: bool = False
    delay_s: float = 0.0
    stats: NodeStats = field(default_factory=NodeStats)

    @property
    def public_key_hex(self) -> str:
        """This node's 66-hex compressed public key, as ``/about`` publishes it."""
        return public_key_hex(self.key)

    @property
    def did(self) -> str:
        """This node's DID: the audience every invocation sent here must name."""
        return f"did:nil:{self.public_key_hex}"

    def register_builder(self, did: str, name: str) -> BuilderRecord:
        """Register a builder (what ``POST /v1/builders/register`` does)."""
        if did in self.builders:
            raise NodeError(400, ["DuplicateEntryError", f"document: {json.dumps({'_id': did})}"])
        builder = BuilderRecord(did=did, name=name)
        self.builders[did] = builder
        return builder

    def create_collection(
        self, owner: str, collection_id: str, kind: str, name: str, schema: dict[str, Any]
    ) -> CollectionRecord:
        """Create a collection owned by a registered builder (``POST /v1/collections``)."""
        builder = self.builders[owner]
        if collection_id in self.collections:
            duplicate = json.dumps({"_id": collection_id})
            raise NodeError(400, ["DuplicateEntryError", f"document: {duplicate}"])
        collection = CollectionRecord(collection_id, owner, kind, name, schema)
        self.collections[collection_id] = collection
        builder.collections.append(collection_id)
        return collection

    def tamper(self, collection_id: str, document_id: str) -> int:
        """Flip every byte of every ``%share`` stored for a document; how many shares."""
        document = self.collections[collection_id].documents[document_id]
        return _flip_shares(document)

    def drop(self, collection_id: str, document_id: str) -> bool:
        """Forget one document on this node only; whether it was there."""
        collection = self.collections.get(collection_id)
        return collection is not None and collection.documents.pop(document_id, None) is not None


def _flip_shares(value: Any) -> int:
    """Invert the bytes of the base64 ``%share`` strings under ``value`` in place."""
    flipped = 0
    if isinstance(value, dict):
        mapping = cast(dict[str, Any], value)
        share = mapping.get("%share")
        if isinstance(share, str):
            inverted = bytes(b ^ 0xFF for b in base64.b64decode(share))
            mapping["%share"] = base64.b64encode(inverted).decode("ascii")
            return 1
        for item in mapping.values():
            flipped += _flip_shares(item)
    elif isinstance(value, list):
        for item in cast(list[Any], value):
            flipped += _flip_shares(item)
    return flipped


# --- request parsing ---------------------------------------------------------------------------


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise invalid(f"malformed JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise invalid("expected a JSON object")
    return cast(dict[str, Any], body)


def _text_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise invalid(f"{name}: Required string")
    return value


def _uuid_field(body: dict[str, Any], name: str) -> str:
    value = _text_field(body, name)
    if not is_uuid(value):
        raise invalid(f"{name}: Invalid uuid")
    return value


def _did_field(body: dict[str, Any], name: str) -> str:
    value = _text_field(body, name)
    try:
        Did.parse(value)
    except Exception as exc:  # nuc raises its own exception types, and ValueError for bad hex
        raise invalid(f"{name}: Invalid DID") from exc
    return value


def _acl_field(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if not isinstance(value, dict):
        raise invalid(f"{name}: Required object")
    acl = cast(dict[str, Any], value)
    grantee = _did_field(acl, "grantee")
    flags = {k: acl.get(k) for k in ("read", "write", "execute")}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise invalid(f"{name}: read, write and execute must be booleans")
    return {"grantee": grantee, **flags}


def is_uuid(value: str) -> bool:
    """Whether ``value`` is a UUID in its canonical text form."""
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def _path_uuid(request: Request, name: str) -> str:
    value = str(request.path_params[name])
    if not is_uuid(value):
        raise invalid(f"{name}: Invalid uuid")
    return value


def _schema_issues(schema: dict[str, Any], data: list[dict[str, Any]]) -> list[str]:
    """What the collection's JSON schema finds wrong with ``data`` (the real node checks too)."""
    if not schema:
        return []
    validator = Draft202012Validator(schema)
    errors = validator.iter_errors(data)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    return [str(error.message) for error in errors]  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]


# --- authorization ----------------------------------------------------------------------------


def parse_bearer(request: Request) -> NucTokenEnvelope:
    """The NUC envelope of ``Authorization: Bearer``; ``401`` when absent or malformed."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise UNAUTHORIZED
    try:
        return NucTokenEnvelope.parse(token.strip())
    except Exception as exc:  # base64, JSON, DID and token-shape errors all come out of here
        raise UNAUTHORIZED from exc


def _validate(envelope: NucTokenEnvelope, node: NodeState, root_issuers: list[Did]) -> None:
    """Chain, expiry, audience and signatures, with nuc's own validator."""
    parameters = ValidationParameters.default()
    parameters.token_requirements = InvocationRequirement(Did.parse(node.did))
    try:
        NucTokenValidator(root_issuers).validate(envelope, {}, parameters)
    except ValidationException as exc:
        if exc.kind is ValidationKind.ROOT_KEY_SIGNATURE_MISSING:
            # The real node's way to say the chain lacks nilauth's (paid-for) authority.
            raise PAYMENT_REQUIRED from exc
        raise UNAUTHORIZED from exc
    except Exception as exc:  # malformed keys or signatures inside the chain
        raise UNAUTHORIZED from exc


def _require_command(envelope: NucTokenEnvelope, command: Command) -> None:
    """``403`` unless the route's command lies within the token's (``/nil/db`` grants all)."""
    if not command.is_attenuation_of(envelope.token.token.command):
        raise FORBIDDEN


async def _check_revocations(node: NodeState, envelope: NucTokenEnvelope) -> None:
    """Ask nilauth whether any token of the chain is revoked; ``401`` if it is or can't say."""
    if node.nilauth_url is None:
        return
    tokens = [envelope.token, *envelope.proofs]
    hashes = [t.compute_hash().hex() for t in tokens]
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.post(
                f"{node.nilauth_url}/api/v1/revocations/lookup", json={"hashes": hashes}
            )
        answer.raise_for_status()
        revoked = answer.json()["revoked"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise UNAUTHORIZED from exc
    if revoked:
        raise UNAUTHORIZED


async def authorize_builder(
    node: NodeState, request: Request, command: Command
) -> tuple[BuilderRecord, NucTokenEnvelope]:
    """A builder's invocation over a nilauth root: the builder (its subject) and the envelope."""
    envelope = parse_bearer(request)
    builder = node.builders.get(str(envelope.token.token.subject))
    if builder is None:
        raise UNAUTHORIZED
    _validate(envelope, node, [Did.parse(f"did:nil:{node.nilauth_public_key}")])
    await _check_revocations(node, envelope)
    _require_command(envelope, command)
    return builder, envelope


@dataclass(frozen=True)
class UserCaller:
    """Who calls a user route: the user the token is about, and who signed it."""

    user: UserRecord
    issuer: str
    as_owner: bool
    """The subject signed the token or its chain; otherwise the issuer only gets ACL reads."""


def authorize_user(node: NodeState, request: Request, command: Command) -> UserCaller:
    """A user route's caller; ``401``/``403`` as the real node answers."""
    envelope = parse_bearer(request)
    token = envelope.token.token
    user = node.users.get(str(token.subject))
    if user is None:
        raise UNAUTHORIZED
    # Users sign their own tokens: any root issuer, but the chain must hold (and nuc requires a
    # chain's first delegation to be signed by the subject).
    _validate(envelope, node, [])
    _require_command(envelope, command)
    issuer = str(token.issuer)
    as_owner = issuer == user.did or bool(envelope.proofs)
    return UserCaller(user=user, issuer=issuer, as_owner=as_owner)


def _require_owner(caller: UserCaller) -> None:
    if not caller.as_owner:
        raise UNAUTHORIZED


# --- the node ---------------------------------------------------------------------------------


class _Handlers:
    """The routes of one stand-in node, bound to its state."""

    def __init__(self, node: NodeState) -> None:
        self.node = node

    async def about(self, _request: Request) -> Response:
        node = self.node
        build = {"time": node.started, "commit": "stand-in", "version": NODE_VERSION}
        maintenance = {"active": False, "started_at": node.started}
        body = {
            "started": node.started,
            "build": build,
            "public_key": node.public_key_hex,
            "url": node.url,
            "maintenance": maintenance,
        }
        return JSONResponse(body)

    async def health(self, _request: Request) -> Response:
        return PlainTextResponse("OK")

    async def register_builder(self, request: Request) -> Response:
        body = await _json_object(request)
        if set(body) != _BUILDER_FIELDS:
            raise invalid("expected exactly 'did' and 'name'")
        name = _text_field(body, "name")
        self.node.register_builder(_did_field(body, "did"), name)
        return PlainTextResponse("", status_code=201)

    async def builder_profile(self, request: Request) -> Response:
        builder, _ = await authorize_builder(self.node, request, BUILDERS_READ)
        profile = {
            "_id": builder.did,
            "_created": builder.created,
            "_updated": builder.updated,
            "name": builder.name,
            "collections": list(builder.collections),
            "queries": [],
        }
        return JSONResponse({"data": profile})

    async def create_collection(self, request: Request) -> Response:
        body = await _json_object(request)
        collection_id = _uuid_field(body, "_id")
        kind = _text_field(body, "type")
        if kind not in _COLLECTION_TYPES:
            raise invalid("type: Invalid enum value. Expected 'standard' | 'owned'")
        schema = body.get("schema")
        if not isinstance(schema, dict):
            raise invalid("schema: Required object")
        name = _text_field(body, "name")
        builder, _ = await authorize_builder(self.node, request, COLLECTIONS_CREATE)
        self.node.create_collection(
            builder.did, collection_id, kind, name, cast(dict[str, Any], schema)
        )
        return PlainTextResponse("", status_code=201)

    async def list_collections(self, request: Request) -> Response:
        builder, _ = await authorize_builder(self.node, request, COLLECTIONS_READ)
        collections = [self.node.collections[c] for c in builder.collections]
        data = [{"id": c.id, "type": c.type, "name": c.name} for c in collections]
        return JSONResponse({"data": data})

    async def read_collection(self, request: Request) -> Response:
        collection_id = _path_uuid(request, "id")
        builder, _ = await authorize_builder(self.node, request, COLLECTIONS_READ)
        if collection_id not in builder.collections:
            raise access_denied("collection", collection_id, builder.did)
        collection = self.node.collections[collection_id]
        documents = list(collection.documents.values())
        writes = [d["_updated"] for d in documents] or [collection.created]
        metadata: dict[str, Any] = {
            "_id": collection_id,
            "count": len(documents),
            "size": len(json.dumps(documents)),
            "first_write": min(writes),
            "last_write": max(writes),
            "indexes": [],
        }
        return JSONResponse({"data": metadata})

    async def create_owned_data(self, request: Request) -> Response:
        body = await _json_object(request)
        collection_id = _uuid_field(body, "collection")
        owner = _did_field(body, "owner")
        acl = _acl_field(body, "acl")
        records = body.get("data")
        if not isinstance(records, list) or not records:
            raise invalid("data: Array must contain at least 1 element(s)")
        data = cast(list[Any], records)
        if not all(isinstance(r, dict) for r in data):
            raise invalid("data: Expected an array of objects")
        builder, _ = await authorize_builder(self.node, request, DATA_CREATE)
        if collection_id not in builder.collections:
            raise access_denied("collection", collection_id, builder.did)
        grantee = self.node.builders.get(acl["grantee"])
        if grantee is None:
            raise not_found("builders", {"_id": acl["grantee"]})
        owns_collection = collection_id in grantee.collections
        if owns_collection and not (acl["read"] or acl["write"] or acl["execute"]):
            raise NodeError(
                401,
                ["GrantAccessError", "type: collection", f"object: {collection_id}"],
            )
        collection = self.node.collections[collection_id]
        if collection.type != "owned":
            raise not_found("collections", {"_id": collection_id, "type": "owned"})
        documents = cast(list[dict[str, Any]], data)
        issues = _schema_issues(collection.schema, documents)
        if issues:
            raise invalid(*issues)
        created, errors = self._insert(collection, documents, owner, acl)
        if created:
            self._remember_user_data(collection, owner, created, acl)
        return JSONResponse({"data": {"created": created, "errors": errors}})

    def _insert(
        self,
        collection: CollectionRecord,
        documents: list[dict[str, Any]],
        owner: str,
        acl: dict[str, Any],
    ) -> tuple[list[str], list[dict[str, Any]]]:
        created: list[str] = []
        errors: list[dict[str, Any]] = []
        now = iso_now()
        for document in documents:
            document_id = document.get("_id")
            if not isinstance(document_id, str) or not is_uuid(document_id):
                errors.append({"error": "_id: Invalid uuid", "document": document})
                continue
            if document_id in collection.documents:
                message = f"E11000 duplicate key error collection: {collection.id}"
                errors.append({"error": message, "document": document})
                continue
            stored = {
                **copy.deepcopy(document),
                "_created": now,
                "_updated": now,
                "_owner": owner,
                "_acl": [dict(acl)],
            }
            collection.documents[document_id] = stored
            created.append(document_id)
        return created, errors

    def _remember_user_data(
        self, collection: CollectionRecord, owner: str, created: list[str], acl: dict[str, Any]
    ) -> None:
        user = self.node.users.setdefault(owner, UserRecord(did=owner))
        user.updated = iso_now()
        for document_id in created:
            user.data.append(
                {"builder": collection.owner, "collection": collection.id, "document": document_id}
            )
        user.logs.append({"op": "create-data", "collection": collection.id})
        user.logs.append({"op": "grant-access", "collection": collection.id, "acl": dict(acl)})

    async def user_profile(self, request: Request) -> Response:
        caller = authorize_user(self.node, request, USERS_READ)
        _require_owner(caller)
        user = caller.user
        profile = {
            "_id": user.did,
            "_created": user.created,
            "_updated": user.updated,
            "logs": list(user.logs),
            "data": [{"collection": r["collection"], "id": r["document"]} for r in user.data],
        }
        return JSONResponse({"data": profile})

    async def list_user_data(self, request: Request) -> Response:
        caller = authorize_user(self.node, request, USERS_READ)
        _require_owner(caller)
        return JSONResponse({"data": [dict(r) for r in caller.user.data]})

    def _user_document(
        self, caller: UserCaller, collection_id: str, document_id: str
    ) -> dict[str, Any]:
        user = caller.user
        if not user.owns(collection_id, document_id):
            raise access_denied("collection", document_id, user.did)
        collection = self.node.collections.get(collection_id)
        document = collection.documents.get(document_id) if collection else None
        if document is None or document.get("_owner") != user.did:
            raise not_found("data", {"_id": document_id, "_owner": user.did})
        return document

    async def read_user_data(self, request: Request) -> Response:
        collection_id = _path_uuid(request, "collection")
        document_id = _path_uuid(request, "document")
        caller = authorize_user(self.node, request, USERS_READ)
        try:
            document = self._user_document(caller, collection_id, document_id)
            if not caller.as_owner and not any(
                entry["grantee"] == caller.issuer and entry["read"]
                for entry in document.get("_acl", [])
            ):
                raise access_denied("collection", document_id, caller.issuer)
        except NodeError:
            self.node.stats.reads_refused += 1
            raise
        self.node.stats.reads_served += 1
        return JSONResponse({"data": copy.deepcopy(document)})

    async def delete_user_data(self, request: Request) -> Response:
        collection_id = _path_uuid(request, "collection")
        document_id = _path_uuid(request, "document")
        caller = authorize_user(self.node, request, USERS_DELETE)
        _require_owner(caller)
        self._user_document(caller, collection_id, document_id)
        del self.node.collections[collection_id].documents[document_id]
        user = caller.user
        user.data = [
            r
            for r in user.data
            if not (r["collection"] == collection_id and r["document"] == document_id)
        ]
        user.logs.append({"op": "delete-data", "collection": collection_id})
        return PlainTextResponse("")

    async def grant_access(self, request: Request) -> Response:
        body = await _json_object(request)
        collection_id = _uuid_field(body, "collection")
        document_id = _uuid_field(body, "document")
        acl = _acl_field(body, "acl")
        caller = authorize_user(self.node, request, USERS_UPDATE)
        _require_owner(caller)
        document = self._user_document(caller, collection_id, document_id)
        if acl["grantee"] not in self.node.builders:
            raise not_found("builders", {"_id": acl["grantee"]})
        entries = [e for e in document["_acl"] if e["grantee"] != acl["grantee"]]
        document["_acl"] = [*entries, acl]
        caller.user.logs.append({"op": "grant-access", "collection": collection_id, "acl": acl})
        return PlainTextResponse("")

    async def revoke_access(self, request: Request) -> Response:
        body = await _json_object(request)
        collection_id = _uuid_field(body, "collection")
        document_id = _uuid_field(body, "document")
        grantee = _did_field(body, "grantee")
        caller = authorize_user(self.node, request, USERS_UPDATE)
        _require_owner(caller)
        document = self._user_document(caller, collection_id, document_id)
        builder = self.node.builders.get(grantee)
        if builder is None:
            raise not_found("builders", {"_id": grantee})
        if collection_id in builder.collections:
            # As the real node: the collection's owner cannot be revoked.
            raise NodeError(
                401,
                [
                    "RevokeAccessError",
                    "type: collection",
                    f"object: {collection_id}",
                    f"grantee: {grantee}",
                ],
            )
        document["_acl"] = [e for e in document["_acl"] if e["grantee"] != grantee]
        log = {"op": "revoke-access", "collection": collection_id, "grantee": grantee}
        caller.user.logs.append(log)
        return PlainTextResponse("")

    async def control(self, request: Request) -> Response:
        body = await _json_object(request)
        node = self.node
        if "unavailable" in body:
            node.unavailable = bool(body["unavailable"])
        if "delay_s" in body:
            node.delay_s = float(body["delay_s"])
        tampered = dropped = 0
        if isinstance(tamper := body.get("tamper"), dict):
            target = cast(dict[str, Any], tamper)
            tampered = node.tamper(str(target["collection"]), str(target["document"]))
        if isinstance(drop := body.get("drop"), dict):
            target = cast(dict[str, Any], drop)
            dropped = int(node.drop(str(target["collection"]), str(target["document"])))
        settings = {"unavailable": node.unavailable, "delay_s": node.delay_s}
        return JSONResponse({**settings, "tampered": tampered, "dropped": dropped})

    async def control_stats(self, _request: Request) -> Response:
        stats = self.node.stats
        body = {
            "requests": stats.requests,
            "reads_served": stats.reads_served,
            "reads_refused": stats.reads_refused,
            "by_route": dict(stats.by_route),
            "documents": sum(len(c.documents) for c in self.node.collections.values()),
        }
        return JSONResponse(body)


class _Faults:
    """Counts requests and applies the injected delay and outage (``/_control`` is exempt)."""

    def __init__(self, app: ASGIApp, node: NodeState) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not str(scope["path"]).startswith("/_control"):
            node = self.node
            node.stats.requests += 1
            node.stats.by_route[f"{scope['method']} {scope['path']}"] += 1
            if node.delay_s:
                await asyncio.sleep(node.delay_s)
            if node.unavailable:
                await PlainTextResponse("Service Unavailable", status_code=503)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


async def _on_node_error(_request: Request, exc: Exception) -> Response:
    return cast(NodeError, exc).response()


def create_nildb_app(node: NodeState) -> ASGIApp:
    """One stand-in nilDB node as an ASGI app (``node`` is its state, shared with the caller)."""
    handlers = _Handlers(node)
    app = Starlette(
        routes=[
            Route("/about", handlers.about),
            Route("/health", handlers.health),
            Route("/v1/builders/register", handlers.register_builder, methods=["POST"]),
            Route("/v1/builders/me", handlers.builder_profile),
            Route("/v1/collections", handlers.create_collection, methods=["POST"]),
            Route("/v1/collections", handlers.list_collections, methods=["GET"]),
            Route("/v1/collections/{id}", handlers.read_collection),
            Route("/v1/data/owned", handlers.create_owned_data, methods=["POST"]),
            Route("/v1/users/me", handlers.user_profile),
            Route("/v1/users/data", handlers.list_user_data),
            Route("/v1/users/data/acl/grant", handlers.grant_access, methods=["POST"]),
            Route("/v1/users/data/acl/revoke", handlers.revoke_access, methods=["POST"]),
            Route("/v1/users/data/{collection}/{document}", handlers.read_user_data),
            Route(
                "/v1/users/data/{collection}/{document}",
                handlers.delete_user_data,
                methods=["DELETE"],
            ),
            Route("/_control", handlers.control, methods=["POST"]),
            Route("/_control/stats", handlers.control_stats),
        ],
        exception_handlers={NodeError: _on_node_error},
    )
    return _Faults(app, node)


# --- a cluster on loopback threads ------------------------------------------------------------


@dataclass
class FakeNildbCluster:
    """A stand-in nilauth and nodes served on loopback threads."""

    nilauth: NilauthState
    nilauth_url: str
    nodes: list[NodeState]
    node_urls: list[str]
    _nilauth_server: ServerThread
    _node_servers: list[ServerThread | None]

    def stop_node(self, index: int) -> None:
        """Stop one node's server: connections to it are refused from now on."""
        server = self._node_servers[index]
        if server is not None:
            server.stop()
            self._node_servers[index] = None

    def stop(self) -> None:
        """Stop every server."""
        for index in range(len(self._node_servers)):
            self.stop_node(index)
        self._nilauth_server.stop()

    def describe(self) -> dict[str, Any]:
        """What a gateway needs to use this cluster (public values only)."""
        return {
            "nilauth_url": self.nilauth_url,
            "nilauth_public_key": self.nilauth.public_key_hex,
            "nodes": list(self.node_urls),
            "node_dids": [node.did for node in self.nodes],
        }


def start_cluster(
    node_count: int = 3,
    *,
    nilauth_port: int = 0,
    node_ports: list[int] | None = None,
    check_revocations: bool = True,
) -> FakeNildbCluster:
    """Start a stand-in nilauth and ``node_count`` nodes on loopback (port 0: any free one)."""
    ports = node_ports or [0] * node_count
    nilauth = NilauthState()
    nilauth_server = ServerThread(create_nilauth_app(nilauth), nilauth_port).start()
    nodes: list[NodeState] = []
    servers: list[ServerThread | None] = []
    try:
        for port in ports:
            node = NodeState(
                nilauth_public_key=nilauth.public_key_hex,
                nilauth_url=nilauth_server.url if check_revocations else None,
            )
            server = ServerThread(create_nildb_app(node), port)
            node.url = server.url
            servers.append(server.start())
            nodes.append(node)
    except BaseException:
        for started in servers:
            if started is not None:
                started.stop()
        nilauth_server.stop()
        raise
    return FakeNildbCluster(
        nilauth=nilauth,
        nilauth_url=nilauth_server.url,
        nodes=nodes,
        node_urls=[node.url for node in nodes],
        _nilauth_server=nilauth_server,
        _node_servers=servers,
    )


def load_or_create_builder_key(path: Path) -> PrivateKey:
    """The builder key kept in ``path`` (hex), made (mode 0600) when the file is missing."""
    if path.exists():
        return PrivateKey(bytes.fromhex(path.read_text().strip()), raw=True)
    key = PrivateKey()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(cast(bytes, key.private_key).hex())  # pyright: ignore[reportUnknownMemberType]
    return key


def provision_builder(
    cluster: FakeNildbCluster, builder: PrivateKey, name: str = "nilai"
) -> tuple[str, str]:
    """Register ``builder`` and give it a new owned prompt collection on every node."""
    builder_did = f"did:nil:{public_key_hex(builder)}"
    collection_id = str(uuid.uuid4())
    for node in cluster.nodes:
        node.register_builder(builder_did, name)
        node.create_collection(
            builder_did, collection_id, "owned", "nilai-prompts", PROMPT_COLLECTION_SCHEMA
        )
    return builder_did, collection_id


def main() -> None:
    """Serve a stand-in nilauth and nodes on loopback until interrupted; print what they are."""
    parser = argparse.ArgumentParser(description="Loopback stand-ins for nilauth and nilDB.")
    parser.add_argument("--ports", default="18301,18302,18303", help="node ports, comma-separated")
    parser.add_argument("--nilauth-port", type=int, default=18300)
    parser.add_argument(
        "--builder-key-file",
        type=Path,
        help="the gateway's builder key (hex); made when missing. Without it no builder is set up",
    )
    args = parser.parse_args()
    ports = [int(p) for p in str(args.ports).split(",") if p]
    cluster = start_cluster(nilauth_port=args.nilauth_port, node_ports=ports)
    description = cluster.describe()
    if args.builder_key_file is not None:
        key = load_or_create_builder_key(args.builder_key_file)
        builder_did, collection_id = provision_builder(cluster, key)
        description |= {
            "builder_did": builder_did,
            "builder_key_file": str(args.builder_key_file),
            "collection": collection_id,
        }
    print(json.dumps(description), flush=True)
    stopped = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stopped.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    stopped.wait()
    cluster.stop()


if __name__ == "__main__":
    main()
