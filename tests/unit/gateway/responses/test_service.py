"""The Responses service against a mock model server: signed answers, refusals, accounting."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from nilai.auth.base import Principal
from nilai.crypto.keys import Signer
from nilai.crypto.verify import verify_responses_object, verify_responses_stream
from nilai.discovery.base import EndpointRecord, endpoint_id
from nilai.discovery.memory import MemoryDiscovery
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.errors import InvalidRequest, NilaiError, UpstreamProtocolError
from nilai.gateway.chat.context import RESPONSES_API, RequestContext
from nilai.gateway.drain import Drain
from nilai.gateway.metrics import Metrics
from nilai.gateway.responses.service import ResponsesService
from nilai.limits.memory import MemoryConcurrencyLimiter, MemoryRateLimiter
from nilai.limits.policy import Admission, LimitDefaults
from nilai.protocol.models import ModelCard
from nilai.protocol.responses import ResponsesRequest
from nilai.store.base import QueryLog
from nilai.upstream.client import HttpxUpstream
from tests.support.records import ListSink

RESPONSES_CARD = ModelCard(id="m", supported_features=["chat_completion", "responses"])
CHAT_ONLY_CARD = ModelCard(id="m")
USAGE = {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13}
OUTPUT: list[dict[str, Any]] = [
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "Hello there", "annotations": []}],
    }
]
ANSWER: dict[str, Any] = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1700000000,
    "model": "m",
    "status": "completed",
    "output": OUTPUT,
    "usage": USAGE,
}
BODY: dict[str, Any] = {"model": "m", "input": "hi"}
STREAM_BODY: dict[str, Any] = {**BODY, "stream": True}

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class Outcome:
    """What one request through the service did."""

    body: bytes
    error: NilaiError | None
    ctx: RequestContext
    raw_request: bytes
    sent: list[httpx.Request]
    logs: list[QueryLog]


def _endpoint(url: str, card: ModelCard) -> EndpointRecord:
    return EndpointRecord(url=url, models=(card,), registered_at=1.0)


async def _run(
    signer: Signer,
    handler: Handler,
    body: dict[str, Any],
    *,
    endpoints: Sequence[EndpointRecord] = (_endpoint("http://model-a", RESPONSES_CARD),),
    times: int = 1,
) -> list[Outcome]:
    """Send ``body`` ``times`` times through one service whose model servers ``handler`` plays."""
    raw_request = json.dumps(body).encode()
    discovery = MemoryDiscovery()
    for record in endpoints:
        await discovery.register(record, 10)
    sent: list[httpx.Request] = []

    def recording(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return handler(request)

    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(recording)) as http:
        snapshot = DiscoverySnapshot(discovery, http, refresh_s=60, eject_s=1)
        await snapshot.refresh()
        rate = MemoryRateLimiter()
        admission = Admission(
            rate, MemoryConcurrencyLimiter(rate), LimitDefaults(), fail_open=False
        )
        for _ in range(times):
            sink = ListSink()
            service = ResponsesService(
                HttpxUpstream(http),
                snapshot,
                signer,
                sink,  # type: ignore[arg-type]
                admission,
                metrics=Metrics(),
                drain=Drain(10),
                request_timeout_s=5,
            )
            sent.clear()
            ctx = RequestContext.begin(
                "r", Principal("acct", "api_key"), raw_request, api=RESPONSES_API
            )
            request = ResponsesRequest.model_validate_json(raw_request)
            out, error = b"", None
            try:
                if request.stream:
                    stream = await service.stream(request, ctx)
                    out = b"".join([part async for part in stream.events])
                    await stream.aclose()
                else:
                    out = (await service.create(request, ctx)).body
            except NilaiError as exc:
                error = exc
            outcomes.append(Outcome(out, error, ctx, raw_request, list(sent), list(sink.logs)))
    return outcomes


async def _one(signer: Signer, handler: Handler, body: dict[str, Any], **options: Any) -> Outcome:
    (outcome,) = await _run(signer, handler, body, **options)
    return outcome


def _json(payload: object, status: int = 200) -> Handler:
    content = payload if isinstance(payload, bytes) else orjson.dumps(payload)

    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers={"content-type": "application/json"})

    return handler


def _typed(kind: str, **fields: Any) -> bytes:
    """One upstream event as a model server writes it: ``event:`` line, then ``data:``."""
    data = orjson.dumps({"type": kind, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def _events(*events: bytes) -> Handler:
    def handler(_: httpx.Request) -> httpx.Response:
        # Served unread, as a real streaming response is; the relay reads it raw.
        return httpx.Response(
            200,
            stream=httpx.ByteStream(b"".join(events)),
            headers={"content-type": "text/event-stream"},
        )

    return handler


UPSTREAM_EVENTS = [
    _typed(
        "response.created",
        sequence_number=0,
        response={**ANSWER, "status": "in_progress", "output": [], "usage": None},
    ),
    _typed("response.output_text.delta", sequence_number=1, item_id="msg_1", delta="Hello"),
    _typed("response.output_text.delta", sequence_number=2, item_id="msg_1", delta=" there"),
    _typed("response.completed", sequence_number=3, response=ANSWER),
]


def _only_log(outcome: Outcome) -> QueryLog:
    assert len(outcome.logs) == 1
    return outcome.logs[0]


def _sent_payload(outcome: Outcome) -> dict[str, Any]:
    (request,) = outcome.sent
    return json.loads(request.content)


# --- answers --------------------------------------------------------------------------------


async def test_a_created_response_is_signed_recorded_and_accounted_once(signer: Signer):
    outcome = await _one(signer, _json({**ANSWER, "sources": ["forged"], "signature": "x"}), BODY)
    assert outcome.error is None
    verified = verify_responses_object(
        outcome.body, signer.public_key_b64, request=outcome.raw_request
    )
    assert verified.kind == "responses"
    body = json.loads(outcome.body)
    assert body["output"] == OUTPUT
    assert body["usage"] == USAGE
    assert "sources" not in body
    ctx = outcome.ctx
    assert (ctx.api, ctx.prompt_tokens, ctx.completion_tokens) == ("responses", 9, 4)
    assert (ctx.status, ctx.endpoint) == (200, endpoint_id("http://model-a"))
    log = _only_log(outcome)
    assert (log.prompt_tokens, log.completion_tokens) == (9, 4)
    assert (log.status_code, log.error_kind, log.streamed, log.model) == (200, None, False, "m")


async def test_the_model_server_is_asked_on_its_responses_path_with_store_false(signer: Signer):
    body = {**BODY, "web_search": False, "store": False, "reasoning": {"effort": "low"}}
    outcome = await _one(signer, _json(ANSWER), body)
    (request,) = outcome.sent
    assert request.method == "POST"
    assert str(request.url) == "http://model-a/v1/responses"
    assert request.headers["accept"] == "application/json"
    assert json.loads(request.content) == {
        "model": "m",
        "input": "hi",
        "store": False,
        "reasoning": {"effort": "low"},
    }


async def test_store_false_is_sent_when_the_client_said_nothing(signer: Signer):
    outcome = await _one(signer, _json(ANSWER), BODY)
    assert _sent_payload(outcome)["store"] is False


async def test_an_upstream_400_is_the_clients_error_with_the_model_servers_message(
    signer: Signer,
):
    rejected = {"error": {"message": "reasoning.effort must be low, medium or high"}}
    outcome = await _one(signer, _json(rejected, status=400), BODY)
    error = outcome.error
    assert isinstance(error, InvalidRequest)
    assert (error.status, error.code) == (400, "upstream_rejected")
    assert error.message == "reasoning.effort must be low, medium or high"
    log = _only_log(outcome)
    assert (log.status_code, log.error_kind) == (400, "InvalidRequest")


@pytest.mark.parametrize(
    "upstream",
    [
        _json({"error": {"message": "boom"}}, status=500),
        _json(b'{"id": "resp_1", "output": ['),
        _json(b"[1, 2]"),
        _json({"id": "resp_1", "object": "response", "status": "completed"}),
        _json({**ANSWER, "output": {"not": "a list"}}),
        _json({**ANSWER, "object": "chat.completion"}),
    ],
    ids=[
        "http-500",
        "malformed-json",
        "not-an-object",
        "no-output",
        "output-not-a-list",
        "other-kind",
    ],
)
async def test_a_model_server_failure_is_a_502_accounted_once(signer: Signer, upstream: Handler):
    outcome = await _one(signer, upstream, BODY)
    error = outcome.error
    assert isinstance(error, UpstreamProtocolError)
    assert (error.status, error.code) == (502, "bad_gateway")
    assert outcome.body == b""
    assert len(outcome.sent) == 1
    log = _only_log(outcome)
    assert (log.status_code, log.error_kind) == (502, "UpstreamProtocolError")
    assert (outcome.ctx.status, outcome.ctx.error_kind) == (502, "UpstreamProtocolError")


# --- streams --------------------------------------------------------------------------------


async def test_a_stream_is_signed_recorded_and_accounted_once(signer: Signer):
    outcome = await _one(signer, _events(*UPSTREAM_EVENTS), STREAM_BODY)
    assert outcome.error is None
    verified = verify_responses_stream(
        outcome.body, signer.public_key_b64, request=outcome.raw_request
    )
    assert verified.kind == "responses stream"
    assert outcome.body.startswith(UPSTREAM_EVENTS[0])  # relayed as the model server sent it
    assert b"[DONE]" not in outcome.body
    (request,) = outcome.sent
    assert str(request.url) == "http://model-a/v1/responses"
    assert request.headers["accept"] == "text/event-stream"
    assert json.loads(request.content) == {**STREAM_BODY, "store": False}
    ctx = outcome.ctx
    assert (ctx.prompt_tokens, ctx.completion_tokens, ctx.status) == (9, 4, 200)
    assert ctx.first_token_s is not None
    log = _only_log(outcome)
    assert (log.prompt_tokens, log.completion_tokens) == (9, 4)
    assert (log.status_code, log.error_kind, log.streamed) == (200, None, True)
    assert log.ttft_ms is not None


async def test_a_stream_the_model_server_fails_ends_in_an_error_event_accounted_once(
    signer: Signer,
):
    failed = _typed("response.failed", sequence_number=2, response={**ANSWER, "status": "failed"})
    outcome = await _one(signer, _events(*UPSTREAM_EVENTS[:2], failed), STREAM_BODY)
    assert outcome.error is None  # the stream had started: the error is in-band
    assert outcome.body.startswith(UPSTREAM_EVENTS[0] + UPSTREAM_EVENTS[1])
    assert outcome.body.count(b"event: error\n") == 1
    assert outcome.body.endswith(b"\n\n")
    assert b"signature" not in outcome.body
    log = _only_log(outcome)
    assert (log.status_code, log.error_kind, log.streamed) == (502, "UpstreamProtocolError", True)
    # One output_text delta; the input ("hi") at its estimate, since no usage ever came.
    assert (log.prompt_tokens, log.completion_tokens) == (1, 1)


async def test_a_stream_the_model_server_refuses_fails_before_any_event(signer: Signer):
    outcome = await _one(signer, _json({"error": {"message": "boom"}}, status=500), STREAM_BODY)
    assert isinstance(outcome.error, UpstreamProtocolError)
    assert outcome.body == b""
    log = _only_log(outcome)
    assert (log.status_code, log.streamed) == (502, True)


# --- refusals: the model server is never called ---------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("fields", "card", "expected"),
    [
        (
            {"previous_response_id": "resp_0"},
            RESPONSES_CARD,
            ("InvalidRequest", 400, "not_supported", "previous_response_id"),
        ),
        ({"model": "unknown"}, RESPONSES_CARD, ("NotFound", 404, "model_not_found", "model")),
        ({}, CHAT_ONLY_CARD, ("InvalidRequest", 400, "responses_not_supported", "model")),
    ],
    ids=["previous-response-id", "unknown-model", "no-responses-feature"],
)
async def test_a_refused_request_never_reaches_the_model_server(
    signer: Signer,
    stream: bool,
    fields: dict[str, Any],
    card: ModelCard,
    expected: tuple[str, int, str, str],
):
    def never(_: httpx.Request) -> httpx.Response:
        raise AssertionError("the model server was called")

    body = {**BODY, "stream": stream, **fields}
    outcome = await _one(signer, never, body, endpoints=[_endpoint("http://model-a", card)])
    error = outcome.error
    assert error is not None
    assert (type(error).__name__, error.status, error.code, error.param) == expected
    assert outcome.sent == []
    log = _only_log(outcome)
    assert (log.error_kind, log.status_code) == expected[:2]
    assert (log.prompt_tokens, log.completion_tokens, log.streamed) == (0, 0, stream)


@pytest.mark.parametrize(
    "order", [("responses", "chat-only"), ("chat-only", "responses")], ids=["first", "second"]
)
async def test_only_the_server_announcing_responses_gets_the_request(
    signer: Signer, order: tuple[str, str]
):
    """A fleet may mix servers that serve the Responses API and servers that do not.

    Whichever of them announced the model first, the request goes to the one that serves it.
    """
    records = {
        "responses": _endpoint("http://serves-responses", RESPONSES_CARD),
        "chat-only": _endpoint("http://chat-only", CHAT_ONLY_CARD),
    }
    endpoints = [records[name] for name in order]
    outcomes = await _run(signer, _json(ANSWER), BODY, endpoints=endpoints, times=4)
    for outcome in outcomes:
        assert outcome.error is None
        assert [str(request.url) for request in outcome.sent] == [
            "http://serves-responses/v1/responses"
        ]
        verify_responses_object(outcome.body, signer.public_key_b64)
