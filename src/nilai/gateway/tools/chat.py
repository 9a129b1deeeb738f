"""Tool rounds in chat completions: calls in ``message.tool_calls``, results as ``tool`` messages.

Also turns a whole chat completion into the stream a client asked for
(``completion_as_stream``), for an answer that came from a round's (non-streamed) call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from nilai.crypto.domains import CHAT_COMPLETION_CHUNK_OBJECT
from nilai.protocol.base import json_count, json_list, json_object
from nilai.tools.server import ToolCall, ToolResult
from nilai.upstream.sse import DONE, frame


class ChatToolDialect:
    """Chat completions' tool calls, for the server tools the client declared."""

    def __init__(self, declared: frozenset[str]) -> None:
        self._declared = declared

    def server_calls(self, answer: dict[str, Any]) -> list[ToolCall] | None:
        """The calls of the answer's one message, if all are of declared server tools."""
        message = _only_message(answer)
        listed = json_list(message.get("tool_calls")) if message is not None else None
        if not listed:
            return None
        calls: list[ToolCall] = []
        for item in listed:
            call = json_object(item)
            function = json_object(call.get("function")) if call is not None else None
            if call is None or function is None:
                return None
            call_id, name = call.get("id"), function.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                return None
            if name not in self._declared:
                return None  # the client's own tool: the whole answer goes to the client
            arguments = function.get("arguments")
            text = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
            calls.append(ToolCall(call_id, name, text))
        return calls

    def round_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload``, not streamed."""
        data = {key: value for key, value in payload.items() if key != "stream_options"}
        data["stream"] = False
        return data

    def next_payload(
        self,
        payload: dict[str, Any],
        answer: dict[str, Any],
        results: list[ToolResult],
        *,
        last: bool,
    ) -> dict[str, Any]:
        """``payload`` with the assistant's calls and a ``tool`` message per result."""
        data = dict(payload)
        data["messages"] = [
            *payload["messages"],
            _assistant(answer),
            *({"role": "tool", "tool_call_id": r.call_id, "content": r.output} for r in results),
        ]
        if last:
            data["tool_choice"] = "none"
        return data

    def round_record(self, answer: dict[str, Any], results: list[ToolResult]) -> dict[str, Any]:
        """The round as the client sees it: the assistant's calls, then each result."""
        return {
            "message": _assistant(answer),
            "results": [
                {"tool_call_id": r.call_id, "name": r.name, "content": r.output} for r in results
            ],
        }

    def usage(self, answer: dict[str, Any]) -> tuple[int, int]:
        """The answer's prompt and completion tokens."""
        usage = json_object(answer.get("usage")) or {}
        return json_count(usage.get("prompt_tokens")), json_count(usage.get("completion_tokens"))


def _only_message(answer: dict[str, Any]) -> dict[str, object] | None:
    """The message of an answer with exactly one choice (rounds are not run for ``n`` > 1)."""
    choices = json_list(answer.get("choices"))
    if choices is None or len(choices) != 1:
        return None
    choice = json_object(choices[0])
    return json_object(choice.get("message")) if choice is not None else None


def _assistant(answer: dict[str, Any]) -> dict[str, object]:
    """The answer's assistant message as it goes back to the model: its text and its calls."""
    message = _only_message(answer) or {}
    return {
        "role": "assistant",
        "content": message.get("content"),
        "tool_calls": message.get("tool_calls"),
    }


async def completion_as_stream(answer: dict[str, Any]) -> AsyncIterator[bytes]:
    """A whole chat completion as the SSE body of its stream, as a model server sends it.

    Per choice, one chunk with the whole message and one with its ``finish_reason``; then the
    usage chunk (no choices) and ``[DONE]``. The relay treats it as any model server's stream:
    the client gets what it asked for (usage only with ``include_usage``), the last chunk
    signed.
    """
    identity = {
        "id": answer.get("id"),
        "object": CHAT_COMPLETION_CHUNK_OBJECT,
        "created": answer.get("created"),
        "model": answer.get("model"),
    }
    chunks: list[dict[str, Any]] = []
    for index, item in enumerate(json_list(answer.get("choices")) or []):
        choice = json_object(item) or {}
        message = json_object(choice.get("message")) or {}
        delta: dict[str, object] = {"role": "assistant", "content": message.get("content")}
        if (calls := json_list(message.get("tool_calls"))) is not None:
            delta["tool_calls"] = [
                {"index": position, **(json_object(call) or {})}
                for position, call in enumerate(calls)
            ]
        at = choice.get("index", index)
        chunks.append(
            {**identity, "choices": [{"index": at, "delta": delta, "finish_reason": None}]}
        )
        reason = choice.get("finish_reason") or "stop"
        finish: dict[str, object] = {"index": at, "delta": {}, "finish_reason": reason}
        chunks.append({**identity, "choices": [finish]})
    if (usage := json_object(answer.get("usage"))) is not None:
        chunks.append({**identity, "choices": [], "usage": usage})
    yield b"".join(frame(orjson.dumps(chunk)) for chunk in chunks) + frame(DONE)
