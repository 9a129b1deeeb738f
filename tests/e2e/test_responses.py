"""``POST /v1/responses`` end to end: the official openai SDK, the real gateway, the fake server.

The fake model server (tests/fakes/fake_openai_server.py) answers "alpha says: w0 ... w7" and
counts usage as its docstring says: input tokens are the words of ``input`` and
``instructions``, output tokens one per streamed piece ("alpha says:" then each " wN").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types.responses import FunctionToolParam, ToolChoiceFunctionParam
from redis.asyncio import Redis

from nilai.cli import main
from nilai.crypto.verify import VerificationError, verify_any
from nilai.discovery.announcer import Announcer, ModelOverrides
from nilai.discovery.redis import RedisDiscovery
from tests.conftest import REDIS_URL, FakeHandle, GatewayHandle
from tests.support.servers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.stack(fake={"name": "alpha", "responses_support": True})]

FAKE = {"name": "alpha", "responses_support": True}
INPUT = "Say hello"
TEXT = "alpha says: w0 w1 w2 w3 w4 w5 w6 w7"
INPUT_TOKENS = 2  # the words of INPUT
OUTPUT_TOKENS = 9  # "alpha says:" and eight words
GOOD: dict[str, Any] = {"model": "fake-model", "input": INPUT}
NILAI = str(Path(sys.executable).parent / "nilai")

Stack = tuple[FakeHandle, GatewayHandle]


def public_key(gateway: GatewayHandle) -> str:
    """The gateway's signing key, as a client fetches it."""
    key: str = httpx.get(f"{gateway.url}/v1/public_key").json()
    return key


def responses_url(gateway: GatewayHandle) -> str:
    """Where the gateway serves the Responses API."""
    return f"{gateway.url}/v1/responses"


def record_stream(gateway: GatewayHandle, **body: Any) -> tuple[bytes, bytes]:
    """The raw bytes of a streamed answer and of the request body the SDK sent for it."""
    with (
        gateway.client() as client,
        client.responses.with_streaming_response.create(stream=True, **body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read()
        sent = response.http_request.content
    return raw, sent


def events_of(raw: bytes) -> list[bytes]:
    """The events of a recorded stream, each without its closing blank line."""
    return [event for event in raw.split(b"\n\n") if event]


def data_of(event: bytes) -> dict[str, Any]:
    """The JSON payload of one ``event:`` + ``data:`` event."""
    name, data = event.split(b"\n")
    assert name.startswith(b"event: ")
    payload: dict[str, Any] = json.loads(data.removeprefix(b"data: "))
    return payload


def rejected(raw: bytes, key: str) -> bool:
    """Whether ``verify_any`` refuses ``raw``."""
    try:
        verify_any(raw, key)
    except VerificationError:
        return True
    return False


# --- 1. signed answers through the SDK ----------------------------------------------------


def test_non_streaming_response_is_signed_and_bound_to_the_request(stack: Stack) -> None:
    fake, gateway = stack
    with gateway.client() as client:
        raw = client.responses.with_raw_response.create(model="fake-model", input=INPUT)
        response = raw.parse()
    assert response.output_text == TEXT
    assert response.usage is not None
    usage = (response.usage.input_tokens, response.usage.output_tokens)
    assert usage == (INPUT_TOKENS, OUTPUT_TOKENS)
    assert response.usage.total_tokens == INPUT_TOKENS + OUTPUT_TOKENS
    reported = fake.state.stats.usages[-1]
    assert usage == (reported["input_tokens"], reported["output_tokens"])
    extra = response.model_extra or {}
    assert extra["signature"]
    assert re.fullmatch(r"[0-9a-f]{64}", extra["request_sha256"])
    sent = raw.http_request.content
    assert extra["request_sha256"] == hashlib.sha256(sent).hexdigest()
    verified = verify_any(raw.http_response.content, public_key(gateway), request=sent)
    assert verified.kind == "responses"
    assert verified.request_sha256 == extra["request_sha256"]
    # The gateway keeps nothing, and tells the model server not to either.
    assert fake.state.stats.last_responses_body is not None
    assert fake.state.stats.last_responses_body["store"] is False
    assert fake.state.stats.responses_requests == 1


def test_recorded_stream_is_signed_and_bound_to_the_request(stack: Stack) -> None:
    fake, gateway = stack
    raw, sent = record_stream(gateway, model="fake-model", input=INPUT)
    assert not raw.endswith(b"[DONE]\n\n")
    events = events_of(raw)
    last = data_of(events[-1])
    assert last["type"] == "response.completed"
    assert last["request_sha256"] == hashlib.sha256(sent).hexdigest()
    assert last["signature"]
    assert all(b"signature" not in event for event in events[:-1])
    usage = last["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (INPUT_TOKENS, OUTPUT_TOKENS)
    assert usage == fake.state.stats.usages[-1]
    verified = verify_any(raw, public_key(gateway), request=sent)
    assert verified.kind == "responses stream"
    assert verified.request_sha256 == last["request_sha256"]


def test_sdk_stream_events_carry_the_same_text_and_end_completed_with_usage(stack: Stack) -> None:
    _, gateway = stack
    with gateway.client() as client:
        whole = client.responses.create(model="fake-model", input=INPUT)
        events = list(client.responses.create(model="fake-model", input=INPUT, stream=True))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) == OUTPUT_TOKENS
    assert "".join(deltas) == whole.output_text == TEXT
    last = events[-1]
    assert last.type == "response.completed"
    assert last.response.output_text == TEXT
    assert last.response.usage is not None
    assert last.response.usage.input_tokens == INPUT_TOKENS
    assert last.response.usage.output_tokens == OUTPUT_TOKENS
    assert last.response.usage.total_tokens == INPUT_TOKENS + OUTPUT_TOKENS
    assert (last.model_extra or {}).get("signature")
    assert [event.type for event in events].count("response.completed") == 1


# --- 2. `nilai verify` on saved answers -------------------------------------------------


def save_answers(gateway: GatewayHandle, tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A non-streaming body and a recorded stream, each with the request body it answers."""
    with gateway.client() as client:
        raw = client.responses.with_raw_response.create(model="fake-model", input=INPUT)
        body, body_request = raw.http_response.content, raw.http_request.content
    stream, stream_request = record_stream(gateway, model="fake-model", input=INPUT)
    paths = [
        tmp_path / name
        for name in ("response.json", "request.json", "stream.sse", "stream-request.json")
    ]
    for path, content in zip(paths, (body, body_request, stream, stream_request), strict=True):
        path.write_bytes(content)
    return paths[0], paths[1], paths[2], paths[3]


def flip_last_byte_of(data: bytes, pattern: bytes) -> bytes:
    """``data`` with one bit changed in the last byte of the first match of ``pattern``."""
    found = re.search(pattern, data)
    assert found is not None, pattern
    index = found.end() - 1
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def changed_text(raw: bytes) -> bytes:
    return flip_last_byte_of(raw, rb"w3")


def changed_usage(raw: bytes) -> bytes:
    return flip_last_byte_of(raw, rb'"output_tokens": ?9')


def injected_delta(raw: bytes) -> bytes:
    events = events_of(raw)
    delta = next(e for e in events if b"event: response.output_text.delta" in e)
    return b"".join(e + b"\n\n" for e in [*events[:-1], delta, events[-1]])


def dropped_delta(raw: bytes) -> bytes:
    events = events_of(raw)
    index = next(i for i, e in enumerate(events) if b"event: response.output_text.delta" in e)
    return b"".join(e + b"\n\n" for e in events[:index] + events[index + 1 :])


def renamed_event(raw: bytes) -> bytes:
    return raw.replace(
        b"event: response.output_text.delta\n", b"event: response.output_text.dong\n", 1
    )


def test_verify_command_accepts_saved_answers(stack: Stack, tmp_path: Path, capsys: Any) -> None:
    _, gateway = stack
    body, body_request, stream, stream_request = save_answers(gateway, tmp_path)
    for saved, sent, kind in (
        (body, body_request, "responses"),
        (stream, stream_request, "responses stream"),
    ):
        assert main(["verify", str(saved), "--gateway", gateway.url, "--request", str(sent)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"OK: {kind} signature valid and bound to the given request")
    # Bound to its own request only: not the stream's, not one changed byte of its own.
    assert (
        main(["verify", str(body), "--gateway", gateway.url, "--request", str(stream_request)]) == 1
    )
    other = tmp_path / "other-request.json"
    other.write_bytes(body_request.read_bytes().replace(b"hello", b"hellO"))
    assert main(["verify", str(body), "--gateway", gateway.url, "--request", str(other)]) == 1
    assert capsys.readouterr().out.count("FAIL:") == 2


def test_verify_command_runs_as_a_program_on_a_responses_stream(
    stack: Stack, tmp_path: Path
) -> None:
    _, gateway = stack
    _, _, stream, stream_request = save_answers(gateway, tmp_path)
    command = [NILAI, "verify", str(stream), "--gateway", gateway.url]
    ok = subprocess.run(
        [*command, "--request", str(stream_request)], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK: responses stream signature valid")
    stream.write_bytes(changed_text(stream.read_bytes()))
    bad = subprocess.run(command, capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert bad.stdout.startswith("FAIL:")


@pytest.mark.parametrize(
    ("which", "tamper"),
    [
        ("body", changed_text),
        ("body", changed_usage),
        ("stream", changed_text),
        ("stream", changed_usage),
        ("stream", injected_delta),
        ("stream", dropped_delta),
        ("stream", renamed_event),
    ],
    ids=[
        "body-text",
        "body-usage",
        "stream-text",
        "stream-usage",
        "stream-injected-event",
        "stream-dropped-event",
        "stream-renamed-event",
    ],
)
def test_verify_command_rejects_a_tampered_answer(
    stack: Stack, tmp_path: Path, capsys: Any, which: str, tamper: Callable[[bytes], bytes]
) -> None:
    _, gateway = stack
    body, _, stream, _ = save_answers(gateway, tmp_path)
    saved = body if which == "body" else stream
    original = saved.read_bytes()
    tampered = tmp_path / f"tampered-{saved.name}"
    tampered.write_bytes(tamper(original))
    assert tampered.read_bytes() != original
    assert main(["verify", str(saved), "--public-key", public_key(gateway)]) == 0
    capsys.readouterr()
    assert main(["verify", str(tampered), "--public-key", public_key(gateway)]) == 1
    assert capsys.readouterr().out.startswith("FAIL:")
    assert rejected(tampered.read_bytes(), public_key(gateway))


# --- 3. tools ----------------------------------------------------------------------------

TOOLS: list[FunctionToolParam] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": False,
    }
]
TOOL_CHOICE: ToolChoiceFunctionParam = {"type": "function", "name": "get_weather"}


async def _announce_with_tools(url: str, prefix: str) -> None:
    # What `nilai announce --tool-support` does once: the fake cannot say it supports tools.
    redis = Redis.from_url(REDIS_URL)  # pyright: ignore[reportUnknownMemberType]
    try:
        async with httpx.AsyncClient() as http:
            announcer = Announcer(
                RedisDiscovery(redis, prefix),
                http,
                url,
                ttl_s=120,
                overrides=ModelOverrides(tool_support=True),
            )
            await announcer.tick()
            assert announcer.registered
    finally:
        await redis.aclose()


@pytest.fixture
def tool_stack(
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
    redis_prefix: str,
) -> Stack:
    """A fake that calls the first tool, announced with tool support, behind a gateway."""
    fake = start_fake(**FAKE, responses_function_call=True)
    asyncio.run(_announce_with_tools(fake.url, redis_prefix))
    gateway = start_gateway(redis_url=REDIS_URL, redis_prefix=redis_prefix)

    def served() -> bool:
        with gateway.client() as client:
            return [m.id for m in client.models.list()] == ["fake-model"]

    wait_until(served, timeout_s=10)
    return fake, gateway


@pytest.mark.integration
def test_tools_reach_the_model_server_and_its_function_call_is_signed(tool_stack: Stack) -> None:
    fake, gateway = tool_stack
    with gateway.client() as client:
        raw = client.responses.with_raw_response.create(
            model="fake-model",
            input="What is the weather in Paris?",
            tools=TOOLS,
            tool_choice=TOOL_CHOICE,
        )
        response = raw.parse()
    sent = fake.state.stats.last_responses_body
    assert sent is not None
    assert sent["tools"] == TOOLS
    assert sent["tool_choice"] == TOOL_CHOICE
    [call] = response.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert call.arguments == "{}"
    assert call.call_id == "call_fake"
    verified = verify_any(raw.http_response.content, public_key(gateway), raw.http_request.content)
    assert verified.kind == "responses"


@pytest.mark.integration
def test_streamed_function_call_events_are_relayed_and_signed(tool_stack: Stack) -> None:
    fake, gateway = tool_stack
    body: dict[str, Any] = {
        "model": "fake-model",
        "input": "What is the weather in Paris?",
        "tools": TOOLS,
        "tool_choice": TOOL_CHOICE,
    }
    raw, sent = record_stream(gateway, **body)
    assert fake.state.stats.last_responses_body is not None
    assert fake.state.stats.last_responses_body["tools"] == TOOLS
    payloads = [data_of(event) for event in events_of(raw)]
    kinds = [payload["type"] for payload in payloads]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert payloads[3]["delta"] == "{}"
    assert payloads[4]["arguments"] == "{}"
    assert payloads[5]["item"]["name"] == "get_weather"
    assert payloads[-1]["response"]["output"][0]["type"] == "function_call"
    assert verify_any(raw, public_key(gateway), request=sent).kind == "responses stream"

    with gateway.client() as client:
        events = list(client.responses.create(stream=True, **body))
    done = [event for event in events if event.type == "response.output_item.done"]
    assert [event.item.type for event in done] == ["function_call"]


# --- 4. refused requests -----------------------------------------------------------------


def post(gateway: GatewayHandle, body: dict[str, Any] | bytes, **headers: str) -> httpx.Response:
    """POST a body (JSON, or raw bytes) to the Responses API with the test key."""
    all_headers = {**gateway.auth, **headers}
    if isinstance(body, bytes):
        return httpx.post(responses_url(gateway), content=body, headers=all_headers, timeout=30)
    return httpx.post(responses_url(gateway), json=body, headers=all_headers, timeout=30)


def openai_error(
    response: httpx.Response, status: int, param: str | None, code: str | None = None
) -> dict[str, Any]:
    """The ``error`` object of a refusal, after checking its status and OpenAI shape."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) >= {"type", "code", "param", "message"}
    assert error["param"] == param
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"input": None}, "input"),
        ({"input": []}, "input"),
        ({"input": 7}, "input"),
        ({"input": [{"content": "hi"}]}, "input.0.type"),
    ],
    ids=[
        "temperature-5",
        "max-output-tokens-0",
        "stream-yes",
        "missing-input",
        "empty-input",
        "input-7",
        "item-without-role-or-type",
    ],
)
def test_invalid_parameters_are_422(stack: Stack, change: dict[str, Any], param: str) -> None:
    fake, gateway = stack
    body = {**GOOD, **change}
    if change.get("input", "") is None:
        del body["input"]
    error = openai_error(post(gateway, body), 422, param)
    assert error["type"] == "invalid_request_error"
    assert fake.state.stats.responses_requests == 0


def test_unknown_model_is_404(stack: Stack) -> None:
    fake, gateway = stack
    error = openai_error(post(gateway, {**GOOD, "model": "no-such-model"}), 404, "model")
    assert error["code"] == "model_not_found"
    assert "/v1/models" in error["message"]
    assert fake.state.stats.responses_requests == 0


def test_model_without_responses_support_is_400(
    start_fake: Callable[..., FakeHandle], start_gateway: Callable[..., GatewayHandle]
) -> None:
    fake = start_fake(name="alpha")
    gateway = start_gateway(upstream_urls=[fake.url])
    error = openai_error(post(gateway, GOOD), 400, "model", "responses_not_supported")
    assert error["type"] == "invalid_request_error"
    assert "/v1/chat/completions" in error["message"]
    # Neither API of the model server was called (its /v1/responses would have said 404).
    assert fake.state.stats.responses_requests == 0
    assert fake.state.stats.requests == 0
    # The same model still answers chat.
    with gateway.client() as client:
        reply = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": INPUT}]
        )
    assert reply.choices[0].message.content == TEXT


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"conversation": "conv_123"}, "conversation"),
        ({"background": True}, "background"),
    ],
)
def test_server_side_state_is_400_not_supported(
    stack: Stack, change: dict[str, Any], param: str
) -> None:
    fake, gateway = stack
    error = openai_error(post(gateway, {**GOOD, **change}), 400, param, "not_supported")
    assert error["type"] == "invalid_request_error"
    assert fake.state.stats.responses_requests == 0


def test_store_false_is_served(stack: Stack) -> None:
    fake, gateway = stack
    assert post(gateway, {**GOOD, "store": False, "background": False}).status_code == 200
    assert fake.state.stats.responses_requests == 1


def test_tools_for_a_model_without_tool_support_are_400(stack: Stack) -> None:
    # The fake never announces tool support (FakeConfig has no switch for it).
    fake, gateway = stack
    error = openai_error(post(gateway, {**GOOD, "tools": TOOLS}), 400, "tools")
    assert error["type"] == "invalid_request_error"
    assert fake.state.stats.responses_requests == 0


@pytest.mark.stack(fake=FAKE, gateway={"max_body_bytes": 4096})
def test_body_over_the_size_limit_is_413(stack: Stack) -> None:
    fake, gateway = stack
    assert post(gateway, {**GOOD, "input": "hi " * 1000}).status_code == 200
    error = openai_error(post(gateway, {**GOOD, "input": "hi " * 1400}), 413, None)
    assert error["code"] == "payload_too_large"
    assert "4096" in error["message"]
    assert fake.state.stats.responses_requests == 1


def test_more_json_items_than_the_limit_is_413(stack: Stack) -> None:
    fake, gateway = stack
    error = openai_error(
        post(gateway, {**GOOD, "metadata": {"tags": [0] * 40_000}}), 413, None, "payload_too_large"
    )
    assert "JSON items" in error["message"]
    assert fake.state.stats.responses_requests == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_body_declared_as_anything_but_json_is_415(stack: Stack, content_type: str) -> None:
    fake, gateway = stack
    response = post(gateway, json.dumps(GOOD).encode(), **{"Content-Type": content_type})
    error = openai_error(response, 415, None, "unsupported_media_type")
    assert error["type"] == "invalid_request_error"
    assert fake.state.stats.responses_requests == 0


# --- 6. a model server failing mid-stream ------------------------------------------------


@pytest.mark.parametrize("fault", ["error_event", "drop_mid_stream", "malformed_json"])
def test_mid_stream_failure_ends_with_an_unsigned_error_event(stack: Stack, fault: str) -> None:
    fake, gateway = stack
    fake.config.fault = fault
    raw, _ = record_stream(gateway, model="fake-model", input=INPUT)
    events = events_of(raw)
    assert events[-1].startswith(b"event: error\n")
    error = data_of(events[-1])
    assert error["type"] == "error"
    assert error["code"]
    assert error["message"]
    assert b"signature" not in raw
    assert b"response.completed" not in raw
    assert rejected(raw, public_key(gateway))

    with gateway.client() as client:
        seen = list(client.responses.create(model="fake-model", input=INPUT, stream=True))
    assert seen[-1].type == "error"
    assert all(event.type != "response.completed" for event in seen)


def test_stream_without_response_completed_ends_with_an_error_event(stack: Stack) -> None:
    fake, gateway = stack
    fake.config.fault = "no_final_chunk"
    raw, _ = record_stream(gateway, model="fake-model", input=INPUT)
    events = events_of(raw)
    assert events[-1].startswith(b"event: error\n")
    assert b"signature" not in raw
    assert rejected(raw, public_key(gateway))
