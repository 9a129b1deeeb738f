"""A whole chat completion sent as a stream: through the real relay, signed and verifiable."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nilai.auth.base import Principal
from nilai.crypto.keys import Signer
from nilai.crypto.verify import VerificationError, sse_payloads, verify_stream
from nilai.gateway.chat.context import RequestContext
from nilai.gateway.chat.signing import StreamSigner
from nilai.gateway.chat.stream import ChunkForwarder, ReadDeadline, read_batches, relay_events
from nilai.gateway.drain import Drain
from nilai.gateway.tools.chat import completion_as_stream
from nilai.gateway.tools.loop import ROUNDS_FIELD
from nilai.protocol.chat import ChatCompletionRequest
from nilai.upstream.sse import DONE, frame

REQUEST = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
USAGE = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
WEATHER_CALL: dict[str, Any] = {
    "id": "call_w",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def _answer(message: dict[str, Any], finish: str | None = "stop", **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-7",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        **extra,
    }


TEXT_ANSWER = _answer({"role": "assistant", "content": "It is 42."}, usage=USAGE)


@pytest.fixture
def ctx() -> RequestContext:
    return RequestContext.begin("req-1", Principal("acct", "api_key"), REQUEST)


async def _client_stream(
    answer: dict[str, Any],
    signer: Signer,
    ctx: RequestContext,
    *,
    include_usage: bool,
    added: dict[str, object] | None = None,
) -> bytes:
    """What the client receives when ``answer`` is relayed as the model server's stream."""
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": include_usage},
        }
    )
    forwarder = ChunkForwarder(StreamSigner(signer, ctx.request_sha256, added=added), ctx, request)
    drain = Drain(10)
    batches = read_batches(completion_as_stream(answer), ReadDeadline(5, 5, drain), drain)
    released: list[bool] = []

    async def release() -> None:
        released.append(True)

    writes = [w async for w in relay_events(batches, forwarder, ctx, release=release)]
    assert released == [True]
    return b"".join(writes)


def _chunks(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(payload) for payload in sse_payloads(raw)]


def _content(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
    )


def _finish_reasons(chunks: list[dict[str, Any]]) -> list[str]:
    return [
        choice["finish_reason"]
        for chunk in chunks
        for choice in chunk["choices"]
        if choice.get("finish_reason") is not None
    ]


async def test_a_text_answer_streams_its_content_and_verifies(signer: Signer, ctx: RequestContext):
    raw = await _client_stream(TEXT_ANSWER, signer, ctx, include_usage=False)
    assert raw.endswith(frame(DONE))
    chunks = _chunks(raw)
    assert _content(chunks) == "It is 42."
    assert _finish_reasons(chunks) == ["stop"]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk["id"] == "chatcmpl-7" for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    verified = verify_stream(raw, signer.public_key_b64, request=REQUEST)
    assert verified.request_sha256 == ctx.request_sha256
    assert (ctx.status, ctx.prompt_tokens, ctx.completion_tokens) == (200, 10, 20)


async def test_usage_comes_as_a_last_chunk_only_with_include_usage(
    signer: Signer, ctx: RequestContext
):
    raw = await _client_stream(TEXT_ANSWER, signer, ctx, include_usage=True)
    chunks = _chunks(raw)
    with_usage = [chunk for chunk in chunks if "usage" in chunk]
    assert with_usage == [chunks[-1]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == USAGE
    assert _content(chunks) == "It is 42."
    verify_stream(raw, signer.public_key_b64, request=REQUEST)


async def test_the_earlier_calls_tokens_are_in_the_usage_the_client_sees(
    signer: Signer, ctx: RequestContext
):
    ctx.count_earlier_call(100, 50)  # a tool round's call
    raw = await _client_stream(TEXT_ANSWER, signer, ctx, include_usage=True)
    assert _chunks(raw)[-1]["usage"] == {
        "prompt_tokens": 110,
        "completion_tokens": 70,
        "total_tokens": 180,
    }
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (110, 70)
    verify_stream(raw, signer.public_key_b64, request=REQUEST)


async def test_a_clients_tool_call_streams_whole_with_its_finish_reason(
    signer: Signer, ctx: RequestContext
):
    answer = _answer(
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        "tool_calls",
        usage=USAGE,
    )
    raw = await _client_stream(answer, signer, ctx, include_usage=False)
    chunks = _chunks(raw)
    calls: list[Any] = [
        call
        for chunk in chunks
        for choice in chunk["choices"]
        for call in choice["delta"].get("tool_calls") or list[Any]()
    ]
    assert calls == [{"index": 0, **WEATHER_CALL}]
    assert _content(chunks) == ""
    assert _finish_reasons(chunks) == ["tool_calls"]
    verify_stream(raw, signer.public_key_b64, request=REQUEST)


async def test_the_rounds_are_signed_on_the_last_chunk(signer: Signer, ctx: RequestContext):
    rounds = [{"message": {"role": "assistant"}, "results": [{"content": "42\n"}]}]
    raw = await _client_stream(
        TEXT_ANSWER, signer, ctx, include_usage=False, added={ROUNDS_FIELD: rounds}
    )
    chunks = _chunks(raw)
    assert chunks[-1][ROUNDS_FIELD] == rounds
    assert all(ROUNDS_FIELD not in chunk for chunk in chunks[:-1])
    verify_stream(raw, signer.public_key_b64, request=REQUEST)
    with pytest.raises(VerificationError):
        verify_stream(raw.replace(b'"42\\n"', b'"43\\n"'), signer.public_key_b64)


async def test_an_answer_without_usage_or_finish_reason_still_ends_signed(
    signer: Signer, ctx: RequestContext
):
    answer = _answer({"role": "assistant", "content": "ok"}, None)
    raw = await _client_stream(answer, signer, ctx, include_usage=True)
    chunks = _chunks(raw)
    assert _content(chunks) == "ok"
    assert _finish_reasons(chunks) == ["stop"]
    assert all("usage" not in chunk for chunk in chunks)
    verify_stream(raw, signer.public_key_b64, request=REQUEST)


async def test_each_choice_streams_its_own_message(signer: Signer, ctx: RequestContext):
    answer = {
        **TEXT_ANSWER,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "A"}, "finish_reason": "stop"},
            {
                "index": 1,
                "message": {"role": "assistant", "content": "B"},
                "finish_reason": "length",
            },
        ],
    }
    raw = await _client_stream(answer, signer, ctx, include_usage=False)
    by_index: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in _chunks(raw):
        for choice in chunk["choices"]:
            by_index[choice["index"]] = by_index.get(choice["index"], "") + (
                choice["delta"].get("content") or ""
            )
            if choice["finish_reason"] is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    assert by_index == {0: "A", 1: "B"}
    assert reasons == {0: "stop", 1: "length"}
    verify_stream(raw, signer.public_key_b64, request=REQUEST)
