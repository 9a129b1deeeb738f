"""The fake model server playing a model that calls tools, which server-tool tests rely on."""

import json
from typing import Any

import httpx
import pytest

from tests.fakes.fake_openai_server import (
    CHAT_TOKENS_PER_CALL,
    RESPONSES_TOKENS_PER_CALL,
    FakeConfig,
    FakeState,
    create_fake_app,
)

CODE = "print(6*7)"
ARGUMENTS = '{"code": "print(6*7)"}'
CHAT_TOOL = {
    "type": "function",
    "function": {"name": "execute_python", "parameters": {"type": "object"}},
}
RESPONSES_TOOL = {"type": "function", "name": "execute_python", "parameters": {"type": "object"}}
TEXT_CALL = '{"name": "execute_python", "arguments": {"code": "print(1)"}}'
WORDS = "alpha says: w0 w1 w2"
USER = {"role": "user", "content": "what is six times seven"}  # 5 words
ASKED = {
    "role": "assistant",
    "content": None,  # counted as the one word "None", the fake's rule for prompts
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "execute_python", "arguments": ARGUMENTS},
        }
    ],
}


async def _post(
    body: dict[str, Any], path: str = "/v1/chat/completions", **config: Any
) -> tuple[httpx.Response, FakeState]:
    """One request to a fresh fake named ``alpha`` that speaks three words."""
    app = create_fake_app(FakeConfig(name="alpha", tokens=3, **config))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        response = await client.post(path, json=body)
    return response, app.state.fake


def _chunks(raw: str) -> list[dict[str, Any]]:
    """The chat stream's chunks, checking it ends with ``[DONE]`` and nothing else is there."""
    blocks = [block for block in raw.split("\n\n") if block]
    assert blocks[-1] == "data: [DONE]"
    assert all(block.startswith("data: ") for block in blocks)
    return [json.loads(block.removeprefix("data: ")) for block in blocks[:-1]]


def _assemble(chunks: list[dict[str, Any]]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The message, finish reason and usage a client rebuilds from a chat stream."""
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    finish = ""
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        delta = choice["delta"]
        content += delta.get("content") or ""
        for part in delta.get("tool_calls", []):
            call = calls.setdefault(part["index"], {"function": {"arguments": ""}})
            call.update({key: part[key] for key in ("id", "type") if key in part})
            if "name" in part["function"]:
                call["function"]["name"] = part["function"]["name"]
            call["function"]["arguments"] += part["function"]["arguments"]
        finish = choice["finish_reason"] or finish
    assert chunks[-1]["choices"] == []
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": c["type"], "function": c["function"]}
            for _i, c in sorted(calls.items())
        ]
    return message, finish, chunks[-1]["usage"]


async def _chat(body: dict[str, Any], stream: bool, **config: Any) -> tuple[Any, ...]:
    """``(message, finish reason, usage, state)``, from a stream or a whole answer."""
    if stream:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    response, state = await _post(body, **config)
    assert response.status_code == 200
    if stream:
        return (*_assemble(_chunks(response.text)), state)
    [choice] = response.json()["choices"]
    return choice["message"], choice["finish_reason"], response.json()["usage"], state


def _events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of each Responses SSE event."""
    events: list[tuple[str, dict[str, Any]]] = []
    for block in raw.split("\n\n"):
        if block:
            name_line, data_line = block.split("\n")
            events.append((name_line.removeprefix("event: "), json.loads(data_line[6:])))
    return events


async def _respond(body: dict[str, Any], stream: bool, **config: Any) -> tuple[Any, ...]:
    """``(output, usage, state)`` of a Responses request, from its stream or whole."""
    response, state = await _post(
        {**body, "stream": stream}, path="/v1/responses", responses_support=True, **config
    )
    assert response.status_code == 200
    if stream:
        events = _events(response.text)
        assert [data["sequence_number"] for _n, data in events] == list(range(len(events)))
        name, data = events[-1]
        assert name == "response.completed"
        answer = data["response"]
    else:
        answer = response.json()
    assert answer["status"] == "completed"
    return answer["output"], answer["usage"], state


def _call(number: int, name: str = "execute_python") -> dict[str, Any]:
    return {
        "id": f"call_{number}",
        "type": "function",
        "function": {"name": name, "arguments": ARGUMENTS},
    }


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# --- chat completions


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_calls_the_declared_tool(stream: bool):
    body = {"model": "m", "messages": [USER], "tools": [CHAT_TOOL]}
    message, finish, usage, state = await _chat(body, stream, tool_code=CODE)
    assert message == {"role": "assistant", "content": None, "tool_calls": [_call(1)]}
    assert finish == "tool_calls"
    assert CHAT_TOKENS_PER_CALL == 4
    assert usage == _usage(5, 4)
    assert state.stats.usages == [usage]
    assert state.stats.completed == 1
    assert [b["messages"] for b in state.stats.bodies] == [[USER]]


async def test_chat_call_stream_deltas():
    body = {
        "model": "m",
        "messages": [USER],
        "tools": [CHAT_TOOL],
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    response, _state = await _post(body, tool_code=CODE)
    chunks = _chunks(response.text)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks[:-1]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "execute_python", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"code": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"print(6*7)"'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]},
        {},
    ]
    finishes = [chunk["choices"][0]["finish_reason"] for chunk in chunks[:-1]]
    assert finishes == [None] * 5 + ["tool_calls"]
    assert [chunk["usage"]["completion_tokens"] for chunk in chunks] == [0, 1, 2, 3, 4, 4, 4]
    assert chunks[-1]["usage"] == _usage(5, 4)


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_several_calls_in_one_answer(stream: bool):
    body = {"model": "m", "messages": [USER], "tools": [CHAT_TOOL]}
    message, finish, usage, _state = await _chat(
        body, stream, tool_code=CODE, tool_calls_per_answer=3
    )
    assert message["tool_calls"] == [_call(1), _call(2), _call(3)]
    assert finish == "tool_calls"
    assert usage == _usage(5, 12)


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_quotes_the_tool_result(stream: bool):
    result = {"role": "tool", "tool_call_id": "call_1", "content": "42\n"}
    body = {"model": "m", "messages": [USER, ASKED, result], "tools": [CHAT_TOOL]}
    message, finish, usage, state = await _chat(body, stream, tool_code=CODE)
    assert message == {"role": "assistant", "content": "alpha says: the tool said 42"}
    assert finish == "stop"
    assert usage == _usage(5 + 1 + 1, 5)
    assert state.stats.usages == [usage]


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_quotes_several_results_in_order(stream: bool):
    results = [
        {"role": "tool", "tool_call_id": "call_1", "content": " 1 "},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "2\n"}]},
    ]
    body = {"model": "m", "messages": [USER, ASKED, *results], "tools": [CHAT_TOOL]}
    message, _finish, _tokens, _state = await _chat(body, stream, tool_code=CODE)
    assert message["content"] == "alpha says: the tool said 1; 2"


async def test_chat_bodies_record_both_rounds():
    app = create_fake_app(FakeConfig(name="alpha", tokens=3, tool_code=CODE))
    first = {"model": "m", "messages": [USER], "tools": [CHAT_TOOL]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "42"}
    second = {**first, "messages": [USER, ASKED, result]}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        called = (await client.post("/v1/chat/completions", json=first)).json()
        quoted = (await client.post("/v1/chat/completions", json=second)).json()
        stats = (await client.get("/_control/stats")).json()
    state: FakeState = app.state.fake
    assert called["choices"][0]["message"]["tool_calls"] == [_call(1)]
    assert quoted["choices"][0]["message"]["content"] == "alpha says: the tool said 42"
    assert state.stats.bodies == [first, second]
    assert state.stats.last_body == second
    assert state.stats.usages == [_usage(5, 4), _usage(7, 5)]
    assert stats["bodies"] == [first, second]
    assert stats["responses_bodies"] == []


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_tool_choice_none_answers_text(stream: bool):
    body = {"model": "m", "messages": [USER], "tools": [CHAT_TOOL], "tool_choice": "none"}
    message, finish, usage, _state = await _chat(body, stream, tool_code=CODE)
    assert message == {"role": "assistant", "content": WORDS}
    assert finish == "stop"
    assert usage == _usage(5, 4)


@pytest.mark.parametrize(
    "tool_choice", ["auto", "required", {"type": "function", "function": {"name": "x"}}]
)
async def test_chat_other_tool_choices_still_call(tool_choice: object):
    body = {"model": "m", "messages": [USER], "tools": [CHAT_TOOL], "tool_choice": tool_choice}
    message, finish, _tokens, _state = await _chat(body, False, tool_code=CODE)
    assert message["tool_calls"] == [_call(1)]
    assert finish == "tool_calls"


@pytest.mark.parametrize(
    ("tools", "config"),
    [
        (None, {"tool_code": CODE}),
        ([{"type": "function", "function": {"name": "get_weather"}}], {"tool_code": CODE}),
        ([CHAT_TOOL], {}),
    ],
    ids=["no-tools", "other-tool", "tool-code-off"],
)
async def test_chat_no_call_unless_declared_and_on(
    tools: list[dict[str, Any]] | None, config: dict[str, Any]
):
    body: dict[str, Any] = {"model": "m", "messages": [USER]}
    if tools is not None:
        body["tools"] = tools
    message, finish, _tokens, _state = await _chat(body, False, **config)
    assert message == {"role": "assistant", "content": WORDS}
    assert finish == "stop"


async def test_chat_results_quoted_only_with_tool_code():
    result = {"role": "tool", "tool_call_id": "call_1", "content": "42"}
    body = {"model": "m", "messages": [USER, ASKED, result], "tools": [CHAT_TOOL]}
    message, _finish, _tokens, _state = await _chat(body, False)
    assert message["content"] == WORDS


async def test_chat_calls_once_per_user_turn():
    result = {"role": "tool", "tool_call_id": "call_1", "content": "42"}
    answered = {"role": "assistant", "content": "it is 42"}
    messages: list[dict[str, Any]] = [USER, ASKED, result, answered]
    body = {"model": "m", "messages": messages, "tools": [CHAT_TOOL]}
    message, _finish, _tokens, _state = await _chat(body, False, tool_code=CODE)
    assert message["content"] == WORDS  # a result already follows the last user message
    body["messages"] = [*messages, USER]
    message, _finish, _tokens, _state = await _chat(body, False, tool_code=CODE)
    assert message["tool_calls"] == [_call(1)]  # a new user turn: a new call


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_calls_another_tool_by_name(stream: bool):
    weather = {"type": "function", "function": {"name": "get_weather"}}
    body = {"model": "m", "messages": [USER], "tools": [CHAT_TOOL, weather]}
    message, finish, _tokens, _state = await _chat(
        body, stream, tool_code=CODE, tool_name="get_weather"
    )
    assert message["tool_calls"] == [_call(1, "get_weather")]
    assert finish == "tool_calls"
    only_python = {**body, "tools": [CHAT_TOOL]}
    message, _finish, _tokens, _state = await _chat(
        only_python, stream, tool_code=CODE, tool_name="get_weather"
    )
    assert message["content"] == WORDS


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("declared", [True, False])
async def test_chat_tool_call_as_text(stream: bool, declared: bool):
    body: dict[str, Any] = {"model": "m", "messages": [USER]}
    if declared:
        body["tools"] = [CHAT_TOOL]
    message, finish, usage, _state = await _chat(body, stream, tool_call_as_text=True)
    assert message == {"role": "assistant", "content": TEXT_CALL}
    assert finish == "stop"
    assert usage == _usage(5, 5)


async def test_chat_defaults_unchanged():
    body = {"model": "m", "messages": [USER], "tools": [CHAT_TOOL]}
    message, finish, usage, state = await _chat(body, True)
    assert message == {"role": "assistant", "content": WORDS}
    assert finish == "stop"
    assert usage == _usage(5, 4)
    assert state.stats.bodies[0]["messages"] == [USER]


# --- Responses API


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_calls_the_declared_tool(stream: bool):
    body = {"model": "m", "input": "what is six times seven", "tools": [RESPONSES_TOOL]}
    output, usage, state = await _respond(body, stream, tool_code=CODE)
    assert output == [
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "execute_python",
            "arguments": ARGUMENTS,
            "status": "completed",
        }
    ]
    assert RESPONSES_TOKENS_PER_CALL == 3
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (5, 3, 8)
    assert state.stats.usages == [usage]
    assert state.stats.responses_bodies == [{**body, "stream": stream}]
    assert state.stats.bodies == []


async def test_responses_call_stream_events():
    body = {"model": "m", "input": "hi", "tools": [RESPONSES_TOOL], "stream": True}
    response, _state = await _post(
        body, path="/v1/responses", responses_support=True, tool_code=CODE
    )
    events = _events(response.text)
    assert [name for name, _data in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * 3,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = events[2][1]["item"]
    assert (added["id"], added["call_id"], added["arguments"]) == ("fc_1", "call_1", "")
    assert added["status"] == "in_progress"
    deltas = [data["delta"] for name, data in events if name.endswith("arguments.delta")]
    assert deltas == ['{"code": ', '"print(6*7)"', "}"]
    assert events[6][1]["arguments"] == ARGUMENTS
    assert events[7][1]["item"]["arguments"] == ARGUMENTS


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_several_calls(stream: bool):
    body = {"model": "m", "input": "hi", "tools": [RESPONSES_TOOL]}
    output, usage, _state = await _respond(body, stream, tool_code=CODE, tool_calls_per_answer=2)
    assert [(i["id"], i["call_id"], i["arguments"]) for i in output] == [
        ("fc_1", "call_1", ARGUMENTS),
        ("fc_2", "call_2", ARGUMENTS),
    ]
    assert usage["output_tokens"] == 6


async def test_responses_several_calls_stream_indexes():
    body = {"model": "m", "input": "hi", "tools": [RESPONSES_TOOL], "stream": True}
    response, _state = await _post(
        body, path="/v1/responses", responses_support=True, tool_code=CODE, tool_calls_per_answer=2
    )
    added = [data for name, data in _events(response.text) if name == "response.output_item.added"]
    assert [(data["output_index"], data["item"]["id"]) for data in added] == [
        (0, "fc_1"),
        (1, "fc_2"),
    ]


def _answered(*outputs: str) -> list[dict[str, Any]]:
    """Input that ends with the results of calls ``call_1`` ...."""
    items: list[dict[str, Any]] = [{"role": "user", "content": "what is six times seven"}]
    for n, _output in enumerate(outputs, 1):
        items.append(
            {
                "type": "function_call",
                "call_id": f"call_{n}",
                "name": "execute_python",
                "arguments": ARGUMENTS,
            }
        )
    items += [
        {"type": "function_call_output", "call_id": f"call_{n}", "output": output}
        for n, output in enumerate(outputs, 1)
    ]
    return items


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_quotes_the_outputs(stream: bool):
    body = {"model": "m", "input": _answered("42\n"), "tools": [RESPONSES_TOOL]}
    output, usage, _state = await _respond(body, stream, tool_code=CODE)
    [item] = output
    assert item["type"] == "message"
    assert item["content"][0]["text"] == "alpha says: the tool said 42"
    assert (usage["input_tokens"], usage["output_tokens"]) == (6, 5)


async def test_responses_quote_stream_deltas():
    body = {"model": "m", "input": _answered("1", "2"), "tools": [RESPONSES_TOOL], "stream": True}
    response, _state = await _post(
        body, path="/v1/responses", responses_support=True, tool_code=CODE
    )
    events = _events(response.text)
    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    assert deltas == ["alpha says:", " the", " tool", " said", " 1; 2"]


async def test_responses_bodies_record_both_rounds():
    app = create_fake_app(FakeConfig(name="alpha", responses_support=True, tool_code=CODE))
    first = {"model": "m", "input": "hi", "tools": [RESPONSES_TOOL]}
    second = {**first, "input": _answered("42")}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        await client.post("/v1/responses", json=first)
        await client.post("/v1/responses", json=second)
    state: FakeState = app.state.fake
    assert state.stats.responses_bodies == [first, second]
    assert state.stats.last_responses_body == second
    assert state.stats.bodies == []


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "config",
    [{"tool_code": CODE}, {"responses_function_call": True}],
    ids=["tool-code", "function-call"],
)
async def test_responses_tool_choice_none_answers_text(stream: bool, config: dict[str, Any]):
    body = {"model": "m", "input": "hi", "tools": [RESPONSES_TOOL], "tool_choice": "none"}
    output, usage, _state = await _respond(body, stream, **config)
    [item] = output
    assert item["type"] == "message"
    assert item["content"][0]["text"] == WORDS
    assert usage["output_tokens"] == 4


@pytest.mark.parametrize(
    ("tools", "config"),
    [
        (None, {"tool_code": CODE}),
        ([{"type": "function", "name": "get_weather"}], {"tool_code": CODE}),
        ([RESPONSES_TOOL], {}),
    ],
    ids=["no-tools", "other-tool", "tool-code-off"],
)
async def test_responses_no_call_unless_declared_and_on(
    tools: list[dict[str, Any]] | None, config: dict[str, Any]
):
    body: dict[str, Any] = {"model": "m", "input": "hi"}
    if tools is not None:
        body["tools"] = tools
    output, _tokens, _state = await _respond(body, False, **config)
    assert [item["type"] for item in output] == ["message"]
    assert output[0]["content"][0]["text"] == WORDS


async def test_responses_calls_once_per_user_turn():
    answered = {"role": "assistant", "content": "it is 42"}
    body = {"model": "m", "input": [*_answered("42"), answered], "tools": [RESPONSES_TOOL]}
    output, _tokens, _state = await _respond(body, False, tool_code=CODE)
    assert output[0]["content"][0]["text"] == WORDS
    body["input"] = [*body["input"], {"role": "user", "content": "again"}]
    output, _tokens, _state = await _respond(body, False, tool_code=CODE)
    assert output[0]["type"] == "function_call"


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_calls_another_tool_by_name(stream: bool):
    weather = {"type": "function", "name": "get_weather"}
    body = {"model": "m", "input": "hi", "tools": [RESPONSES_TOOL, weather]}
    output, _tokens, _state = await _respond(body, stream, tool_code=CODE, tool_name="get_weather")
    assert [(i["name"], i["call_id"]) for i in output] == [("get_weather", "call_1")]


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_tool_call_as_text(stream: bool):
    body = {"model": "m", "input": "hi", "tools": [RESPONSES_TOOL]}
    output, usage, _state = await _respond(body, stream, tool_call_as_text=True)
    [item] = output
    assert item["type"] == "message"
    assert item["content"][0]["text"] == TEXT_CALL
    assert usage["output_tokens"] == 5
