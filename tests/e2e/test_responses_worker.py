"""``POST /v1/responses`` through the gateway to the built-in worker (the tiny model)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from nilai.crypto.verify import verify_any
from tests.conftest import GatewayHandle
from tests.e2e import test_local_worker

pytestmark = pytest.mark.e2e

# The worker and the gateway in front of it: their one definition is in test_local_worker.
worker = test_local_worker.worker
gateway = test_local_worker.gateway

INPUT = "Tell me something."
MAX_OUTPUT_TOKENS = 16


def public_key(handle: GatewayHandle) -> str:
    """The gateway's signing key, as a client fetches it."""
    key: str = httpx.get(f"{handle.url}/v1/public_key").json()
    return key


def token_counts(engine: Any, text: str) -> tuple[int, int]:
    """The worker's tokenizer counts: the prompt as the worker builds it, and ``text``."""
    prompt = len(engine.encode_chat([{"role": "user", "content": INPUT}]))
    output = len(engine._tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompt, output


def test_non_streaming_response_is_signed_with_tokenizer_counts(
    gateway: GatewayHandle,
    tiny_engine: Any,
) -> None:
    with gateway.client() as client:
        raw = client.responses.with_raw_response.create(
            model="tiny-model", input=INPUT, max_output_tokens=MAX_OUTPUT_TOKENS, temperature=0
        )
        response = raw.parse()
    text = response.output_text
    assert text
    assert response.usage is not None
    counts = (response.usage.input_tokens, response.usage.output_tokens)
    assert counts == token_counts(tiny_engine, text)
    assert response.usage.output_tokens == MAX_OUTPUT_TOKENS
    assert response.usage.total_tokens == sum(counts)
    extra = response.model_extra or {}
    assert extra["signature"]
    verified = verify_any(raw.http_response.content, public_key(gateway), raw.http_request.content)
    assert verified.kind == "responses"


def test_streamed_response_matches_its_deltas_and_verifies(
    gateway: GatewayHandle,
    tiny_engine: Any,
) -> None:
    body: dict[str, Any] = {
        "model": "tiny-model",
        "input": INPUT,
        "max_output_tokens": MAX_OUTPUT_TOKENS,
        "temperature": 0,
    }
    with gateway.client() as client:
        whole = client.responses.create(
            model="tiny-model", input=INPUT, max_output_tokens=MAX_OUTPUT_TOKENS, temperature=0
        )
        events = list(client.responses.create(stream=True, **body))
        with client.responses.with_streaming_response.create(stream=True, **body) as recorded:
            raw = recorded.read()
            sent = recorded.http_request.content
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas
    last = events[-1]
    assert last.type == "response.completed"
    assert last.response.output_text == deltas
    assert deltas == whole.output_text  # greedy: the same text either way
    usage = last.response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens) == token_counts(tiny_engine, deltas)
    assert (last.model_extra or {}).get("signature")
    assert verify_any(raw, public_key(gateway), request=sent).kind == "responses stream"
