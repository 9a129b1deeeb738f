"""The streaming path of a request, in one place: read upstream SSE, relay it signed, release.

The parts, in the order bytes flow:

* ``read_batches`` reads the model server's SSE body through ``nilai.upstream.sse`` and is the
  one place where reading fails: a late first token or a silent server (``ReadDeadline``, with
  first-token and idle as explicit state), shutdown (the ``Drain`` cut-off), and the upstream
  client's errors all become a ``NilaiError`` here.
* ``relay_events`` is the SSE relay: it passes each payload through a ``StreamTranslator`` and
  writes once per upstream read. Any ``NilaiError`` ends the stream the same way, with an in-band
  error event. The upstream response and the model slot are released *before* the last write
  (the signed end, or the error, and ``[DONE]``), so a client that never has more than N requests
  open is never refused by a limit of N.
* ``ChunkForwarder`` is the translator for chat completion chunks: it decides what to forward
  and hands every payload to the ``StreamSigner``, which signs the last one.
* ``ChatStream`` and ``ChatStreamResponse`` own the release of everything the stream holds,
  whether or not the client read any of it.

What the stream learns (first token, usage, chunks, how it failed) it reports to a
``StreamRecord``; the chat service passes its request context there, and is the only code that
decides what the context holds.

Another API's typed events (the Responses API) reuse ``read_batches`` and ``relay_events`` with
their own ``StreamTranslator`` and ``SseFraming`` (``event:`` lines, its own error and end events).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol, cast

import anyio
import orjson
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nilai.crypto.domains import CHAT_COMPLETION_CHUNK_OBJECT
from nilai.errors import NilaiError, ShuttingDown, UpstreamProtocolError, UpstreamTimeout
from nilai.gateway.chat.signing import StreamSigner, claim_object, drop_gateway_fields
from nilai.gateway.drain import Drain
from nilai.gateway.middleware import SERVER_SEND
from nilai.protocol.base import json_object
from nilai.protocol.chat import ChatCompletionRequest
from nilai.upstream.client import ConnectionBroken, ReadTimedOut
from nilai.upstream.sse import DONE, frame, iter_payload_batches, one_line

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- reading: every failure of the upstream read becomes a NilaiError here -------------------


class ReadDeadline:
    """How long the next upstream read may take: the first token, then each next one.

    The state is explicit: until a payload arrived the limit is the first-token limit and a
    timeout says "first token"; afterwards it is the idle limit and a timeout says "next token".
    """

    def __init__(self, first_token_s: float, idle_s: float, drain: Drain) -> None:
        self._first_token_s = first_token_s
        self._idle_s = idle_s
        self._drain = drain
        self.waiting_for_first_token = True

    @property
    def limit_s(self) -> float:
        """Seconds the current read may take."""
        return self._first_token_s if self.waiting_for_first_token else self._idle_s

    def arrived(self) -> None:
        """Payloads arrived: from now on the idle limit applies."""
        self.waiting_for_first_token = False

    def expired(self) -> NilaiError:
        """The error for a read that ran out of time (the drain's cut-off counts as shutdown)."""
        if self._drain.passed():
            return ShuttingDown(
                "The gateway is shutting down; the stream ended before the answer was complete. "
                "Send the request again."
            )
        what = "first token" if self.waiting_for_first_token else "next token"
        return UpstreamTimeout(
            f"The model server did not send its {what} within {self.limit_s:g}s."
        )


class _ReadWatch:
    """One timer per stream that keeps its read deadline, instead of one timer per read.

    Tokens arrive one per read, and a timer set and cancelled for every read
    (``asyncio.timeout(limit)``) cost about a fifth of a relayed token's CPU. Here each read only
    notes when it began and enters a timeout with no timer of its own; the one timer wakes no
    later than the current read's deadline and then either ends that read (it is late) or sleeps
    on until the deadline of the read now in progress. The drain pulls it in at shutdown as it
    does any time limit (``when`` and ``reschedule``).
    """

    def __init__(self, deadline: ReadDeadline) -> None:
        self._deadline = deadline
        self._loop = asyncio.get_running_loop()
        self._read: asyncio.Timeout | None = None
        self._read_began = 0.0
        self._cut_off: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def begin_read(self) -> asyncio.Timeout:
        """The timeout to wait for the next read in; ``end_read`` when it is over."""
        now = self._loop.time()
        if self._cut_off is not None and now >= self._cut_off:
            return asyncio.timeout_at(self._cut_off)  # past the drain's cut-off: end it at once
        self._read_began = now
        self._read = asyncio.timeout(None)
        if self._timer is None:
            self._arm(self._due())
        return self._read

    def end_read(self) -> None:
        """The read finished (or failed): nothing is waiting any more."""
        self._read = None

    def arrived(self) -> None:
        """Payloads arrived; after the first ones, the (maybe shorter) idle limit applies."""
        if self._deadline.waiting_for_first_token:
            self._deadline.arrived()
            self._disarm()  # the next read arms the timer for its own deadline

    def close(self) -> None:
        """The stream is over: no more wake-ups."""
        self._read = None
        self._disarm()

    def when(self) -> float | None:
        """The drain's cut-off, once set: each read's own limit moves on with the reads."""
        return self._cut_off

    def reschedule(self, when: float | None) -> None:
        """The drain's cut-off: no read may last beyond ``when``."""
        self._cut_off = when
        if self._read is not None:
            self._arm(self._due())

    def _due(self) -> float:
        due = self._read_began + self._deadline.limit_s
        return due if self._cut_off is None else min(due, self._cut_off)

    def _arm(self, when: float) -> None:
        self._disarm()
        self._timer = self._loop.call_at(when, self._wake)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        self._timer = None
        if self._read is None:
            return  # between reads (the client is being written to): the next read re-arms
        due = self._due()
        now = self._loop.time()
        if now >= due:
            self._read.reschedule(now)  # the read in progress ends with a TimeoutError
        else:
            self._arm(due)


async def read_batches(
    raw: AsyncIterator[bytes], deadline: ReadDeadline, drain: Drain
) -> AsyncGenerator[list[bytes]]:
    """The upstream SSE payloads, all those completed by one read as one list.

    Each read must finish within ``deadline`` (ended early by the drain at shutdown).

    Raises:
        UpstreamTimeout: The model server was too slow, or the client's read timed out.
        ShuttingDown: The gateway's shutdown cut the read off.
        UpstreamProtocolError: The connection broke.
    """
    batches = iter_payload_batches(raw)
    watch = _ReadWatch(deadline)
    async with contextlib.aclosing(batches):
        with drain.watch(watch):
            try:
                while True:
                    try:
                        async with watch.begin_read():
                            batch = await anext(batches)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise deadline.expired() from None
                    except ReadTimedOut as exc:
                        raise UpstreamTimeout("The model server stopped sending.") from exc
                    except ConnectionBroken as exc:
                        raise UpstreamProtocolError("The model server broke the stream.") from exc
                    finally:
                        watch.end_read()
                    watch.arrived()
                    yield batch
            finally:
                watch.close()


# --- relaying: one write per upstream read, one error path ------------------------------------


class StreamRecord(Protocol):
    """Where a stream reports what it learns as it goes: the service's request context."""

    def mark_first_token(self) -> None:
        """The first chunk from the model arrived (the first call wins)."""
        ...

    def record_usage(self, usage: object) -> None:
        """Token usage the model reported (running totals, or the final figures)."""
        ...

    def add_earlier_calls(self, usage: object) -> bool:
        """Add the request's earlier model calls' tokens to ``usage``; True if changed."""
        ...

    def count_chunk(self) -> None:
        """One chunk with content was relayed."""
        ...

    def fail(self, error: BaseException) -> None:
        """The stream ended with ``error`` (a ``NilaiError``, or the client going away)."""
        ...


class StreamTranslator(Protocol):
    """Turns upstream payloads into the payloads the client receives, signing the last."""

    def feed(self, payload: bytes) -> list[bytes]:
        """Take one upstream payload; return the payloads to send now.

        Raises:
            NilaiError: The payload ends the stream (sent in-band to the client).
        """
        ...

    def finish(self) -> list[bytes]:
        """The upstream ended normally; return the last payloads, the final one signed.

        Raises:
            NilaiError: The upstream ended without a proper end.
        """
        ...


def error_event(error: NilaiError) -> bytes:
    """The in-band error payload that ends a stream that already started."""
    return orjson.dumps(
        {"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}}
    )


def _chat_error(error: NilaiError) -> bytes:
    return frame(error_event(error))


@dataclass(frozen=True, slots=True)
class SseFraming:
    """How one API writes its stream: each payload as an event, an error event, the end."""

    event: Callable[[bytes], bytes]
    error: Callable[[NilaiError], bytes]
    end: bytes


CHAT_FRAMING = SseFraming(event=frame, error=_chat_error, end=frame(DONE))
"""Chat completions: ``data:`` events, ``data: {"error": ...}``, then ``data: [DONE]``."""


async def relay_events(
    batches: AsyncGenerator[list[bytes]],
    translator: StreamTranslator,
    record: StreamRecord,
    *,
    release: Callable[[], Awaitable[None]],
    framing: SseFraming = CHAT_FRAMING,
) -> AsyncGenerator[bytes]:
    """The SSE relay: the client's events, one write per upstream read, then the end.

    The last write is the signed end (or the in-band error) and the end event (``[DONE]`` in
    chat's ``framing``); ``release`` runs just before it. Every ``NilaiError`` (from reading or
    translating) ends the stream the same way: the error reported to ``record``, and an error event
    instead of the signed end. A client that goes away (the generator is closed) is recorded
    too, and nothing more is sent.
    """
    encode = framing.event
    events: list[bytes] = []
    try:
        async with contextlib.aclosing(batches):
            async for batch in batches:
                done = False
                for payload in batch:
                    if payload == DONE:
                        done = True
                        break
                    events += [encode(out) for out in translator.feed(payload)]
                if done:
                    break
                if events:
                    yield b"".join(events)
                    events = []
        events.extend(encode(out) for out in translator.finish())
    except NilaiError as exc:
        record.fail(exc)
        events.append(framing.error(exc))
    except BaseException as exc:  # the client went away; closing the response cancels upstream
        record.fail(exc)
        raise
    # The answer is complete: free the model slot before the client can see the end, so a
    # client that never has more than N requests open is never refused by a limit of N.
    await release()
    events.append(framing.end)
    yield b"".join(events)


# --- chat completion chunks -----------------------------------------------------------------


class ChunkForwarder:
    """Decides, chunk by chunk, what to forward and which chunk carries the signature.

    A chunk that finishes the choice is held back until the upstream ends, because the
    signature goes on the last chunk the client receives, and only the end tells which one
    that is. Every other chunk goes out at once. Usage that the gateway asked for on its own
    account (running totals on each chunk, the final usage chunk) is kept from clients that did
    not ask for it. As in OpenAI's API, a client that asked for usage gets it once, on a final
    chunk with no choices; only ``continuous_usage_stats`` puts it on every chunk.
    """

    def __init__(
        self, signer: StreamSigner, record: StreamRecord, request: ChatCompletionRequest
    ) -> None:
        self._signer = signer
        self._record = record
        self._include_usage = request.include_usage
        options = request.stream_options
        extra = (options.model_extra or {}) if options else {}
        self._continuous = bool(extra.get("continuous_usage_stats"))
        self._held: tuple[bytes, dict[str, Any]] | None = None
        self._usage_chunk: dict[str, Any] | None = None

    def feed(self, payload: bytes) -> list[bytes]:
        """Take one upstream payload; return the payloads to send now.

        Raises:
            UpstreamProtocolError: The chunk is malformed, of another kind, or an error.
        """
        chunk = _parse_chunk(payload)
        # The verifier accepts only chunks that say what they are; add it where upstream didn't.
        changed = claim_object(chunk, CHAT_COMPLETION_CHUNK_OBJECT)
        # Fields only the gateway may set (sources, signature) never pass from a model server.
        changed = drop_gateway_fields(chunk) or changed
        self._record.mark_first_token()
        usage = chunk.get("usage")
        if usage:
            # The client's usage counts the request's earlier model calls too (a web search's
            # planner, tool rounds), and so does the query log.
            changed = self._record.add_earlier_calls(usage) or changed
            self._record.record_usage(usage)
        if not chunk.get("choices"):
            if usage is not None and self._include_usage:
                self._usage_chunk = chunk
            return []
        finishing = _finishes(chunk)
        if usage and finishing and self._include_usage:
            # The usage chunk is the client's only usage; keep it for the end in case the
            # model server sends none of its own.
            self._usage_chunk = self._usage_chunk or _usage_only(chunk)
        if "usage" in chunk and not self._continuous:
            del chunk["usage"]
            payload = orjson.dumps(chunk)
        elif changed or b"\n" in payload or b"\r" in payload:
            # Send the chunk as changed here (``object`` added, gateway fields dropped), and one
            # event per line (what clients and the verifier read): re-encode compactly.
            payload = orjson.dumps(chunk)
        payload = one_line(payload)
        if _has_content(chunk):
            self._record.count_chunk()
        out = self._release()
        if finishing:
            self._held = (payload, chunk)
        else:
            out.append(self._signer.sent(payload))
        return out

    def finish(self) -> list[bytes]:
        """The upstream ended: send what is held, signing the very last chunk.

        Raises:
            UpstreamProtocolError: The stream had no final chunk.
        """
        if self._usage_chunk is not None:
            return [*self._release(), self._signer.last(self._usage_chunk)]
        if self._held is not None:
            _, chunk = self._held
            self._held = None
            return [self._signer.last(chunk)]
        raise UpstreamProtocolError("The model server ended the stream without a final chunk.")

    def _release(self) -> list[bytes]:
        if self._held is None:
            return []
        payload, _ = self._held
        self._held = None
        return [self._signer.sent(payload)]


def _parse_chunk(payload: bytes) -> dict[str, Any]:
    try:
        chunk = json_object(orjson.loads(payload))
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError("The model server sent a malformed stream chunk.") from exc
    if chunk is None:
        raise UpstreamProtocolError("The model server sent an unexpected stream chunk.")
    if "error" in chunk:
        raise UpstreamProtocolError("The model server reported an error mid-stream.")
    return chunk


def _usage_only(chunk: dict[str, Any]) -> dict[str, Any]:
    """The final usage chunk OpenAI sends: the chunk's identity and usage, no choices."""
    return {**{key: value for key, value in chunk.items() if key != "choices"}, "choices": []}


def _choices(chunk: dict[str, Any]) -> list[dict[str, object]]:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    return [c for item in cast(list[object], choices) if (c := json_object(item)) is not None]


def _finishes(chunk: dict[str, Any]) -> bool:
    return any(choice.get("finish_reason") for choice in _choices(chunk))


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in _choices(chunk):
        delta = json_object(choice.get("delta"))
        if delta and delta.get("content"):
            return True
    return False


# --- releasing: whatever the client did ------------------------------------------------------


@dataclass(slots=True)
class ChatStream:
    """SSE events to send, and what must be released once they are sent (or abandoned)."""

    events: AsyncGenerator[bytes]
    resources: AsyncExitStack
    headers: dict[str, str]

    async def aclose(self) -> None:
        """Stop the relay, close upstream, free the model slot and account the request."""
        await self.events.aclose()
        await self.resources.aclose()


class ChatStreamResponse(StreamingResponse):
    """SSE response over a ``ChatStream``; closes it however the response ends.

    A generator's own ``finally`` does not run if it is never started (the client left before
    the first byte), so the release happens here, around the whole response.

    The chunks between the response start and its end go straight to the server's ``send``
    where ``KeepServerSend`` left it (see there why); the start and the end pass the middleware.
    """

    def __init__(self, stream: ChatStream) -> None:
        super().__init__(
            stream.events,
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **stream.headers},
        )
        self._stream = stream
        self._chunk_send: Send | None = None

    async def stream_response(self, send: Send) -> None:
        """The start and the end through the middleware; the chunks past it, if it allows."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        write = self._chunk_send or send
        async for chunk in self.body_iterator:
            await write({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the stream, then release its resources even when cancelled."""
        self._chunk_send = cast(Send | None, scope.get(SERVER_SEND))
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()
