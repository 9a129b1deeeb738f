import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest

from nilai.auth.base import Principal
from nilai.crypto.keys import Signer
from nilai.crypto.verify import VerificationError, sse_payloads, verify_response, verify_stream
from nilai.discovery.base import EndpointRecord
from nilai.discovery.memory import MemoryDiscovery
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.errors import UpstreamProtocolError
from nilai.gateway.chat.context import RequestContext
from nilai.gateway.chat.service import ChatService
from nilai.gateway.chat.signing import StreamSigner, sign_completion
from nilai.gateway.chat.stream import ChunkForwarder
from nilai.gateway.drain import Drain
from nilai.gateway.metrics import Metrics
from nilai.limits.memory import MemoryConcurrencyLimiter, MemoryRateLimiter
from nilai.limits.policy import Admission, LimitDefaults
from nilai.protocol.chat import ChatCompletionRequest
from nilai.protocol.models import ModelCard
from nilai.upstream.client import HttpxUpstream
from nilai.upstream.sse import DONE, frame
from tests.support.records import ListSink

REQUEST = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


@pytest.fixture
def ctx() -> RequestContext:
    return RequestContext.begin("req-1", Principal("acct", "api_key"), REQUEST)


def _chunk(
    delta: dict[str, Any], finish: str | None = None, *, usage: Any = None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _usage_chunk() -> dict[str, Any]:
    return {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [],
        "usage": USAGE,
    }


ROLE = orjson.dumps(_chunk({"role": "assistant", "content": ""}))
HEL = orjson.dumps(_chunk({"content": "Hel"}))
# Upstream bytes need not be compact; they must be forwarded byte for byte.
LO = (
    b'{"id": "chatcmpl-9", "object": "chat.completion.chunk", '
    b'"choices": [{"index": 0, "delta": {"content": "lo \xc3\xa9"}}]}'
)
FINISH = orjson.dumps(_chunk({}, "stop"))
USAGE_ONLY = orjson.dumps(_usage_chunk())
UPSTREAM = [ROLE, HEL, LO, FINISH, USAGE_ONLY]


def _relay(signer: Signer, ctx: RequestContext, include_usage: bool = False) -> ChunkForwarder:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": include_usage},
        }
    )
    return ChunkForwarder(StreamSigner(signer, ctx.request_sha256), ctx, request)


def _run(
    signer: Signer, ctx: RequestContext, upstream: list[bytes], *, include_usage: bool
) -> tuple[list[list[bytes]], list[bytes]]:
    relay = _relay(signer, ctx, include_usage)
    per_feed = [relay.feed(payload) for payload in upstream]
    return per_feed, relay.finish()


def _stream(per_feed: list[list[bytes]], final: list[bytes]) -> bytes:
    sent = [p for out in per_feed for p in out] + final
    return b"".join(frame(p) for p in sent) + frame(DONE)


def test_without_usage_drops_usage_chunk_and_signs_finish_chunk(
    signer: Signer, ctx: RequestContext
):
    per_feed, final = _run(signer, ctx, UPSTREAM, include_usage=False)
    assert per_feed == [[ROLE], [HEL], [LO], [], []]
    assert len(final) == 1
    last = json.loads(final[0])
    assert last["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in last
    assert last["request_sha256"] == ctx.request_sha256
    assert isinstance(last["signature"], str)

    raw = _stream(per_feed, final)
    verified = verify_stream(raw, signer.public_key_b64, request=REQUEST)
    assert verified.request_sha256 == ctx.request_sha256
    assert sse_payloads(raw)[:3] == [ROLE, HEL, LO]


def test_with_usage_sends_every_choice_chunk_and_signs_usage_chunk(
    signer: Signer, ctx: RequestContext
):
    per_feed, final = _run(signer, ctx, UPSTREAM, include_usage=True)
    assert per_feed == [[ROLE], [HEL], [LO], [], []]
    assert final[0] == FINISH  # the held finish chunk goes out unchanged
    assert len(final) == 2
    last = json.loads(final[1])
    assert last["choices"] == []
    assert last["usage"] == USAGE
    assert last["request_sha256"] == ctx.request_sha256

    raw = _stream(per_feed, final)
    assert sse_payloads(raw)[:-1] == [ROLE, HEL, LO, FINISH]
    assert verify_stream(raw, signer.public_key_b64, request=REQUEST).kind == "stream"


def test_finish_chunk_is_held_until_finish(signer: Signer, ctx: RequestContext):
    relay = _relay(signer, ctx)
    assert relay.feed(HEL) == [HEL]
    assert relay.feed(FINISH) == []
    assert relay.feed(USAGE_ONLY) == []
    final = relay.finish()
    assert json.loads(final[0])["choices"][0]["finish_reason"] == "stop"


def test_held_chunk_is_released_unchanged_when_more_choices_follow(
    signer: Signer, ctx: RequestContext
):
    first_finish = orjson.dumps(_chunk({"content": "a"}, "length"))
    relay = _relay(signer, ctx)
    assert relay.feed(first_finish) == []
    assert relay.feed(HEL) == [first_finish, HEL]
    assert relay.feed(FINISH) == []
    final = relay.finish()
    raw = b"".join(frame(p) for p in [first_finish, HEL, *final])
    assert verify_stream(raw, signer.public_key_b64, request=REQUEST).kind == "stream"


def test_usage_only_on_the_finish_chunk_moves_to_a_final_usage_chunk(
    signer: Signer, ctx: RequestContext
):
    finish_with_usage = orjson.dumps(_chunk({}, "stop", usage=USAGE))
    per_feed, final = _run(signer, ctx, [HEL, finish_with_usage], include_usage=True)
    assert per_feed == [[HEL], []]
    finish, last = (json.loads(payload) for payload in final)
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in finish
    assert last["choices"] == []
    assert last["usage"] == USAGE
    assert (last["id"], last["model"]) == ("chatcmpl-9", "m")
    assert ctx.prompt_tokens == 11
    assert verify_stream(_stream(per_feed, final), signer.public_key_b64).kind == "stream"


def test_usage_reaches_the_client_once_with_running_usage_upstream(
    signer: Signer, ctx: RequestContext
):
    """The built-in worker and vLLM put running usage on every chunk when the gateway asks
    (continuous_usage_stats); a client that asked only for include_usage must see it once."""
    upstream = [
        orjson.dumps(_chunk({"content": "Hel"}, usage=USAGE)),
        orjson.dumps(_chunk({}, "stop", usage=USAGE)),
        orjson.dumps(_usage_chunk()),
    ]
    per_feed, final = _run(signer, ctx, upstream, include_usage=True)
    sent = [json.loads(p) for out in per_feed for p in out] + [json.loads(p) for p in final]
    with_usage = [chunk for chunk in sent if chunk.get("usage") is not None]
    assert with_usage == [sent[-1]]
    assert sent[-1]["choices"] == []


def test_include_usage_without_usage_chunk_signs_finish_chunk(signer: Signer, ctx: RequestContext):
    per_feed, final = _run(signer, ctx, [HEL, FINISH], include_usage=True)
    assert len(final) == 1
    assert json.loads(final[0])["choices"][0]["finish_reason"] == "stop"
    assert verify_stream(_stream(per_feed, final), signer.public_key_b64).kind == "stream"


def test_chunks_without_choices_or_usage_are_dropped(signer: Signer, ctx: RequestContext):
    keepalive = b'{"id":"chatcmpl-9","choices":[]}'
    per_feed, final = _run(signer, ctx, [HEL, keepalive, FINISH], include_usage=True)
    assert per_feed == [[HEL], [], []]
    assert verify_stream(_stream(per_feed, final), signer.public_key_b64).kind == "stream"


def test_signed_stream_fails_if_a_chunk_is_altered(signer: Signer, ctx: RequestContext):
    per_feed, final = _run(signer, ctx, UPSTREAM, include_usage=True)
    raw = _stream(per_feed, final)
    assert b'"content":"Hel"' in raw
    with pytest.raises(VerificationError):
        verify_stream(raw.replace(b'"content":"Hel"', b'"content":"Hal"'), signer.public_key_b64)


def test_usage_is_recorded_into_the_context(signer: Signer, ctx: RequestContext):
    assert ctx.first_token_s is None
    _run(signer, ctx, UPSTREAM, include_usage=False)
    assert ctx.prompt_tokens == 11
    assert ctx.completion_tokens == 3
    assert ctx.first_token_s is not None
    assert ctx.first_token_s >= 0


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_without_final_chunk_fails(signer: Signer, ctx: RequestContext, include_usage: bool):
    relay = _relay(signer, ctx, include_usage)
    assert relay.feed(ROLE) == [ROLE]
    assert relay.feed(HEL) == [HEL]
    with pytest.raises(UpstreamProtocolError, match="without a final chunk"):
        relay.finish()


def test_empty_stream_fails(signer: Signer, ctx: RequestContext):
    with pytest.raises(UpstreamProtocolError) as info:
        _relay(signer, ctx).finish()
    assert info.value.status == 502


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"choices": [', "malformed"),
        (b"not json", "malformed"),
        (b"", "malformed"),
        (b"[1, 2]", "unexpected"),
        (b'"text"', "unexpected"),
        (b"42", "unexpected"),
        (b"null", "unexpected"),
        (b'{"error": {"message": "boom", "code": 500}}', "error mid-stream"),
        (b'{"error": null}', "error mid-stream"),
    ],
)
def test_bad_chunks_raise(signer: Signer, ctx: RequestContext, payload: bytes, message: str):
    relay = _relay(signer, ctx)
    relay.feed(HEL)
    with pytest.raises(UpstreamProtocolError, match=message):
        relay.feed(payload)


def test_upstream_chunks_without_object_are_sent_as_chat_completion_chunks(
    signer: Signer, ctx: RequestContext
):
    # The verifier accepts only payloads that say they are chunks; a model server that leaves
    # "object" out must still give the client a verifiable stream.
    bare = [{k: v for k, v in json.loads(p).items() if k != "object"} for p in (HEL, FINISH)]
    upstream = [orjson.dumps(chunk) for chunk in bare]
    per_feed, final = _run(signer, ctx, upstream, include_usage=False)
    raw = _stream(per_feed, final)
    sent = [json.loads(payload) for payload in sse_payloads(raw)]
    assert [chunk["object"] for chunk in sent] == ["chat.completion.chunk"] * 2
    assert sent[0] == {**bare[0], "object": "chat.completion.chunk"}
    assert verify_stream(raw, signer.public_key_b64, request=REQUEST).kind == "stream"


@pytest.mark.parametrize("kind", ["chat.completion", "text_completion", 7])
def test_upstream_chunk_of_another_kind_is_a_protocol_error(
    signer: Signer, ctx: RequestContext, kind: object
):
    # Signing it would vouch for a payload the verifier (and the client's SDK) cannot take
    # for a chat completion chunk.
    relay = _relay(signer, ctx)
    relay.feed(HEL)
    with pytest.raises(UpstreamProtocolError, match=r"not a chat\.completion\.chunk\."):
        relay.feed(orjson.dumps({**_chunk({"content": "x"}), "object": kind}))


# --- through ChatService, with a mock model server ------------------------------------------


async def _service_stream(
    signer: Signer,
    handler: Callable[[httpx.Request], httpx.Response],
    body: dict[str, Any],
    *,
    drain: Drain | None = None,
    **options: Any,
) -> tuple[bytes, RequestContext, list[bytes]]:
    raw_request = json.dumps(body).encode()
    discovery = MemoryDiscovery()
    await discovery.register(
        EndpointRecord(url="http://model-a", models=(ModelCard(id="m"),), registered_at=1.0), 10
    )
    seen: list[bytes] = []

    def recording(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return handler(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(recording)) as http:
        snapshot = DiscoverySnapshot(discovery, http, refresh_s=60, eject_s=1)
        await snapshot.refresh()
        sink = ListSink()
        rate = MemoryRateLimiter()
        admission = Admission(
            rate, MemoryConcurrencyLimiter(rate), LimitDefaults(), fail_open=False
        )
        service = ChatService(
            HttpxUpstream(http),
            snapshot,
            signer,
            sink,  # type: ignore[arg-type]
            admission,
            metrics=Metrics(),
            drain=drain or Drain(10),
            request_timeout_s=5,
            **options,
        )
        ctx = RequestContext.begin("r", Principal("acct", "api_key"), raw_request)
        request = ChatCompletionRequest.model_validate(body)
        stream = await service.stream(request, ctx)
        out = b"".join([part async for part in stream.events])
        await stream.aclose()
        assert len(sink.logs) == 1
    return out, ctx, seen


def _sse_response(events: list[bytes]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(_: httpx.Request) -> httpx.Response:
        content = b"".join(events)
        # Served unread, as a real streaming response is; the relay reads it raw.
        return httpx.Response(
            200, stream=httpx.ByteStream(content), headers={"content-type": "text/event-stream"}
        )

    return handler


async def test_service_stream_is_verifiable(signer: Signer):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    events = [frame(p) for p in UPSTREAM] + [frame(DONE)]
    raw, ctx, seen = await _service_stream(signer, _sse_response(events), body)
    assert raw.endswith(b"data: [DONE]\n\n")
    assert verify_stream(raw, signer.public_key_b64, request=json.dumps(body).encode())
    assert json.loads(seen[0])["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }
    assert ctx.completion_tokens == 3
    assert ctx.status == 200


async def test_service_stream_reports_mid_stream_error_in_band(signer: Signer):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    events = [frame(HEL), frame(b'{"error": {"message": "oops"}}'), frame(DONE)]
    raw, ctx, _ = await _service_stream(signer, _sse_response(events), body)
    payloads = sse_payloads(raw)
    assert payloads[0] == HEL
    assert json.loads(payloads[-1])["error"]["type"] == "upstream_error"
    assert raw.endswith(b"data: [DONE]\n\n")
    assert ctx.status == 502


async def test_service_stream_with_multi_line_upstream_event_is_verifiable(signer: Signer):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    multi_line = b'data: {"id": "chatcmpl-9",\ndata: "choices": [{"index": 0, '
    multi_line += b'"delta": {"content": "Hel"}}]}\n\n'
    events = [multi_line, frame(FINISH), frame(DONE)]
    raw, _, _ = await _service_stream(signer, _sse_response(events), body)
    # Every data event the client sees must be one complete JSON payload ...
    for payload in sse_payloads(raw):
        json.loads(payload)
    # ... and the stream must verify.
    assert verify_stream(raw, signer.public_key_b64, request=json.dumps(body).encode())


@pytest.mark.parametrize("choices", [1, True, "stop", {"0": {"finish_reason": "stop"}}])
def test_non_list_choices_are_never_the_final_chunk(
    signer: Signer, ctx: RequestContext, choices: object
):
    payload = orjson.dumps({"id": "x", "object": "chat.completion.chunk", "choices": choices})
    relay = _relay(signer, ctx)
    assert relay.feed(payload) == [payload]
    with pytest.raises(UpstreamProtocolError, match="without a final chunk"):
        relay.finish()


class _StallingStream(httpx.AsyncByteStream):
    """Sends ``events``, then nothing more until closed (a model server gone quiet)."""

    def __init__(self, events: list[bytes], on_stall: Callable[[], None] = lambda: None) -> None:
        self._events = events
        self._on_stall = on_stall

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self._events:
            yield event
        self._on_stall()
        await asyncio.Event().wait()


def _stalling(events: list[bytes], on_stall: Callable[[], None] = lambda: None):
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_StallingStream(events, on_stall))

    return handler


STREAM_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def test_stall_after_the_first_token_is_reported_as_next_token_when_limits_are_equal(
    signer: Signer,
):
    raw, ctx, _ = await _service_stream(
        signer,
        _stalling([frame(HEL)]),
        STREAM_BODY,
        first_byte_timeout_s=0.05,
        idle_timeout_s=0.05,
    )
    message = json.loads(sse_payloads(raw)[-1])["error"]["message"]
    assert "next token within 0.05s" in message
    assert ctx.status == 504


async def test_stream_open_at_shutdown_ends_with_an_error_event_and_done(signer: Signer):
    drain = Drain(0.2)
    loop = asyncio.get_running_loop()
    raw, ctx, _ = await _service_stream(
        signer,
        # Shutdown begins while the stream waits for its next token.
        _stalling([frame(HEL)], on_stall=lambda: loop.call_soon(drain.begin)),
        STREAM_BODY,
        drain=drain,
    )
    payloads = sse_payloads(raw)
    assert payloads[0] == HEL
    error = json.loads(payloads[-1])["error"]
    assert error["code"] == "shutting_down"
    assert raw.endswith(frame(DONE))
    assert (ctx.status, ctx.error_kind) == (503, "ShuttingDown")


def test_line_separators_in_content_are_escaped_so_every_client_reads_one_line(
    signer: Signer, ctx: RequestContext
):
    """httpx's line reader (and so httpx-sse) splits at U+0085, U+2028 and U+2029."""
    text = "a\u2028b\u2029c\u0085d"
    upstream = [
        orjson.dumps(_chunk({"content": text})),
        orjson.dumps(_chunk({"content": text}, "stop")),
    ]
    per_feed, final = _run(signer, ctx, upstream, include_usage=False)
    raw = _stream(per_feed, final)
    assert all(
        separator not in raw for separator in (b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9")
    )
    lines = httpx.Response(200, content=raw).iter_lines()
    contents = [
        json.loads(line[6:])["choices"][0]["delta"]["content"]
        for line in lines
        if line.startswith("data: {")
    ]
    assert contents == [text, text]
    assert verify_stream(raw, signer.public_key_b64).kind == "stream"


def test_sources_a_model_server_sends_are_dropped_and_the_gateways_are_signed_last(
    signer: Signer, ctx: RequestContext
):
    forged = [{"source": "https://evil.example", "content": "made up"}]
    ours = [{"source": "https://example.com/a", "content": "the page's text"}]
    hel = orjson.dumps({**_chunk({"content": "Hel"}), "sources": forged, "signature": "x"})
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    relay = ChunkForwarder(
        StreamSigner(signer, ctx.request_sha256, added={"sources": ours}), ctx, request
    )
    per_feed = [relay.feed(payload) for payload in [ROLE, hel, FINISH]]
    final = relay.finish()
    forwarded = json.loads(per_feed[1][0])
    assert "sources" not in forwarded
    assert "signature" not in forwarded
    last = json.loads(final[-1])
    assert last["sources"] == ours
    raw = _stream(per_feed, final)
    verify_stream(raw, signer.public_key_b64, request=REQUEST)
    # The sources are inside what is signed: an edited source fails verification.
    with pytest.raises(VerificationError):
        verify_stream(raw.replace(b"the page's text", b"the page's test"), signer.public_key_b64)


def test_a_completion_signs_the_gateways_sources_never_the_model_servers(signer: Signer):
    body = {
        "id": "c",
        "object": "chat.completion",
        "choices": [],
        "sources": [{"source": "https://evil.example", "content": "made up"}],
    }
    ours = [{"source": "https://example.com/a", "content": "text"}]
    signed = sign_completion(body, signer, "ab" * 32, added={"sources": ours})
    assert json.loads(signed)["sources"] == ours
    verify_response(signed, signer.public_key_b64)
    with pytest.raises(VerificationError):
        verify_response(signed.replace(b"example.com/a", b"example.com/b"), signer.public_key_b64)
    plain = sign_completion(
        {"id": "c", "object": "chat.completion", "choices": [], "sources": ["x"]},
        signer,
        "ab" * 32,
    )
    assert "sources" not in json.loads(plain)
