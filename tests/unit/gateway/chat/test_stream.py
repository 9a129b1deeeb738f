"""The contract of the streaming path: reading, relaying, ending and releasing."""

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack

import pytest
from starlette.types import Message, Scope, Send

from nilai.auth.base import Principal
from nilai.errors import NilaiError, UpstreamProtocolError
from nilai.gateway.chat.context import CLIENT_CLOSED, RequestContext
from nilai.gateway.chat.stream import (
    ChatStream,
    ChatStreamResponse,
    ReadDeadline,
    SseFraming,
    read_batches,
    relay_events,
)
from nilai.gateway.drain import Drain
from nilai.gateway.middleware import SERVER_SEND
from nilai.upstream.client import ConnectionBroken
from nilai.upstream.sse import DONE, frame

END = b'{"end":true}'


@pytest.fixture
def ctx() -> RequestContext:
    return RequestContext.begin("req-1", Principal("acct", "api_key"), b"{}")


class Echo:
    """A translator that forwards every payload and ends with ``END``; ``bad`` payloads fail."""

    def feed(self, payload: bytes) -> list[bytes]:
        if payload == b"bad":
            raise UpstreamProtocolError("The model server sent a malformed stream chunk.")
        return [payload]

    def finish(self) -> list[bytes]:
        return [END]


async def _reads(*reads: bytes, then: BaseException | None = None) -> AsyncIterator[bytes]:
    """An upstream body: ``reads`` one by one, then ``then`` raised (if given)."""
    for read in reads:
        yield read
    if then is not None:
        raise then


async def _silent_after(*reads: bytes) -> AsyncIterator[bytes]:
    """An upstream body: ``reads``, then nothing more (a model server gone quiet)."""
    for read in reads:
        yield read
    await asyncio.Event().wait()


def _batches(raw: AsyncIterator[bytes], first_s: float = 5, idle_s: float = 5):
    drain = Drain(10)
    return read_batches(raw, ReadDeadline(first_s, idle_s, drain), drain)


async def _collect(
    raw: AsyncIterator[bytes], ctx: RequestContext, **limits: float
) -> tuple[list[bytes | str], list[str]]:
    """Every write the relay makes, with ``"released"`` where the release ran."""
    writes: list[bytes | str] = []

    async def release() -> None:
        writes.append("released")

    async for write in relay_events(_batches(raw, **limits), Echo(), ctx, release=release):
        # One at a time, not extend(): the release must land between the writes it came between.
        writes.append(write)  # noqa: PERF401
    return writes, [w for w in writes if isinstance(w, str)]


def _error(write: bytes | str) -> dict[str, object]:
    assert isinstance(write, bytes)
    last_event = write.removesuffix(frame(DONE)).split(b"\n\n")[-2]
    return json.loads(last_event.removeprefix(b"data: "))["error"]


async def test_one_write_per_upstream_read_and_release_before_the_end(ctx: RequestContext):
    raw = _reads(frame(b"1") + frame(b"2"), frame(b"3"), frame(DONE))
    writes, _ = await _collect(raw, ctx)
    assert writes == [
        frame(b"1") + frame(b"2"),
        frame(b"3"),
        "released",
        frame(END) + frame(DONE),
    ]
    assert ctx.status == 200


async def test_an_upstream_that_ends_without_done_still_gets_the_signed_end(ctx: RequestContext):
    writes, _ = await _collect(_reads(frame(b"1")), ctx)
    assert writes == [frame(b"1"), "released", frame(END) + frame(DONE)]


async def test_a_silent_server_times_out_naming_the_first_token(ctx: RequestContext):
    writes, released = await _collect(_silent_after(), ctx, first_s=0.02, idle_s=5)
    assert released == ["released"]
    assert isinstance(writes[-1], bytes)
    assert writes[-1].endswith(frame(DONE))
    assert "first token within 0.02s" in str(_error(writes[-1])["message"])
    assert ctx.status == 504


async def test_a_server_silent_after_a_token_times_out_naming_the_next_token(
    ctx: RequestContext,
):
    writes, _ = await _collect(_silent_after(frame(b"1")), ctx, first_s=5, idle_s=0.02)
    assert writes[0] == frame(b"1")
    assert "next token within 0.02s" in str(_error(writes[-1])["message"])
    assert ctx.status == 504


async def test_a_connection_broken_mid_stream_ends_in_band_after_the_release(
    ctx: RequestContext,
):
    raw = _reads(frame(b"1"), then=ConnectionBroken("reset"))
    writes, _ = await _collect(raw, ctx)
    assert writes[:2] == [frame(b"1"), "released"]
    error = _error(writes[2])
    assert (error["type"], error["message"]) == (
        "upstream_error",
        "The model server broke the stream.",
    )
    assert (ctx.status, ctx.error_kind) == (502, "UpstreamProtocolError")


async def test_a_bad_payload_ends_the_stream_with_what_came_before_it(ctx: RequestContext):
    raw = _reads(frame(b"1") + frame(b"bad") + frame(b"never"), frame(b"late"))
    writes, _ = await _collect(raw, ctx)
    assert writes[0] == "released"
    final = writes[1]
    assert isinstance(final, bytes)
    assert final.startswith(frame(b"1") + b'data: {"error"')
    assert b"never" not in final
    assert b"late" not in final
    assert final.endswith(frame(DONE))
    assert ctx.status == 502


async def test_a_client_that_leaves_is_recorded_and_sees_nothing_more(ctx: RequestContext):
    released: list[str] = []

    async def release() -> None:
        released.append("released")

    events = relay_events(_batches(_silent_after(frame(b"1"))), Echo(), ctx, release=release)
    assert await anext(events) == frame(b"1")
    await events.aclose()
    # The relay's own release is for the normal end; the ChatStream releases on a close.
    assert released == []
    assert (ctx.status, ctx.error_kind) == (CLIENT_CLOSED, "ClientDisconnected")


async def _trickle(count: int, every_s: float) -> AsyncIterator[bytes]:
    """An upstream body: ``count`` events, one per read, ``every_s`` apart."""
    for n in range(count):
        await asyncio.sleep(every_s)
        yield frame(str(n).encode())


async def test_reads_within_the_idle_limit_never_time_out_however_long_the_stream(
    ctx: RequestContext,
):
    """Each read has its own limit: 30 reads of 10 ms outlast the 50 ms limit many times."""
    writes, _ = await _collect(_trickle(30, 0.01), ctx, first_s=0.05, idle_s=0.05)
    assert writes[-1] == frame(END) + frame(DONE)
    assert ctx.status == 200


async def test_time_spent_writing_to_a_slow_client_is_not_the_model_servers(
    ctx: RequestContext,
):
    """The limit runs while waiting for the model server, not while the client is written to."""
    seen: list[bytes] = []
    async for batch in _batches(_reads(frame(b"1"), frame(b"2")), first_s=0.05, idle_s=0.05):
        seen += batch
        await asyncio.sleep(0.15)  # three idle limits spent by the consumer
    assert seen == [b"1", b"2"]


async def test_a_stream_keeps_its_read_limit_with_one_timer_not_one_per_read(
    ctx: RequestContext, monkeypatch: pytest.MonkeyPatch
):
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_at = loop.call_at

    def counting_call_at(when: float, *args: object, **kwargs: object) -> asyncio.TimerHandle:
        timers.append(when)
        return call_at(when, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "call_at", counting_call_at)
    reads = [frame(str(n).encode()) for n in range(200)]
    writes, _ = await _collect(_reads(*reads, frame(DONE)), ctx, first_s=5, idle_s=5)
    monkeypatch.undo()
    assert len(writes) == 202  # 200 events, the release, the end
    assert len(timers) <= 2  # the first token's limit, then the idle limit


async def test_the_drain_cuts_a_waiting_read_off_as_a_shutdown(ctx: RequestContext):
    drain = Drain(0.04)
    events = relay_events(
        read_batches(_silent_after(frame(b"1")), ReadDeadline(5, 5, drain), drain),
        Echo(),
        ctx,
        release=_nothing,
    )
    assert await anext(events) == frame(b"1")
    drain.begin()  # the cut-off comes 30 ms from now; the read waits for 5 s
    final = await anext(events)
    assert "shutting down" in str(_error(final)["message"])
    assert ctx.status == 503


async def test_a_read_begun_after_the_drains_cut_off_ends_at_once(ctx: RequestContext):
    drain = Drain(0.0)
    drain.begin()
    batches = read_batches(_silent_after(), ReadDeadline(5, 5, drain), drain)
    with pytest.raises(NilaiError, match="shutting down"):
        await anext(batches)


async def _nothing() -> None:
    pass


def test_the_deadline_moves_from_first_token_to_idle() -> None:
    deadline = ReadDeadline(3, 7, Drain(10))
    assert (deadline.waiting_for_first_token, deadline.limit_s) == (True, 3)
    deadline.arrived()
    assert (deadline.waiting_for_first_token, deadline.limit_s) == (False, 7)
    assert "next token within 7s" in deadline.expired().message


async def test_another_api_frames_its_own_events_errors_and_end(ctx: RequestContext):
    """What the Responses API needs: typed events and its own error and end, same relay."""

    def typed(payload: bytes) -> bytes:
        return b"event: delta\n" + frame(payload)

    def failed(error: NilaiError) -> bytes:
        return b"event: error\n" + frame(error.code.encode())

    async def release() -> None:
        pass

    framing = SseFraming(event=typed, error=failed, end=b"event: end\n\n")
    ok = relay_events(_batches(_reads(frame(b"1"))), Echo(), ctx, release=release, framing=framing)
    assert [w async for w in ok] == [typed(b"1"), typed(END) + b"event: end\n\n"]
    broken = _batches(_reads(frame(b"bad")))
    bad = relay_events(broken, Echo(), ctx, release=release, framing=framing)
    assert [w async for w in bad] == [b"event: error\n" + frame(b"bad_gateway") + b"event: end\n\n"]


async def test_a_streams_chunks_go_straight_to_the_server_and_its_start_and_end_through_the_stack():
    async def events() -> AsyncGenerator[bytes]:
        yield b"one"
        yield b"two"

    released: list[str] = []
    resources = AsyncExitStack()
    resources.callback(released.append, "released")
    through_stack: list[tuple[str, bytes]] = []
    to_server: list[tuple[str, bytes]] = []

    def recorder(into: list[tuple[str, bytes]]) -> Send:
        async def send(message: Message) -> None:
            into.append((message["type"], message.get("body", b"")))

        return send

    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError

    scope: Scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    scope[SERVER_SEND] = recorder(to_server)
    response = ChatStreamResponse(ChatStream(events(), resources, {}))
    await response(scope, receive, recorder(through_stack))
    assert through_stack == [("http.response.start", b""), ("http.response.body", b"")]
    assert to_server == [("http.response.body", b"one"), ("http.response.body", b"two")]
    assert released == ["released"]
