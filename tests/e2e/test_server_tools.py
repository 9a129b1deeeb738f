"""Server-side tools end to end (issue 20): the official openai SDK, the real gateway running
``execute_python`` in its local sandbox, and the fake model server playing a model that calls
the tool and then quotes its result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from nilai.crypto.verify import verify_any
from tests.conftest import FakeHandle, GatewayHandle
from tests.e2e.test_observability import scrape, value
from tests.integration.tools.test_sandbox import bubblewrap_works

pytestmark = pytest.mark.e2e

MODEL = "fake-model"
CODE = "print(6*7)"
QUOTED = "fake says: the tool said 42"
CHAT_TOOL = {
    "type": "function",
    "function": {
        "name": "execute_python",
        "description": "Run Python code and return what it prints.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string"}},
            "required": ["code"],
        },
    },
}
RESPONSES_TOOL = {"type": "function", **CHAT_TOOL["function"]}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}
QUESTION = [{"role": "user", "content": "What is six times seven?"}]

Stack = tuple[FakeHandle, GatewayHandle]


@pytest.fixture
def tools_stack(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
) -> Stack:
    """A model that calls execute_python when declared, behind a gateway that runs it."""
    fake = start_fake(tool_code=CODE, tool_support=True, responses_support=True)
    gateway = start_gateway(upstream_urls=[fake.url], server_tools=["execute_python"])
    return fake, gateway


def _public_key(gateway: GatewayHandle) -> str:
    return httpx.get(f"{gateway.url}/v1/public_key").json()


def _summed(usages: list[dict[str, Any]], prompt: str, completion: str) -> tuple[int, int]:
    return sum(u[prompt] for u in usages), sum(u[completion] for u in usages)


def _tool_calls_run(gateway: GatewayHandle) -> float:
    return value(scrape(gateway.url), "nilai_tool_calls_total", model=MODEL)


# --- chat completions ---------------------------------------------------------------------------


def test_chat_runs_the_tool_and_answers_signed_with_the_exact_usage(tools_stack: Stack):
    fake, gateway = tools_stack
    with gateway.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=QUESTION, tools=[CHAT_TOOL]
        )
    completion = raw.parse()
    assert completion.choices[0].message.content == QUOTED
    # The second model request carries the assistant's call and the tool's result.
    first, second = fake.state.stats.bodies
    assert "tool_choice" not in first
    *_, assistant, tool = second["messages"]
    [call] = assistant["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"code": CODE}
    assert tool == {"role": "tool", "tool_call_id": call["id"], "content": "42\n"}
    assert second["tool_choice"] == "none"
    # The client sees the round, inside the signed answer; usage is both calls, once each.
    extra = completion.model_extra or {}
    [round_] = extra["tool_rounds"]
    assert round_["message"]["tool_calls"] == [call]
    assert round_["results"] == [
        {"tool_call_id": call["id"], "name": "execute_python", "content": "42\n"}
    ]
    usage = completion.usage
    assert usage is not None
    expected = _summed(fake.state.stats.usages, "prompt_tokens", "completion_tokens")
    assert (usage.prompt_tokens, usage.completion_tokens) == expected
    assert usage.total_tokens == sum(expected)
    body = raw.http_response.content
    request = raw.http_request.content
    verified = verify_any(body, _public_key(gateway), request=request)
    assert verified.request_sha256 == hashlib.sha256(request).hexdigest()
    assert _tool_calls_run(gateway) == 1


def test_chat_stream_runs_the_round_then_streams_the_signed_answer(tools_stack: Stack):
    fake, gateway = tools_stack
    with gateway.client() as client:
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=QUESTION,
                tools=[CHAT_TOOL],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=QUESTION, tools=[CHAT_TOOL], stream=True
        ) as recorded:
            raw = recorded.read()
            request = recorded.http_request.content
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == QUOTED
    last = chunks[-1]
    extra = last.model_extra or {}
    assert extra["signature"]
    assert extra["tool_rounds"][0]["results"][0]["content"] == "42\n"
    assert last.usage is not None
    first_request_usages = fake.state.stats.usages[:2]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == _summed(
        first_request_usages, "prompt_tokens", "completion_tokens"
    )
    # The round's call was not streamed; the answer's call was.
    bodies = fake.state.stats.bodies
    assert [body.get("stream") for body in bodies[:2]] == [False, True]
    assert verify_any(raw, _public_key(gateway), request=request).kind == "stream"
    assert _tool_calls_run(gateway) == 2


def test_an_undeclared_tool_goes_back_to_the_client_unrun(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    # The model calls the client's own tool: the answer is the client's, nothing runs.
    fake = start_fake(tool_code=CODE, tool_name="get_weather", tool_support=True)
    gateway = start_gateway(upstream_urls=[fake.url], server_tools=["execute_python"])
    with gateway.client() as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL, CHAT_TOOL]
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert "tool_rounds" not in (completion.model_extra or {})
    assert len(fake.state.stats.bodies) == 1
    assert _tool_calls_run(gateway) == 0


def test_execute_python_not_declared_by_the_client_is_never_run(tools_stack: Stack):
    fake, gateway = tools_stack
    with gateway.client() as client:
        completion = client.chat.completions.create(model=MODEL, messages=QUESTION)
    assert completion.choices[0].message.content == "fake says: w0 w1 w2 w3 w4 w5 w6 w7"
    assert len(fake.state.stats.bodies) == 1
    assert _tool_calls_run(gateway) == 0


def test_a_tool_call_written_as_text_is_never_run(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake(tool_call_as_text=True, tool_support=True)
    gateway = start_gateway(upstream_urls=[fake.url], server_tools=["execute_python"])
    with gateway.client() as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[CHAT_TOOL]
        )
    content = completion.choices[0].message.content
    assert content is not None
    assert '"execute_python"' in content
    assert len(fake.state.stats.bodies) == 1
    assert _tool_calls_run(gateway) == 0


def test_a_gateway_without_server_tools_returns_the_call(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
):
    fake = start_fake(tool_code=CODE, tool_support=True)
    gateway = start_gateway(upstream_urls=[fake.url])
    with gateway.client() as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[CHAT_TOOL]
        )
        [model] = client.models.list().data
    assert completion.choices[0].finish_reason == "tool_calls"
    assert len(fake.state.stats.bodies) == 1
    assert (model.model_extra or {})["server_tools"] == []


# --- the Responses API --------------------------------------------------------------------------


def test_responses_run_the_tool_and_answer_signed_with_the_exact_usage(tools_stack: Stack):
    fake, gateway = tools_stack
    with gateway.client() as client:
        raw = client.responses.with_raw_response.create(
            model=MODEL,
            input="What is six times seven?",
            tools=[RESPONSES_TOOL],
        )
    response = raw.parse()
    assert response.output_text == QUOTED
    first, second = fake.state.stats.responses_bodies
    assert first["input"] == "What is six times seven?"
    *_, call, output = second["input"]
    assert call["type"] == "function_call"
    assert json.loads(call["arguments"]) == {"code": CODE}
    assert output == {"type": "function_call_output", "call_id": call["call_id"], "output": "42\n"}
    assert second["tool_choice"] == "none"
    [round_] = (response.model_extra or {})["tool_rounds"]
    assert round_["results"] == [
        {"call_id": call["call_id"], "name": "execute_python", "output": "42\n"}
    ]
    usage = response.usage
    assert usage is not None
    expected = _summed(fake.state.stats.usages, "input_tokens", "output_tokens")
    assert (usage.input_tokens, usage.output_tokens) == expected
    verify_any(raw.http_response.content, _public_key(gateway), request=raw.http_request.content)


def test_a_responses_stream_runs_the_round_then_streams_the_signed_answer(tools_stack: Stack):
    fake, gateway = tools_stack
    with (
        gateway.client() as client,
        client.responses.with_streaming_response.create(
            model=MODEL,
            input="What is six times seven?",
            tools=[RESPONSES_TOOL],
            stream=True,
        ) as recorded,
    ):
        raw = recorded.read()
        request = recorded.http_request.content
    verified = verify_any(raw, _public_key(gateway), request=request)
    assert verified.kind == "responses stream"
    events = [
        json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")
    ]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == QUOTED
    completed = events[-1]
    assert completed["type"] == "response.completed"
    assert completed["response"]["tool_rounds"][0]["results"][0]["output"] == "42\n"
    expected = _summed(fake.state.stats.usages, "input_tokens", "output_tokens")
    usage = completed["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == expected


# --- what the gateway shows -------------------------------------------------------------------


def test_models_and_readiness_show_the_server_tools_and_the_sandbox(tools_stack: Stack):
    _, gateway = tools_stack
    with gateway.client() as client:
        [model] = client.models.list().data
    assert (model.model_extra or {})["server_tools"] == ["execute_python"]
    checks = httpx.get(f"{gateway.url}/readyz").json()["checks"]
    if bubblewrap_works():
        assert checks["sandbox"] == "ok (bubblewrap)"
    else:  # the weaker sandbox says so
        assert checks["sandbox"].startswith("ok (rlimit: resource limits and an empty environment")
