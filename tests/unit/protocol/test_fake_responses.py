"""The fake model server's ``POST /v1/responses``, which gateway tests rely on."""

import json
from typing import Any

import httpx
import pytest

from tests.fakes.fake_openai_server import FakeConfig, FakeState, create_fake_app

MESSAGE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 4,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


async def _post(
    body: dict[str, Any], path: str = "/v1/responses", **config: Any
) -> tuple[httpx.Response, FakeState]:
    config.setdefault("responses_support", True)
    app = create_fake_app(FakeConfig(name="alpha", tokens=3, **config))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        response = await client.post(path, json=body)
    return response, app.state.fake


async def _get(path: str, **config: Any) -> httpx.Response:
    config.setdefault("responses_support", True)
    app = create_fake_app(FakeConfig(**config))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        return await client.get(path)


def _events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of each SSE event, checking every event has both lines."""
    events: list[tuple[str, dict[str, Any]]] = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ")
        assert data_line.startswith("data: ")
        events.append((name_line.removeprefix("event: "), json.loads(data_line[6:])))
    return events


async def test_non_stream_message():
    body = {"model": "m", "input": "one two three", "instructions": "be brief"}
    response, state = await _post(body)
    assert response.status_code == 200
    answer = response.json()
    assert answer["object"] == "response"
    assert answer["status"] == "completed"
    assert answer["model"] == "m"
    [item] = answer["output"]
    assert item["type"] == "message"
    assert item["role"] == "assistant"
    assert item["content"][0]["type"] == "output_text"
    assert item["content"][0]["text"] == "alpha says: w0 w1 w2"
    usage = answer["usage"]
    assert usage["input_tokens"] == 5
    assert usage["output_tokens"] == 4
    assert usage["total_tokens"] == 9
    assert state.stats.responses_requests == 1
    assert state.stats.last_responses_body == body
    assert state.stats.usages == [usage]
    assert state.stats.requests == 0  # chat counters stay the chat's own


async def test_input_items_are_counted():
    items = [
        {"role": "user", "content": "a b"},
        {"role": "user", "content": [{"type": "input_text", "text": "c d e"}]},
    ]
    response, _state = await _post({"model": "m", "input": items})
    assert response.json()["usage"]["input_tokens"] == 5


async def test_stream_event_order():
    response, state = await _post({"model": "m", "input": "hi", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert [name for name, _data in events] == MESSAGE_EVENTS
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _name, data in events] == list(range(len(events)))
    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    assert "".join(deltas) == "alpha says: w0 w1 w2"
    final = events[-1][1]["response"]
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == "alpha says: w0 w1 w2"
    assert final["usage"]["output_tokens"] == 4
    assert "[DONE]" not in response.text
    assert state.stats.completed == 1
    assert state.stats.usages == [final["usage"]]


async def test_function_call():
    body = {"model": "m", "input": "hi", "tools": [{"type": "function", "name": "lookup"}]}
    response, _state = await _post(body, responses_function_call=True)
    [item] = response.json()["output"]
    assert item["type"] == "function_call"
    assert item["name"] == "lookup"
    assert item["arguments"] == "{}"
    assert item["status"] == "completed"
    assert item["call_id"]


async def test_function_call_needs_the_switch_and_tools():
    with_tools = {"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f"}]}
    response, _state = await _post(with_tools)
    assert response.json()["output"][0]["type"] == "message"
    response, _state = await _post({"model": "m", "input": "hi"}, responses_function_call=True)
    assert response.json()["output"][0]["type"] == "message"


async def test_function_call_stream():
    body = {
        "model": "m",
        "input": "hi",
        "stream": True,
        "tools": [{"type": "function", "name": "lookup"}],
    }
    response, _state = await _post(body, responses_function_call=True)
    events = _events(response.text)
    names = [name for name, _data in events]
    assert names[0] == "response.created"
    assert "response.function_call_arguments.done" in names
    assert names[-1] == "response.completed"
    assert events[-1][1]["response"]["output"][0]["name"] == "lookup"


async def test_error_event_fault():
    response, _state = await _post(
        {"model": "m", "input": "hi", "stream": True}, fault="error_event"
    )
    events = _events(response.text)
    name, data = events[-1]
    assert name == "error"
    assert data["type"] == "error"
    assert data["code"]
    assert data["sequence_number"] == len(events) - 1
    assert "response.completed" not in [n for n, _d in events]


@pytest.mark.parametrize("stream", [False, True])
async def test_http_500_fault(stream: bool):
    response, _state = await _post(
        {"model": "m", "input": "hi", "stream": stream}, fault="http_500"
    )
    assert response.status_code == 500


async def test_support_off():
    response, state = await _post({"model": "m", "input": "hi"}, responses_support=False)
    assert response.status_code == 404
    assert state.stats.responses_requests == 0
    cards = (await _get("/v1/models", responses_support=False)).json()["data"]
    assert all(card["supported_features"] == ["chat_completion"] for card in cards)


async def test_models_announce_responses():
    cards = (await _get("/v1/models", models=["a", "b"])).json()["data"]
    assert [card["supported_features"] for card in cards] == [["chat_completion", "responses"]] * 2


async def test_chat_still_answers():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    response, state = await _post(body, path="/v1/chat/completions")
    assert response.json()["choices"][0]["message"]["content"] == "alpha says: w0 w1 w2"
    assert state.stats.responses_requests == 0
