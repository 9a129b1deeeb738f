from collections.abc import AsyncIterator, Iterable

import pytest

from nilai.upstream.sse import DONE, frame, iter_payload_batches, iter_payloads


async def _chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _bytewise(raw: bytes) -> list[bytes]:
    return [raw[i : i + 1] for i in range(len(raw))]


async def _collect(parts: Iterable[bytes]) -> list[bytes]:
    return [payload async for payload in iter_payloads(_chunks(parts))]


STREAM = b'data: {"a":1}\n\ndata: {"b":"x y"}\n\ndata: [DONE]\n\n'
EXPECTED = [b'{"a":1}', b'{"b":"x y"}', DONE]


async def test_whole_stream_in_one_chunk():
    assert await _collect([STREAM]) == EXPECTED


async def test_fed_byte_by_byte():
    assert await _collect(_bytewise(STREAM)) == EXPECTED


@pytest.mark.parametrize("size", [2, 3, 5, 7, 11, 16])
async def test_arbitrary_chunk_boundaries(size: int):
    parts = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert await _collect(parts) == EXPECTED


async def test_crlf_line_endings():
    raw = STREAM.replace(b"\n", b"\r\n")
    assert await _collect([raw]) == EXPECTED
    assert await _collect(_bytewise(raw)) == EXPECTED


async def test_comment_and_other_field_lines_are_skipped():
    raw = b': keep-alive\n\n: another comment\nevent: message\nid: 7\nretry: 100\ndata: {"c":3}\n\n'
    assert await _collect(_bytewise(raw)) == [b'{"c":3}']


async def test_multi_line_data_is_joined_with_newline():
    raw = b"data: first\ndata: second\ndata:third\n\ndata: next\n\n"
    assert await _collect(_bytewise(raw)) == [b"first\nsecond\nthird", b"next"]


async def test_final_event_without_trailing_blank_line():
    assert await _collect([b"data: one\n\ndata: two"]) == [b"one", b"two"]
    assert await _collect(_bytewise(b"data: one\n\ndata: two\n")) == [b"one", b"two"]
    assert await _collect([b"data: one\r\n\r\ndata: two\r"]) == [b"one", b"two"]


async def test_final_multi_line_event_without_blank_line():
    assert await _collect([b"data: a\ndata: b"]) == [b"a\nb"]


async def test_only_one_leading_space_is_removed():
    assert await _collect([b"data:  two spaces\n\ndata:none\n\n"]) == [b" two spaces", b"none"]


async def test_done_passes_through_as_payload():
    payloads = await _collect([b"data: [DONE]\n\n"])
    assert payloads == [b"[DONE]"]
    assert payloads[0] == DONE


async def test_blank_lines_without_data_yield_nothing():
    assert await _collect([b"\n\n\r\n: only a comment\n\n"]) == []
    assert await _collect([]) == []


async def test_trailing_partial_non_data_line_is_ignored():
    assert await _collect([b"data: x\n\n: trailing comment"]) == [b"x"]


def test_frame():
    assert frame(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert frame(DONE) == b"data: [DONE]\n\n"


async def test_frame_round_trips_through_iter_payloads():
    payloads = [b'{"a":1}', b"[1,2]", DONE]
    raw = b"".join(frame(p) for p in payloads)
    assert await _collect(_bytewise(raw)) == payloads


async def test_batches_hold_the_events_each_read_completes():
    reads = [STREAM[:20], STREAM[20:], b'data: {"tail":1}']
    batches = [batch async for batch in iter_payload_batches(_chunks(reads))]
    # The first read completes one event, the second the other two, the unterminated tail last.
    assert batches == [[b'{"a":1}'], [b'{"b":"x y"}', DONE], [b'{"tail":1}']]
    assert [batch async for batch in iter_payload_batches(_chunks([b": comment\n\n"]))] == []
