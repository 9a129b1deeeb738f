"""Web search from the public nilai-py client (issue 18): the call its users make works.

nilai-py has no web-search method of its own; a user turns web search on with the OpenAI SDK's
``extra_body={"web_search": True}`` on ``client.chat.completions.create``. Here nilai-py, in its
own virtualenv (``make interop``), makes that call in API-key (self-issued NUC) mode against a
gateway searching the loopback stand-ins, and must see the sources inside the signed answer, for
a plain answer and for a stream, with both signatures valid.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from secp256k1 import PrivateKey  # pyright: ignore[reportMissingTypeStubs]

from nilai.crypto.verify import verify_response, verify_stream
from tests.conftest import FakeHandle, GatewayHandle
from tests.e2e.test_nuc import BOTH, CLIENT, INTEROP_PYTHON
from tests.fakes.web import ARTICLE_TEXT
from tests.support.websearch import SearchWorld

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

QUERY = "marrowby lighthouse storm"
PLAN = json.dumps({"topics": [{"topic": "the storm", "query": QUERY}]})


def run_nilai_py_web_search(base_url: str, key: str) -> dict[str, Any]:
    """Run the nilai-py client program in API-key mode with ``--web-search``; its JSON report."""
    if not INTEROP_PYTHON.exists():
        pytest.fail("the nilai-py virtualenv is missing: run `make interop` (make test does)")
    command = [str(INTEROP_PYTHON), str(CLIENT), "--base-url", base_url, "--model", "fake-model"]
    command += ["--mode", "api_key", "--key", key, "--web-search"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_nilai_py_web_search_sees_signed_sources(
    web: SearchWorld,
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
):
    fake = start_fake(tokens=3, planner_reply=PLAN)
    web.answer(QUERY, "/article")
    gateway = start_gateway(
        upstream_urls=[fake.url], auth_strategies=BOTH, **web.gateway_settings()
    )
    public_key: str = httpx.get(f"{gateway.url}/v1/public_key").json()

    report = run_nilai_py_web_search(f"{gateway.url}/v1/", PrivateKey().serialize())

    assert report["gateway_key"] == base64.b64decode(public_key).hex()
    plain, streamed = report["results"]
    for result in (plain, streamed):
        assert result["status"] == 200, result
        # The flag went out as the SDK's extra body, not as anything of ours.
        assert json.loads(result["request"])["web_search"] is True
        sources: list[dict[str, Any]] = result["sources"]
        assert [source["source"] for source in sources] == [web.page("/article")]
        assert ARTICLE_TEXT in sources[0]["content"]
        assert result["signature"]
    assert streamed["chunks"] >= 4
    # What the SDK read is what the gateway signed, sources included, for this very request.
    answer = verify_response(plain["body"].encode(), public_key, request=plain["request"].encode())
    assert answer.request_sha256 == plain["request_sha256"]
    assert json.loads(plain["body"])["sources"] == plain["sources"]
    stream = verify_stream(
        streamed["body"].encode(), public_key, request=streamed["request"].encode()
    )
    assert stream.request_sha256 == streamed["request_sha256"]
    # Each request searched once (one topic) and planned once, and the answer was grounded.
    assert [query["q"] for query in web.brave.queries] == [QUERY, QUERY]
    assert fake.state.stats.planner_requests == 2
    sent = fake.state.stats.last_body
    assert sent is not None
    assert ARTICLE_TEXT in sent["messages"][0]["content"]
