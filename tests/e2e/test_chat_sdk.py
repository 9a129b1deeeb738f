"""The official openai SDK against the real gateway in front of the fake model server."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from nilai.crypto.verify import verify_response, verify_stream

pytestmark = [pytest.mark.e2e, pytest.mark.stack(fake={"name": "alpha"})]

MESSAGES = [{"role": "user", "content": "Say hello"}]


def public_key(gateway) -> str:
    return httpx.get(f"{gateway.url}/v1/public_key").json()


def test_non_streaming_chat_is_signed(stack):
    fake, gateway = stack
    with gateway.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=MESSAGES, temperature=0.2
        )
        completion = raw.parse()
    assert completion.choices[0].message.content == "alpha says: w0 w1 w2 w3 w4 w5 w6 w7"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 9
    extra = completion.model_extra or {}
    assert extra["signature"]
    assert len(extra["request_sha256"]) == 64
    verified = verify_response(raw.http_response.content, public_key(gateway))
    assert verified.request_sha256 == extra["request_sha256"]
    assert fake.state.stats.last_body["temperature"] == 0.2


def test_streaming_chat_with_usage_signs_last_chunk(stack):
    _, gateway = stack
    with gateway.client() as client:
        chunks = list(
            client.chat.completions.create(
                model="fake-model",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "alpha says: w0 w1 w2 w3 w4 w5 w6 w7"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 9
    assert (last.model_extra or {}).get("signature")
    assert all("signature" not in (c.model_extra or {}) for c in chunks[:-1])


def test_streaming_without_usage_omits_usage_chunk(stack):
    fake, gateway = stack
    with gateway.client() as client:
        chunks = list(
            client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
        )
    assert all(c.choices for c in chunks), "usage chunk must not reach a client that did not ask"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert (chunks[-1].model_extra or {}).get("signature")
    # the gateway still asked the model server for usage, for accounting
    assert fake.state.stats.last_body["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }


def test_recorded_stream_verifies(stack):
    _, gateway = stack
    body = {"model": "fake-model", "messages": MESSAGES, "stream": True}
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=gateway.auth
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    request_bytes = httpx.Request("POST", "http://x", json=body).content
    verified = verify_stream(raw, public_key(gateway), request=request_bytes)
    assert verified.kind == "stream"


async def test_async_client_stream_and_non_stream(stack):
    _, gateway = stack
    async with gateway.async_client() as client:
        completion = await client.chat.completions.create(model="fake-model", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="fake-model", messages=MESSAGES, stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        results = await asyncio.gather(
            *(
                client.chat.completions.create(model="fake-model", messages=MESSAGES)
                for _ in range(8)
            )
        )
    assert completion.choices[0].message.content == "".join(pieces)
    assert {r.choices[0].message.content for r in results} == {"".join(pieces)}


def test_models_list_and_public_key(stack):
    _, gateway = stack
    with gateway.client() as client:
        models = client.models.list()
    [model] = models.data
    assert model.id == "fake-model"
    assert (model.model_extra or {})["max_model_len"] == 4096
    key = public_key(gateway)
    import base64

    assert len(base64.b64decode(key)) == 33
