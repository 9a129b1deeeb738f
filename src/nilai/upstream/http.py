"""The one pooled HTTP client a process uses, and a bounded read of an answer's body."""

from __future__ import annotations

import httpx

from nilai.settings import NilaiSettings


def make_http_client(settings: NilaiSettings) -> httpx.AsyncClient:
    """Build the shared client with explicit pool limits and timeouts."""
    return httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=settings.upstream_max_connections,
            max_keepalive_connections=settings.upstream_max_connections,
            # Below the 5 s keep-alive of uvicorn-based model servers (vLLM's included), so an
            # idle connection is dropped here before the server closes it under a request.
            keepalive_expiry=4.0,
        ),
        timeout=httpx.Timeout(
            connect=settings.upstream_connect_timeout_s,
            read=settings.upstream_read_timeout_s,
            write=settings.upstream_read_timeout_s,
            pool=settings.upstream_connect_timeout_s,
        ),
        follow_redirects=False,
        trust_env=False,
    )


async def read_capped(response: httpx.Response, max_bytes: int) -> bytes | None:
    """The (decoded) body of a streamed ``response``, or None once it passes ``max_bytes``.

    What comes after the cap is never downloaded: the caller closes the response, dropping the
    connection, and refuses the answer in its own terms.
    """
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            return None
    return bytes(body)
