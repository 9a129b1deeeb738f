"""Gateway + the real local worker (tiny model) driven by the openai SDK."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

from nilai.crypto.verify import verify_response, verify_stream
from nilai.workers.local.server import create_worker_app
from tests.support.servers import ServerThread, wait_until

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Tell me something."}]


@pytest.fixture
def worker(tiny_engine):
    thread = ServerThread(create_worker_app(tiny_engine)).start()
    yield thread
    thread.stop()


@pytest.fixture
def gateway(worker, start_gateway):
    return start_gateway(upstream_urls=[worker.url])


def token_counts(engine, content: str) -> tuple[int, int]:
    prompt = len(engine.encode_chat(MESSAGES))
    completion = len(engine._tokenizer(content, add_special_tokens=False)["input_ids"])
    return prompt, completion


def test_models_come_from_the_worker(gateway, tiny_engine):
    with gateway.client() as client:
        [model] = client.models.list().data
    assert model.id == "tiny-model"
    assert (model.model_extra or {})["max_model_len"] == tiny_engine.max_model_len


def test_non_streaming_answer_is_signed_with_tokenizer_counts(gateway, tiny_engine):
    with gateway.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-model", messages=MESSAGES, seed=7, max_tokens=40
        )
        completion = raw.parse()
    content = completion.choices[0].message.content
    assert content
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == token_counts(
        tiny_engine, content
    )
    key = httpx.get(f"{gateway.url}/v1/public_key").json()
    verify_response(raw.http_response.content, key)


def test_streaming_answer_matches_and_carries_usage(gateway, tiny_engine):
    with gateway.client() as client:
        whole = client.chat.completions.create(
            model="tiny-model", messages=MESSAGES, seed=3, max_tokens=30
        )
        chunks = list(
            client.chat.completions.create(
                model="tiny-model",
                messages=MESSAGES,
                seed=3,
                max_tokens=30,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == token_counts(tiny_engine, text)
    assert (chunks[-1].model_extra or {}).get("signature")


def test_streamed_usage_is_counted_once_by_a_client_summing_usage(gateway, tiny_engine):
    """OpenAI semantics: with include_usage only the final chunk (no choices) carries usage."""
    with gateway.client() as client:
        chunks = list(
            client.chat.completions.create(
                model="tiny-model",
                messages=MESSAGES,
                seed=3,
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    with_usage = [chunk for chunk in chunks if chunk.usage is not None]
    assert with_usage == [chunks[-1]]
    assert chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (
        sum(c.usage.completion_tokens for c in with_usage if c.usage)
        == token_counts(tiny_engine, text)[1]
    )


def test_recorded_stream_verifies(gateway):
    body = {"model": "tiny-model", "messages": MESSAGES, "stream": True, "max_tokens": 10}
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=gateway.auth
    ) as response:
        raw = response.read()
    key = httpx.get(f"{gateway.url}/v1/public_key").json()
    assert verify_stream(raw, key).kind == "stream"


async def test_concurrent_requests_match_sequential_runs(gateway):
    seeds = [11, 12, 13, 14]
    async with gateway.async_client() as client:

        async def ask(seed: int) -> str:
            reply = await client.chat.completions.create(
                model="tiny-model", messages=MESSAGES, seed=seed, max_tokens=25
            )
            return reply.choices[0].message.content or ""

        sequential = [await ask(seed) for seed in seeds]
        concurrent = await asyncio.gather(*(ask(seed) for seed in seeds))
    assert list(concurrent) == sequential
    assert len(set(sequential)) == 4


def test_parameters_are_honoured(gateway):
    with gateway.client() as client:
        greedy = client.chat.completions.create(
            model="tiny-model", messages=MESSAGES, temperature=0, max_tokens=12
        )
        text = greedy.choices[0].message.content or ""
        assert greedy.choices[0].finish_reason == "length"
        assert greedy.usage is not None
        assert greedy.usage.completion_tokens == 12
        stop = text[5:7]
        stopped = client.chat.completions.create(
            model="tiny-model", messages=MESSAGES, temperature=0, max_tokens=12, stop=[stop]
        )
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_too_long_request_is_a_client_error(gateway, tiny_engine):
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "tiny-model", "messages": MESSAGES, "max_tokens": tiny_engine.max_model_len},
        headers=gateway.auth,
    )
    assert response.status_code in (400, 422)
    assert "max_tokens" in response.json()["error"]["message"]


def test_dropped_stream_stops_generation(worker, gateway, tiny_engine, monkeypatch):
    finished: list[str] = []
    original = tiny_engine.generate

    def recording(prompt, params, cancelled):
        for item in original(prompt, params, cancelled):
            if not isinstance(item, str):
                finished.append(item.finish_reason)
            yield item

    monkeypatch.setattr(tiny_engine, "generate", recording)
    body = {
        "model": "tiny-model",
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 1500,
        "temperature": 0,
    }
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=gateway.auth
    ) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    wait_until(lambda: finished == ["cancelled"], timeout_s=10)


def test_gateway_app_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from nilai.gateway.app import create_app\n"
        "from nilai.settings import NilaiSettings\n"
        f"create_app(NilaiSettings(data_dir={str(tmp_path)!r}))\n"
        "import nilai.cli\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
