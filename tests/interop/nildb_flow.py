"""Store and read back a private prompt with the public secretvaults/nilai-py clients.

Runs in .venv-interop (see requirements.txt), started by tests/e2e/test_nildb_fakes.py and
tests/e2e/test_private_prompts.py against the loopback stand-ins of
tests/fakes/{nilauth,nildb}.py. It reads one JSON object on stdin:

    {"nilauth_url": URL, "nodes": [URL, ...], "builder_key": HEX, "prompt": TEXT}

and does, with the clients' own code paths:

a. the builder (the gateway's key): root token from nilauth, subscription status, registration
   on every node, an ``owned`` collection, its profile and collection list;
b. a user (keypair as nilai-py makes one) stores ``{"_id", "prompt": {"%allot": prompt}}`` with
   nilai-py's ``create_document_core``, over a delegation minted as the nilai gateway mints it
   (the nilauth root extended by the builder key: ``/nil/db/data/create``, audience the user,
   60 s), granting the builder read access;
c. the user lists its data references and reads its document back;
d. the builder reads the document as upstream nilai does (a user client holding the builder key,
   ``subject`` = the owner) and reveals the prompt;
e. refusals: a stranger reading with ``subject`` = the owner, a second user reading the first
   one's document, and the builder reading with another subject.

With ``"nilai_url"`` and ``"nilai_api_key"`` in the input, step b goes through a gateway
instead: nilai-py's own ``Client.store_prompt_to_nildb`` asks it for the delegation
(``GET /v1/delegation``), ``Client.list_prompts_from_nildb`` lists what the user owns (the
report's ``nilai_py_listed``); then the builder reads and reveals as in step d. Optional in that
mode: ``"collection"`` (the builder is already set up and owns it, so step a is skipped) and
``"user_key"`` (hex: the user's nilDB key, saved where nilai-py looks for it first, so that the
caller knows the owner's key; otherwise nilai-py makes one).

The last stdout line is a JSON report. It says whether revealed prompts match, never the prompt,
and carries no keys or tokens.
"""

# secretvaults, nilai-py and nuc ship no type information and live only in .venv-interop; strict
# checking would flag every call into them, so this program is checked in basic mode.
# pyright: basic

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import json
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from nuc.builder import NucTokenBuilder
from nuc.token import Command, Did
from secretvaults import SecretVaultBuilderClient, SecretVaultUserClient
from secretvaults.common.blindfold import BlindfoldFactoryConfig, BlindfoldOperation
from secretvaults.common.keypair import Keypair
from secretvaults.common.nuc_cmd import NucCmd
from secretvaults.common.types import Did as SvDid
from secretvaults.common.types import Uuid
from secretvaults.common.utils import into_seconds_from_now
from secretvaults.dto.builders import RegisterBuilderRequest
from secretvaults.dto.collections import CreateCollectionRequest
from secretvaults.dto.users import ReadDataRequestParams

LISTED_DOCUMENT = re.compile(r"Document: ([0-9a-f-]{36})")
"""A document id in what ``Client.list_prompts_from_nildb`` prints."""

PROMPT_SCHEMA = {
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


def store_config() -> BlindfoldFactoryConfig:
    """The blindfold setting nilai-py and upstream nilai both use."""
    return BlindfoldFactoryConfig(operation=BlindfoldOperation.STORE, use_cluster_key=True)


def failures(results: Any) -> list[str]:
    """The per-node exceptions in a secretvaults ``{node: result}`` answer."""
    return [type(r).__name__ for r in results.values() if isinstance(r, Exception)]


def mint_delegation(builder: SecretVaultBuilderClient, user_did: str) -> str:
    """The delegation the gateway's ``/v1/delegation`` returns (as upstream nilai builds it)."""
    return (
        NucTokenBuilder.extending(builder.root_token)
        .command(Command(NucCmd.NIL_DB_DATA_CREATE.value.split(".")))
        .audience(Did.parse(user_did))
        .expires_at(datetime.datetime.fromtimestamp(into_seconds_from_now(60)))
        .build(builder.keypair.private_key())
    )


async def statuses_of_raw_reads(
    reader: SecretVaultUserClient, params: ReadDataRequestParams, subject: str
) -> list[int | str]:
    """Each node's HTTP status for a read as ``reader`` with ``subject`` (200 when served)."""
    statuses: list[int | str] = []
    for node in reader.nodes:
        token = reader._mint_invocation(
            command=NucCmd.NIL_DB_USERS_READ,
            audience=Did.parse(node.id),
            subject=Did.parse(subject),
        )
        try:
            await node.read_data(token, params)
            statuses.append(200)
        except aiohttp.ClientResponseError as exc:
            statuses.append(exc.status)
        except Exception as exc:
            statuses.append(type(exc).__name__)
    return statuses


async def set_up_builder(
    config: dict[str, Any], report: dict[str, Any]
) -> tuple[SecretVaultBuilderClient, str]:
    """Step a: the builder, its registration and its owned collection."""
    builder = await SecretVaultBuilderClient.from_options(
        keypair=Keypair.from_hex(config["builder_key"]),
        urls={"chain": [], "auth": config["nilauth_url"], "dbs": config["nodes"]},
        blindfold=store_config(),
    )
    await builder.refresh_root_token()
    root = builder.root_token.token.token
    report["root_token"] = {
        "cmd": str(root.command),
        "sub_is_builder": str(root.subject) == builder.id,
        "aud_is_builder": str(root.audience) == builder.id,
        "proofs": len(root.proofs),
    }
    # Annotated as a dict, but it is nuc's Subscription dataclass.
    report["subscribed"] = getattr(await builder.subscription_status(), "subscribed", None)
    registered = await builder.register(
        RegisterBuilderRequest(did=SvDid(builder.id), name="nilai-test")
    )
    report["register_failures"] = failures(registered)
    collection = str(uuid.uuid4())
    request = CreateCollectionRequest(
        _id=Uuid(collection), type="owned", name="nilai-prompts", schema=PROMPT_SCHEMA
    )
    report["collection_failures"] = failures(await builder.create_collection(request))
    listed = await builder.read_collections()
    report["collections_listed"] = [str(c.id) for c in listed.data]
    profile = await builder.read_profile()
    report["profile_collections"] = list(profile.data.collections)
    report["builder_did"] = builder.id
    report["collection"] = collection
    return builder, collection


async def store_prompt(
    config: dict[str, Any],
    builder: SecretVaultBuilderClient,
    collection: str,
    report: dict[str, Any],
) -> tuple[SecretVaultUserClient, str]:
    """Step b: a user stores the prompt with nilai-py's own document code."""
    from nilai_py.nildb.document import create_document_core  # prints its config on import

    user = await SecretVaultUserClient.from_options(
        keypair=Keypair.generate(), base_urls=config["nodes"], blindfold=store_config()
    )
    document = str(uuid.uuid4())
    data = {"_id": document, "prompt": {"%allot": config["prompt"]}}
    delegation = mint_delegation(builder, user.id)
    created = await create_document_core(user, collection, data, delegation, builder.id)
    report["user_did"] = user.id
    report["document"] = document
    report["create"] = {
        "success": created.success,
        "message": created.message,
        "created_per_node": {
            str(node): [str(d) for d in answer.data.created]
            for node, answer in (created.data or {}).items()
            if hasattr(answer, "data")
        },
        "failures": failures(created.data or {}),
    }
    return user, document


async def read_back(
    config: dict[str, Any],
    user: SecretVaultUserClient,
    collection: str,
    document: str,
    report: dict[str, Any],
) -> None:
    """Steps c and d: the user lists and reads; the builder reads and reveals."""
    from nilai_py.nildb.document import list_data_references_core, read_document_core

    listed = await list_data_references_core(user)
    report["references"] = [
        {"builder": str(r.builder), "collection": str(r.collection), "document": str(r.document)}
        for r in (listed.data or [])
    ]
    own = await read_document_core(user, collection, document)
    own_data = own.data if own.success else {}
    report["user_read_matches"] = isinstance(own_data, dict) and (
        own_data.get("prompt") == config["prompt"]
    )

    report["builder_read"] = await builder_read(config, collection, document, user.id)


async def builder_read(
    config: dict[str, Any], collection: str, document: str, owner: str
) -> dict[str, Any]:
    """Step d: read as upstream nilai does (builder key, ``subject`` the owner) and reveal."""
    reader = await SecretVaultUserClient.from_options(
        keypair=Keypair.from_hex(config["builder_key"]),
        base_urls=config["nodes"],
        blindfold=store_config(),
    )
    params = ReadDataRequestParams(
        collection=Uuid(collection), document=Uuid(document), subject=Uuid(owner)
    )
    revealed = await reader.read_data(params)
    await reader.close()
    return {
        "owner_matches": isinstance(revealed, dict) and revealed.get("owner") == owner,
        "prompt_matches": isinstance(revealed, dict) and revealed.get("prompt") == config["prompt"],
        "acl_grantees": [
            str(a.grantee) if hasattr(a, "grantee") else str(a.get("grantee"))
            for a in (revealed.get("acl", []) if isinstance(revealed, dict) else [])
        ],
    }


async def refusals(
    config: dict[str, Any],
    user: SecretVaultUserClient,
    collection: str,
    document: str,
    report: dict[str, Any],
) -> None:
    """Step e: who may not read the document gets each node's refusal."""
    params = ReadDataRequestParams(collection=Uuid(collection), document=Uuid(document))
    stranger = await SecretVaultUserClient.from_options(
        keypair=Keypair.generate(), base_urls=config["nodes"], blindfold=store_config()
    )
    report["stranger_as_owner"] = await statuses_of_raw_reads(stranger, params, user.id)
    await stranger.close()

    builder_reader = await SecretVaultUserClient.from_options(
        keypair=Keypair.from_hex(config["builder_key"]),
        base_urls=config["nodes"],
        blindfold=store_config(),
    )
    report["builder_wrong_subject"] = await statuses_of_raw_reads(
        builder_reader, params, builder_reader.id
    )
    await builder_reader.close()


async def run(config: dict[str, Any]) -> dict[str, Any]:
    """The whole flow; the report."""
    report: dict[str, Any] = {}
    builder, collection = await set_up_builder(config, report)
    user, document = await store_prompt(config, builder, collection, report)
    await read_back(config, user, collection, document, report)

    # A second user with a document of its own may still not read the first user's.
    other, _ = await store_prompt(config, builder, collection, {})
    params = ReadDataRequestParams(collection=Uuid(collection), document=Uuid(document))
    report["other_user_own_subject"] = await statuses_of_raw_reads(other, params, other.id)
    await other.close()

    await refusals(config, user, collection, document, report)
    await user.close()
    for node in builder.nodes:  # the builder client itself has no close()
        await node.close()
    return report


async def set_up_only(config: dict[str, Any], report: dict[str, Any]) -> str:
    """Step a alone; the collection."""
    builder, collection = await set_up_builder(config, report)
    for node in builder.nodes:
        await node.close()
    return collection


def run_through_nilai(config: dict[str, Any]) -> dict[str, Any]:
    """Step b through a gateway: nilai-py's ``Client.store_prompt_to_nildb`` as its users call it.

    nilai-py reads its nilDB settings from the environment when first imported, keeps the user's
    keys in ``./keys`` and writes what it stored under ``dir``: all of it goes to a temporary
    directory. The gateway at ``nilai_url`` must answer ``GET /v1/public_key`` and
    ``GET /v1/delegation`` (minting with ``builder_key``'s nilauth root).
    """
    report: dict[str, Any] = {}
    collection = config.get("collection") or asyncio.run(set_up_only(config, report))
    os.environ["NILDB_NODES"] = ",".join(config["nodes"])
    os.environ["NILDB_COLLECTION"] = collection
    os.environ["NILDB_NILAUTH_URL"] = config["nilauth_url"]
    from nilai_py import Client  # reads the NILDB_* settings on import

    with tempfile.TemporaryDirectory() as workdir:
        os.chdir(workdir)
        if config.get("user_key"):
            save_user_key(Keypair.from_hex(config["user_key"]), Path(workdir) / "keys")
        client = Client(base_url=config["nilai_url"], api_key=config["nilai_api_key"])
        stored = client.store_prompt_to_nildb(config["prompt"], dir=str(Path(workdir) / "out"))
        # nilai-py prints the list rather than returning it: read the document ids it printed.
        with contextlib.redirect_stdout(io.StringIO()) as listing:
            client.list_prompts_from_nildb()
        report["nilai_py_listed"] = LISTED_DOCUMENT.findall(listing.getvalue())
        public_key_file = next((Path(workdir) / "keys").glob("public_key_*.json"))
        user_did = json.loads(public_key_file.read_text())["did"]
    documents = sorted({str(d) for d in stored})
    report["nilai_py_documents"] = documents
    report["user_did"] = user_did
    if len(documents) == 1:
        report["document"] = documents[0]
        report["builder_read"] = asyncio.run(
            builder_read(config, collection, documents[0], user_did)
        )
    return report


def save_user_key(keypair: Keypair, keys_dir: Path) -> None:
    """Save a user's keypair as nilai-py saves the one it makes (it loads the newest first)."""
    from nilai_py.nildb.user import save_keypair_to_json

    saved, _, problem = save_keypair_to_json(keypair, str(keys_dir))
    if not saved:
        raise RuntimeError(f"cannot save the user's key: {problem}")


def main() -> None:
    """Read the configuration on stdin; print the report as the last line."""
    config = json.loads(sys.stdin.read())
    # The clients print and log chatter (nilai-py prints its configuration on import, and
    # secretvaults logs request bodies); keep stdout for the report.
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        through_gateway = bool(config.get("nilai_url"))
        report = run_through_nilai(config) if through_gateway else asyncio.run(run(config))
    sys.stderr.write(chatter.getvalue()[-5000:])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
