"""Server-sent events: split a byte stream into ``data:`` payloads, and frame payloads."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

DONE = b"[DONE]"


def frame(payload: bytes) -> bytes:
    """Frame one payload as an SSE event."""
    return b"data: " + payload + b"\n\n"


async def iter_payloads(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes]:
    r"""Yield each event's data (multi-line data joined by ``\\n``); comments are skipped."""
    async for batch in iter_payload_batches(chunks):
        for payload in batch:
            yield payload


async def iter_payload_batches(chunks: AsyncIterator[bytes]) -> AsyncGenerator[list[bytes]]:
    """Like ``iter_payloads``, but all the events completed by one read come as one list.

    A fast model server often delivers many events in one read: relaying them together costs
    one trip through the response machinery instead of one per event.
    """
    buffer = b""
    data: list[bytes] = []
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        batch: list[bytes] = []
        for raw in lines:
            line = raw.removesuffix(b"\r")
            if not line:
                if data:
                    batch.append(b"\n".join(data))
                    data = []
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
        if batch:
            yield batch
    if buffer.startswith(b"data:"):
        data.append(buffer.removesuffix(b"\r")[5:].removeprefix(b" "))
    if data:
        yield [b"\n".join(data)]
