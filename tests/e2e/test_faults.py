"""Model server faults become real statuses before the stream starts, in-band errors after."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.stack(gateway={"upstream_read_timeout_s": 0.5})]

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def post(gateway, **extra):
    return httpx.post(
        f"{gateway.url}/v1/chat/completions", json={**BODY, **extra}, headers=gateway.auth
    )


def stream_events(gateway) -> list[bytes]:
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json={**BODY, "stream": True},
        headers=gateway.auth,
        timeout=10,
    ) as response:
        assert response.status_code == 200
        raw = response.read()
    return [e for e in raw.split(b"\n\n") if e]


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_500_is_502(stack, stream):
    fake, gateway = stack
    fake.config.fault = "http_500"
    response = post(gateway, stream=stream)
    assert response.status_code == 502
    error = response.json()["error"]
    assert "boom" not in error["message"]  # upstream internals stay inside


def test_upstream_400_is_relayed_as_400(stack):
    fake, gateway = stack
    fake.config.fault = "http_400"
    response = post(gateway)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "context too long"


def test_malformed_json_is_502(stack):
    fake, gateway = stack
    fake.config.fault = "malformed_json"
    assert post(gateway).status_code == 502


@pytest.mark.parametrize("stream", [False, True])
def test_slow_first_byte_is_504(stack, stream):
    fake, gateway = stack
    fake.config.first_byte_delay_s = 10.0
    if stream:
        events = stream_events(gateway)
        assert b'"timeout' in events[-2]
        assert events[-1] == b"data: [DONE]"
    else:
        response = post(gateway)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout_error"
    # The gateway gave up (after 0.5 s) before the model server answered (after 10 s).
    assert fake.state.stats.completed == 0


@pytest.mark.parametrize("fault", ["drop_mid_stream", "malformed_json", "error_event"])
def test_mid_stream_failure_ends_with_error_event_and_done(stack, fault):
    fake, gateway = stack
    fake.config.fault = fault
    events = stream_events(gateway)
    assert events[-1] == b"data: [DONE]"
    assert events[-2].startswith(b'data: {"error"')
    assert b"signature" not in b"".join(events)


def test_stream_without_final_chunk_ends_with_error(stack):
    fake, gateway = stack
    fake.config.fault = "no_final_chunk"
    events = stream_events(gateway)
    assert events[-2].startswith(b'data: {"error"')


def test_sdk_surfaces_mid_stream_error(stack):
    fake, gateway = stack
    fake.config.fault = "error_event"
    with gateway.client() as client, pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model="fake-model", messages=BODY["messages"], stream=True
        ):
            pass


def test_request_time_limit_is_504(start_fake, start_gateway):
    fake = start_fake(first_byte_delay_s=1.0)
    gateway = start_gateway(upstream_urls=[fake.url], request_timeout_s=0.3)
    response = post(gateway)
    assert response.status_code == 504
