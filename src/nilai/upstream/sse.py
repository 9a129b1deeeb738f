"""Server-sent events: split a byte stream into ``data:`` payloads, and frame payloads."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

DONE = b"[DONE]"


# Characters JSON allows raw inside strings but some line readers (httpx's iter_lines, and so
# httpx-sse) take for line breaks: U+0085, U+2028, U+2029, in UTF-8.
_LINE_BREAKS_IN_STRINGS = (
    (b"\xc2\x85", b"\\u0085"),
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
)


def one_line(payload: bytes) -> bytes:
    """``payload`` (compact JSON) with every character a client might split a line at escaped.

    JSON escapes CR and LF inside strings itself; U+0085, U+2028 and U+2029 it may leave raw,
    and they only ever occur inside strings, so escaping them keeps the same JSON value.
    """
    if b"\xc2\x85" not in payload and b"\xe2\x80" not in payload:
        return payload
    for raw, escaped in _LINE_BREAKS_IN_STRINGS:
        payload = payload.replace(raw, escaped)
    return payload


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
