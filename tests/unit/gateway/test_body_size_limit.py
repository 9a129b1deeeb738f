"""BodySizeLimit at the ASGI level: what it reads of an over-limit body, and what it answers."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from nilai.errors import PayloadTooLarge, to_error_body
from nilai.gateway.security import BodySizeLimit

LIMIT = 1024
CHUNK = 256


class Client:
    """Feeds the request body in chunks and records what the middleware sends back."""

    def __init__(self, body_size: int, *, disconnect: bool = False) -> None:
        self.chunks = [b"x" * CHUNK] * (body_size // CHUNK) + [b"x" * (body_size % CHUNK)]
        self.disconnect = disconnect
        self.received = 0  # body messages the middleware (or the app) has read
        self.sent: list[dict[str, Any]] = []
        self.sent_before_reading = 0

    async def receive(self) -> dict[str, Any]:
        if self.disconnect or self.received >= len(self.chunks):
            return {"type": "http.disconnect"}
        self.received += 1
        more = self.received < len(self.chunks)
        return {"type": "http.request", "body": self.chunks[self.received - 1], "more_body": more}

    async def send(self, message: dict[str, Any]) -> None:
        if self.received == 0:
            self.sent_before_reading += 1
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    def header(self, name: bytes) -> bytes | None:
        return dict(self.sent[0]["headers"]).get(name)


def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}


async def read_body_or_answer_413(scope: Any, receive: Any, send: Any) -> None:
    """What the gateway does: read the whole body; a PayloadTooLarge becomes its 413."""
    try:
        await Request(scope, receive).body()
    except PayloadTooLarge as error:
        body = orjson.dumps(to_error_body(error))
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def test_an_over_limit_body_within_the_drain_allowance_is_read_before_the_connection_ends():
    size = LIMIT + 700
    client = Client(size)
    middleware = BodySizeLimit(read_body_or_answer_413, max_bytes=LIMIT)
    await middleware(scope((b"content-length", str(size).encode())), client.receive, client.send)
    assert client.status == 413
    assert client.header(b"connection") == b"close"
    # The whole answer goes out first, so a client that reads while it sends has it at once...
    assert client.sent_before_reading == 2
    assert client.sent[1]["more_body"] is True
    assert orjson.loads(client.sent[1]["body"])["error"]["code"] == "payload_too_large"
    # ...and the response ends only once the declared body has been read and dropped.
    assert client.received == len(client.chunks)
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_a_body_far_over_the_limit_is_refused_without_reading_it():
    size = 2 * LIMIT + 1  # beyond the drain allowance (the limit again)
    client = Client(size)
    middleware = BodySizeLimit(read_body_or_answer_413, max_bytes=LIMIT)
    await middleware(scope((b"content-length", str(size).encode())), client.receive, client.send)
    assert client.status == 413
    assert client.header(b"connection") == b"close"
    assert client.received == 0
    assert client.sent[-1].get("more_body", False) is False


async def test_a_client_waiting_for_100_continue_gets_its_413_without_sending_the_body():
    size = LIMIT + 1
    client = Client(size)
    middleware = BodySizeLimit(read_body_or_answer_413, max_bytes=LIMIT)
    headers = ((b"content-length", str(size).encode()), (b"expect", b"100-continue"))
    await middleware(scope(*headers), client.receive, client.send)
    assert client.status == 413
    assert client.received == 0
    assert client.sent[-1].get("more_body", False) is False


async def test_a_streamed_body_over_the_limit_is_drained_and_answered_413_with_connection_close():
    client = Client(LIMIT + 700)
    middleware = BodySizeLimit(read_body_or_answer_413, max_bytes=LIMIT)
    await middleware(scope(), client.receive, client.send)
    assert client.status == 413
    assert client.received == len(client.chunks)
    assert client.header(b"connection") == b"close"


async def test_a_streamed_body_far_over_the_limit_is_cut_off_unread():
    client = Client(3 * LIMIT)
    middleware = BodySizeLimit(read_body_or_answer_413, max_bytes=LIMIT)
    await middleware(scope(), client.receive, client.send)
    assert client.status == 413
    assert client.header(b"connection") == b"close"
    # Read up to the limit plus the allowance (and one chunk over it), not the rest.
    assert client.received * CHUNK <= 2 * LIMIT + CHUNK
    assert client.received < len(client.chunks)


async def test_a_body_within_the_limit_is_served_and_the_connection_kept():
    client = Client(LIMIT)
    middleware = BodySizeLimit(read_body_or_answer_413, max_bytes=LIMIT)
    await middleware(scope(), client.receive, client.send)
    assert client.status == 200
    assert client.header(b"connection") is None


async def test_a_client_gone_while_its_body_is_read_ends_the_request_quietly():
    client = Client(LIMIT, disconnect=True)
    middleware = BodySizeLimit(read_body_or_answer_413, max_bytes=LIMIT)
    await middleware(scope(), client.receive, client.send)  # no ClientDisconnect escapes
    assert client.sent == []
