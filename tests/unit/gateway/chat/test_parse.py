"""Request bytes to a chat request: content type, and a body's shape measured before parsing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nilai.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from nilai.gateway.chat.parse import (
    BodyLimits,
    body_overflow,
    check_content_type,
    measure,
    parse_chat_request,
)

LIMITS = BodyLimits(max_messages=4, max_json_items=64)
USER = {"role": "user", "content": "hi"}


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [USER], **fields}).encode()


def _messages(count: int, **fields: Any) -> bytes:
    return _body(messages=[USER] * count, **fields)


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


# --- content type ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, "", "application/json", "application/json; charset=utf-8", "Application/JSON ;x=1"],
)
def test_json_or_missing_content_type_is_accepted(value: str | None):
    check_content_type(value)


@pytest.mark.parametrize(
    "value",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "application/vnd.api+json",
        "*/*",
    ],
)
def test_other_content_types_are_415(value: str):
    with pytest.raises(UnsupportedMediaType) as caught:
        check_content_type(value)
    assert caught.value.status == 415
    assert caught.value.code == "unsupported_media_type"


# --- messages limit -------------------------------------------------------------------------


def test_messages_up_to_the_limit_pass_the_measure():
    assert body_overflow(_messages(4), LIMITS) is None


def test_more_messages_than_the_limit_are_refused_before_parsing():
    error = body_overflow(_messages(5), LIMITS)
    assert isinstance(error, ValidationFailed)
    assert error.status == 422
    assert error.param == "messages"
    assert "at most 4 messages" in error.message


def test_the_messages_count_stops_at_the_limit_on_a_huge_body():
    # Text after the fifth message is never looked at: it is not even JSON.
    raw = _messages(5)[:-2] + b", " + b"garbage " * 1000
    assert measure(raw.decode(), LIMITS) == "messages"


def test_an_escaped_messages_key_is_the_messages_key():
    raw = _messages(5).replace(b'"messages"', b'"messag\\u0065s"')
    assert json.loads(raw)["messages"]
    assert body_overflow(raw, LIMITS) is not None


def test_only_the_top_level_messages_count():
    nested = {"messages": [USER] * 10}
    raw = json.dumps({"model": "m", "messages": [USER], "nilrag": nested}).encode()
    assert measure(raw.decode(), BodyLimits(max_messages=4, max_json_items=1000)) is None
    root_array = json.dumps(["messages", [1] * 10]).encode()
    assert measure(root_array.decode(), BodyLimits(max_messages=4, max_json_items=1000)) is None


def test_commas_and_brackets_inside_strings_do_not_count():
    prose = 'a, b, [c], {d}, "quoted", \\ ' * 500
    raw = _body(messages=[{"role": "user", "content": prose}] * 3)
    assert raw.count(b",") > LIMITS.max_json_items  # the quick bound cannot decide
    assert body_overflow(raw, LIMITS) is None


def test_messages_that_are_not_objects_count_too():
    assert body_overflow(_body(messages=[1, 2, 3, 4, 5]), LIMITS) is not None
    assert body_overflow(_body(messages=[[], [], [], [], []]), LIMITS) is not None
    assert body_overflow(_body(messages=[]), LIMITS) is None


# --- items limit ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": [{"role": "user", "content": [{"type": "text"}] * 40}]},
        {"x": [1] * 70},
        {"logit_bias": {str(n): 1 for n in range(70)}},
        {"x": _nested(70)},
    ],
    ids=["content-parts", "array", "object", "nesting"],
)
def test_more_json_items_than_the_limit_are_413(fields: dict[str, Any]):
    error = body_overflow(_body(**fields), LIMITS)
    assert isinstance(error, PayloadTooLarge)
    assert error.status == 413
    assert "more than 64 JSON items" in error.message


def test_items_up_to_the_limit_pass():
    # 3 root members, 1 message of 2 members, 58 elements of x: 64 items.
    assert body_overflow(_body(x=[1] * 58), LIMITS) is None
    assert body_overflow(_body(x=[1] * 59), LIMITS) is not None


# --- what the measure leaves to the parser ---------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "messages": [' + b"1," * 100,
        b'{"a": "unterminated' + b"," * 100,
        b'{"a": "\\x"' + b"," * 100,
        b"[" * 100,
        b"\xff\xfe" + b"," * 100,
    ],
)
def test_text_that_is_not_json_is_left_to_the_parser(raw: bytes):
    # Either it is refused for its shape or it reaches the parser; it never raises here.
    body_overflow(raw, BodyLimits(max_messages=1000, max_json_items=1000))


async def test_parse_refuses_unreadable_json_with_400():
    with pytest.raises(InvalidRequest) as caught:
        await parse_chat_request(b'{"model": ', LIMITS)
    assert caught.value.status == 400


async def test_parse_returns_the_request_within_the_limits():
    request = await parse_chat_request(_messages(4), LIMITS)
    assert len(request.messages) == 4


async def test_parse_of_a_large_body_is_measured_too():
    # Over the inline size: measured in a worker thread, same answer.
    raw = _body(messages=[{"role": "user", "content": "x" * 40_000}] * 5)
    with pytest.raises(ValidationFailed) as caught:
        await parse_chat_request(raw, LIMITS)
    assert caught.value.param == "messages"
