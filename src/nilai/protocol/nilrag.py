"""The ``nilrag`` field of a chat request: where the client's secret-shared documents are.

Wire-compatible with nilrag 0.1.11's client: ``{"nodes": [{"url", "bearer_token", "schema_id",
"diff_query_id"}, ...], "num_chunks": k}``. Each node is a nilDB node's API root
(``https://node.example/api/v1``); the bearer token is the client's own for that node, used for
this request only and never logged or stored. The shapes are checked here (2 to 5 nodes, 1 to 10
chunks, http(s) URLs, UUID ids); whether a URL may be used (https, and only public addresses
unless the operator allowlisted a network) is the gateway's node policy, checked when the
request runs, before anything is sent.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MIN_NODES = 2
MAX_NODES = 5
MAX_CHUNKS = 10
DEFAULT_CHUNKS = 2

_UUID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# http(s), a host, an optional port and path; no credentials, query or fragment, no spaces.
_NODE_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~\-/%]*)?")
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: a header value


def _node_url(value: str) -> str:
    if not _NODE_URL.fullmatch(value):
        raise ValueError(
            "must be the URL of a nilDB node's API root, without credentials, query or "
            "fragment (e.g. https://node.example/api/v1)"
        )
    return value.rstrip("/")


def _bearer_token(value: str) -> str:
    if not _TOKEN_CHARS.fullmatch(value):
        raise ValueError("must be printable ASCII without spaces")
    return value


NodeUrl = Annotated[str, Field(max_length=2048), AfterValidator(_node_url)]
BearerToken = Annotated[str, Field(min_length=1, max_length=8192), AfterValidator(_bearer_token)]
Uuid = Annotated[str, Field(pattern=_UUID)]


class NilragNode(BaseModel):
    """One nilDB node holding a share of every document."""

    model_config = ConfigDict(extra="forbid")

    url: NodeUrl
    bearer_token: BearerToken
    schema_id: Uuid
    diff_query_id: Uuid


class NilragRequest(BaseModel):
    """The ``nilrag`` field: the nodes to query, and how many chunks to add to the prompt."""

    model_config = ConfigDict(extra="forbid")

    nodes: list[NilragNode] = Field(min_length=MIN_NODES, max_length=MAX_NODES)
    num_chunks: int = Field(default=DEFAULT_CHUNKS, ge=1, le=MAX_CHUNKS)
