"""The local worker's OpenAI-shaped HTTP API over a fake engine (no torch)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any

import httpx
import orjson
import pytest

from nilai.workers.local.engine import Finished, SamplingParams
from nilai.workers.local.server import DEFAULT_MAX_TOKENS, create_worker_app
from tests.support.servers import ServerThread, wait_until

CHAT = "/v1/chat/completions"
FOREVER = "forever"


def prompt_text(messages: list[dict[str, Any]]) -> str:
    return "".join(m["content"] for m in messages if isinstance(m.get("content"), str))


def answer_for(text: str) -> str:
    return f"reply to {text}"


class FakeEngine:
    """Implements the server's ``Engine`` protocol.

    The prompt is one id per character of the concatenated message contents. The answer is
    ``answer_for(prompt)`` in word-sized pieces (endless ticks for the prompt ``FOREVER``); a
    piece counts as one token.
    """

    model_id = "fake-model"

    def __init__(
        self, *, max_model_len: int = 200, delay: float = 0.002, fail: Exception | None = None
    ) -> None:
        self.max_model_len = max_model_len
        self.delay = delay
        self.fail = fail
        self.params: list[SamplingParams] = []
        self.prompts: list[list[int]] = []
        self.saw_cancel = threading.Event()
        self.finished: list[Finished] = []
        self._lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return [ord(c) for c in prompt_text(messages)]

    def _pieces(self, prompt: Sequence[int]) -> Iterable[str]:
        text = "".join(map(chr, prompt))
        if text == FOREVER:
            return (f"tick{i} " for i in itertools.count())
        words = answer_for(text).split(" ")
        return [words[0], *(f" {word}" for word in words[1:])]

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[str | Finished]:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.prompts.append(list(prompt))
            self.params.append(params)
        try:
            finished = yield from self._produce(prompt, params, cancelled)
            self.finished.append(finished)
            yield finished
        finally:
            with self._lock:
                self.active -= 1

    def _produce(
        self, prompt: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Generator[str, None, Finished]:
        if self.fail is not None:
            raise self.fail
        produced = 0
        for piece in self._pieces(prompt):
            if cancelled.is_set():
                self.saw_cancel.set()
                return Finished("cancelled", produced)
            if produced >= params.max_tokens:
                return Finished("length", produced)
            time.sleep(self.delay)
            for stop in params.stop:
                if stop in piece:
                    before = piece[: piece.index(stop)]
                    if before:
                        yield before
                    return Finished("stop", produced + 1)
            yield piece
            produced += 1
        return Finished("stop", produced)


def body(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


def events(raw: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    assert raw.endswith("\n\n")
    frames = raw.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f.removeprefix("data: ") for f in frames]


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


async def completion(client: httpx.AsyncClient, **extra: Any) -> httpx.Response:
    return await client.post(CHAT, json=body(**extra))


async def params_for(client: httpx.AsyncClient, engine: FakeEngine, **extra: Any) -> SamplingParams:
    response = await completion(client, **extra)
    assert response.status_code == 200, response.text
    return engine.params[-1]


# --- plain routes -----------------------------------------------------------------------------


async def test_health(client: httpx.AsyncClient):
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_models_lists_the_engine_with_its_context(client: httpx.AsyncClient):
    response = await client.get("/v1/models")
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    [card] = listing["data"]
    assert card["id"] == "fake-model"
    assert card["object"] == "model"
    assert card["max_model_len"] == 200
    assert card["owned_by"] == "nilai-local"
    assert isinstance(card["created"], int)


async def test_owned_by_is_configurable(engine: FakeEngine):
    app = create_worker_app(engine, owned_by="someone")
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
            [card] = (await client.get("/v1/models")).json()["data"]
        assert card["owned_by"] == "someone"
    finally:
        app.state.generations.close()


async def test_unknown_route_is_an_openai_404(client: httpx.AsyncClient):
    error = assert_openai_error(await client.get("/v1/nothing"), 404)
    assert error["type"] == "not_found_error"


# --- non-streaming ----------------------------------------------------------------------------


async def test_non_streaming_completion_shape(client: httpx.AsyncClient, engine: FakeEngine):
    response = await completion(client, content="hello there")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert data["model"] == "fake-model"
    assert isinstance(data["created"], int)
    [choice] = data["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "reply to hello there"}
    assert choice["finish_reason"] == "stop"
    [finished] = engine.finished
    assert data["usage"] == {
        "prompt_tokens": len("hello there"),
        "completion_tokens": finished.completion_tokens,
        "total_tokens": len("hello there") + finished.completion_tokens,
    }
    assert finished.completion_tokens == 4  # reply / to / hello / there
    assert engine.prompts == [[ord(c) for c in "hello there"]]


async def test_completion_ids_are_unique(client: httpx.AsyncClient):
    first = (await completion(client)).json()["id"]
    second = (await completion(client)).json()["id"]
    assert first != second


async def test_length_finish_reason_and_usage(client: httpx.AsyncClient):
    data = (await completion(client, content="a b c d e", max_tokens=2)).json()
    assert data["choices"][0]["message"]["content"] == "reply to"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 2
    assert data["usage"]["total_tokens"] == len("a b c d e") + 2


async def test_stop_string_cuts_the_answer(client: httpx.AsyncClient):
    data = (await completion(client, content="one two three", stop="hre")).json()
    assert data["choices"][0]["message"]["content"] == "reply to one two t"
    assert data["choices"][0]["finish_reason"] == "stop"


async def test_system_and_user_messages_both_reach_the_prompt(
    client: httpx.AsyncClient, engine: FakeEngine
):
    messages = [{"role": "system", "content": "be nice. "}, {"role": "user", "content": "hi"}]
    response = await client.post(CHAT, json={"model": "fake-model", "messages": messages})
    assert response.status_code == 200
    assert engine.prompts == [[ord(c) for c in "be nice. hi"]]
    assert response.json()["usage"]["prompt_tokens"] == len("be nice. hi")


async def test_text_parts_are_accepted(client: httpx.AsyncClient):
    parts = [{"type": "text", "text": "hello"}]
    response = await client.post(
        CHAT, json={"model": "fake-model", "messages": [{"role": "user", "content": parts}]}
    )
    assert response.status_code == 200, response.text


# --- streaming --------------------------------------------------------------------------------


async def stream_chunks(client: httpx.AsyncClient, **extra: Any) -> tuple[list[dict], str]:
    response = await client.post(CHAT, json=body(stream=True, **extra))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = events(response.text)
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    return [orjson.loads(p) for p in payloads[:-1]], response.text


async def test_streaming_shape(client: httpx.AsyncClient):
    chunks, _ = await stream_chunks(client, content="a b")

    first, *middle, last = chunks
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]
    assert middle
    for chunk in middle:
        [choice] = chunk["choices"]
        assert set(choice["delta"]) == {"content"}
        assert choice["finish_reason"] is None
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == answer_for("a b")
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert all("usage" not in chunk for chunk in chunks)

    ids = {chunk["id"] for chunk in chunks}
    assert len(ids) == 1
    assert ids.pop().startswith("chatcmpl-")
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk["model"] for chunk in chunks} == {"fake-model"}
    assert len({chunk["created"] for chunk in chunks}) == 1


async def test_streaming_usage_chunk_only_when_asked(client: httpx.AsyncClient, engine: FakeEngine):
    chunks, _ = await stream_chunks(
        client, content="a b", stream_options={"include_usage": True}, max_tokens=3
    )

    *_, final, usage = chunks
    assert final["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    assert usage["object"] == "chat.completion.chunk"
    assert usage["id"] == final["id"]
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert engine.finished[-1].completion_tokens == 3

    chunks, _ = await stream_chunks(client, stream_options={"include_usage": False})
    assert all(chunk["choices"] for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)


async def test_streaming_and_whole_answers_agree(client: httpx.AsyncClient):
    whole = (await completion(client, content="x y z")).json()
    chunks, _ = await stream_chunks(client, content="x y z")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]


# --- parameters -------------------------------------------------------------------------------


async def test_default_parameters(client: httpx.AsyncClient, engine: FakeEngine):
    params = await params_for(client, engine, content="hi")
    assert params == SamplingParams(
        max_tokens=min(DEFAULT_MAX_TOKENS, 200 - 2), temperature=1.0, top_p=1.0, stop=(), seed=None
    )


async def test_default_max_tokens_is_capped_by_the_default():
    big = FakeEngine(max_model_len=4096)
    app = create_worker_app(big)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
            params = await params_for(client, big, content="hi")
    finally:
        app.state.generations.close()
    assert params.max_tokens == DEFAULT_MAX_TOKENS


async def test_sampling_parameters_are_passed_on(client: httpx.AsyncClient, engine: FakeEngine):
    params = await params_for(
        client, engine, temperature=0.3, top_p=0.5, max_tokens=7, stop=["x", "yz"], seed=42
    )
    assert params == SamplingParams(
        max_tokens=7, temperature=0.3, top_p=0.5, stop=("x", "yz"), seed=42
    )


async def test_temperature_zero_is_kept(client: httpx.AsyncClient, engine: FakeEngine):
    params = await params_for(client, engine, temperature=0)
    assert params.temperature == 0.0


async def test_single_stop_string_becomes_a_tuple(client: httpx.AsyncClient, engine: FakeEngine):
    params = await params_for(client, engine, stop="END")
    assert params.stop == ("END",)


async def test_max_completion_tokens_is_honoured(client: httpx.AsyncClient, engine: FakeEngine):
    params = await params_for(client, engine, max_completion_tokens=5)
    assert params.max_tokens == 5
    params = await params_for(client, engine, max_completion_tokens=5, max_tokens=9)
    assert params.max_tokens == 5


async def test_max_tokens_may_fill_the_context_exactly(
    client: httpx.AsyncClient, engine: FakeEngine
):
    params = await params_for(client, engine, content="hi", max_tokens=198)
    assert params.max_tokens == 198


# --- refusals ---------------------------------------------------------------------------------


async def test_tools_are_refused(client: httpx.AsyncClient, engine: FakeEngine):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    error = assert_openai_error(await completion(client, tools=[tool]), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "tools"
    assert engine.params == []


async def test_images_are_refused(client: httpx.AsyncClient, engine: FakeEngine):
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    response = await client.post(
        CHAT, json={"model": "fake-model", "messages": [{"role": "user", "content": parts}]}
    )
    error = assert_openai_error(response, 400)
    assert error["param"] == "messages"
    assert engine.params == []


async def test_nilai_extras_are_not_supported(client: httpx.AsyncClient):
    error = assert_openai_error(await completion(client, web_search=True), 501)
    assert error["code"] == "not_supported"


async def test_prompt_longer_than_the_context_is_refused(
    client: httpx.AsyncClient, engine: FakeEngine
):
    error = assert_openai_error(await completion(client, content="x" * 250), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    assert "250" in error["message"]
    assert engine.params == []


async def test_prompt_that_fills_the_context_is_refused(client: httpx.AsyncClient):
    error = assert_openai_error(await completion(client, content="x" * 200), 400)
    assert error["code"] == "context_length_exceeded"


async def test_max_tokens_above_the_room_left_is_refused(
    client: httpx.AsyncClient, engine: FakeEngine
):
    error = assert_openai_error(await completion(client, content="x" * 150, max_tokens=51), 400)
    assert error["param"] == "max_tokens"
    assert error["code"] == "context_length_exceeded"
    error = assert_openai_error(
        await completion(client, content="x" * 150, max_completion_tokens=51), 400
    )
    assert error["param"] == "max_tokens"
    assert engine.params == []


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 9}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"model": "  "}, "model"),
    ],
)
async def test_validation_errors_are_openai_shaped(
    client: httpx.AsyncClient, engine: FakeEngine, extra: dict[str, Any], param: str
):
    error = assert_openai_error(await client.post(CHAT, json=body() | extra), 422)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == "invalid_value"
    assert engine.params == []


async def test_bad_role_names_the_field(client: httpx.AsyncClient):
    response = await client.post(
        CHAT, json={"model": "m", "messages": [{"role": "wizard", "content": "x"}]}
    )
    error = assert_openai_error(response, 422)
    assert error["param"] == "messages.0.role"


async def test_invalid_json_is_a_400(client: httpx.AsyncClient):
    response = await client.post(
        CHAT, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 400)


# --- concurrency and failures -----------------------------------------------------------------


async def test_concurrent_requests_never_overlap_in_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine
):
    engine.delay = 0.01
    contents = [f"request {i}" for i in range(5)]

    responses = await asyncio.gather(*(completion(client, content=c) for c in contents))

    assert [r.status_code for r in responses] == [200] * 5
    answers = [r.json()["choices"][0]["message"]["content"] for r in responses]
    assert answers == [answer_for(c) for c in contents]
    assert engine.max_active == 1
    assert len(engine.params) == 5


async def test_concurrent_streams_never_overlap_in_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine
):
    contents = [f"stream {i}" for i in range(4)]

    results = await asyncio.gather(*(stream_chunks(client, content=c) for c in contents))

    for content, (chunks, _) in zip(contents, results, strict=True):
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == answer_for(content)
    assert engine.max_active == 1


async def test_engine_failure_is_an_openai_500_without_detail(engine: FakeEngine):
    engine.fail = RuntimeError("secret internal detail /srv/model.bin")
    app = create_worker_app(engine)
    try:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
            response = await completion(client)
            error = assert_openai_error(response, 500)
            assert error["type"] == "server_error"
            assert "secret" not in response.text
            assert "/srv/model.bin" not in response.text
            assert "RuntimeError" not in response.text

            engine.fail = None
            after = await completion(client, content="fine")
            assert after.status_code == 200
            assert after.json()["choices"][0]["message"]["content"] == answer_for("fine")
    finally:
        app.state.generations.close()


# --- cancellation over real sockets ----------------------------------------------------------


@pytest.fixture
def served() -> Iterator[tuple[FakeEngine, ServerThread]]:
    engine = FakeEngine(max_model_len=1_000_000, delay=0.01)
    app = create_worker_app(engine)
    server = ServerThread(app).start()
    try:
        yield engine, server
    finally:
        server.stop()
        app.state.generations.close()


def test_stream_disconnect_cancels_the_generation(served: tuple[FakeEngine, ServerThread]):
    engine, server = served
    request = body(FOREVER, stream=True, max_tokens=100_000)

    with (
        httpx.Client(base_url=server.url, timeout=10) as client,
        client.stream("POST", CHAT, json=request) as response,
    ):
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 4:
                break

    wait_until(engine.saw_cancel.is_set, timeout_s=5)
    assert engine.finished[-1].finish_reason == "cancelled"
    assert engine.finished[-1].completion_tokens < 100_000

    with httpx.Client(base_url=server.url, timeout=10) as client:
        after = client.post(CHAT, json=body("next"))
    assert after.status_code == 200
    assert after.json()["choices"][0]["message"]["content"] == answer_for("next")
    assert engine.max_active == 1


def test_non_streaming_disconnect_cancels_the_generation(
    served: tuple[FakeEngine, ServerThread],
):
    engine, server = served

    with (
        httpx.Client(base_url=server.url, timeout=0.5) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post(CHAT, json=body(FOREVER, max_tokens=100_000))

    wait_until(engine.saw_cancel.is_set, timeout_s=5)
    assert engine.finished[-1].finish_reason == "cancelled"

    with httpx.Client(base_url=server.url, timeout=10) as client:
        after = client.post(CHAT, json=body("again"))
    assert after.status_code == 200
    assert after.json()["choices"][0]["message"]["content"] == answer_for("again")


async def test_streaming_request_errors_come_before_the_stream(
    client: httpx.AsyncClient, engine: FakeEngine
):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    response = await completion(client, stream=True, tools=[tool])
    assert response.headers["content-type"].startswith("application/json")
    assert assert_openai_error(response, 400)["param"] == "tools"
    response = await completion(client, stream=True, content="x" * 300)
    assert assert_openai_error(response, 400)["code"] == "context_length_exceeded"
    assert engine.params == []


async def test_engine_failure_mid_stream_ends_with_error_event_and_done():
    class Failing(FakeEngine):
        def generate(self, prompt, params, cancelled):
            yield "partial"
            raise RuntimeError("engine exploded")

    app = create_worker_app(Failing())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": True},
        )
    events = [e for e in response.content.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert events[-2].startswith(b'data: {"error"')
    assert b"exploded" not in response.content
