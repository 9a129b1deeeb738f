"""Tool rounds in the Responses API: calls as ``function_call`` items, results as input items.

A round's results go back as ``function_call_output`` items after the answer's own output.

Also turns a whole response object into the stream of typed events a client asked for
(``response_as_stream``), for an answer that came from a round's (non-streamed) call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from nilai.crypto.domains import RESPONSE_COMPLETED
from nilai.protocol.base import json_count, json_list, json_object
from nilai.tools.server import ToolCall, ToolResult
from nilai.upstream.sse import one_line

FUNCTION_CALL = "function_call"


class ResponsesToolDialect:
    """The Responses API's function calls, for the server tools the client declared."""

    def __init__(self, declared: frozenset[str]) -> None:
        self._declared = declared

    def server_calls(self, answer: dict[str, Any]) -> list[ToolCall] | None:
        """The answer's function calls, if there are any and all are of declared server tools."""
        calls: list[ToolCall] = []
        for item in _function_calls(answer):
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
            if not isinstance(call_id, str) or not isinstance(name, str):
                return None
            if name not in self._declared:
                return None  # the client's own tool: the whole answer goes to the client
            text = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
            calls.append(ToolCall(call_id, name, text))
        return calls or None

    def round_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload``, not streamed."""
        return {**payload, "stream": False}

    def next_payload(
        self,
        payload: dict[str, Any],
        answer: dict[str, Any],
        results: list[ToolResult],
        *,
        last: bool,
    ) -> dict[str, Any]:
        """``payload`` with the answer's output items and a ``function_call_output`` each."""
        given = payload["input"]
        earlier = [{"role": "user", "content": given}] if isinstance(given, str) else list(given)
        outputs = [
            {"type": "function_call_output", "call_id": r.call_id, "output": r.output}
            for r in results
        ]
        data = {**payload, "input": [*earlier, *(json_list(answer.get("output")) or []), *outputs]}
        if last:
            data["tool_choice"] = "none"
        return data

    def round_record(self, answer: dict[str, Any], results: list[ToolResult]) -> dict[str, Any]:
        """The round as the client sees it: the function calls, then each result."""
        return {
            "output": _function_calls(answer),
            "results": [
                {"call_id": r.call_id, "name": r.name, "output": r.output} for r in results
            ],
        }

    def usage(self, answer: dict[str, Any]) -> tuple[int, int]:
        """The answer's input and output tokens."""
        usage = json_object(answer.get("usage")) or {}
        return json_count(usage.get("input_tokens")), json_count(usage.get("output_tokens"))


def _function_calls(answer: dict[str, Any]) -> list[dict[str, object]]:
    items = (json_object(item) for item in json_list(answer.get("output")) or [])
    return [item for item in items if item is not None and item.get("type") == FUNCTION_CALL]


async def response_as_stream(answer: dict[str, Any]) -> AsyncIterator[bytes]:
    """A whole response object as the SSE body of its stream, as a model server sends it.

    ``response.created`` and ``response.in_progress`` (the object without output), each
    output item added, its content (a message's text as one delta, a call's arguments as one
    delta) and done, then ``response.completed`` with the whole object.
    """
    events = _Events()
    pending: dict[str, object] = {**answer, "status": "in_progress", "output": [], "usage": None}
    events.add("response.created", response=pending)
    events.add("response.in_progress", response=pending)
    for index, item in enumerate(json_list(answer.get("output")) or []):
        events.item(index, json_object(item) or {})
    events.add(RESPONSE_COMPLETED, response=answer)
    yield events.body()


class _Events:
    def __init__(self) -> None:
        self._events: list[bytes] = []

    def add(self, kind: str, **fields: object) -> None:
        data = one_line(
            orjson.dumps({"type": kind, **fields, "sequence_number": len(self._events)})
        )
        self._events.append(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")

    def item(self, index: int, item: dict[str, object]) -> None:
        item_id = item.get("id")
        if item.get("type") == "message":
            self.add("response.output_item.added", output_index=index, item={**item, "content": []})
            for part_index, part in enumerate(json_list(item.get("content")) or []):
                self._part(index, part_index, item_id, json_object(part) or {})
        elif item.get("type") == FUNCTION_CALL:
            self.add(
                "response.output_item.added", output_index=index, item={**item, "arguments": ""}
            )
            where = {"item_id": item_id, "output_index": index}
            arguments = item.get("arguments")
            self.add("response.function_call_arguments.delta", **where, delta=arguments)
            self.add("response.function_call_arguments.done", **where, arguments=arguments)
        else:
            self.add("response.output_item.added", output_index=index, item=item)
        self.add("response.output_item.done", output_index=index, item=item)

    def _part(self, index: int, part_index: int, item_id: object, part: dict[str, object]) -> None:
        where = {"item_id": item_id, "output_index": index, "content_index": part_index}
        text = part.get("text")
        self.add("response.content_part.added", **where, part={**part, "text": ""})
        if part.get("type") == "output_text" and isinstance(text, str):
            self.add("response.output_text.delta", **where, delta=text, logprobs=[])
            self.add("response.output_text.done", **where, text=text, logprobs=[])
        self.add("response.content_part.done", **where, part=part)

    def body(self) -> bytes:
        return b"".join(self._events)
