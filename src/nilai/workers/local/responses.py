"""The Responses API (``POST /v1/responses``) on the local worker: text in, text out.

Requests are turned into the chat messages the engine already understands; answers are shaped
as OpenAI's (and vLLM's) response objects, whole or as typed server-sent events.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from nilai.errors import InternalError, InvalidRequest
from nilai.protocol.base import json_object
from nilai.protocol.chat import IMAGE_PARTS
from nilai.protocol.responses import InputItem, InputMessage, ResponsesRequest
from nilai.upstream.sse import one_line
from nilai.workers.local.engine import Finished, collect

logger = logging.getLogger(__name__)

NOT_SUPPORTED = "not_supported"
# Text parts a message may carry: a client's own text, and earlier answers sent back as history.
TEXT_PARTS = ("input_text", "output_text", "text")


def chat_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages for the engine, instructions first.

    The request is parsed as the gateway parses it (``nilai.protocol.responses``); this worker
    then refuses (400 ``not_supported``) what it cannot serve: tools, stored, chained or
    background responses, structured output, images and items that are not messages.
    """
    _refuse_unsupported(body)
    messages: list[dict[str, Any]] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        return messages
    for index, item in enumerate(body.input):
        messages.append(_message(item, f"input.{index}"))
    return messages


def _refuse_unsupported(body: ResponsesRequest) -> None:
    if body.tools:
        raise InvalidRequest(
            "This worker does not support tools.", param="tools", code=NOT_SUPPORTED
        )
    extra = body.model_extra or {}
    refused = (
        ("previous_response_id", body.previous_response_id is not None),
        ("conversation", extra.get("conversation") is not None),
        ("store", body.store is True),
        ("background", extra.get("background") is True),
    )
    for param, asked in refused:
        if asked:
            raise InvalidRequest(
                f"This worker keeps no responses: {param} is not supported.",
                param=param,
                code=NOT_SUPPORTED,
            )
    text_format = json_object((json_object(extra.get("text")) or {}).get("format")) or {}
    if text_format.get("type", "text") != "text":
        raise InvalidRequest(
            "This worker answers in plain text only.", param="text.format", code=NOT_SUPPORTED
        )


def _message(item: InputMessage | InputItem, param: str) -> dict[str, Any]:
    if not isinstance(item, InputMessage):
        raise InvalidRequest(
            f"This worker accepts message items only, not {item.type!r}.",
            param=f"{param}.type",
            code=NOT_SUPPORTED,
        )
    if isinstance(item.content, str):
        return {"role": item.role, "content": item.content}
    texts: list[str] = []
    for part in item.content:
        text = (part.model_extra or {}).get("text")
        if part.type in IMAGE_PARTS or part.type not in TEXT_PARTS or not isinstance(text, str):
            raise InvalidRequest(
                "This worker accepts text input only.", param=f"{param}.content", code=NOT_SUPPORTED
            )
        texts.append(text)
    # The engine's chat templates expect plain strings; text parts are read as one text.
    return {"role": item.role, "content": "".join(texts)}


def event(kind: str, payload: dict[str, Any]) -> bytes:
    """Frame one typed SSE event; the data names its type, so the event cannot be renamed."""
    data = one_line(orjson.dumps({"type": kind, **payload}))
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


class ResponseShaper:
    """Shapes engine output as OpenAI response objects and Responses stream events."""

    def __init__(self, model: str, body: ResponsesRequest, input_tokens: int) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.body = body
        self.input_tokens = input_tokens
        self.sequence = 0

    def _usage(self, finished: Finished) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            # Nothing is cached here; cache_write_tokens is required by OpenAI's current schema.
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": finished.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + finished.completion_tokens,
        }

    def _message(self, text: str, status: str) -> dict[str, Any]:
        return {
            "id": self.item_id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }

    def _response(
        self, status: str, output: list[dict[str, Any]], finished: Finished | None = None
    ) -> dict[str, Any]:
        incomplete = finished is not None and finished.finish_reason == "length"
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": "incomplete" if incomplete else status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": (body.model_extra or {}).get("metadata") or {},
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": "disabled",
            "usage": None if finished is None else self._usage(finished),
            "user": (body.model_extra or {}).get("user"),
        }

    def _final(self, text: str, finished: Finished) -> dict[str, Any]:
        status = "incomplete" if finished.finish_reason == "length" else "completed"
        return self._response("completed", [self._message(text, status)], finished)

    async def whole(self, output: AsyncIterator[str | Finished]) -> bytes:
        """Collect the whole answer into one response object."""
        text, finished = await collect(output)
        return orjson.dumps(self._final(text, finished))

    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        framed = event(kind, {**payload, "sequence_number": self.sequence})
        self.sequence += 1
        return framed

    def _part_event(self, kind: str, **payload: Any) -> bytes:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return self._event(kind, {**where, **payload})

    async def stream(self, output: AsyncGenerator[str | Finished]) -> AsyncIterator[bytes]:
        """Stream the answer as typed events, from response.created to response.completed."""
        yield self._event("response.created", {"response": self._response("in_progress", [])})
        yield self._event("response.in_progress", {"response": self._response("in_progress", [])})
        item: dict[str, Any] = self._message("", "in_progress") | {"content": []}
        yield self._event("response.output_item.added", {"output_index": 0, "item": item})
        part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": []}
        yield self._part_event("response.content_part.added", part=part)
        pieces: list[str] = []
        finished = Finished("stop", 0)
        try:
            async with contextlib.aclosing(output):
                async for piece in output:
                    if isinstance(piece, Finished):
                        finished = piece
                        continue
                    pieces.append(piece)
                    yield self._part_event("response.output_text.delta", delta=piece, logprobs=[])
        except Exception:
            logger.exception("generation failed mid-stream")
            error = InternalError("The model failed while generating.")
            yield self._event(
                "error", {"code": error.code, "message": error.message, "param": None}
            )
            return
        text = "".join(pieces)
        yield self._part_event("response.output_text.done", text=text, logprobs=[])
        yield self._part_event("response.content_part.done", part=part | {"text": text})
        final = self._final(text, finished)
        done = {"output_index": 0, "item": final["output"][0]}
        yield self._event("response.output_item.done", done)
        yield self._event("response.completed", {"response": final})
