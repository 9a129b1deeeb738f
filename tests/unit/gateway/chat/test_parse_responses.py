"""Request bytes to a Responses request: ``input`` is the counted list, limits as for chat."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from nilai.errors import InvalidRequest, PayloadTooLarge, ValidationFailed
from nilai.gateway.chat import parse
from nilai.gateway.chat.parse import (
    INLINE_MEASURE_BYTES,
    BodyLimits,
    body_overflow,
    parse_responses_request,
)

# As the route builds them: the chat limits, ``messages`` named; the parser counts ``input``.
LIMITS = BodyLimits(max_messages=4, max_json_items=64)
ITEM = {"role": "user", "content": "hi"}


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "input": "hi", **fields}).encode()


def _items(count: int, **fields: Any) -> bytes:
    return _body(input=[ITEM] * count, **fields)


def _assert_too_many_items(error: BaseException) -> None:
    assert isinstance(error, ValidationFailed)
    assert (error.status, error.param, error.code) == (422, "input", "invalid_value")
    assert error.message == "input: at most 4 items are accepted in one request."


# --- the input limit --------------------------------------------------------------------------


def test_the_measure_counts_the_input_items():
    limits = replace(LIMITS, list_member="input")
    assert body_overflow(_items(4), limits) is None
    error = body_overflow(_items(5), limits)
    assert error is not None
    _assert_too_many_items(error)


async def test_too_many_input_items_are_422_naming_input():
    with pytest.raises(ValidationFailed) as caught:
        await parse_responses_request(_items(5), LIMITS)
    _assert_too_many_items(caught.value)


async def test_input_items_up_to_the_limit_parse():
    request = await parse_responses_request(_items(4), LIMITS)
    assert isinstance(request.input, list)
    assert len(request.input) == 4


async def test_a_large_body_is_measured_too():
    # Over the inline size: measured in a worker thread, same answer.
    raw = _body(input=[{"role": "user", "content": "x" * 5_000}] * 5)
    assert len(raw) > INLINE_MEASURE_BYTES
    with pytest.raises(ValidationFailed) as caught:
        await parse_responses_request(raw, LIMITS)
    _assert_too_many_items(caught.value)


async def test_too_many_items_the_measure_missed_are_refused_after_parsing(
    monkeypatch: pytest.MonkeyPatch,
):
    # The count after parsing is the limit's last guard (a body the measure could not read).
    def missed(raw: bytes, limits: BodyLimits) -> None:
        return None

    monkeypatch.setattr(parse, "body_overflow", missed)
    with pytest.raises(ValidationFailed) as caught:
        await parse_responses_request(_items(5), LIMITS)
    _assert_too_many_items(caught.value)


async def test_a_messages_member_is_not_what_is_counted():
    # An unknown field to the Responses API, passed through: not the conversation.
    request = await parse_responses_request(_body(messages=[ITEM] * 10), LIMITS)
    assert (request.model_extra or {})["messages"] == [ITEM] * 10


async def test_a_string_input_is_fine_however_many_commas_it_holds():
    text = "a, b, [c], {d}, " * 200
    request = await parse_responses_request(_body(input=text), LIMITS)
    assert request.input == text


# --- the JSON items limit and invalid bodies ----------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"metadata": {str(n): "v" for n in range(70)}},
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}] * 40}]},
        {"tools": [{"type": "function", "name": f"f{n}"} for n in range(40)]},
    ],
    ids=["object", "content-parts", "tools"],
)
async def test_more_json_items_than_the_limit_are_413(fields: dict[str, Any]):
    with pytest.raises(PayloadTooLarge) as caught:
        await parse_responses_request(_body(**fields), LIMITS)
    assert caught.value.status == 413
    assert "more than 64 JSON items" in caught.value.message


@pytest.mark.parametrize("raw", [b'{"model": ', b"not json", b""])
async def test_a_body_that_is_not_json_is_400(raw: bytes):
    with pytest.raises(InvalidRequest) as caught:
        await parse_responses_request(raw, LIMITS)
    assert caught.value.status == 400
    assert caught.value.message == "The request body is not valid JSON."


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"[1, 2]", None),
        (b'{"model": "m"}', "input"),
        (_body(input=""), "input"),
        (_body(input=[]), "input"),
        (_body(input=7), "input"),
        (_body(input=[1]), "input.0"),
        (_body(input=[{"role": "robot", "content": "x"}]), "input.0.role"),
        (_body(temperature=5), "temperature"),
        (_body(max_output_tokens=0), "max_output_tokens"),
        (_body(stream="yes"), "stream"),
        (_body(web_search=1), "web_search"),
        (_body(model=""), "model"),
    ],
    ids=[
        "not-an-object",
        "input-missing",
        "input-empty-string",
        "input-empty-list",
        "input-a-number",
        "input-item-not-an-object",
        "input-role-unknown",
        "temperature-above-2",
        "max-output-tokens-0",
        "stream-a-string",
        "web-search-a-number",
        "model-empty",
    ],
)
async def test_json_that_is_no_valid_request_is_422_naming_the_field(raw: bytes, param: str | None):
    with pytest.raises(ValidationFailed) as caught:
        await parse_responses_request(raw, LIMITS)
    assert (caught.value.status, caught.value.code) == (422, "invalid_value")
    assert caught.value.param == param
