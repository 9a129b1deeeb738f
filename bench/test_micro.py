"""Micro benchmarks of the per-request hot paths: validation, signing, stream hashing.

Run with ``make bench``; results go to ``bench/results/micro.json``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from coincurve import PrivateKey
from pytest_benchmark.fixture import BenchmarkFixture

from nilai.crypto.canonical import canonical_json
from nilai.crypto.keys import Signer
from nilai.gateway.chat.signing import StreamSigner
from nilai.protocol.chat import ChatCompletionRequest

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
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
    signature = benchmark(lambda: signer.sign(canonical_json(body)))
    if not signature:
        pytest.fail("no signature produced")


def test_stream_signer_per_chunk(benchmark: BenchmarkFixture, signer: Signer) -> None:
    """Account for one 100-byte streamed chunk (a running SHA-256 update)."""
    stream = StreamSigner(signer, "0" * 64)
    payload = b"x" * CHUNK_SIZE
    sent = benchmark(stream.sent, payload)
    if sent is not payload:
        pytest.fail("the chunk must go out unchanged")
