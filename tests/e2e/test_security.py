"""Hardening against hostile clients, end to end: CORS, body limits, headers, time limits, logs.

Every test starts the real gateway on loopback in front of the fake model server and talks to it
over HTTP, as a browser or a script would.
"""

from __future__ import annotations

import json
import logging
import stat
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import TEST_API_KEY
from tests.support.servers import wait_until

pytestmark = pytest.mark.e2e

DEFAULT_ORIGINS = ("http://localhost:3000", "http://localhost:8080")
MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "fake-model", "messages": MESSAGES}
ELEVEN_MB = 11 * 1024 * 1024
SMALL_LIMIT = 64 * 1024
# Time limits of 0.3 s against a model server that waits 1 s: had the limit not fired first,
# the model's answer would have come through instead of the limit's error.
LIMIT_S = 0.3
SLOW_S = 1.0


# --- helpers -------------------------------------------------------------------------------


def chat_url(gateway) -> str:
    return f"{gateway.url}/v1/chat/completions"


def csp_directives(policy: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in policy.split(";"):
        words = part.split()
        if words:
            directives[words[0].lower()] = words[1:]
    return directives


def assert_security_headers(response: httpx.Response, *, docs: bool = False) -> None:
    headers = response.headers
    where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    assert headers.get("x-content-type-options") == "nosniff", where
    assert headers.get("x-frame-options") == "DENY", where
    assert headers.get("referrer-policy") == "no-referrer", where
    assert "content-security-policy" in headers, where
    csp = csp_directives(headers["content-security-policy"])
    assert csp.get("default-src") == ["'none'"], where
    assert csp.get("frame-ancestors") == ["'none'"], where
    if not docs:  # the API serves JSON and SSE: nothing may be loaded or run
        assert set(csp) <= {"default-src", "frame-ancestors", "base-uri", "sandbox"}, where


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


def body_of_size(size: int) -> bytes:
    """A valid chat request of exactly ``size`` bytes (the user message is padding)."""
    empty = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": ""}]})
    padding = size - len(empty)
    assert padding >= 0
    content = "x" * padding
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": content}]})
    raw = body.encode()
    assert len(raw) == size
    return raw


def chunks(raw: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """A generator body: httpx sends it chunked, without Content-Length."""
    for start in range(0, len(raw), size):
        yield raw[start : start + size]


def post_raw(gateway, raw: bytes, *, chunked: bool, **headers: str) -> httpx.Response:
    all_headers = {**gateway.auth, "Content-Type": "application/json", **headers}
    content = chunks(raw) if chunked else raw
    response = httpx.post(chat_url(gateway), content=content, headers=all_headers, timeout=30)
    sent = response.request.headers
    if chunked:
        assert sent.get("transfer-encoding") == "chunked"
        assert "content-length" not in sent
    else:
        assert sent["content-length"] == str(len(raw))
    return response


def assert_responsive(gateway) -> None:
    """Liveness and a normal chat both answer (within the client's timeout)."""
    health = httpx.get(f"{gateway.url}/healthz", timeout=5)
    assert health.status_code == 200
    chat = httpx.post(chat_url(gateway), json=CHAT, headers=gateway.auth, timeout=5)
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]


def sse_events(response: httpx.Response) -> list[bytes]:
    return [event for event in response.read().split(b"\n\n") if event]


def stream_chat(gateway) -> tuple[httpx.Response, list[bytes]]:
    with httpx.stream(
        "POST", chat_url(gateway), json={**CHAT, "stream": True}, headers=gateway.auth, timeout=10
    ) as response:
        events = sse_events(response)
    return response, events


# --- files ---------------------------------------------------------------------------------


def test_data_directory_is_0700_and_the_sqlite_database_0600(start_gateway, tmp_path):
    data_dir = tmp_path / "fresh" / "nilai"
    gateway = start_gateway(data_dir=data_dir, database_url=None)
    assert httpx.get(f"{gateway.url}/v1/models", headers=gateway.auth).status_code == 200
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "nilai.db").stat().st_mode) == 0o600


# --- CORS ----------------------------------------------------------------------------------


def preflight(gateway, origin: str, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.options(
        gateway.url + path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


@pytest.mark.parametrize("origin", DEFAULT_ORIGINS)
def test_preflight_from_an_allowed_origin(start_gateway, origin):
    gateway = start_gateway()
    response = preflight(gateway, origin)
    assert response.status_code == 200
    headers = response.headers
    assert headers["access-control-allow-origin"] == origin
    assert headers["access-control-allow-credentials"] == "true"
    assert "POST" in headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "origin" in headers["vary"].lower()
    assert_security_headers(response)


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "http://localhost:3001",  # another port
        "https://localhost:3000",  # another scheme
        "http://localhost:3000.evil.example",  # a prefix match is not a match
        "null",  # sandboxed frames and file:// pages
    ],
)
def test_preflight_from_a_disallowed_origin_is_refused(start_gateway, origin):
    gateway = start_gateway()
    response = preflight(gateway, origin)
    assert response.status_code == 400  # Starlette's refusal of the preflight
    assert "access-control-allow-origin" not in response.headers
    assert_security_headers(response)


def test_refused_preflight_is_an_openai_error(start_gateway):
    gateway = start_gateway()
    response = preflight(gateway, "https://evil.example")
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": {
            "message": "Disallowed CORS origin.",
            "type": "invalid_request_error",
            "param": None,
            "code": "cors_disallowed",
        }
    }


@pytest.mark.parametrize("origin", DEFAULT_ORIGINS)
def test_simple_requests_from_an_allowed_origin(stack, origin):
    _, gateway = stack
    health = httpx.get(f"{gateway.url}/healthz", headers={"Origin": origin})
    models = httpx.get(f"{gateway.url}/v1/models", headers={"Origin": origin, **gateway.auth})
    chat = httpx.post(chat_url(gateway), json=CHAT, headers={"Origin": origin, **gateway.auth})
    for response in (health, models, chat):
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == origin
        assert response.headers["access-control-allow-credentials"] == "true"
        assert "origin" in response.headers["vary"].lower()
        exposed = response.headers["access-control-expose-headers"].lower()
        assert "x-request-id" in exposed


def test_simple_requests_from_a_disallowed_origin_get_no_cors_headers(stack):
    _, gateway = stack
    origin = "https://evil.example"
    health = httpx.get(f"{gateway.url}/healthz", headers={"Origin": origin})
    models = httpx.get(f"{gateway.url}/v1/models", headers={"Origin": origin, **gateway.auth})
    for response in (health, models):
        assert response.status_code == 200  # served, but the browser will not hand it over
        # Without Access-Control-Allow-Origin nothing else in CORS lets the page read it.
        assert "access-control-allow-origin" not in response.headers


def test_allowlist_defaults_to_the_local_frontends(start_gateway, monkeypatch):
    monkeypatch.delenv("NILAI_CORS_ORIGINS", raising=False)
    gateway = start_gateway()
    assert tuple(gateway.settings.cors_origins) == DEFAULT_ORIGINS
    assert "*" not in gateway.settings.cors_origins


def test_allowlist_comes_from_nilai_cors_origins(start_gateway, monkeypatch):
    monkeypatch.setenv("NILAI_CORS_ORIGINS", "https://app.example, https://admin.example")
    gateway = start_gateway()
    assert gateway.settings.cors_origins == ["https://app.example", "https://admin.example"]
    for origin in ("https://app.example", "https://admin.example"):
        response = preflight(gateway, origin)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == origin
    # The defaults are replaced, not extended.
    assert preflight(gateway, DEFAULT_ORIGINS[0]).status_code == 400


@pytest.mark.parametrize("origins", [["*"], ["https://app.example", "*"]])
def test_wildcard_origin_never_allows_credentials(start_gateway, origins):
    gateway = start_gateway(cors_origins=origins)
    origin = "https://anywhere.example"
    response = preflight(gateway, origin)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers

    for headers in ({}, gateway.auth, {"Cookie": "session=abc"}):
        simple = httpx.get(f"{gateway.url}/healthz", headers={"Origin": origin, **headers})
        assert simple.status_code == 200
        assert "access-control-allow-origin" in simple.headers
        assert "access-control-allow-credentials" not in simple.headers


def test_wildcard_must_be_set_explicitly_in_the_environment(start_gateway, monkeypatch):
    monkeypatch.setenv("NILAI_CORS_ORIGINS", "*")
    gateway = start_gateway()
    response = httpx.get(f"{gateway.url}/healthz", headers={"Origin": "https://x.example"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers


# --- body size limit -----------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_eleven_megabyte_body_is_413_and_the_gateway_stays_responsive(stack, chunked):
    _, gateway = stack
    assert gateway.settings.max_body_bytes == 10 * 1024 * 1024  # the default
    raw = body_of_size(ELEVEN_MB)
    response = post_raw(gateway, raw, chunked=chunked)
    error = assert_openai_error(response, 413)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "payload_too_large"
    assert str(10 * 1024 * 1024) in str(error["message"])
    assert_security_headers(response)
    assert_responsive(gateway)


def test_repeated_oversized_bodies_do_not_wear_the_gateway_down(stack):
    _, gateway = stack
    raw = body_of_size(ELEVEN_MB)
    for chunked in (False, True, False, True):
        assert post_raw(gateway, raw, chunked=chunked).status_code == 413
    assert_responsive(gateway)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_at_the_limit_is_served_and_one_byte_more_is_413(start_fake, start_gateway, chunked):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url], max_body_bytes=SMALL_LIMIT)
    at_limit = post_raw(gateway, body_of_size(SMALL_LIMIT), chunked=chunked)
    assert at_limit.status_code == 200, at_limit.text
    assert fake.state.stats.completed == 1
    over = post_raw(gateway, body_of_size(SMALL_LIMIT + 1), chunked=chunked)
    assert assert_openai_error(over, 413)["code"] == "payload_too_large"
    assert fake.state.stats.requests == 1  # the refused body never reached the model server
    assert_responsive(gateway)


def test_oversized_body_is_refused_before_authentication(start_gateway):
    gateway = start_gateway(max_body_bytes=SMALL_LIMIT)
    response = httpx.post(
        chat_url(gateway),
        content=body_of_size(SMALL_LIMIT + 1),
        headers={"Content-Type": "application/json"},
    )
    assert_openai_error(response, 413)


def test_413_by_content_length_is_readable_by_an_allowed_origin(stack):
    _, gateway = stack
    origin = DEFAULT_ORIGINS[0]
    response = post_raw(gateway, body_of_size(ELEVEN_MB), chunked=False, Origin=origin)
    assert response.status_code == 413
    assert response.headers.get("access-control-allow-origin") == origin


def test_413_by_streamed_body_is_readable_by_an_allowed_origin(stack):
    _, gateway = stack
    origin = DEFAULT_ORIGINS[0]
    response = post_raw(gateway, body_of_size(ELEVEN_MB), chunked=True, Origin=origin)
    assert response.status_code == 413
    assert response.headers.get("access-control-allow-origin") == origin


# --- security headers ----------------------------------------------------------------------


def test_security_headers_on_successful_responses(stack):
    _, gateway = stack
    responses = [
        httpx.get(f"{gateway.url}/healthz"),
        httpx.get(f"{gateway.url}/v1/health"),
        httpx.get(f"{gateway.url}/readyz"),
        httpx.get(f"{gateway.url}/v1/public_key"),
        httpx.get(f"{gateway.url}/openapi.json"),
        httpx.get(f"{gateway.url}/v1/models", headers=gateway.auth),
        httpx.post(chat_url(gateway), json=CHAT, headers=gateway.auth),
    ]
    for response in responses:
        assert response.status_code == 200, response.request.url
        assert_security_headers(response)
    streamed, events = stream_chat(gateway)
    assert streamed.status_code == 200
    assert events[-1] == b"data: [DONE]"
    assert_security_headers(streamed)


def test_security_headers_on_client_errors(stack):
    _, gateway = stack
    url = chat_url(gateway)
    bogus = {"Authorization": "Bearer not-a-key"}
    cases = [
        (401, httpx.post(url, json=CHAT)),
        (401, httpx.post(url, json=CHAT, headers=bogus)),
        (401, httpx.get(f"{gateway.url}/v1/models", headers=bogus)),
        (404, httpx.get(f"{gateway.url}/no/such/route")),
        (404, httpx.post(url, json={**CHAT, "model": "no-such-model"}, headers=gateway.auth)),
        (405, httpx.get(url, headers=gateway.auth)),
        (400, httpx.post(url, content=b"{not json", headers=gateway.auth)),
        (422, httpx.post(url, json={**CHAT, "temperature": 10}, headers=gateway.auth)),
        (422, httpx.post(url, json={"model": "fake-model", "messages": []}, headers=gateway.auth)),
        (413, post_raw(gateway, body_of_size(ELEVEN_MB), chunked=False)),
        (413, post_raw(gateway, body_of_size(ELEVEN_MB), chunked=True)),
    ]
    for status, response in cases:
        assert_openai_error(response, status)
        assert_security_headers(response)
    unauthenticated = cases[0][1]
    assert unauthenticated.headers["www-authenticate"] == "Bearer"


def test_security_headers_on_502_from_a_failing_model_server(stack):
    fake, gateway = stack
    fake.config.fault = "http_500"
    for stream in (False, True):
        response = httpx.post(
            chat_url(gateway), json={**CHAT, "stream": stream}, headers=gateway.auth
        )
        error = assert_openai_error(response, 502)
        assert "boom" not in str(error["message"])
        assert_security_headers(response)


def test_security_headers_on_503_without_a_model_server(start_fake, start_gateway):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url])
    wait_until(lambda: httpx.get(f"{gateway.url}/readyz").status_code == 200)
    fake.stop()
    response = httpx.post(chat_url(gateway), json=CHAT, headers=gateway.auth, timeout=10)
    assert assert_openai_error(response, 503)["type"] == "service_unavailable"
    assert_security_headers(response)
    not_ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
    assert not_ready.status_code == 503
    assert_security_headers(not_ready)


def test_security_headers_on_504(start_fake, start_gateway):
    fake = start_fake(first_byte_delay_s=SLOW_S)
    gateway = start_gateway(upstream_urls=[fake.url], request_timeout_s=LIMIT_S)
    response = httpx.post(chat_url(gateway), json=CHAT, headers=gateway.auth, timeout=10)
    assert_openai_error(response, 504)
    assert_security_headers(response)


def test_security_headers_on_an_unexpected_500(start_gateway):
    gateway = start_gateway()

    async def boom() -> None:
        raise RuntimeError("an unexpected failure")

    # Routes are looked up per request, so one can be added to the running app.
    app = gateway.thread.app
    app.add_api_route("/_test/boom", boom)
    response = httpx.get(f"{gateway.url}/_test/boom", headers=gateway.auth)
    error = assert_openai_error(response, 500)
    assert "unexpected failure" not in str(error["message"])  # no internal detail
    assert "x-request-id" in response.headers
    assert_security_headers(response)


def test_cache_control_no_store_when_credentials_were_sent(stack):
    _, gateway = stack
    sent = [
        httpx.get(f"{gateway.url}/v1/models", headers=gateway.auth),
        httpx.get(f"{gateway.url}/v1/usage", headers=gateway.auth),
        httpx.post(chat_url(gateway), json=CHAT, headers=gateway.auth),
        httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": "Bearer wrong"}),
        httpx.get(f"{gateway.url}/healthz", headers=gateway.auth),
    ]
    streamed, _ = stream_chat(gateway)
    for response in [*sent, streamed]:
        assert response.headers.get("cache-control") == "no-store", response.request.url
    anonymous = httpx.get(f"{gateway.url}/healthz")
    assert "no-store" not in anonymous.headers.get("cache-control", "")


def test_hsts_only_when_enabled(start_gateway):
    off = start_gateway()
    for path in ("/healthz", "/no/such/route"):
        assert "strict-transport-security" not in httpx.get(off.url + path).headers
    on = start_gateway(hsts=True)
    for path in ("/healthz", "/no/such/route", "/v1/models"):
        response = httpx.get(on.url + path)
        hsts = response.headers["strict-transport-security"]
        max_age = next(p for p in hsts.split(";") if p.strip().startswith("max-age="))
        assert int(max_age.split("=")[1]) >= 365 * 24 * 3600
        assert_security_headers(response)


# --- interactive docs ----------------------------------------------------------------------


def external_hosts(html: str) -> set[str]:
    hosts: set[str] = set()
    for marker in ('src="', 'href="'):
        for piece in html.split(marker)[1:]:
            url = httpx.URL(piece.split('"', 1)[0])
            if url.scheme in {"http", "https"}:
                hosts.add(f"{url.scheme}://{url.host}")
    return hosts


def test_docs_have_their_own_policy_and_the_schema_is_served(start_gateway):
    gateway = start_gateway()
    docs = httpx.get(f"{gateway.url}/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    assert_security_headers(docs, docs=True)
    csp = csp_directives(docs.headers["content-security-policy"])
    assert "https://cdn.jsdelivr.net" in csp["script-src"]
    assert "https://cdn.jsdelivr.net" in csp["style-src"]
    assert "'self'" in csp["connect-src"]  # Swagger UI fetches /openapi.json

    schema = httpx.get(f"{gateway.url}/openapi.json")
    assert schema.status_code == 200
    assert "/v1/chat/completions" in schema.json()["paths"]
    assert_security_headers(schema)  # the API policy, not the docs one


@pytest.mark.parametrize(
    "path",
    [
        "/docs",
        pytest.param("/redoc"),
    ],
)
def test_docs_page_loads_only_what_its_policy_allows(start_gateway, path):
    gateway = start_gateway()
    page = httpx.get(gateway.url + path)
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    hosts = external_hosts(page.text)
    assert hosts, "the page links nothing external: nothing to check"
    for host in hosts:
        assert host in policy, f"{path} links {host}, which its Content-Security-Policy blocks"


def test_docs_disabled_removes_docs_and_schema(start_gateway):
    gateway = start_gateway(docs_enabled=False)
    for path in ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"):
        response = httpx.get(gateway.url + path)
        assert_openai_error(response, 404)
        # The looser docs policy still goes by path; harmless on a JSON 404 (nosniff).
        assert_security_headers(response, docs=path != "/openapi.json")
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200


# --- time limits ---------------------------------------------------------------------------


def error_event(event: bytes) -> dict[str, object]:
    assert event.startswith(b"data: ")
    body = json.loads(event.removeprefix(b"data: "))
    assert set(body) == {"error"}
    return body["error"]


def test_stream_first_byte_limit_ends_the_stream_in_band(start_fake, start_gateway):
    fake = start_fake(first_byte_delay_s=SLOW_S)
    gateway = start_gateway(upstream_urls=[fake.url], stream_first_byte_timeout_s=LIMIT_S)
    response, events = stream_chat(gateway)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == b"data: [DONE]"
    error = error_event(events[-2])
    assert error["type"] == "timeout_error"
    assert error["code"] == "timeout"
    assert "first token" in str(error["message"])
    assert len(events) == 2  # nothing came before the error: the model's first token was late
    assert_security_headers(response)


def test_stream_idle_limit_ends_the_stream_in_band(start_fake, start_gateway):
    fake = start_fake(token_delay_s=SLOW_S)
    gateway = start_gateway(upstream_urls=[fake.url], stream_idle_timeout_s=LIMIT_S)
    response, events = stream_chat(gateway)
    assert response.status_code == 200
    assert events[-1] == b"data: [DONE]"
    error = error_event(events[-2])
    assert error["type"] == "timeout_error"
    assert "next token" in str(error["message"])
    first = json.loads(events[0].removeprefix(b"data: "))
    assert first["choices"][0]["delta"]["role"] == "assistant"  # the stream had started
    assert b"signature" not in b"".join(events)  # an unfinished answer is not signed
    assert fake.state.stats.completed == 0  # the model's next token never came through


def test_stream_limits_bound_each_gap_not_the_whole_stream(start_fake, start_gateway):
    fake = start_fake(token_delay_s=0.05, tokens=10)
    # The model server takes longer in total than either limit (it sleeps between tokens).
    assert fake.config.tokens * fake.config.token_delay_s > LIMIT_S
    gateway = start_gateway(
        upstream_urls=[fake.url],
        stream_first_byte_timeout_s=LIMIT_S,
        stream_idle_timeout_s=LIMIT_S,
    )
    _, events = stream_chat(gateway)
    assert events[-1] == b"data: [DONE]"
    assert b'"error"' not in b"".join(events)
    assert b'"signature"' in events[-2]


def test_request_time_limit_is_504_quickly_and_the_gateway_recovers(start_fake, start_gateway):
    fake = start_fake(first_byte_delay_s=SLOW_S)
    gateway = start_gateway(upstream_urls=[fake.url], request_timeout_s=LIMIT_S)
    response = httpx.post(chat_url(gateway), json=CHAT, headers=gateway.auth, timeout=10)
    error = assert_openai_error(response, 504)  # not the model's answer: the limit came first
    assert error["type"] == "timeout_error"
    assert error["code"] == "timeout"
    with gateway.client() as client, pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert raised.value.status_code == 504
    fake.config.first_byte_delay_s = 0.0
    assert_responsive(gateway)


# --- privacy -------------------------------------------------------------------------------


def test_no_token_key_or_prompt_in_any_log_line(
    stack, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
):
    _, gateway = stack
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "nilai", "sqlalchemy", "uvicorn", "uvicorn.error"):
        caplog.set_level(logging.DEBUG, logger=name)
    marker = uuid.uuid4().hex
    prompt = f"PRIVATE-PROMPT-{marker}"
    bogus_token = f"nilai-bogus-token-{marker}"
    stored_shape = f"nilai_{marker[:12]}_{marker}{marker}"  # takes the database lookup path
    stored_secret = stored_shape.split("_", 2)[2]
    body = {"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}

    refused = [
        {"Authorization": f"Bearer {bogus_token}"},
        {"Authorization": f"bearer {bogus_token}"},
        {"Authorization": f"Basic {bogus_token}"},
        {"Authorization": bogus_token},
        {"Authorization": f"Bearer {stored_shape}"},
    ]
    for headers in refused:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            response = httpx.request(
                method,
                gateway.url + path,
                json=body if method == "POST" else None,
                headers=headers,
            )
            assert response.status_code == 401
            assert bogus_token not in response.text
    with gateway.client() as client:
        whole = client.chat.completions.create(model="fake-model", messages=body["messages"])
        assert whole.choices[0].message.content
        stream = client.chat.completions.create(
            model="fake-model", messages=body["messages"], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    captured = capfd.readouterr()
    records = caplog.records
    assert any("chat model=" in r.getMessage() for r in records), "the gateway logged nothing"
    log_text = "\n".join(
        [
            caplog.text,
            *(r.getMessage() for r in records),
            *(repr(r.args) for r in records),
            *(repr(getattr(r, "exc_text", "")) for r in records),
            captured.out,
            captured.err,
        ]
    )
    secrets = {
        "bogus bearer token": bogus_token,
        "stored-key-shaped token": stored_shape,
        "stored-key-shaped secret": stored_secret,
        "API key": TEST_API_KEY,
        "prompt": prompt,
    }
    for what, secret in secrets.items():
        assert secret not in log_text, f"the {what} appears in the logs"
