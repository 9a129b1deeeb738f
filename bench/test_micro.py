"""Micro benchmarks of the per-request hot paths: validation, signing, stream hashing.

Run with ``make bench``; results go to ``bench/results/micro.json``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from coincurve import PrivateKey
from pytest_benchmark.fixture import BenchmarkFixture
from redis.asyncio import Redis

from nilai.auth.base import Principal
from nilai.auth.stored_keys import StoredApiKeys, generate_key
from nilai.crypto.canonical import canonical_json
from nilai.crypto.domains import SignatureDomain
from nilai.crypto.keys import Signer
from nilai.gateway.chat.context import RequestContext
from nilai.gateway.chat.signing import StreamSigner
from nilai.gateway.chat.stream import ChunkForwarder
from nilai.limits.base import Limit
from nilai.limits.redis import RedisRateLimiter
from nilai.protocol.chat import ChatCompletionRequest
from nilai.store.base import Account, ApiKey
from nilai.upstream.sse import frame

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
REDIS_URL = "redis://127.0.0.1:6379/0"
CHUNK_SIZE = 100

CHAT_REQUEST = json.dumps(
    {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer concisely."},
            {"role": "user", "content": "What is the capital of France, and why is it famous?"},
            {"role": "assistant", "content": "Paris. It is known for art, food and history."},
            {"role": "user", "content": "Name three museums there, one sentence each."},
        ],
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 512,
        "stream": False,
        "user": "bench-user",
    }
).encode()

ANSWER = (
    "1. The Louvre is the world's most visited museum and home to the Mona Lisa and the Venus "
    "de Milo. 2. The Musee d'Orsay, in a former railway station, holds the largest collection "
    "of Impressionist and Post-Impressionist masterpieces, including works by Monet, Renoir "
    "and Van Gogh. 3. The Centre Pompidou is a landmark of high-tech architecture that houses "
    "the National Museum of Modern Art, one of the largest modern art collections in Europe. "
    "Each of them deserves at least half a day; book tickets online to skip the queues."
)


def typical_completion() -> dict[str, Any]:
    """A non-streaming chat completion of about 1 KB, as a model server returns it."""
    return {
        "id": "chatcmpl-8f2c6d0b9a4e4f7c9d1e2a3b4c5d6e7f",
        "object": "chat.completion",
        "created": 1732600000,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ANSWER, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 64, "completion_tokens": 128, "total_tokens": 192},
        "request_sha256": "0" * 64,
    }


@pytest.fixture(scope="module")
def signer() -> Signer:
    """A fresh in-memory signing key."""
    return Signer(PrivateKey())


def test_validate_chat_request(benchmark: BenchmarkFixture) -> None:
    """Parse and validate a typical chat request body."""
    request = benchmark(ChatCompletionRequest.model_validate_json, CHAT_REQUEST)
    if request.model != MODEL:
        pytest.fail("the request did not round-trip")


def test_sign_completion(benchmark: BenchmarkFixture, signer: Signer) -> None:
    """Canonicalise and sign a ~1 KB completion, as every non-streaming answer is."""
    body = typical_completion()
    signature = benchmark(
        lambda: signer.sign(SignatureDomain.CHAT_COMPLETION, canonical_json(body))
    )
    if not signature:
        pytest.fail("no signature produced")


def test_stream_signer_per_chunk(benchmark: BenchmarkFixture, signer: Signer) -> None:
    """Account for one 100-byte streamed chunk (a running SHA-256 update)."""
    stream = StreamSigner(signer, "0" * 64)
    payload = b"x" * CHUNK_SIZE
    sent = benchmark(stream.sent, payload)
    if sent is not payload:
        pytest.fail("the chunk must go out unchanged")


CHUNK = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1732600000,'
    b'"model":"' + MODEL.encode() + b'","choices":[{"index":0,"delta":{"content":" Paris"},'
    b'"logprobs":null,"finish_reason":null}],'
    b'"usage":{"prompt_tokens":64,"completion_tokens":7,"total_tokens":71}}'
)


def test_sse_relay_per_chunk(benchmark: BenchmarkFixture, signer: Signer) -> None:
    """Relay one upstream chunk: parse, strip the running usage, hash, frame (as the gateway)."""
    request = ChatCompletionRequest.model_validate_json(CHAT_REQUEST)
    ctx = RequestContext.begin("bench", Principal("acct", "api_key"), CHAT_REQUEST)
    relay = ChunkForwarder(StreamSigner(signer, ctx.request_sha256), ctx, request)
    framed = benchmark(lambda: [frame(out) for out in relay.feed(CHUNK)])
    if not framed or b"usage" in framed[0]:
        pytest.fail("the chunk must go out, without the usage the client did not ask for")


def test_api_key_lookup_warm_cache(benchmark: BenchmarkFixture) -> None:
    """Authenticate a stored API key whose record is in the process cache (every request)."""
    made = generate_key()
    account = Account("acct", "bench", datetime.now(UTC), active=True)
    key = ApiKey("key", "acct", made.prefix, made.hash, None, datetime.now(UTC), None, None)

    class OneKey:
        async def key_by_prefix(self, prefix: str) -> tuple[ApiKey, Account] | None:
            return (key, account) if prefix == made.prefix else None

    keys = StoredApiKeys(OneKey(), ttl_s=5.0)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(keys.authenticate(made.value))  # warm the cache
        principal = benchmark(lambda: loop.run_until_complete(keys.authenticate(made.value)))
    finally:
        loop.close()
    if principal.key_id != "key":
        pytest.fail("the key did not authenticate")


def test_rate_limit_check_redis(benchmark: BenchmarkFixture) -> None:
    """One admission against Redis: minute, hour and day windows in one Lua call."""
    prefix = f"nilai-bench-{uuid.uuid4().hex[:8]}:"
    loop = asyncio.new_event_loop()
    client = Redis.from_url(REDIS_URL)
    limiter = RedisRateLimiter(client, prefix)
    limits = [
        Limit("{acct:bench}:minute", "minute", 10**9, 60),
        Limit("{acct:bench}:hour", "hour", 10**9, 3600),
        Limit("{acct:bench}:day", "day", 10**9, 86400),
    ]
    try:
        decision = benchmark(lambda: loop.run_until_complete(limiter.hit(limits, uuid.uuid4().hex)))
    finally:
        keys = loop.run_until_complete(_keys(client, prefix))
        if keys:
            loop.run_until_complete(client.delete(*keys))
        loop.run_until_complete(client.aclose())
        loop.close()
    if not decision.allowed:
        pytest.fail("the check must admit")


async def _keys(client: Redis, prefix: str) -> list[bytes]:
    return [key async for key in client.scan_iter(match=f"{prefix}*")]
