"""Bad requests get OpenAI-shaped 4xx answers and never reach the model server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.stack(fake={"max_model_len": 100})]

GOOD = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 10}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"model": None}, "model"),
        ({"model": "   "}, "model"),
        ({"n": 2}, "n"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"max_tokens": 101}, "max_tokens"),
    ],
)
def test_invalid_parameters_are_422_with_param(stack, change, param):
    fake, gateway = stack
    body = {**GOOD, **change}
    if change.get("model", "") is None:
        del body["model"]
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=gateway.auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert fake.state.stats.requests == 0


def test_unknown_model_points_to_models_endpoint(stack):
    fake, gateway = stack
    with gateway.client() as client, pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=GOOD["messages"])
    assert "/v1/models" in caught.value.message
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    assert fake.state.stats.requests == 0


def test_sdk_raises_unprocessable_entity_with_readable_message(stack):
    _, gateway = stack
    with gateway.client() as client, pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(
            model="fake-model", messages=GOOD["messages"], temperature=10
        )
    assert "temperature" in caught.value.message


def test_malformed_json_body_is_400(stack):
    fake, gateway = stack
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=b'{"model": ',
        headers={**gateway.auth, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert fake.state.stats.requests == 0


def test_unknown_fields_are_ignored_and_not_forwarded(stack):
    fake, gateway = stack
    body = {**GOOD, "frobnicate": True, "top_k": 5}
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=gateway.auth)
    assert response.status_code == 200
    assert response.headers["x-nilai-ignored-fields"] == "frobnicate"
    assert "frobnicate" not in fake.state.stats.last_body
    assert fake.state.stats.last_body["top_k"] == 5


def test_a_stream_names_the_fields_it_ignored(stack):
    _, gateway = stack
    body = {**GOOD, "stream": True, "max_tokenz": 3}
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=gateway.auth
    ) as response:
        response.read()
    assert response.status_code == 200
    assert response.headers["x-nilai-ignored-fields"] == "max_tokenz"
    known = httpx.post(f"{gateway.url}/v1/chat/completions", json=GOOD, headers=gateway.auth)
    assert "x-nilai-ignored-fields" not in known.headers


def test_tools_refused_for_model_without_tool_support(stack):
    fake, gateway = stack
    body = {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=gateway.auth)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tools"
    assert fake.state.stats.requests == 0


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "missing_api_key"), ({"Authorization": "Bearer wrong"}, "invalid_api_key")],
)
def test_auth_failures_are_401_with_bearer_challenge(stack, headers, code):
    fake, gateway = stack
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=GOOD, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == code
    assert "wrong" not in response.text
    assert fake.state.stats.requests == 0


def test_sdk_raises_authentication_error(stack):
    _, gateway = stack
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="nope", max_retries=0)
    with client, pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_unknown_route_is_openai_shaped_404(stack):
    _, gateway = stack
    response = httpx.get(f"{gateway.url}/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


# --- request hygiene (issue 13): client values that could reach logs or the query log ------


def _post(gateway, body: bytes | dict, **headers: str) -> httpx.Response:
    all_headers = {**gateway.auth, **headers}
    if isinstance(body, dict):
        return httpx.post(
            f"{gateway.url}/v1/chat/completions", json=body, headers=all_headers, timeout=30
        )
    return httpx.post(
        f"{gateway.url}/v1/chat/completions", content=body, headers=all_headers, timeout=30
    )


def _assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    return error


@pytest.mark.parametrize(
    "model",
    ["bad\u0000model", "fake-model\nfake 2026-01-01 INFO forged", "a\u2028b", "m" * 257],
    ids=["nul", "newline", "line-separator", "too-long"],
)
def test_model_id_with_control_characters_is_422_and_never_logged(stack, caplog, model):
    fake, gateway = stack
    caplog.set_level("INFO")
    response = _post(gateway, {**GOOD, "model": model})
    error = _assert_error(response, 422, "model")
    assert error["code"] == "invalid_value"
    assert model not in response.text  # not echoed either
    assert fake.state.stats.requests == 0
    logged = [record.getMessage() for record in caplog.records]
    assert any("status=422" in line for line in logged), logged
    assert not any(model in line for line in logged)


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("stream", "yes", "stream"),
        ("stream", 1, "stream"),
        ("logprobs", "true", "logprobs"),
        ("parallel_tool_calls", "no", "parallel_tool_calls"),
        ("web_search", "false", "web_search"),
        ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage"),
    ],
)
def test_booleans_that_are_not_json_booleans_are_422(stack, field, value, param):
    fake, gateway = stack
    response = _post(gateway, {**GOOD, field: value})
    _assert_error(response, 422, param)
    assert fake.state.stats.requests == 0


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "text/plain; charset=utf-8"],
)
def test_body_declared_as_anything_but_json_is_415(stack, content_type):
    fake, gateway = stack
    response = _post(gateway, json.dumps(GOOD).encode(), **{"Content-Type": content_type})
    error = _assert_error(response, 415, None)
    assert error["code"] == "unsupported_media_type"
    assert fake.state.stats.requests == 0


@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": "application/json; charset=utf-8"}, {"Content-Type": "Application/JSON"}, {}],
    ids=["charset", "upper-case", "missing"],
)
def test_json_body_with_charset_or_without_content_type_is_served(stack, headers):
    _, gateway = stack
    response = _post(gateway, json.dumps(GOOD).encode(), **headers)
    assert response.status_code == 200, response.text


def test_content_type_is_checked_after_authentication(stack):
    _, gateway = stack
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=json.dumps(GOOD).encode(),
        headers={"Content-Type": "text/plain"},
    )
    assert response.status_code == 401


def test_more_messages_than_the_limit_is_422(stack):
    fake, gateway = stack
    messages = [{"role": "user", "content": "hi"}]
    assert _post(gateway, {**GOOD, "messages": messages * 2048}).status_code == 200
    response = _post(gateway, {**GOOD, "messages": messages * 2049})
    error = _assert_error(response, 422, "messages")
    assert "2048" in error["message"]
    assert fake.state.stats.requests == 1


def test_more_json_items_than_the_limit_is_413(stack):
    fake, gateway = stack
    response = _post(gateway, {**GOOD, "metadata": {"tags": [0] * 40_000}})
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert "JSON items" in error["message"]
    assert fake.state.stats.requests == 0
