"""From request bytes to a typed request (chat, Responses), at a cost the settings bound.

Parsing is the one step whose cost the client chooses: pydantic spends about a microsecond per
JSON item, holding the GIL (and so the event loop) throughout, and 10 MB of tiny messages is
320,000 of them. Before a body is parsed, its shape is measured without building anything:
the items it holds (array elements plus object members, at any depth) and the elements of its
top-level ``messages`` (``input`` for the Responses API). The count stops at the first limit
passed, so refusing a body costs no more than the limits allow, however big it is. Bodies large
enough for that count to matter are measured in a worker thread (one at a time): the count is
Python code, which yields the GIL every few milliseconds, so the loop keeps serving. The parse
itself stays on the loop, since pydantic would hold the GIL in any thread; what it costs is
bounded by the item limit.
"""

from __future__ import annotations

import asyncio
import json.decoder
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import cast

from pydantic import BaseModel, ValidationError

from nilai.errors import (
    NilaiError,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from nilai.http_errors import validation_error
from nilai.protocol.chat import ChatCompletionRequest
from nilai.protocol.responses import ResponsesRequest

JSON_MEDIA_TYPE = "application/json"

# Smaller bodies are measured on the loop: at worst a few milliseconds, less than a thread hop
# is worth.
INLINE_MEASURE_BYTES = 16 * 1024

_COUNT_SLICE_BYTES = 256 * 1024
# One thread measures at a time, in each process: every thread that wants the GIL makes the
# loop wait its turn for it, so several big bodies at once would stall the loop for longer
# than one; queued behind each other, they cost only themselves. (No asyncio state: it serves
# any event loop of the process; idle, it holds no thread.)
_MEASURER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nilai-body-measure")
# A short string without escapes is taken whole by the search itself; any other string is
# read by the json module's scanner from its opening quote.
_TOKEN = re.compile(r'"[^"\\\n]{0,128}"|["\[\]{},:]')
_NOT_WHITESPACE = re.compile(r"[^ \t\n\r]")
# The json module's C string scanner: from just after an opening quote, the unescaped string and
# the position after its closing quote; one call however long the string.
_scanstring = cast(
    Callable[[str, int], tuple[str, int]],
    json.decoder.scanstring,  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]
)


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """What one request body may hold."""

    max_messages: int
    """Elements of the top-level ``list_member`` array."""
    max_json_items: int
    list_member: str = "messages"
    """The member holding the conversation: ``messages`` (chat), ``input`` (Responses)."""


def check_content_type(value: str | None) -> None:
    """Refuse a body declared as anything but JSON (415); ``charset`` and the like are fine.

    A request without the header is read as JSON: that is the only format this endpoint has,
    and every client that sends JSON without saying so (``requests`` with ``data=``, many
    scripts) keeps working. A browser cannot send a credentialed request across origins without
    a CORS preflight, so the header guards nothing here.
    """
    if value is None or not value.strip():
        return
    media_type = value.split(";", 1)[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        raise UnsupportedMediaType(
            "The request body must be JSON, sent with 'Content-Type: application/json'."
        )


async def parse_chat_request(raw: bytes, limits: BodyLimits) -> ChatCompletionRequest:
    """Check the body's shape against ``limits``, then parse it; raise a 4xx ``NilaiError``."""
    limits = replace(limits, list_member="messages")
    request = await parse_request(raw, limits, ChatCompletionRequest)
    if len(request.messages) > limits.max_messages:
        # Only a body the measure could not read as JSON gets here with too many messages.
        raise _too_many_messages(limits)
    return request


async def parse_responses_request(raw: bytes, limits: BodyLimits) -> ResponsesRequest:
    """As ``parse_chat_request``, for a Responses API body: ``input`` holds the conversation."""
    limits = replace(limits, list_member="input")
    request = await parse_request(raw, limits, ResponsesRequest)
    if isinstance(request.input, list) and len(request.input) > limits.max_messages:
        raise _too_many_messages(limits)
    return request


async def parse_request[R: BaseModel](raw: bytes, limits: BodyLimits, model: type[R]) -> R:
    """Check the body's shape against ``limits``, then parse it as ``model``.

    Raises:
        NilaiError: A 4xx: too big (413), too many conversation items or invalid (422).
    """
    if len(raw) <= INLINE_MEASURE_BYTES:
        overflow = body_overflow(raw, limits)
    else:
        loop = asyncio.get_running_loop()
        overflow = await loop.run_in_executor(_MEASURER, body_overflow, raw, limits)
    if overflow is not None:
        raise overflow
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False, include_input=False)) from None


def body_overflow(raw: bytes, limits: BodyLimits) -> NilaiError | None:
    """The error for a body that holds more than ``limits`` allow, or ``None``.

    Stops counting at the first limit passed. A body the count cannot read as JSON gives
    ``None``: the parser reports it.
    """
    if not _may_pass(raw, min(limits.max_messages, limits.max_json_items)):
        return None
    passed = measure(raw.decode("utf-8", "surrogateescape"), limits)
    if passed == "messages":
        return _too_many_messages(limits)
    if passed == "items":
        return PayloadTooLarge(
            f"The request body holds more than {limits.max_json_items} JSON items (array "
            "elements and object members); send a smaller request."
        )
    return None


def _may_pass(raw: bytes, limit: int) -> bool:
    """Whether ``raw`` has enough commas and opening brackets to hold more than ``limit`` items.

    Every item but the first of its container follows a comma, and each container opens with a
    bracket, so these bytes (inside strings or not) bound the items. Counted a slice at a time,
    to stop as soon as the bound passes and to let other threads run in between.
    """
    bound = 0
    for start in range(0, len(raw), _COUNT_SLICE_BYTES):
        end = start + _COUNT_SLICE_BYTES
        bound += raw.count(b",", start, end) + raw.count(b"[", start, end)
        bound += raw.count(b"{", start, end)
        if bound > limit:
            return True
    return False


def measure(text: str, limits: BodyLimits) -> str | None:  # noqa: PLR0912 - one tight loop
    """Which limit the JSON document ``text`` passes, ``"messages"`` or ``"items"``, or ``None``.

    ``"messages"`` is the limit on the elements of the top-level ``limits.list_member`` array.

    Walks the structure token by token without building it: strings are skipped whole, so
    commas or brackets inside them count for nothing, and a key is compared once unescaped.
    Returns ``None`` also when the text is not JSON.
    """
    # One loop with local variables: this runs once per token of a hostile body.
    max_messages, max_items = limits.max_messages, limits.max_json_items
    list_member = limits.list_member
    search = _TOKEN.search
    scan = _scanstring
    depth = items = 0
    messages = -1  # elements of the top-level "messages" array while inside it
    root_is_object = False
    last_string: str | None = None  # at the top: a member's key once a colon follows it
    member: str | None = None  # the key of the top-level member being read
    position = 0
    try:
        while (match := search(text, position)) is not None:
            token = match.group()
            position = match.end()
            char = token[0]
            if char == '"':
                if len(token) == 1:  # long or escaped: the scanner reads it to its end
                    value, position = scan(text, position)
                    if depth == _TOP:
                        last_string = value
                elif depth == _TOP:
                    last_string = token[1:-1]
            elif char == ",":
                items += 1
                if depth == _TOP:
                    member = None
                elif depth == _MEMBER and messages >= 0:
                    messages += 1
                    if messages > max_messages:
                        return "messages"
                if items > max_items:
                    return "items"
            elif char == ":":
                if depth == _TOP:
                    member = last_string
            elif char in "[{":
                depth += 1
                if _next_char(text, position) not in "]}":
                    items += 1
                    if items > max_items:
                        return "items"
                if depth == _TOP:
                    root_is_object = char == "{"
                elif depth == _MEMBER and char == "[" and root_is_object and member == list_member:
                    messages = 0 if _next_char(text, position) == "]" else 1
            else:  # a closing bracket
                if depth == _MEMBER:
                    messages = -1
                depth -= 1
    except (ValueError, IndexError):  # a broken string, or the text ends inside a container
        return None
    return None


_TOP = 1  # depth inside the root object
_MEMBER = 2  # depth inside a container that is the value of a root member


def _next_char(text: str, position: int) -> str:
    """The first character from ``position`` on that is not JSON whitespace."""
    match = _NOT_WHITESPACE.search(text, position)
    if match is None:
        raise IndexError(position)
    return match.group()


def _too_many_messages(limits: BodyLimits) -> ValidationFailed:
    member = limits.list_member
    what = "messages" if member == "messages" else "items"
    return ValidationFailed(
        f"{member}: at most {limits.max_messages} {what} are accepted in one request.",
        param=member,
        code="invalid_value",
    )
