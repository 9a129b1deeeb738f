"""Relaying a Responses API stream: typed events in, typed events out, the last one signed.

The model server's events (``event: <type>`` + ``data: {...}``) are read as payloads by the
shared reader (``nilai.gateway.chat.stream.read_batches``) and relayed by the shared
``relay_events`` with the translator and framing here:

* ``ResponseEventForwarder`` checks each payload (a JSON object whose ``type`` is a
  ``response.*`` event), drops the fields only the gateway may set, forwards it, and holds
  ``response.completed`` back: it must be the last event, and it carries the signature
  (``ResponseStreamSigner``). Usage comes from its ``response.usage``.
* ``RESPONSES_FRAMING`` writes each payload as ``event: <its type>`` + ``data: <payload>``,
  ends a failed stream with OpenAI's ``error`` event (unsigned) and sends no ``[DONE]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from nilai.crypto.domains import RESPONSE_COMPLETED
from nilai.errors import NilaiError, UpstreamProtocolError
from nilai.gateway.chat.signing import drop_gateway_fields
from nilai.gateway.chat.stream import SseFraming, StreamRecord
from nilai.gateway.responses.signing import ResponseStreamSigner
from nilai.protocol.base import json_object
from nilai.upstream.sse import one_line

_TYPE_FIRST = b'{"type":"'
"""How every payload the forwarder sends begins, so the framing reads its type in place."""
EVENT_TYPE = re.compile(r"response\.[a-z0-9_.]{1,100}")
"""The event types relayed: the Responses API's own (all ``response.*``), in plain characters
(the type is written as the event's name, on a line of its own)."""
_OUTPUT_TEXT_DELTA = "response.output_text.delta"
_ENDED_BADLY = {
    "response.failed": "The model server reported that the response failed.",
    "response.incomplete": (
        "The model server ended the response as incomplete (response.incomplete); a signed "
        f"stream ends with {RESPONSE_COMPLETED}."
    ),
}


class ResponseEventForwarder:
    """Checks, forwards and signs a Responses API stream's events, one payload at a time.

    ``hide_context`` is applied to the response object of every lifecycle event (created,
    in progress, completed): it takes out what the gateway added to the request, which model
    servers echo (``ValidatedResponses.hide_context``).
    """

    def __init__(
        self,
        signer: ResponseStreamSigner,
        record: StreamRecord,
        *,
        hide_context: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        self._signer = signer
        self._record = record
        self._hide_context = hide_context
        self._completed: dict[str, Any] | None = None

    def feed(self, payload: bytes) -> list[bytes]:
        """Take one upstream payload; return the payloads to send now.

        Raises:
            UpstreamProtocolError: The event is malformed, not a Responses API event, an
                error or a failure, or it follows ``response.completed``.
        """
        if self._completed is not None:
            raise UpstreamProtocolError(
                f"The model server sent an event after {RESPONSE_COMPLETED}."
            )
        event = _parse_event(payload)
        kind: str = event["type"]
        # Fields only the gateway may set never pass from a model server, at the top or in the
        # response object the lifecycle events carry.
        drop_gateway_fields(event)
        if (response := json_object(event.get("response"))) is not None:
            drop_gateway_fields(response)
            if self._hide_context is not None:
                self._hide_context(response)
        if kind == RESPONSE_COMPLETED:
            usage = response.get("usage") if response is not None else None
            self._record.add_earlier_calls(usage)
            self._record.record_usage(usage)
            self._completed = {"type": kind, **event}  # signed last, type first
            return []
        if kind.endswith(".delta"):
            self._record.mark_first_token()
            if kind == _OUTPUT_TEXT_DELTA:
                self._record.count_chunk()
        # Always re-encoded, compactly with the type first (what the framing reads), on one
        # line: the bytes sent are then exactly the event checked here, whatever the model
        # server wrote (a repeated key, which parsers resolve differently, included).
        return [self._signer.sent(one_line(orjson.dumps({"type": kind, **event})))]

    def finish(self) -> list[bytes]:
        """The upstream ended: send ``response.completed``, signed over every earlier event.

        Raises:
            UpstreamProtocolError: The stream ended without ``response.completed``.
        """
        if self._completed is None:
            raise UpstreamProtocolError(
                f"The model server ended the stream without {RESPONSE_COMPLETED}."
            )
        completed, self._completed = self._completed, None
        return [self._signer.last(completed)]


def _parse_event(payload: bytes) -> dict[str, Any]:
    try:
        event = json_object(orjson.loads(payload))
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError("The model server sent a malformed stream event.") from exc
    if event is None:
        raise UpstreamProtocolError("The model server sent an unexpected stream event.")
    kind = event.get("type")
    if kind == "error" or ("error" in event and kind is None):
        raise UpstreamProtocolError("The model server reported an error mid-stream.")
    if isinstance(kind, str) and kind in _ENDED_BADLY:
        raise UpstreamProtocolError(_ENDED_BADLY[kind])
    if not isinstance(kind, str) or not EVENT_TYPE.fullmatch(kind):
        raise UpstreamProtocolError("The model server sent an event of no Responses API type.")
    return event


def typed_event(payload: bytes) -> bytes:
    """Frame a payload the forwarder sent (it begins with its ``type``) as a typed SSE event."""
    end = payload.index(b'"', len(_TYPE_FIRST))
    return b"event: " + payload[len(_TYPE_FIRST) : end] + b"\ndata: " + payload + b"\n\n"


def error_event(error: NilaiError) -> bytes:
    """OpenAI's ``error`` event, which ends a Responses stream that cannot be completed."""
    data = orjson.dumps(
        {"type": "error", "code": error.code, "message": error.message, "param": None}
    )
    return b"event: error\ndata: " + data + b"\n\n"


RESPONSES_FRAMING = SseFraming(event=typed_event, error=error_event, end=b"")
"""Typed events (``event:`` names the data's type), OpenAI's ``error`` event, no ``[DONE]``."""
