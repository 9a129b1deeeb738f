"""The Responses API (``POST /v1/responses``) gets what chat gets: limits, accounting, metrics,
privacy, and the context features (private prompts, web search).

Each test mirrors a chat e2e test (named in its docstring) against the fake model server with
``responses_support`` on, so that a difference between the two APIs shows as a failure here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Generator, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import ResponseInputParam

from nilai.crypto.verify import verify_any
from nilai.store.base import Account, ApiKey
from nilai.store.tables import QueryLogRow
from tests.conftest import TEST_API_KEY, FakeHandle, GatewayHandle
from tests.e2e.test_accounting import Tenant
from tests.e2e.test_observability import Samples, scrape, value
from tests.e2e.test_private_prompts import (
    MARKER,
    PROMPT,
    new_builder,
    nildb_gateway,
    owner_token,
    store_with_nilai_py,
)
from tests.e2e.test_rate_limits import assert_rate_limited
from tests.e2e.test_web_search import expect_error, public_key, request_bytes, search_stack
from tests.fakes.nildb import FakeNildbCluster
from tests.fakes.web import PLAIN_TEXT
from tests.support.servers import wait_until
from tests.support.stores import create_tenant, dump_database, with_store
from tests.support.websearch import SearchWorld

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MODEL = "fake-model"
INPUT = "count the words of this prompt please"
INSTRUCTIONS = "Be brief."
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
RESPONSES_FAKE: dict[str, Any] = {"name": "alpha", "responses_support": True}
"""The ``stack`` fake: serves ``/v1/responses`` and announces it; answers ``alpha says: ...``."""
ALPHA_TEXT = "alpha says: w0 w1 w2 w3 w4 w5 w6 w7"
INPUT_WORDS = len(INPUT.split()) + len(INSTRUCTIONS.split())
"""The fake's ``input_tokens`` for ``INPUT`` with ``INSTRUCTIONS``: words of both."""
OUTPUT_PIECES = 9
"""The fake's ``output_tokens`` for its default 8 tokens: ``alpha says:`` and ``w0`` .. ``w7``."""

FakeStarter = Callable[..., FakeHandle]
GatewayStarter = Callable[..., GatewayHandle]


# --- helpers ------------------------------------------------------------------------------------


def responses_body(*, stream: bool = False, **extra: Any) -> dict[str, Any]:
    """A Responses request body as a raw HTTP client sends it."""
    return {
        "model": MODEL,
        "input": INPUT,
        "instructions": INSTRUCTIONS,
        "stream": stream,
        **extra,
    }


def post_responses(
    url: str,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST ``body`` to ``/v1/responses``; the whole response, read (streams included)."""
    return httpx.post(f"{url}/v1/responses", json=body, headers=headers or AUTH, timeout=30)


def respond(url: str, *, stream: bool = False) -> httpx.Response:
    """One valid Responses request with the settings key."""
    return post_responses(url, responses_body(stream=stream))


def chat(url: str, *, stream: bool = False) -> httpx.Response:
    """One chat request with the settings key, read to the end."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=10)


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``(event, data)`` of every frame of a Responses stream."""
    events: list[tuple[str, dict[str, Any]]] = []
    for frame in raw.decode().split("\n\n"):
        if not frame.strip():
            continue
        fields = dict(line.split(": ", 1) for line in frame.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def completed_event(raw: bytes) -> dict[str, Any]:
    """The last event of a Responses stream, which must be the signed ``response.completed``."""
    events = sse_events(raw)
    assert events, raw
    name, data = events[-1]
    assert name == "response.completed", events[-1]
    assert data["type"] == "response.completed"
    return data


@contextlib.contextmanager
def open_responses_stream(client: httpx.Client, url: str, path: str) -> Generator[Iterator[bytes]]:
    """A stream (``/v1/responses`` or chat) held open after its first bytes; yields the rest.

    The iterator must stay referenced: dropping a started ``iter_raw`` closes the connection.
    """
    if path == "/v1/responses":
        body = responses_body(stream=True)
        first = b"event: "
    else:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        first = b"data: "
    with client.stream("POST", f"{url}{path}", json=body, headers=AUTH) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = resp.iter_raw()
        assert next(events).startswith(first)
        yield events


def fake_responses_usages(fake: FakeHandle) -> list[dict[str, int]]:
    """The usages of the Responses answers the fake finished (not its chat answers)."""
    return [usage for usage in fake.state.stats.usages if "input_tokens" in usage]


# --- 1. limits (mirrors test_rate_limits.py) --------------------------------------------------


@pytest.mark.stack(fake=RESPONSES_FAKE, gateway={"rate_limit_minute": 3})
def test_the_minute_limit_counts_chat_and_responses_together(
    stack: tuple[FakeHandle, GatewayHandle],
):
    fake, gateway = stack
    for i, response in enumerate([chat(gateway.url), chat(gateway.url, stream=True)]):
        assert response.status_code == 200, response.text
        assert response.headers["X-RateLimit-Remaining"] == str(2 - i)
    third = respond(gateway.url)
    assert third.status_code == 200, third.text
    assert third.headers["X-RateLimit-Limit"] == "3"
    assert third.headers["X-RateLimit-Remaining"] == "0"
    assert third.json()["output"][0]["content"][0]["text"] == ALPHA_TEXT

    retry_after = assert_rate_limited(respond(gateway.url), "3 requests per minute")
    assert retry_after <= 60
    assert_rate_limited(respond(gateway.url, stream=True), "per minute")
    assert_rate_limited(chat(gateway.url), "per minute")  # and chat sees the same count
    with pytest.raises(openai.RateLimitError) as raised:
        gateway.client().responses.create(model=MODEL, input=INPUT)
    assert raised.value.status_code == 429
    assert "requests per minute" in raised.value.message
    assert fake.state.stats.responses_requests == 1  # the refused ones never reached it


@pytest.mark.stack(fake=RESPONSES_FAKE, gateway={"rate_limit_minute": 2})
def test_a_refused_responses_request_still_counts_against_the_limit(
    stack: tuple[FakeHandle, GatewayHandle],
):
    fake, gateway = stack
    refused = post_responses(gateway.url, responses_body(previous_response_id="resp_123"))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("not_supported", "previous_response_id")
    assert refused.headers.get("X-RateLimit-Remaining") in (None, "1")

    admitted = respond(gateway.url)
    assert admitted.status_code == 200, admitted.text
    assert admitted.headers["X-RateLimit-Remaining"] == "0"  # the refused one counted
    assert_rate_limited(respond(gateway.url), "2 requests per minute")
    # Once the limit is used up, the 429 wins over the refusal.
    again = post_responses(gateway.url, responses_body(previous_response_id="resp_123"))
    assert_rate_limited(again, "per minute")
    assert fake.state.stats.responses_requests == 1


@pytest.mark.parametrize("holder", ["/v1/responses", "/v1/chat/completions"])
def test_a_model_slot_held_by_one_api_refuses_a_responses_request(
    holder: str, start_fake: FakeStarter, start_gateway: GatewayStarter
):
    """As ``test_model_concurrency_refuses_the_third_until_a_stream_ends``, with one slot."""
    fake = start_fake(tokens=50, token_delay_s=0.05, responses_support=True)
    gateway = start_gateway(upstream_urls=[fake.url], model_concurrency=1)
    with httpx.Client(timeout=10) as client, contextlib.ExitStack() as streams:
        held = streams.enter_context(open_responses_stream(client, gateway.url, holder))

        refused = respond(gateway.url)
        assert_rate_limited(refused, "1 concurrent requests for this model")
        assert "x-should-retry" not in refused.headers  # a 1 s wait: SDKs may retry it
        assert_rate_limited(respond(gateway.url, stream=True), "concurrent requests")
        assert_rate_limited(chat(gateway.url), "concurrent requests")
        with pytest.raises(openai.RateLimitError):
            gateway.client().responses.create(model=MODEL, input=INPUT, stream=True)
        stats = fake.state.stats
        assert (stats.streams_started, stats.cancelled) == (1, 0)  # only the holder's

        rest = b"".join(held)  # the held stream runs to its end
        if holder == "/v1/responses":
            assert b"event: response.completed" in rest
        else:
            assert rest.rstrip().endswith(b"data: [DONE]")
        # The slot is returned as the response finishes; allow the server that moment.
        admitted = wait_until(
            lambda: (r := respond(gateway.url)).status_code == 200 and r, timeout_s=5
        )
        assert admitted.headers["content-type"].startswith("application/json")


# --- 2. usage (mirrors test_accounting.py) ----------------------------------------------------


def new_tenant(db_url: str, name: str) -> Tenant:
    """An account with one stored key in the database at ``db_url``."""
    made: tuple[Account, ApiKey, str] = with_store(db_url, lambda store: create_tenant(store, name))
    return Tenant(db_url, *made)


def grown(before: dict[str, int], prompt: int, completion: int) -> dict[str, int]:
    """``/v1/usage`` totals after one more request of these tokens."""
    return {
        "prompt_tokens": before["prompt_tokens"] + prompt,
        "completion_tokens": before["completion_tokens"] + completion,
        "total_tokens": before["total_tokens"] + prompt + completion,
        "queries": before["queries"] + 1,
    }


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_responses_usage_reaches_the_query_log_and_v1_usage(
    db_url: str, start_fake: FakeStarter, start_gateway: GatewayStarter
):
    tenant = new_tenant(db_url, "responses")
    fake = start_fake(**RESPONSES_FAKE)
    gateway = start_gateway(
        database_url=db_url, upstream_urls=[fake.url], usage_flush_interval_s=0.2
    )
    start = tenant.usage(gateway)
    assert start == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "queries": 0}

    with tenant.client(gateway) as client:
        whole = client.responses.create(model=MODEL, input=INPUT, instructions=INSTRUCTIONS)
        assert whole.output_text == ALPHA_TEXT
        assert whole.usage is not None
        assert (whole.usage.input_tokens, whole.usage.output_tokens) == (
            INPUT_WORDS,
            OUTPUT_PIECES,
        )
        after_one = grown(start, INPUT_WORDS, OUTPUT_PIECES)
        tenant.wait_for_usage(gateway, after_one)

        text = ""
        reported = None
        with client.responses.create(
            model=MODEL, input=INPUT, instructions=INSTRUCTIONS, stream=True
        ) as stream:
            for event in stream:
                if event.type == "response.output_text.delta":
                    text += event.delta
                elif event.type == "response.completed":
                    reported = event.response.usage
        assert text == ALPHA_TEXT
        assert reported is not None
        assert (reported.input_tokens, reported.output_tokens) == (INPUT_WORDS, OUTPUT_PIECES)
        tenant.wait_for_usage(gateway, grown(after_one, INPUT_WORDS, OUTPUT_PIECES))

    assert (
        fake_responses_usages(fake)
        == [
            {
                "input_tokens": INPUT_WORDS,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": OUTPUT_PIECES,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": INPUT_WORDS + OUTPUT_PIECES,
            }
        ]
        * 2
    )
    rows = sorted(tenant.wait_for_logs(2), key=lambda row: row.started_at)
    assert [row.streamed for row in rows] == [False, True]
    for row in rows:
        assert (row.prompt_tokens, row.completion_tokens) == (INPUT_WORDS, OUTPUT_PIECES)
        assert row.status_code == 200
        assert row.error_kind is None
        assert row.model == MODEL
        assert row.api_key_id == tenant.key.id
    assert rows[1].ttft_ms is not None


def drop_a_responses_stream(
    tenant: Tenant, start_fake: FakeStarter, start_gateway: GatewayStarter
) -> QueryLogRow:
    """Drop a long Responses stream after four deltas; its one query log row, checked as chat's.

    As ``test_a_dropped_stream_is_accounted_as_far_as_it_went`` for chat: 499, once, with the
    output tokens relayed so far, and ``/v1/usage`` agreeing with the row.
    """
    fake = start_fake(tokens=200, token_delay_s=0.02, responses_support=True)
    gateway = start_gateway(
        database_url=tenant.db_url, upstream_urls=[fake.url], usage_flush_interval_s=0.2
    )
    before = tenant.usage(gateway)
    with tenant.client(gateway) as client:
        stream = client.responses.create(model=MODEL, input=INPUT, stream=True)
        deltas = 0
        for event in stream:
            deltas += event.type == "response.output_text.delta"
            if deltas == 4:
                break
        stream.close()

    wait_until(lambda: fake.state.stats.cancelled >= 1, what="the model server's cancellation")
    (row,) = tenant.wait_for_logs(1)
    assert row.status_code == 499
    assert row.streamed is True
    assert row.error_kind == "ClientDisconnected"
    assert 4 <= row.completion_tokens <= 201  # one per delta relayed: as far as it went
    tenant.wait_for_usage(gateway, grown(before, row.prompt_tokens, row.completion_tokens))
    assert fake.state.stats.completed == 0
    assert [other.id for other in tenant.logs()] == [row.id]  # still one: accounted once
    return row


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_responses_stream_the_client_drops_is_accounted_once_as_499(
    db_url: str, start_fake: FakeStarter, start_gateway: GatewayStarter
):
    drop_a_responses_stream(new_tenant(db_url, "dropper"), start_fake, start_gateway)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_dropped_responses_stream_is_charged_its_input_at_the_estimate(
    db_url: str, start_fake: FakeStarter, start_gateway: GatewayStarter
):
    # A Responses stream reports usage only at its end: the input of one the client leaves
    # is charged at the gateway's estimate (four characters a token), not left unpaid.
    row = drop_a_responses_stream(new_tenant(db_url, "dropper"), start_fake, start_gateway)
    assert row.prompt_tokens == -(-len(INPUT) // 4)


# --- 3. metrics (mirrors test_observability.py) -----------------------------------------------


@pytest.mark.stack(fake={**RESPONSES_FAKE, "tokens": 4}, gateway={"rate_limit_minute": 4})
def test_metrics_count_responses_by_stream_and_status(stack: tuple[FakeHandle, GatewayHandle]):
    fake, gateway = stack
    client = gateway.client()
    for _ in range(2):
        client.responses.create(model=MODEL, input=INPUT, instructions=INSTRUCTIONS)
    with client.responses.create(model=MODEL, input=INPUT, stream=True) as stream:
        assert [event.type for event in stream][-1] == "response.completed"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input=INPUT)
    with pytest.raises(openai.RateLimitError):  # the 5th request of the minute
        client.responses.create(model=MODEL, input=INPUT)

    samples: Samples = scrape(gateway.url)
    duration = "nilai_responses_duration_seconds_count"
    assert value(samples, duration, model=MODEL, stream="plain", status="200") == 2
    assert value(samples, duration, model=MODEL, stream="stream", status="200") == 1
    assert value(samples, duration, model=MODEL, stream="plain", status="429") == 1
    assert value(samples, duration, model="other", stream="plain", status="404") == 1
    assert value(samples, "nilai_responses_time_to_first_token_seconds_count", model=MODEL) == 1
    # Not counted as chat.
    chat_duration = "nilai_chat_duration_seconds_count"
    assert value(samples, chat_duration, model=MODEL, stream="plain", status="200") == 0
    assert value(samples, chat_duration, model=MODEL, stream="stream", status="200") == 0

    usages = fake_responses_usages(fake)
    assert len(usages) == 3
    tokens = "nilai_tokens_total"
    assert value(samples, tokens, model=MODEL, kind="prompt") == sum(
        usage["input_tokens"] for usage in usages
    )
    assert value(samples, tokens, model=MODEL, kind="prompt") == 2 * INPUT_WORDS + len(
        INPUT.split()
    )
    assert value(samples, tokens, model=MODEL, kind="completion") == 3 * 5  # "alpha says:" w0-w3
    assert value(samples, "nilai_rate_limit_rejections_total", limit="minute") == 1
    upstream = "nilai_upstream_duration_seconds_count"
    assert value(samples, upstream, model=MODEL, stream="plain") == 2
    assert value(samples, upstream, model=MODEL, stream="stream") == 1
    http = "nilai_http_request_duration_seconds_count"
    assert value(samples, http, route="/v1/responses", method="POST", status="200") == 3
    assert value(samples, "nilai_chat_streams_in_flight") == 0


# --- 4. privacy (mirrors test_privacy.py) -----------------------------------------------------


def test_no_responses_content_in_logs_query_logs_or_metrics(
    db_url: str,
    start_fake: FakeStarter,
    start_gateway: GatewayStarter,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
):
    input_marker = f"PRIVATE-INPUT-{uuid.uuid4()}"
    instructions_marker = f"PRIVATE-INSTRUCTIONS-{uuid.uuid4()}"
    reply_marker = f"SECRETREPLY{uuid.uuid4().hex[:8]}"
    _, _, key_value = with_store(db_url, lambda store: create_tenant(store, "private"))
    secret_part = key_value.split("_", 2)[2]
    instructions = f"answer with {instructions_marker}"
    conversation: ResponseInputParam = [
        {"role": "user", "content": f"please repeat {input_marker} back"}
    ]

    caplog.set_level(logging.DEBUG)  # the root logger: every library, every thread
    fake = start_fake(name=reply_marker, responses_support=True)
    gateway = start_gateway(
        database_url=db_url, upstream_urls=[fake.url], usage_flush_interval_s=0.1
    )
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key_value, max_retries=0)
    with client:
        whole = client.responses.create(model=MODEL, input=input_marker, instructions=instructions)
        assert reply_marker in whole.output_text
        streamed = ""
        with client.responses.create(
            model=MODEL, input=conversation, instructions=instructions, stream=True
        ) as stream:
            for event in stream:
                if event.type == "response.output_text.delta":
                    streamed += event.delta
        assert reply_marker in streamed
        # Failures too: invalid, unsupported and unknown-model requests carrying the markers.
        with pytest.raises(openai.UnprocessableEntityError):
            client.responses.create(
                model=MODEL, input=input_marker, instructions=instructions, temperature=5
            )
        with pytest.raises(openai.BadRequestError):
            client.responses.create(
                model=MODEL,
                input=input_marker,
                instructions=instructions,
                previous_response_id=f"resp_{input_marker}",
            )
        with pytest.raises(openai.NotFoundError):
            client.responses.create(
                model="no-such-model", input=input_marker, instructions=instructions
            )
    sent = fake.state.stats.last_responses_body
    assert sent is not None
    assert instructions_marker in str(sent)  # the markers reached the model server
    assert fake.state.stats.responses_requests == 2

    wait_until(lambda: len(dump_database(db_url)["query_logs"]) >= 5, what="the query logs")
    dump = dump_database(db_url)
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    captured = capfd.readouterr()
    log_text = "\n".join(
        [caplog.text, *(r.getMessage() for r in caplog.records), captured.out, captured.err]
    )
    db_text = repr(dump)

    assert len(dump["query_logs"]) == 5
    assert any(r.getMessage().startswith("responses model=") for r in caplog.records)
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    assert "nilai_responses_duration_seconds" in metrics
    secrets = {
        "input": input_marker,
        "instructions": instructions_marker,
        "reply": reply_marker,
        "api key": key_value,
        "api key secret": secret_part,
    }
    for what, secret in secrets.items():
        assert secret not in log_text, f"the {what} appears in the logs"
        assert secret not in db_text, f"the {what} appears in the database"
        assert secret not in metrics, f"the {what} appears in /metrics"


# --- 5a. private prompts (mirrors test_private_prompts.py) -----------------------------------


def test_a_private_prompt_leads_the_instructions_and_stays_with_the_model_server(
    cluster: FakeNildbCluster, start_fake: FakeStarter, start_gateway: GatewayStarter
):
    fake = start_fake(tokens=3, responses_support=True)
    builder = new_builder(cluster)
    gateway = nildb_gateway(start_gateway, fake, builder, cluster)
    stored = store_with_nilai_py(cluster, builder, gateway.url)
    key = public_key(gateway)

    cases: list[tuple[dict[str, Any], str]] = [
        (responses_body(stream=False), f"{PROMPT}\n\n{INSTRUCTIONS}"),
        (responses_body(stream=True), f"{PROMPT}\n\n{INSTRUCTIONS}"),
        ({"model": MODEL, "input": INPUT}, PROMPT),  # no instructions of the client's own
    ]
    for body, expected in cases:
        headers = {"Authorization": f"Bearer {owner_token(gateway, stored)}"}
        response = post_responses(gateway.url, body, headers=headers)
        assert response.status_code == 200, response.text
        sent = fake.state.stats.last_responses_body
        assert sent is not None
        assert sent["instructions"] == expected
        assert sent["input"] == INPUT
        assert MARKER not in response.text
        # Signed, and bound to the request as the client sent it (without the prompt).
        verify_any(response.content, key, request=request_bytes(body))
    assert fake.state.stats.responses_requests == 3


# --- 5b. web search (mirrors test_web_search.py) ---------------------------------------------

QUESTION = "What happened at Marrowby and on the Wendle estuary?"


def responses_search_stack(
    web: SearchWorld, start_fake: FakeStarter, start_gateway: GatewayStarter
) -> tuple[FakeHandle, GatewayHandle]:
    """A web-searching gateway whose every search finds the stand-in ``/plain`` page."""
    web.answer(None, "/plain")
    return search_stack(start_fake, start_gateway, web, fake={"responses_support": True})


def test_web_search_sources_are_signed_into_the_response_object(
    web: SearchWorld, start_fake: FakeStarter, start_gateway: GatewayStarter
):
    fake, gateway = responses_search_stack(web, start_fake, start_gateway)
    raw = gateway.client().responses.with_raw_response.create(
        model=MODEL, input=QUESTION, instructions=INSTRUCTIONS, extra_body={"web_search": True}
    )
    assert raw.parse().output_text == "fake says: w0 w1 w2 w3 w4 w5 w6 w7"
    body = raw.http_response.content
    answer = json.loads(body)
    assert answer["sources"] == [{"source": web.page("/plain"), "content": PLAIN_TEXT}]
    assert isinstance(answer["signature"], str)
    verify_any(body, public_key(gateway), request=raw.http_response.request.content)

    sent = fake.state.stats.last_responses_body
    assert sent is not None
    assert "web_search" not in sent
    assert PLAIN_TEXT in sent["instructions"]
    assert sent["instructions"].endswith(f"\n\n{INSTRUCTIONS}")  # the client's own come last
    assert sent["input"] == QUESTION
    assert fake.state.stats.planner_requests == 1
    assert len(web.brave.queries) == 1


def test_a_web_search_with_no_question_in_its_input_is_422_naming_input(
    web: SearchWorld, start_fake: FakeStarter, start_gateway: GatewayStarter
):
    fake, gateway = responses_search_stack(web, start_fake, start_gateway)
    only_a_tool_result = [{"type": "function_call_output", "call_id": "c1", "output": "{}"}]
    body = {"model": MODEL, "input": only_a_tool_result, "web_search": True}
    response = post_responses(gateway.url, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "input"
    assert fake.state.stats.responses_requests == 0
    assert fake.state.stats.planner_requests == 0
    assert web.brave.queries == []


def test_a_streamed_web_search_carries_its_sources_on_the_signed_completed_event(
    web: SearchWorld, start_fake: FakeStarter, start_gateway: GatewayStarter
):
    fake, gateway = responses_search_stack(web, start_fake, start_gateway)
    body = {"model": MODEL, "input": QUESTION, "stream": True, "web_search": True}
    response = post_responses(gateway.url, body)
    assert response.status_code == 200, response.text
    events = sse_events(response.content)
    carrying = [n for n, (_, data) in enumerate(events) if "sources" in data.get("response", {})]
    assert carrying == [len(events) - 1], "sources must be on response.completed only"
    completed = completed_event(response.content)
    assert completed["response"]["sources"] == [
        {"source": web.page("/plain"), "content": PLAIN_TEXT}
    ]
    assert isinstance(completed["signature"], str)
    verify_any(response.content, public_key(gateway), request=request_bytes(body))
    sent = fake.state.stats.last_responses_body
    assert sent is not None
    assert "web_search" not in sent
    assert PLAIN_TEXT in sent["instructions"]


def test_web_search_without_a_search_key_is_503_before_any_model_call(
    start_fake: FakeStarter, start_gateway: GatewayStarter
):
    fake = start_fake(responses_support=True)
    gateway = start_gateway(upstream_urls=[fake.url])
    for stream in (False, True):
        response = post_responses(gateway.url, responses_body(stream=stream, web_search=True))
        error = expect_error(response, 503, "web_search_not_configured")
        assert "NILAI_WEB_SEARCH_API_KEY" in error["message"]
    assert (fake.state.stats.responses_requests, fake.state.stats.requests) == (0, 0)
    plain = respond(gateway.url)
    assert plain.status_code == 200, plain.text
