"""A client that drops a stream cancels the model server's generation."""

from __future__ import annotations

import httpx
import pytest

from tests.support.servers import wait_until

pytestmark = pytest.mark.e2e


def test_dropped_stream_cancels_upstream(start_fake, start_gateway):
    fake = start_fake(tokens=200, token_delay_s=0.02)
    gateway = start_gateway(upstream_urls=[fake.url])
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=gateway.auth
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
    # leaving the block closes the connection mid-stream
    wait_until(lambda: fake.state.stats.cancelled == 1, timeout_s=5)
    assert fake.state.stats.completed == 0


async def test_sdk_client_closing_stream_cancels_upstream(start_fake, start_gateway):
    fake = start_fake(tokens=200, token_delay_s=0.02)
    gateway = start_gateway(upstream_urls=[fake.url])
    async with gateway.async_client() as client:
        stream = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for _ in stream:
            break
        await stream.close()
    wait_until(lambda: fake.state.stats.cancelled == 1, timeout_s=5)
