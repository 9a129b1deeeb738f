"""NUC tokens through real gateways: the public nilai-py client, bad tokens, shared token limits,
delegation policies matched against the request, bounded lifetimes, and spent invocations.

The nilai-py client runs in its own virtualenv (``make interop``; tests/interop/README.md).
Tokens for the other tests are built with the ``nuc`` package the way nilai-py builds them.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from nuc.token import Command, Did
from secp256k1 import PrivateKey

from nilai.crypto.verify import verify_response
from tests.conftest import REDIS_URL, TEST_API_KEY, FakeHandle, GatewayHandle
from tests.support.nuc import Holder, did_of, invoke
from tests.support.private_redis import PrivateRedis
from tests.support.replicas import NILAI, Replica, wait_serving
from tests.support.servers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
INTEROP_PYTHON = ROOT / ".venv-interop" / "bin" / "python"
CLIENT = ROOT / "tests" / "interop" / "nilai_py_client.py"
MESSAGES = [{"role": "user", "content": "hi"}]
BOTH = ["api_key", "nuc"]


def gateway_did(url: str) -> Did:
    """The DID tokens must be addressed to, from the gateway's public key."""
    public_key_b64 = httpx.get(f"{url}/v1/public_key").json()
    return Did(base64.b64decode(public_key_b64))


def chat(url: str, token: str, *, stream: bool = False, **fields: Any) -> httpx.Response:
    body: dict[str, Any] = {"model": "fake-model", "messages": MESSAGES, "stream": stream}
    body.update(fields)
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=10)


def run_nilai_py(base_url: str, mode: str, key: str, **options: int | str) -> dict[str, Any]:
    """Run the nilai-py client program; its JSON report."""
    if not INTEROP_PYTHON.exists():
        pytest.fail("the nilai-py virtualenv is missing: run `make interop` (make test does)")
    command = [str(INTEROP_PYTHON), str(CLIENT), "--base-url", base_url, "--model", "fake-model"]
    command += ["--mode", mode, "--key", key]
    for name, value in options.items():
        command += [f"--{name}", str(value)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


# --- the public nilai-py client ------------------------------------------------------------


def test_nilai_py_api_key_mode_chats_and_sees_signatures(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake(tokens=3)
    expected = "".join(fake.state.words())
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=BOTH)
    holder = PrivateKey()
    report = run_nilai_py(f"{gateway.url}/v1/", "api_key", holder.serialize())

    assert report["openai"] < "2.34"
    assert report["gateway_key"] == base64.b64decode(gateway_public_key(gateway)).hex()
    plain, streamed = report["results"]
    for result in (plain, streamed):
        assert result["status"] == 200, result
        assert result["content"] == expected
        assert result["signature"]
        assert len(result["request_sha256"]) == 64
    assert streamed["chunks"] >= 4
    # The client's own key is the subscription holder: it now has an account named by its DID.
    usage = httpx.get(f"{gateway.url}/v1/usage", headers=nuc_auth(gateway, holder)).json()
    assert usage["queries"] == 2, usage


def test_nilai_py_delegation_mode_honours_the_usage_limit(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=["nuc"])
    holder = PrivateKey()
    report = run_nilai_py(
        f"{gateway.url}/v1/", "delegation", holder.serialize(), uses=2, requests=2
    )

    statuses = [(r["stream"], r["status"]) for r in report["results"]]
    assert statuses == [(False, 200), (True, 200), (False, 429), (True, 429)]
    assert all(r["signature"] for r in report["results"][:2])
    refused = report["results"][2]["error"]
    assert "2 uses of this token" in refused["message"]
    assert fake.state.stats.requests == 2


def test_a_signed_answer_from_a_nuc_client_verifies(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=["nuc"])
    holder = Holder()
    token = invoke(holder.root(), holder.key, gateway_did(gateway.url))
    response = chat(gateway.url, token)
    assert response.status_code == 200, response.text
    verify_response(response.content, gateway_public_key(gateway))


# --- one gateway, both kinds of client -------------------------------------------------------


def test_api_key_and_nuc_clients_share_one_gateway(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake(tokens=1)
    expected = "".join(fake.state.words())
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=BOTH)
    holder = Holder()
    token = invoke(holder.root(), holder.key, gateway_did(gateway.url))

    by_key = gateway.client().chat.completions.create(model="fake-model", messages=MESSAGES)
    nuc_client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0)
    by_nuc = nuc_client.chat.completions.create(model="fake-model", messages=MESSAGES)
    # An invocation is spent by its request: the next request needs a fresh one.
    fresh = invoke(holder.root(), holder.key, gateway_did(gateway.url))
    stream = nuc_client.with_options(api_key=fresh).chat.completions.create(
        model="fake-model", messages=MESSAGES, stream=True
    )
    assert by_key.choices[0].message.content == by_nuc.choices[0].message.content == expected
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    assert fake.state.stats.requests == 3


def test_nuc_only_gateway_refuses_api_keys_and_api_key_gateway_refuses_tokens(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake()
    nuc_only = start_gateway(upstream_urls=[fake.url], auth_strategies=["nuc"])
    keys_only = start_gateway(upstream_urls=[fake.url])
    holder = Holder()

    refused = chat(nuc_only.url, TEST_API_KEY)
    assert refused.status_code == 401
    assert "accepts NUC tokens only" in refused.json()["error"]["message"]
    token = invoke(holder.root(), holder.key, gateway_did(keys_only.url))
    refused = chat(keys_only.url, token)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "nuc_not_accepted"
    assert fake.state.stats.requests == 0


# --- bad tokens ------------------------------------------------------------------------------


def _resigned(token: str, key: PrivateKey) -> str:
    """The same token with its first signature made by another key."""
    first, _, proofs = token.partition("/")
    header, payload, _ = first.split(".")
    signature = key.ecdsa_serialize_compact(key.ecdsa_sign(f"{header}.{payload}".encode()))
    encoded = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    return f"{header}.{payload}.{encoded}/{proofs}"


def bad_tokens(gateway: Did) -> dict[str, str]:
    """One token per failed check, each otherwise well formed."""
    holder, caller, stranger = Holder(), PrivateKey(), PrivateKey()
    good = invoke(holder.root(), holder.key, gateway)
    # A delegation to `caller`, but the invocation is issued by `stranger`: the chain breaks.
    to_caller = holder.delegate(caller)
    broken = invoke(to_caller, stranger, gateway)
    outside = holder.root(command=Command(["nil", "db", "read"]))
    return {
        "garbled": "eyJhbGciOiJFUzI1NksifQ.bm90IGpzb24.c2ln",
        "expired": invoke(holder.root(expires_in=timedelta(seconds=-5)), holder.key, gateway),
        "wrong audience": invoke(holder.root(), holder.key, did_of(stranger)),
        "outside /nil/ai": invoke(outside, holder.key, gateway),
        "broken chain": broken,
        "wrong key": _resigned(good, stranger),
    }


def test_each_bad_token_gets_its_own_401(
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
    caplog: pytest.LogCaptureFixture,
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=BOTH, log_level="debug")
    tokens = bad_tokens(gateway_did(gateway.url))
    messages: dict[str, str] = {}
    with caplog.at_level(logging.DEBUG):
        for name, token in tokens.items():
            response = chat(gateway.url, token)
            assert response.status_code == 401, (name, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert error["type"] == "authentication_error"
            assert error["message"].startswith("NUC token rejected:"), (name, error)
            messages[name] = error["message"]
    assert len(set(messages.values())) == len(messages), messages
    assert "expired" in messages["expired"]
    assert "audience" in messages["wrong audience"]
    assert "/nil/db/read" in messages["outside /nil/ai"]
    assert "chain is broken" in messages["broken chain"]
    assert "signature" in messages["wrong key"]
    for token in tokens.values():
        signature = token.split("/")[0].split(".")[2]
        assert signature not in caplog.text
        assert all(signature not in message for message in messages.values())
    assert fake.state.stats.requests == 0


def test_a_raw_private_key_as_bearer_is_explained_and_never_logged(
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
    caplog: pytest.LogCaptureFixture,
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=BOTH, log_level="debug")
    private_key = PrivateKey().serialize()
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=private_key, max_retries=0)
    with caplog.at_level(logging.DEBUG), pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert "private key" in refused.value.message
    assert refused.value.code == "private_key_sent"
    assert private_key not in caplog.text
    assert private_key not in str(refused.value.body)


def test_prompt_documents_are_refused_with_503_when_nildb_is_not_configured(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=["nuc"])
    owner, caller = Holder(), PrivateKey()
    # The delegation naming the document is signed by its owner, as the gateway requires.
    document = {"document_id": str(uuid.uuid4()), "document_owner_did": str(owner.did)}
    delegation = owner.delegate(caller, meta=document)
    for stream in (False, True):
        response = chat(
            gateway.url, invoke(delegation, caller, gateway_did(gateway.url)), stream=stream
        )
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "nildb_not_configured"
        assert "NILAI_NILDB_NODES" in error["message"]
    assert fake.state.stats.requests == 0
    # The same caller without a document is served: only the document is refused.
    plain = invoke(owner.root(), owner.key, gateway_did(gateway.url))
    assert chat(gateway.url, plain).status_code == 200


def test_unknown_holders_are_refused_until_an_operator_creates_their_account(
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
    tmp_path: Path,
):
    fake = start_fake()
    data_dir = tmp_path / "closed"
    gateway = start_gateway(
        upstream_urls=[fake.url],
        auth_strategies=["nuc"],
        nuc_auto_accounts=False,
        data_dir=data_dir,
        key_cache_ttl_s=0.1,
    )
    holder = Holder()
    token = invoke(holder.root(), holder.key, gateway_did(gateway.url))
    refused = chat(gateway.url, token)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unknown_account"
    assert str(holder.did) in refused.json()["error"]["message"]

    created = subprocess.run(
        [NILAI, "accounts", "add", str(holder.did)],
        env={**os.environ, "NILAI_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    assert chat(gateway.url, token).status_code == 200


# --- token limits across replicas -----------------------------------------------------------


def test_a_token_with_two_uses_admits_two_requests_across_two_replicas(
    start_fake: Callable[..., FakeHandle],
    start_replica: Callable[..., Replica],
    tmp_path: Path,
):
    fake = start_fake()
    env = {
        "NILAI_UPSTREAM_URLS": fake.url,
        "NILAI_AUTH_STRATEGIES": "api_key,nuc",
        # Replicas of one deployment share the signing key, hence the DID tokens name.
        "NILAI_SIGNING_KEY_PATH": str(tmp_path / "shared-key.pem"),
    }
    replicas = [start_replica("a", **env), start_replica("b", **env)]
    wait_serving(*replicas)
    audience = gateway_did(replicas[0].url)
    assert gateway_did(replicas[1].url) == audience
    holder, caller = Holder(), PrivateKey()
    delegation = holder.delegate(caller, uses=2)
    # Fresh invocations of the one delegation, alternating replicas, all at once.
    requests = [(replicas[i % 2].url, invoke(delegation, caller, audience)) for i in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda r: chat(*r), requests))

    assert Counter(r.status_code for r in responses) == {200: 2, 429: 4}
    for response in responses:
        if response.status_code == 429:
            error = response.json()["error"]
            assert error["code"] == "rate_limit_exceeded"
            assert "2 uses of this token" in error["message"]
    assert fake.state.stats.requests == 2

    # When the delegation carrying the limit expires, its invocations are refused with 401.
    expired = holder.delegate(caller, uses=2, expires_in=timedelta(seconds=-1))
    response = chat(replicas[0].url, invoke(expired, caller, audience))
    assert response.status_code == 401
    assert "expired" in response.json()["error"]["message"]


# --- delegation policies, matched against the request (issue 14, item 1) ---------------------

CHEAP, EXPENSIVE = "cheap-model", "expensive-model"


def test_a_model_policy_admits_only_that_model(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake(models=[CHEAP, EXPENSIVE])
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=["nuc"])
    audience = gateway_did(gateway.url)
    holder, caller = Holder(), PrivateKey()
    policies = [
        ["==", ".args.model", CHEAP],
        ["==", "$.req.model", CHEAP],
        ["!=", "$.req.model", EXPENSIVE],
        ["anyOf", "$.req.model", [CHEAP, "another-model"]],
    ]
    for policy in policies:
        delegation = holder.delegate(caller, policies=[policy])
        for stream in (False, True):
            # The invocation claims the cheap model in its own args: only the body counts.
            token = invoke(delegation, caller, audience, args={"model": CHEAP})
            served = chat(gateway.url, token, stream=stream, model=CHEAP)
            assert served.status_code == 200, (policy, served.text)
            token = invoke(delegation, caller, audience, args={"model": CHEAP})
            refused = chat(gateway.url, token, stream=stream, model=EXPENSIVE)
            assert refused.status_code == 401, (policy, refused.text)
            error = refused.json()["error"]
            assert error["code"] == "nuc_policy_not_met"
            assert json.dumps(policy, separators=(",", ":")) in error["message"]
    assert fake.state.stats.requests == 2 * len(policies)


def test_policies_see_the_request_fields_as_json_values(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake(models=[CHEAP, EXPENSIVE])
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=["nuc"])
    audience = gateway_did(gateway.url)
    holder, caller = Holder(), PrivateKey()
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    either = ["or", [["==", "$.req.model", CHEAP], ["==", "$.req.max_tokens", 1]]]
    cases: list[tuple[list[Any], dict[str, Any], bool]] = [
        (["==", "$.req.stream", False], {}, True),
        (["==", "$.req.stream", False], {"stream": True}, False),
        (["==", "$.req.stream", 0], {}, False),  # false is not 0
        (["anyOf", "$.req.max_tokens", [16, 32]], {"max_tokens": 16}, True),
        (["anyOf", ".args.max_tokens", [16, 32]], {"max_completion_tokens": 32}, True),
        (["anyOf", "$.req.max_tokens", [16, 32]], {"max_tokens": 64}, False),
        (["anyOf", "$.req.max_tokens", [16, 32]], {}, False),  # not set is null
        (["==", "$.req.temperature", None], {}, True),
        (["==", "$.req.temperature", None], {"temperature": 0}, False),
        (["==", "$.req.tools", False], {"tools": [tool]}, False),
        (["==", "$.req.web_search", False], {}, True),
        (["not", ["==", "$.req.model", EXPENSIVE]], {"model": EXPENSIVE}, False),
        (either, {"model": EXPENSIVE, "max_tokens": 1}, True),
        (either, {"model": EXPENSIVE}, False),
        (["and", [["==", "$.req.model", CHEAP], ["==", "$.req.stream", True]]], {}, False),
        (["==", ".aud", str(audience)], {}, True),
        (["==", ".iss", str(did_of(caller))], {}, True),
        (["!=", ".iss", str(did_of(caller))], {}, False),
        (["==", ".cmd", "/nil/ai/generate"], {}, True),
    ]
    wrong: list[tuple[list[Any], dict[str, Any], int]] = []
    for policy, fields, admitted in cases:
        token = invoke(holder.delegate(caller, policies=[policy]), caller, audience)
        response = chat(gateway.url, token, **{"model": CHEAP, **fields})
        if (response.status_code == 200) is not admitted or response.status_code not in (200, 401):
            wrong.append((policy, fields, response.status_code))
    assert wrong == []
    assert fake.state.stats.requests == sum(admitted for _, _, admitted in cases)


# Selectors the gateway cannot evaluate. With "!=", the nuc library would let every one pass.
UNSUPPORTED_SELECTORS = [
    "$.env.region",
    "$.req",
    "$.req.messages",
    "$.req.frequency_penalty",
    "$.req.model.name",
    ".args",
    ".args.user",
    ".meta.tier",
    ".nonce",
    ".exp",
]


def test_an_unsupported_policy_selector_is_refused_naming_it(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=["nuc"])
    audience = gateway_did(gateway.url)
    holder, caller = Holder(), PrivateKey()
    for selector in UNSUPPORTED_SELECTORS:
        # Nested in an "or" with a policy that holds: an unsupported part still refuses it.
        policy = ["or", [["!=", selector, "x"], ["==", "$.req.stream", False]]]
        for token in (
            invoke(holder.delegate(caller, policies=[policy]), caller, audience),
            invoke(holder.root(policies=[["!=", selector, "x"]]), holder.key, audience),
        ):
            response = chat(gateway.url, token)
            assert response.status_code == 401, (selector, response.text)
            error = response.json()["error"]
            assert error["code"] == "unsupported_nuc_policy", error
            assert f'"{selector}"' in error["message"]
    assert fake.state.stats.requests == 0


# --- lifetimes and spent invocations (issue 14, items 3 and 4) -------------------------------


def test_a_chain_without_any_expiry_is_refused(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=["nuc"])
    audience = gateway_did(gateway.url)
    holder = Holder()
    forever = holder.root(expires_in=None)
    refused = chat(gateway.url, invoke(forever, holder.key, audience))
    assert refused.status_code == 401
    error = refused.json()["error"]
    assert error["code"] == "nuc_expiry_required"
    assert "'exp'" in error["message"]
    # One expiry anywhere in the chain bounds it, even on the invocation alone.
    bounded = invoke(forever, holder.key, audience, expires_in=timedelta(minutes=1))
    assert chat(gateway.url, bounded).status_code == 200
    assert fake.state.stats.requests == 1


def test_a_chain_valid_for_longer_than_the_maximum_lifetime_is_refused(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=["nuc"])
    audience = gateway_did(gateway.url)
    holder, caller = Holder(), PrivateKey()
    long_lived = holder.root(expires_in=timedelta(days=2))
    refused = chat(gateway.url, invoke(long_lived, holder.key, audience))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "nuc_lifetime_too_long"
    assert "86400 s" in refused.json()["error"]["message"]  # NILAI_NUC_MAX_LIFETIME_S
    # Its delegation expires sooner, and bounds the chain; nilai-py's own roots last an hour.
    delegation = holder.delegate(caller, root=long_lived, expires_in=timedelta(minutes=5))
    assert chat(gateway.url, invoke(delegation, caller, audience)).status_code == 200
    assert chat(gateway.url, invoke(holder.root(), holder.key, audience)).status_code == 200
    # A use count must not outlive its bound either: here the limited root lasts two days.
    limited = holder.root(expires_in=timedelta(days=2), meta={"usage_limit": 5})
    short = holder.delegate(caller, root=limited, expires_in=timedelta(minutes=5))
    refused = chat(gateway.url, invoke(short, caller, audience))
    assert refused.status_code == 401
    assert "usage_limit" in refused.json()["error"]["message"]
    assert fake.state.stats.requests == 2


def test_an_invocation_is_accepted_once(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], auth_strategies=["nuc"])
    audience = gateway_did(gateway.url)
    holder = Holder()
    root = holder.root()
    token = invoke(root, holder.key, audience)
    assert chat(gateway.url, token).status_code == 200
    for stream in (False, True):
        replayed = chat(gateway.url, token, stream=stream)
        assert replayed.status_code == 401
        error = replayed.json()["error"]
        assert error["code"] == "nuc_replayed"
        assert "fresh invocation" in error["message"]
    # A fresh invocation of the same root is a new request.
    assert chat(gateway.url, invoke(root, holder.key, audience), stream=True).status_code == 200
    assert fake.state.stats.requests == 2


def test_replay_protection_can_be_turned_off(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake()
    gateway = start_gateway(
        upstream_urls=[fake.url], auth_strategies=["nuc"], nuc_replay_protection=False
    )
    holder = Holder()
    token = invoke(holder.root(), holder.key, gateway_did(gateway.url))
    assert [chat(gateway.url, token).status_code for _ in range(2)] == [200, 200]


def test_an_invocation_is_spent_on_every_replica_sharing_redis(
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
    redis_prefix: str,
    tmp_path: Path,
):
    fake = start_fake()
    shared: dict[str, Any] = {
        "upstream_urls": [fake.url],
        "auth_strategies": ["nuc"],
        "redis_url": REDIS_URL,
        "redis_prefix": redis_prefix,
        "signing_key_path": tmp_path / "shared-key.pem",
    }
    replicas = [start_gateway(**shared), start_gateway(**shared)]
    audience = gateway_did(replicas[0].url)
    holder, caller = Holder(), PrivateKey()
    delegation = holder.delegate(caller)
    tokens = [invoke(delegation, caller, audience) for _ in range(5)]
    # Each invocation sent to both replicas at once: one of the two serves it.
    sends = [(replica.url, token) for token in tokens for replica in replicas]
    with ThreadPoolExecutor(max_workers=len(sends)) as pool:
        statuses = [r.status_code for r in pool.map(lambda send: chat(*send), sends)]
    assert [sorted(statuses[i : i + 2]) for i in range(0, len(statuses), 2)] == [[200, 401]] * 5
    assert fake.state.stats.requests == 5


def test_the_replay_check_fails_closed_with_503_when_redis_is_down(
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
    private_redis: PrivateRedis,
    caplog: pytest.LogCaptureFixture,
):
    fake = start_fake()
    gateway = start_gateway(
        upstream_urls=[fake.url], auth_strategies=["nuc"], redis_url=private_redis.url
    )
    audience = gateway_did(gateway.url)
    holder = Holder()
    root = holder.root()
    assert chat(gateway.url, invoke(root, holder.key, audience)).status_code == 200
    private_redis.stop()
    with caplog.at_level(logging.INFO):
        for stream in (False, True, False):
            refused = chat(gateway.url, invoke(root, holder.key, audience), stream=stream)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "nuc_replay_check_unavailable"
        private_redis.start()
        wait_until(
            lambda: chat(gateway.url, invoke(root, holder.key, audience)).status_code == 200,
            timeout_s=30,
        )
    outage = [r.getMessage() for r in caplog.records if "NUC replay cache" in r.getMessage()]
    assert len([line for line in outage if "unavailable" in line]) == 1, outage
    assert len([line for line in outage if "available again" in line]) == 1, outage


def test_token_use_counters_in_redis_expire_though_invocations_have_no_exp(
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
    redis_prefix: str,
):
    fake = start_fake()
    gateway = start_gateway(
        upstream_urls=[fake.url],
        auth_strategies=["nuc"],
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
    )
    audience = gateway_did(gateway.url)
    holder, caller = Holder(), PrivateKey()
    delegation = holder.delegate(caller, uses=100, expires_in=timedelta(minutes=5))
    for _ in range(50):
        # Like nilai-py's, the invocation has no exp; this one even asks for a count of its own.
        token = invoke(delegation, caller, audience, meta={"usage_limit": 100})
        assert chat(gateway.url, token).status_code == 200
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [key.decode() for key in client.scan_iter(match=f"{redis_prefix}*")]
        ttls = {key: client.ttl(key) for key in keys if ":uses" in key or ":spent:" in key}
    finally:
        client.close()
    assert [key for key, ttl in ttls.items() if ttl == -1] == []  # none kept forever
    # Each lives as long as the chain (5 min) plus the 300 s clock skew margin, no longer.
    assert all(0 < ttl <= 600 for ttl in ttls.values()), ttls
    counters = [key for key in ttls if ":uses" in key]
    # One count, the delegation's: a limit on the invocation itself is not honoured.
    assert len(counters) == 1, counters
    assert len(ttls) == 51  # and 50 spent invocations
    assert fake.state.stats.requests == 50


# --- helpers ---------------------------------------------------------------------------------


def gateway_public_key(gateway: GatewayHandle) -> str:
    return httpx.get(f"{gateway.url}/v1/public_key").json()


def nuc_auth(gateway: GatewayHandle, key: PrivateKey) -> dict[str, str]:
    """A header with a fresh self-issued invocation for ``key``'s subscription."""
    holder = Holder(key)
    return {"Authorization": f"Bearer {invoke(holder.root(), key, gateway_did(gateway.url))}"}
