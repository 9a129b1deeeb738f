"""Bad requests get OpenAI-shaped 4xx answers and never reach the model server."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

GOOD = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def stack(start_fake, start_gateway):
    fake = start_fake(models=["fake-model"], max_model_len=100)
    return fake, start_gateway(upstream_urls=[fake.url])


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
    assert "frobnicate" not in fake.state.stats.last_body
    assert fake.state.stats.last_body["top_k"] == 5


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
