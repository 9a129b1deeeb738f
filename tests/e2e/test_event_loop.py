"""The gateway never blocks its event loop: traffic under asyncio debug mode.

asyncio's debug mode logs every callback (task step) that runs longer than
``slow_callback_duration``. One slow step in the gateway delays every other request and stream
on that process, so any such step after warm-up fails the test. The gateway runs in its own
process, so that the test's client threads and fake model server cannot stretch its steps by
holding its GIL.

The threshold is 50 ms of debug-mode time. Debug mode records a traceback for every scheduled
callback, which roughly doubles a step's cost; the longest real steps here (a whole 32-chunk
stream relayed in one step when the model server's bytes arrive at once) take up to ~10 ms
without debug mode (measured by timing every handle, docs/PERFORMANCE.md). A blocking call —
a synchronous HTTP or database call, a CPU-heavy job on the loop — takes far longer.

The second test adds private prompts (issue 17) to the mix: chats whose NUC names a prompt
document, stored by nilai-py in stand-in nilDB nodes, and ``GET /v1/delegation`` calls. The
prompt cache is off there, so every such chat reads all nodes and reveals the shares (the
costly path: a NUC signed per node, then blindfold's combine).

The third adds web searches (issue 18): chats with ``web_search: true`` against the loopback
Brave and pages stand-ins. Each plans with the model server, searches, fetches a real HTML
article and a 2 MiB page (the fetcher's cap on a 20 MB one), and extracts their text with
trafilatura in the fetcher's worker threads, so the loop shares its GIL with that work. The
gateway's default 2 MiB page cap is kept on purpose: extracting one such page on the loop takes
longer than the threshold (~75 ms in debug mode), so extraction moved onto the loop fails the
test (checked by patching it there once).

The fourth adds server-side tools (issue 20): chats and Responses requests, streamed and not,
that declare ``execute_python`` to fake models that call it, so that the gateway runs their code
in its local sandbox (bubblewrap where it works, else the rlimit sandbox) and asks again. The
codes are real work for the executor: a compute loop (~150-300 ms of CPU), a flood of output
stopped at the output cap, and a sleeper killed at the (small) tool timeout, beside
``print(6*7)``; plain chats run between them. Every answer must be signed and quote exactly what
the tool printed (and how its run ended). The executor waits on its processes with asyncio
subprocesses; a blocking wait on the loop — ``subprocess.run``, or even a 0.2 s sleep per run —
fails the test (checked by patching ``LocalExecutor.run`` that way once).

The fifth adds NilRAG (issue 21): chats naming three stand-in nilDB nodes (in the test's
process, not the gateway's) that hold shares of 1,000 documents, streamed and not, among plain
chats. Each such chat embeds the question with MiniLM, decodes three ~4.4 MB node answers,
reconstructs 1,000 distances and joins the closest chunks' shares: the gateway's worker pool's
work. The data owner seeds the nodes with the deterministic embedder (MiniLM over 1,000 texts
takes too long for a test), so the gateway's MiniLM ranking does not match the owner's: the test
checks that every answer is 200 and that the model received ``num_chunks`` corpus chunks in the
context message, not which ones. Reconstruction on the loop (the pool's calls made directly)
fails the test (checked by patching ``NilRag._run`` that way once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from secp256k1 import PrivateKey  # pyright: ignore[reportMissingTypeStubs]

from nilai.context.rag.embed import HashEmbedder
from nilai.context.rag.retriever import context_message
from nilai.crypto.verify import verify_any
from tests.conftest import TEST_API_KEY, FakeHandle
from tests.e2e.test_observability import scrape, value
from tests.e2e.test_private_prompts import (
    PROMPT,
    new_builder,
    node_requests,
    owner_token,
    store_with_nilai_py,
)
from tests.fakes.nildb import start_cluster
from tests.fakes.web import ARTICLE_TEXT, HUGE_CHUNK
from tests.support.nilrag import DataOwner, StandInNode, running_nodes
from tests.support.nuc import did_of
from tests.support.servers import free_port, stop_process, wait_until
from tests.support.websearch import SearchWorld

pytestmark = pytest.mark.e2e

SLOW_CALLBACK_S = 0.05
ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "hello there"}]
HEADERS = {"Authorization": f"Bearer {TEST_API_KEY}"}
SEARCH_QUERY = "marrowby lighthouse storm"
SEARCH_PLAN = json.dumps({"topics": [{"topic": "the storm", "query": SEARCH_QUERY}]})
HUGE_TEXT = HUGE_CHUNK.decode()[3:40]
"""The start of the 20 MB page's paragraphs: in its source only when its text was extracted."""


def settings_env(settings: dict[str, Any]) -> dict[str, str]:
    """``NilaiSettings`` fields as the ``NILAI_*`` environment a gateway process reads."""
    return {
        f"NILAI_{name.upper()}": ",".join(cast("list[str]", value))
        if isinstance(value, list)
        else str(value)
        for name, value in settings.items()
    }


@dataclass(frozen=True)
class DebugGateway:
    """The gateway subprocess on a debug-mode loop, and the log its slow steps go to."""

    url: str
    log: Path

    def slow_steps(self) -> list[str]:
        """The "Executing <Task ...> took N seconds" lines asyncio has logged so far."""
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines() if "Executing" in line]


@contextmanager
def debug_gateway(tmp_path: Path, upstream_url: str, **env: str) -> Generator[DebugGateway]:
    """Run tests/support/debug_loop_gateway.py in its own process until ready; stop it after.

    ``env`` adds ``NILAI_*`` settings to the API key, model server and rate limit given here.
    """
    port = free_port()
    gateway = DebugGateway(f"http://127.0.0.1:{port}", tmp_path / "gateway.log")
    settings = {
        "PYTHONPATH": str(ROOT),
        "NILAI_DATA_DIR": str(tmp_path),
        "NILAI_API_KEY": TEST_API_KEY,
        "NILAI_UPSTREAM_URLS": upstream_url,
        "NILAI_RATE_LIMIT_MINUTE": "100000",
        **env,
    }
    command = [sys.executable, "-m", "tests.support.debug_loop_gateway", str(port)]
    with gateway.log.open("wb") as out:
        process = subprocess.Popen(
            [*command, str(SLOW_CALLBACK_S)],
            env={**os.environ, **settings},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(timeout=10) as client:

            def ready() -> bool:
                assert process.poll() is None, gateway.log.read_text()
                try:
                    models = client.get(f"{gateway.url}/v1/models", headers=HEADERS)
                except httpx.TransportError:
                    return False
                return models.status_code == 200

            wait_until(ready, timeout_s=30, interval_s=0.1)
        yield gateway
    finally:
        stop_process(process)


def chat(
    client: httpx.Client,
    url: str,
    *,
    stream: bool,
    headers: dict[str, str] = HEADERS,
) -> int:
    """POST a chat (read to the end when streamed); its status."""
    body = {"model": "fake-model", "messages": MESSAGES, "stream": stream}
    if not stream:
        return client.post(f"{url}/v1/chat/completions", json=body, headers=headers).status_code
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        for _ in r.iter_bytes():
            pass
        return r.status_code


def test_no_slow_callbacks_under_traffic(start_fake: Callable[..., FakeHandle], tmp_path: Path):
    fake = start_fake(tokens=32)
    with debug_gateway(tmp_path, fake.url) as gateway, httpx.Client(timeout=10) as client:
        url = gateway.url
        for stream in (False, True, False, True):  # warm-up: first-use imports and caches
            assert chat(client, url, stream=stream) == 200
        warm = len(gateway.slow_steps())
        jobs = [stream for _ in range(15) for stream in (False, True)]

        def send(stream: bool) -> int:
            return chat(client, url, stream=stream)

        with ThreadPoolExecutor(max_workers=4) as pool:
            statuses = list(pool.map(send, jobs))
        assert client.get(f"{url}/metrics").status_code == 200
        assert client.get(f"{url}/readyz").status_code == 200
    assert statuses == [200] * len(jobs)
    assert gateway.slow_steps()[warm:] == []


def test_no_slow_callbacks_with_prompt_documents_in_the_traffic(
    start_fake: Callable[..., FakeHandle], tmp_path: Path
):
    fake = start_fake(tokens=32)
    cluster = start_cluster(3)
    try:
        builder = new_builder(cluster)
        # The settings test_private_prompts.py gives NilaiSettings, as the subprocess's env.
        nildb_env = settings_env(builder.settings(cluster))
        with (
            debug_gateway(
                tmp_path,
                fake.url,
                NILAI_AUTH_STRATEGIES="api_key,nuc",
                # Off: every document chat reads all nodes and reveals, the costly path.
                NILAI_NILDB_PROMPT_CACHE_S="0",
                **nildb_env,
            ) as gateway,
            httpx.Client(timeout=10) as client,
        ):
            # nilai-py stores the prompt through this gateway's own /v1/delegation.
            stored = store_with_nilai_py(cluster, builder, gateway.url)
            user_did = str(did_of(PrivateKey()))

            def delegation() -> int:
                params = {"prompt_delegation_request": user_did}
                answer = client.get(f"{gateway.url}/v1/delegation", params=params, headers=HEADERS)
                return answer.status_code

            def document_chat(stream: bool) -> int:
                token = owner_token(gateway, stored)
                headers = {"Authorization": f"Bearer {token}"}
                return chat(client, gateway.url, stream=stream, headers=headers)

            def send(job: tuple[str, bool]) -> int:
                kind, stream = job
                if kind == "delegation":
                    return delegation()
                if kind == "document":
                    return document_chat(stream)
                return chat(client, gateway.url, stream=stream)

            # Warm-up: first-use imports (blindfold, the NUC validation) and the nodes' DIDs.
            for stream in (False, True):
                assert chat(client, gateway.url, stream=stream) == 200
                assert document_chat(stream) == 200
            assert delegation() == 200
            sent: Any = fake.state.stats.last_body
            assert sent["messages"][0] == {"role": "system", "content": PROMPT}
            warm = len(gateway.slow_steps())

            kinds = [("api_key", False), ("api_key", True), ("document", False)]
            kinds += [("document", True), ("delegation", False)]
            jobs = [job for _ in range(8) for job in kinds]
            before = node_requests(cluster)
            with ThreadPoolExecutor(max_workers=4) as pool:
                statuses = list(pool.map(send, jobs))
            after = node_requests(cluster)
            assert client.get(f"{gateway.url}/metrics").status_code == 200
    finally:
        cluster.stop()
    assert statuses == [200] * len(jobs), list(zip(jobs, statuses, strict=True))
    # No prompt cache: every document chat read the document from every node.
    documents = sum(kind == "document" for kind, _ in jobs)
    assert [a - b for a, b in zip(after, before, strict=True)] >= [documents] * len(before)
    assert gateway.slow_steps()[warm:] == []


def search_chat(client: httpx.Client, url: str, *, stream: bool) -> tuple[int, list[str]]:
    """POST a ``web_search: true`` chat; its status and the contents of its signed sources.

    A stream's sources are on its last (signed) chunk.
    """
    body = {"model": "fake-model", "messages": MESSAGES, "stream": stream, "web_search": True}
    target = f"{url}/v1/chat/completions"
    if not stream:
        answer = client.post(target, json=body, headers=HEADERS)
        if answer.status_code != 200:
            return answer.status_code, []
        signed: dict[str, Any] = answer.json()
    else:
        with client.stream("POST", target, json=body, headers=HEADERS) as r:
            if r.status_code != 200:
                return r.status_code, []
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
        assert events[-1] == "[DONE]", events[-1:]
        signed = json.loads(events[-2])
    return 200, [source["content"] for source in signed.get("sources", [])]


def test_no_slow_callbacks_with_web_searches_in_the_traffic(
    start_fake: Callable[..., FakeHandle], web: SearchWorld, tmp_path: Path
):
    fake = start_fake(tokens=32, planner_reply=SEARCH_PLAN)
    web.answer(SEARCH_QUERY, "/article", "/huge")
    search_env = settings_env(
        web.gateway_settings(
            # Limits high, not off, so that admission runs for every search as in production.
            web_search_rps=100_000,
            web_search_rate_limit_minute=100_000,
            web_search_rate_limit_hour=100_000,
            web_search_rate_limit_day=100_000,
        )
    )
    with (
        debug_gateway(tmp_path, fake.url, **search_env) as gateway,
        httpx.Client(timeout=30) as client,
    ):
        url = gateway.url

        def send(job: tuple[str, bool]) -> tuple[int, list[str]]:
            kind, stream = job
            if kind == "search":
                # The stand-in's 20 MB page is 20 MB over the server's life, not per request
                # (each fetch takes ~3 MB of it before the gateway hangs up at its 2 MiB cap):
                # refill it, so that every search gets a full page to extract.
                web.web.huge_bytes_sent = 0
                return search_chat(client, url, stream=stream)
            return chat(client, url, stream=stream), []

        # Warm-up: first-use imports (trafilatura, in an extraction thread) and connections.
        for stream in (False, True):
            assert send(("api_key", stream)) == (200, [])
            status, sources = send(("search", stream))
            assert status == 200
            assert len(sources) == 2, sources
        warm = len(gateway.slow_steps())
        planned = fake.state.stats.planner_requests

        kinds = [("api_key", False), ("search", False), ("api_key", True), ("search", True)]
        jobs = [job for _ in range(4) for job in kinds]
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(send, jobs))
        assert client.get(f"{url}/metrics").status_code == 200
        assert client.get(f"{url}/readyz").status_code == 200
    statuses = [status for status, _ in results]
    assert statuses == [200] * len(jobs), list(zip(jobs, statuses, strict=True))
    # Every search really ran: planned, searched, both pages fetched and their text extracted
    # (a page that failed would be left as its search snippet).
    searches = [
        sources for (kind, _), (_, sources) in zip(jobs, results, strict=True) if kind == "search"
    ]
    assert len(searches) == 8
    for sources in searches:
        assert len(sources) == 2, sources
        assert ARTICLE_TEXT in sources[0]
        assert HUGE_TEXT in sources[1]
    assert fake.state.stats.planner_requests - planned == len(searches)
    assert web.web.paths().count("/huge") == len(searches) + 2
    assert gateway.slow_steps()[warm:] == []


# --- server-side tools (issue 20) ---------------------------------------------------------------

TOOL_TIMEOUT_S = 2.0
"""Long enough for the compute job on a busy machine, short enough to wait for the sleeper."""
TOOL_OUTPUT_CAP = 64 * 1024
COMPUTE_N = 2_000_000
COMPUTE_CODE = f"print(sum(i * i for i in range({COMPUTE_N})))"
"""~150-300 ms of CPU in the sandbox (``python -I -S``)."""
FLOOD_CODE = "for i in range(1_000_000):\n    print(i)"
"""~6.9 MB of lines: far past the output cap, so the run is stopped there."""
SLEEP_CODE = 'import time\nprint("started", flush=True)\ntime.sleep(60)'
"""Killed at ``TOOL_TIMEOUT_S`` after printing one line."""
FLOOD_KEPT = "".join(f"{i}\n" for i in range(20_000))[:TOOL_OUTPUT_CAP]
TOOL_MODELS = {
    # model: (its code, the answer quoting the tool's result, as the fake writes it)
    "fake-model": ("print(6*7)", "fake says: the tool said 42"),
    "tool-compute": (
        COMPUTE_CODE,
        f"fake says: the tool said {(COMPUTE_N - 1) * COMPUTE_N * (2 * COMPUTE_N - 1) // 6}",
    ),
    "tool-flood": (
        FLOOD_CODE,
        "fake says: the tool said "
        + FLOOD_KEPT
        + "\n[output truncated]\n[killed: resource limit reached]",
    ),
    "tool-sleep": (
        SLEEP_CODE,
        "fake says: the tool said started\n\n[killed: time limit reached]",
    ),
}
EXECUTE_PYTHON = {
    "type": "function",
    "name": "execute_python",
    "description": "Run Python code and return what it prints.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}},
}
"""The tool as a Responses request declares it; a chat nests the same under ``function``."""
CHAT_EXECUTE_PYTHON = {
    "type": "function",
    "function": {k: v for k, v in EXECUTE_PYTHON.items() if k != "type"},
}


def tool_request(
    client: httpx.Client, url: str, key: str, *, api: str, model: str, stream: bool
) -> tuple[int, str]:
    """POST a chat or Responses request declaring ``execute_python``; its status and text.

    The answer (streamed or not) is checked against the gateway's signature (``key``, its public
    key) and the request's hash before its text is read.
    """
    if api == "chat":
        target = f"{url}/v1/chat/completions"
        body: dict[str, Any] = {"model": model, "messages": MESSAGES}
        body["tools"] = [CHAT_EXECUTE_PYTHON]
    else:
        target = f"{url}/v1/responses"
        body = {"model": model, "input": "hello there", "tools": [EXECUTE_PYTHON]}
    body["stream"] = stream
    with client.stream("POST", target, json=body, headers=HEADERS) as answer:
        raw = answer.read()
        request = answer.request.content
    if answer.status_code != 200:
        return answer.status_code, raw.decode(errors="replace")
    verify_any(raw, key, request=request)
    if not stream:
        signed: dict[str, Any] = json.loads(raw)
        if api == "chat":
            return 200, signed["choices"][0]["message"]["content"]
        parts = [part for item in signed["output"] for part in item.get("content", [])]
        return 200, "".join(part["text"] for part in parts if part["type"] == "output_text")
    events = [
        json.loads(line[6:])
        for line in raw.decode().splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    if api == "chat":
        deltas = [choice["delta"] for event in events for choice in event.get("choices", [])]
        return 200, "".join(delta.get("content") or "" for delta in deltas)
    texts = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    return 200, "".join(texts)


def test_no_slow_callbacks_with_server_tools_in_the_traffic(
    start_fake: Callable[..., FakeHandle], tmp_path: Path
):
    # A fake calls the tool with the same code in every answer: one fake (and model) per code.
    fakes = [
        start_fake(
            models=[model],
            tokens=32,
            tool_code=code,
            tool_support=True,
            responses_support=True,
        )
        for model, (code, _) in TOOL_MODELS.items()
    ]
    with (
        debug_gateway(
            tmp_path,
            ",".join(fake.url for fake in fakes),
            NILAI_SERVER_TOOLS="execute_python",
            NILAI_TOOL_TIMEOUT_S=str(TOOL_TIMEOUT_S),
            NILAI_TOOL_MAX_OUTPUT_BYTES=str(TOOL_OUTPUT_CAP),
        ) as gateway,
        httpx.Client(timeout=30) as client,
    ):
        url = gateway.url

        def ready_models() -> bool:
            listed = client.get(f"{url}/v1/models", headers=HEADERS).json()["data"]
            return {model["id"] for model in listed} == set(TOOL_MODELS)

        wait_until(ready_models, timeout_s=10, interval_s=0.1)
        key: str = client.get(f"{url}/v1/public_key").json()

        def send(job: tuple[str, str, bool]) -> tuple[int, str]:
            api, model, stream = job
            if api == "plain":
                return chat(client, url, stream=stream), ""
            return tool_request(client, url, key, api=api, model=model, stream=stream)

        # Warm-up: first-use imports (the tool loop, the Responses path) and every code's path
        # through the executor once (clean exit, output cap, timeout).
        warm_jobs = [("plain", "fake-model", False), ("plain", "fake-model", True)]
        warm_jobs += [
            (api, "fake-model", s) for api in ("chat", "responses") for s in (False, True)
        ]
        warm_jobs += [("chat", model, False) for model in TOOL_MODELS if model != "fake-model"]
        for job in warm_jobs:
            status, text = send(job)
            assert status == 200, (job, text)
            if job[0] != "plain":
                assert text == TOOL_MODELS[job[1]][1], job
        warm = len(gateway.slow_steps())
        before = scrape(url)

        tool_jobs = [
            (api, model, stream)
            for model in TOOL_MODELS
            for api in ("chat", "responses")
            for stream in (False, True)
        ]
        # Each tool request followed by a plain chat, so that chats run beside every kind of run.
        plain_jobs = [("plain", "fake-model", stream) for stream in (False, True)] * 8
        jobs = [
            job
            for _ in range(2)
            for pair in zip(tool_jobs, plain_jobs, strict=True)
            for job in pair
        ]
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(send, jobs))
        after = scrape(url)
        assert client.get(f"{url}/readyz").status_code == 200
    for job, (status, text) in zip(jobs, results, strict=True):
        assert status == 200, (job, text)
        api, model, _ = job
        if api != "plain":
            assert text == TOOL_MODELS[model][1], job
    # Every tool request ran its code once in the sandbox.
    for model in TOOL_MODELS:
        ran = value(after, "nilai_tool_calls_total", model=model)
        ran -= value(before, "nilai_tool_calls_total", model=model)
        assert ran == sum(job[0] != "plain" and job[1] == model for job in jobs), model
    assert gateway.slow_steps()[warm:] == []


# --- NilRAG (issue 21) --------------------------------------------------------------------------

NILRAG_DOCUMENTS = 1000
NILRAG_CHUNKS = 3
NILRAG_ENV = {"NILAI_NILRAG_ENABLED": "true", "NILAI_NILRAG_ALLOW_NETWORKS": "127.0.0.1/32"}
"""NilRAG on, with plain http to the loopback stand-ins allowed (refused otherwise)."""


def nilrag_corpus(count: int) -> list[str]:
    """``count`` distinct one-line texts (no blank lines: the context message separates chunks
    with them)."""
    return [
        f"Note {i}: the harbour log for day {i} records tide {i % 7}, wind {i % 11} and "
        f"{i % 5} ships."
        for i in range(count)
    ]


def context_chunks(content: str, corpus: set[str]) -> list[str]:
    """The chunks of a NilRAG context message, checked to be corpus texts and numbered in order.

    Fails the test when ``content`` is not ``context_message`` of corpus texts.
    """
    head = context_message([])
    assert content.startswith(head), content[:200]
    chunks: list[str] = []
    for index, numbered in enumerate(content[len(head) :].split("\n\n"), start=1):
        prefix = f"[{index}] "
        assert numbered.startswith(prefix), numbered[:80]
        chunks.append(numbered.removeprefix(prefix))
    assert set(chunks) <= corpus, chunks
    assert content == context_message(chunks)
    return chunks


def nilrag_chat(
    client: httpx.Client, url: str, nodes: list[StandInNode], question: str, *, stream: bool
) -> int:
    """POST a chat asking ``question`` over the stand-in nodes (read to the end); its status."""
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": question}],
        "stream": stream,
        "nilrag": {"nodes": [node.node() for node in nodes], "num_chunks": NILRAG_CHUNKS},
    }
    target = f"{url}/v1/chat/completions"
    if not stream:
        return client.post(target, json=body, headers=HEADERS).status_code
    with client.stream("POST", target, json=body, headers=HEADERS) as r:
        for _ in r.iter_bytes():
            pass
        return r.status_code


def test_no_slow_callbacks_with_nilrag_in_the_traffic(
    start_fake: Callable[..., FakeHandle], tmp_path: Path
):
    fake = start_fake(tokens=32)
    corpus = nilrag_corpus(NILRAG_DOCUMENTS)
    with (
        running_nodes(3) as nodes,
        debug_gateway(tmp_path, fake.url, **NILRAG_ENV) as gateway,
        httpx.Client(timeout=60) as client,
    ):
        DataOwner(HashEmbedder(), len(nodes)).seed([node.state for node in nodes], corpus)
        url = gateway.url

        def send(job: tuple[str, bool, str]) -> tuple[str, int]:
            """The job's question ("" for a plain chat) and its status."""
            kind, stream, question = job
            if kind == "plain":
                return "", chat(client, url, stream=stream)
            return question, nilrag_chat(client, url, nodes, question, stream=stream)

        def jobs_of(kinds: list[tuple[str, bool]], first: int) -> list[tuple[str, bool, str]]:
            """The jobs, each NilRAG one with its own question (to find its model call by)."""
            return [
                (kind, stream, f"Which ships came in on day {first + n}? (question {first + n})")
                for n, (kind, stream) in enumerate(kinds)
            ]

        # Warm-up: first-use imports and the worker pool's threads, and one model call.
        warm_jobs = jobs_of(
            [("plain", False), ("plain", True), ("nilrag", False), ("nilrag", True)], 0
        )
        warm_results = [send(job) for job in warm_jobs]
        assert [status for _, status in warm_results] == [200] * len(warm_jobs)
        warm = len(gateway.slow_steps())
        before = [len(node.state.requests) for node in nodes]

        kinds = [("nilrag", False), ("plain", False), ("nilrag", True), ("plain", True)]
        jobs = jobs_of(kinds * 4, len(warm_jobs))
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(send, jobs))
        routes = [node.state.routes()[count:] for node, count in zip(nodes, before, strict=True)]
        assert client.get(f"{url}/readyz").status_code == 200
    statuses = [status for _, status in results]
    assert statuses == [200] * len(jobs), list(zip(jobs, statuses, strict=True))
    # Every NilRAG chat reached the model with NILRAG_CHUNKS corpus chunks in a system message
    # before its question, and with nothing else; plain chats with none.
    sent: dict[str, list[dict[str, Any]]] = {}
    plain: list[list[dict[str, Any]]] = []
    for body in fake.state.stats.bodies:
        asked = body["messages"][-1]["content"]
        if asked == MESSAGES[0]["content"]:
            plain.append(body["messages"])
        else:
            sent[asked] = body["messages"]
    questions = {question for question, _ in results if question}
    assert len(questions) == sum(kind == "nilrag" for kind, _, _ in jobs)
    corpus_set = set(corpus)
    for question in questions:
        messages = sent[question]
        assert len(messages) == 2, messages[:-1]
        assert messages[0]["role"] == "system"
        assert len(context_chunks(messages[0]["content"], corpus_set)) == NILRAG_CHUNKS
    assert plain == [MESSAGES] * sum(kind == "plain" for kind, _, _ in [*warm_jobs, *jobs])
    # Each NilRAG chat asked every node once for its distances and once for its chunks.
    for node_routes in routes:
        assert sorted(node_routes) == ["execute"] * len(questions) + ["read"] * len(questions)
    assert gateway.slow_steps()[warm:] == []
