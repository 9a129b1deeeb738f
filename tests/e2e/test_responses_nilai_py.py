"""The Responses API from the public nilai-py client (issue 19): the SDK call its users make.

nilai-py's ``Client`` is the OpenAI SDK's, so its users call ``client.responses.create``. Here
nilai-py, in its own virtualenv (``make interop``), makes that call plainly and streamed, with
its own self-issued NUC (API-key mode) and with a delegation from a subscription holder, and must
see the answer, its usage and its signature, which must verify against what went over the wire.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from secp256k1 import PrivateKey  # pyright: ignore[reportMissingTypeStubs]

from nilai.crypto.verify import verify_any
from tests.conftest import FakeHandle, GatewayHandle
from tests.e2e.test_nuc import BOTH, nuc_auth, run_nilai_py

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.mark.parametrize("mode", ["api_key", "delegation"])
def test_nilai_py_responses_are_signed_and_accounted(
    mode: str,
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
):
    fake = start_fake(tokens=3, responses_support=True)
    expected = "".join(fake.state.words())
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=BOTH)
    public_key: str = httpx.get(f"{gateway.url}/v1/public_key").json()
    holder = PrivateKey()

    report = run_nilai_py(f"{gateway.url}/v1/", mode, holder.serialize(), api="responses")

    plain, streamed = report["results"]
    usages: list[dict[str, Any]] = fake.state.stats.usages
    assert fake.state.stats.responses_requests == 2
    for result, usage in zip((plain, streamed), usages, strict=True):
        assert result["status"] == 200, result
        assert result["content"] == expected
        assert (result["input_tokens"], result["output_tokens"]) == (
            usage["input_tokens"],
            usage["output_tokens"],
        )
        assert json.loads(result["request"])["input"] == "Say hello"
        verified = verify_any(
            result["body"].encode(), public_key, request=result["request"].encode()
        )
        assert verified.request_sha256 == result["request_sha256"]
    assert streamed["events"] >= 6
    if mode == "api_key":
        # The client's own key is the subscription holder; both requests are its.
        usage = httpx.get(f"{gateway.url}/v1/usage", headers=nuc_auth(gateway, holder)).json()
        assert usage["queries"] == 2, usage
