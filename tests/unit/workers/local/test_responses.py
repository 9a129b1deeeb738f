"""The local worker's ``POST /v1/responses`` over the fake engine (no torch)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from fastapi import FastAPI
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from nilai.workers.local.engine import Finished, SamplingParams
from nilai.workers.local.server import DEFAULT_MAX_TOKENS, create_worker_app
from tests.support.servers import ServerThread, wait_until
from tests.unit.workers.local.test_server import (
    FOREVER,
    FakeEngine,
    answer_for,
    assert_openai_error,
)

RESPONSES = "/v1/responses"

STREAM_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
STREAM_END = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def request(content: Any = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "input": content, **extra}


async def respond(client: httpx.AsyncClient, content: Any = "hi", **extra: Any) -> httpx.Response:
    return await client.post(RESPONSES, json=request(content, **extra))


def typed_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each SSE event; every event has exactly one name and one data line."""
    assert raw.endswith(b"\n\n")
    parsed: list[tuple[str, dict[str, Any]]] = []
    for block in raw.split(b"\n\n")[:-1]:
        name_line, data_line = block.split(b"\n")
        assert name_line.startswith(b"event: ")
        assert data_line.startswith(b"data: ")
        data = orjson.loads(data_line.removeprefix(b"data: "))
        name = name_line.removeprefix(b"event: ").decode()
        assert data["type"] == name
        parsed.append((name, data))
    return parsed


async def stream(
    client: httpx.AsyncClient, content: Any = "hi", **extra: Any
) -> list[tuple[str, Any]]:
    response = await respond(client, content, stream=True, **extra)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert b"[DONE]" not in response.content
    return typed_events(response.content)


# --- announcement ---------------------------------------------------------------------------


async def test_the_card_announces_responses(client: httpx.AsyncClient):
    [card] = (await client.get("/v1/models")).json()["data"]
    assert "responses" in card["supported_features"]
    assert "chat_completion" in card["supported_features"]


# --- non-streaming --------------------------------------------------------------------------


async def test_plain_text_response_shape(client: httpx.AsyncClient, engine: FakeEngine):
    response = await respond(client, "hello there")

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    assert data["id"].startswith("resp_")
    assert data["object"] == "response"
    assert data["status"] == "completed"
    assert data["model"] == "fake-model"
    assert isinstance(data["created_at"], int)
    assert data["error"] is None
    assert data["incomplete_details"] is None
    [message] = data["output"]
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    assert message["status"] == "completed"
    assert message["id"].startswith("msg_")
    assert message["content"] == [
        {"type": "output_text", "text": answer_for("hello there"), "annotations": []}
    ]
    [finished] = engine.finished
    assert finished.completion_tokens == 4
    assert data["usage"] == {
        "input_tokens": len("hello there"),
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": finished.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": len("hello there") + finished.completion_tokens,
    }
    assert engine.prompts == [[ord(c) for c in "hello there"]]
    # The SDK's own model of a response accepts the object as it is, validated.
    assert Response.model_validate(data).output_text == answer_for("hello there")


async def test_response_ids_are_unique(client: httpx.AsyncClient):
    first = (await respond(client)).json()
    second = (await respond(client)).json()
    assert first["id"] != second["id"]
    assert first["output"][0]["id"] != second["output"][0]["id"]


async def test_instructions_are_the_first_message(client: httpx.AsyncClient):
    seen: list[list[dict[str, Any]]] = []

    class Recording(FakeEngine):
        def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
            seen.append(messages)
            return super().encode_chat(messages)

    app = create_worker_app(Recording())
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as recording:
            response = await respond(recording, "hi", instructions="be brief. ")
            assert response.status_code == 200, response.text
            data = response.json()
    finally:
        app.state.generations.close()
    assert seen == [
        [{"role": "system", "content": "be brief. "}, {"role": "user", "content": "hi"}]
    ]
    assert data["instructions"] == "be brief. "
    assert data["usage"]["input_tokens"] == len("be brief. hi")


async def test_message_items_and_text_parts_become_chat_messages():
    seen: list[list[dict[str, Any]]] = []

    class Recording(FakeEngine):
        def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
            seen.append(messages)
            return super().encode_chat(messages)

    items = [
        {"role": "developer", "content": "rules. "},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a "}]},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "b "}],
        },
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "c"}, {"type": "input_text", "text": "d"}],
        },
    ]
    app = create_worker_app(Recording())
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as recording:
            response = await respond(recording, items)
    finally:
        app.state.generations.close()
    assert response.status_code == 200, response.text
    assert seen == [
        [
            {"role": "developer", "content": "rules. "},
            {"role": "user", "content": "a "},
            {"role": "assistant", "content": "b "},
            {"role": "user", "content": "cd"},
        ]
    ]
    assert response.json()["output"][0]["content"][0]["text"] == answer_for("rules. a b cd")


async def test_sampling_parameters_are_passed_on(client: httpx.AsyncClient, engine: FakeEngine):
    response = await respond(client, temperature=0.3, top_p=0.5, max_output_tokens=7)
    assert response.status_code == 200, response.text
    assert engine.params == [SamplingParams(max_tokens=7, temperature=0.3, top_p=0.5)]
    data = response.json()
    assert (data["temperature"], data["top_p"], data["max_output_tokens"]) == (0.3, 0.5, 7)


async def test_default_parameters(client: httpx.AsyncClient, engine: FakeEngine):
    assert (await respond(client, "hi")).status_code == 200
    assert engine.params == [
        SamplingParams(max_tokens=min(DEFAULT_MAX_TOKENS, 200 - 2), temperature=1.0, top_p=1.0)
    ]


async def test_hitting_max_output_tokens_is_incomplete(
    client: httpx.AsyncClient, engine: FakeEngine
):
    data = (await respond(client, "a b c d e", max_output_tokens=2)).json()
    assert engine.finished == [Finished("length", 2)]
    assert data["status"] == "incomplete"
    assert data["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data["output"][0]["content"][0]["text"] == "reply to"
    assert data["usage"]["output_tokens"] == 2
    assert data["usage"]["total_tokens"] == len("a b c d e") + 2


# --- streaming ------------------------------------------------------------------------------


async def test_stream_event_order_and_sequence_numbers(
    client: httpx.AsyncClient, engine: FakeEngine
):
    events = await stream(client, "a b")

    names = [name for name, _ in events]
    [finished] = engine.finished
    deltas = finished.completion_tokens
    assert names == [*STREAM_ORDER, *["response.output_text.delta"] * deltas, *STREAM_END]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))

    created = events[0][1]["response"]
    assert created["status"] == "in_progress"
    assert created["output"] == []
    assert created["usage"] is None
    response_ids = {data["response"]["id"] for _, data in events if "response" in data}
    assert len(response_ids) == 1
    item_ids = {data["item_id"] for _, data in events if "item_id" in data}
    item_ids |= {data["item"]["id"] for _, data in events if "item" in data}
    assert len(item_ids) == 1
    # Each event validates as the SDK's model of that event type.
    adapter: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)
    assert [adapter.validate_python(data).type for _, data in events] == names


async def test_stream_deltas_concatenate_to_the_final_text(
    client: httpx.AsyncClient, engine: FakeEngine
):
    events = await stream(client, "x y z")

    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    text = answer_for("x y z")
    assert "".join(deltas) == text
    assert len(deltas) == engine.finished[-1].completion_tokens
    by_name = dict(events)
    assert by_name["response.output_text.done"]["text"] == text
    assert by_name["response.content_part.done"]["part"]["text"] == text
    assert by_name["response.output_item.done"]["item"]["content"][0]["text"] == text
    final = by_name["response.completed"]["response"]
    assert final["status"] == "completed"
    assert final["output"] == [by_name["response.output_item.done"]["item"]]
    assert final["output"][0]["content"][0]["text"] == text

    whole = (await respond(client, "x y z")).json()
    assert whole["output"][0]["content"] == final["output"][0]["content"]


async def test_stream_final_usage_is_the_engines_count(
    client: httpx.AsyncClient, engine: FakeEngine
):
    events = await stream(client, "a b", max_output_tokens=3)
    name, completed = events[-1]
    assert name == "response.completed"
    [finished] = engine.finished
    assert finished == Finished("length", 3)
    assert completed["response"]["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 6,
    }
    assert completed["response"]["status"] == "incomplete"


async def test_engine_failure_mid_stream_ends_with_an_error_event():
    class Failing(FakeEngine):
        def generate(self, prompt, params, cancelled):  # type: ignore[override]
            yield "partial"
            raise RuntimeError("engine exploded")

    app = create_worker_app(Failing())
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
            response = await respond(client, "x", stream=True)
    finally:
        app.state.generations.close()
    events = typed_events(response.content)
    name, error = events[-1]
    assert name == "error"
    assert error["code"] == "internal_error"
    assert error["sequence_number"] == len(events) - 1
    assert "response.completed" not in [name for name, _ in events]
    assert b"exploded" not in response.content


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
    ],
)
@pytest.mark.parametrize("streamed", [False, True])
async def test_unsupported_features_are_refused(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    extra: dict[str, Any],
    param: str,
    streamed: bool,
):
    response = await respond(client, stream=streamed, **extra)
    assert response.headers["content-type"].startswith("application/json")
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "not_supported"
    assert error["param"] == param
    assert engine.params == []


async def test_store_false_is_served(client: httpx.AsyncClient):
    response = await respond(client, store=False)
    assert response.status_code == 200, response.text
    assert response.json()["store"] is False


@pytest.mark.parametrize(
    ("items", "param"),
    [
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "what is this?"},
                        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                    ],
                }
            ],
            "input.0.content",
        ),
        ([{"role": "user", "content": "a"}, {"type": "function_call_output"}], "input.1.type"),
        ([{"type": "input_file", "file_id": "f"}], "input.0.type"),
    ],
)
async def test_non_text_input_is_refused(
    client: httpx.AsyncClient, engine: FakeEngine, items: list[dict[str, Any]], param: str
):
    error = assert_openai_error(await respond(client, items), 400)
    assert error["code"] == "not_supported"
    assert error["param"] == param
    assert engine.params == []


async def test_bad_role_is_refused(client: httpx.AsyncClient, engine: FakeEngine):
    # Parsed as the gateway parses it (nilai.protocol.responses): a schema error, 422.
    error = assert_openai_error(await respond(client, [{"role": "wizard", "content": "x"}]), 422)
    assert error["param"] == "input.0.role"
    assert engine.params == []


async def test_empty_input_is_refused(client: httpx.AsyncClient, engine: FakeEngine):
    error = assert_openai_error(await respond(client, []), 422)
    assert error["param"] == "input"
    assert engine.params == []


async def test_context_length_is_checked_like_chat(client: httpx.AsyncClient, engine: FakeEngine):
    error = assert_openai_error(await respond(client, "x" * 250), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "input"
    assert "250" in error["message"]
    error = assert_openai_error(await respond(client, "x" * 150, max_output_tokens=51), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "max_output_tokens"
    response = await respond(client, "x" * 300, stream=True)
    assert assert_openai_error(response, 400)["code"] == "context_length_exceeded"
    assert engine.params == []


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 9}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "  "}, "model"),
        ({"stream": "yes"}, "stream"),
    ],
)
async def test_bad_parameters_are_openai_422s(
    client: httpx.AsyncClient, engine: FakeEngine, extra: dict[str, Any], param: str
):
    error = assert_openai_error(await client.post(RESPONSES, json=request() | extra), 422)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == "invalid_value"
    assert engine.params == []


async def test_missing_input_is_a_422(client: httpx.AsyncClient):
    error = assert_openai_error(await client.post(RESPONSES, json={"model": "fake-model"}), 422)
    assert error["param"] == "input"


# --- the official SDK -----------------------------------------------------------------------


@pytest.fixture
async def sdk(app: FastAPI) -> AsyncIterator[openai.AsyncOpenAI]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://w/v1") as http:
        yield openai.AsyncOpenAI(
            base_url="http://w/v1", api_key="unused", max_retries=0, http_client=http
        )


async def test_openai_sdk_reads_a_response(sdk: openai.AsyncOpenAI, engine: FakeEngine):
    response = await sdk.responses.create(
        model="fake-model", input="hello", instructions="sys. ", max_output_tokens=50
    )
    assert response.output_text == answer_for("sys. hello")
    assert response.status == "completed"
    assert response.usage is not None
    assert response.usage.output_tokens == engine.finished[-1].completion_tokens
    assert response.usage.input_tokens == len("sys. hello")


async def test_openai_sdk_reads_a_stream(sdk: openai.AsyncOpenAI, engine: FakeEngine):
    stream = await sdk.responses.create(model="fake-model", input="a b", stream=True)
    seen: list[Any] = [event async for event in stream]
    deltas = [e.delta for e in seen if e.type == "response.output_text.delta"]
    assert "".join(deltas) == answer_for("a b")
    final = seen[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == answer_for("a b")
    assert final.response.usage.output_tokens == engine.finished[-1].completion_tokens


async def test_openai_sdk_raises_on_refusal(sdk: openai.AsyncOpenAI):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.create(model="fake-model", input="x", previous_response_id="resp_1")
    assert caught.value.code == "not_supported"


# --- cancellation over a real socket --------------------------------------------------------


def test_stream_disconnect_cancels_the_generation():
    engine = FakeEngine(max_model_len=1_000_000, delay=0.01)
    app = create_worker_app(engine)
    server = ServerThread(app).start()
    try:
        body = request(FOREVER, stream=True, max_output_tokens=100_000)
        with (
            httpx.Client(base_url=server.url, timeout=10) as client,
            client.stream("POST", RESPONSES, json=body) as response,
        ):
            assert response.status_code == 200
            deltas = 0
            for line in response.iter_lines():
                if line == "event: response.output_text.delta":
                    deltas += 1
                if deltas >= 3:
                    break

        wait_until(engine.saw_cancel.is_set, timeout_s=5)
        assert engine.finished[-1].finish_reason == "cancelled"
        assert engine.finished[-1].completion_tokens < 100_000
    finally:
        server.stop()
        app.state.generations.close()
