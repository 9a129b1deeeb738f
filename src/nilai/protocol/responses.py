"""Responses API requests as clients send them (OpenAI shape plus nilai's extras).

``POST /v1/responses`` is relayed to model servers that serve it themselves (vLLM does). The
gateway checks only what it relies on (the model id, bounds, the shape of ``input``) and keeps
no conversation state: ``previous_response_id``, ``conversation``, ``store: true`` and
``background: true`` are refused, and the model server is told ``store: false``. Every other
field, known here or not, is passed to the model server as the client sent it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

import orjson
from pydantic import Discriminator, Field, StrictBool, Tag

from nilai.errors import InvalidRequest, ValidationFailed
from nilai.protocol.base import OpenAIBaseModel
from nilai.protocol.chat import IMAGE_PARTS, ChatMessage, ContentPart, ModelId

InputRole = Literal["user", "assistant", "system", "developer"]

NILAI_ONLY_FIELDS = frozenset({"web_search", "nilrag"})
"""Fields nilai reads itself and never sends to the model server (``nilrag`` holds the client's
node tokens: it is refused here, and never relayed)."""

MESSAGE_TYPE = "message"
"""The ``type`` of a message item (which may also be written without a type, with a role)."""
TEXT_PARTS = ("input_text", "output_text", "text")
"""Content parts that hold text: a client's own, and earlier answers sent back as history."""

# Discriminator tags. Pydantic puts them in error locations; written in angle brackets, they
# are left out of the ``param`` clients see (``input.0.role``; ``nilai.http_errors``).
_TEXT = "<text>"
_ITEMS = "<items>"
_MESSAGE = "<message>"
_OTHER = "<item>"


class InputMessage(OpenAIBaseModel):
    """A message item of ``input``; other fields (``id``, ``status``) pass through."""

    type: Literal["message"] = MESSAGE_TYPE
    role: InputRole
    content: str | list[ContentPart]

    def text(self) -> str:
        """The message's text: its string content, or its text parts joined (images left out)."""
        if isinstance(self.content, str):
            return self.content
        texts = [
            text
            for part in self.content
            if part.type in TEXT_PARTS
            and isinstance(text := (part.model_extra or {}).get("text"), str)
        ]
        return "\n".join(texts)

    def has_image(self) -> bool:
        """Whether the content carries an image part."""
        if isinstance(self.content, str):
            return False
        return any(part.type in IMAGE_PARTS for part in self.content)


class InputItem(OpenAIBaseModel):
    """Any other item of ``input`` (``function_call_output``, ``reasoning``, ...), by type."""

    type: str


def _item_kind(value: object) -> str | None:
    """Which model validates an ``input`` item: messages carry a role or say so in ``type``."""
    if isinstance(value, dict):
        item = cast(dict[str, object], value)
        if "role" in item or item.get("type") == MESSAGE_TYPE:
            return _MESSAGE
        return _OTHER
    if isinstance(value, InputMessage):
        return _MESSAGE
    if isinstance(value, InputItem):
        return _OTHER
    # Not an object: no tag, so pydantic reports the item itself as invalid.
    return None


ResponseInputItem = Annotated[
    Annotated[InputMessage, Tag(_MESSAGE)] | Annotated[InputItem, Tag(_OTHER)],
    Discriminator(
        _item_kind,
        custom_error_type="invalid_input_item",
        custom_error_message="Each input item must be an object with a role or a type.",
    ),
]


def _input_kind(value: object) -> str | None:
    """Whether ``input`` is text or a list of items; anything else matches neither."""
    if isinstance(value, str):
        return _TEXT
    if isinstance(value, list):
        return _ITEMS
    return None


# Discriminated, so that a bad input reports one error under a readable path
# (``input.0.role``) instead of one error per member of the union.
ResponseInput = Annotated[
    Annotated[str, Field(min_length=1), Tag(_TEXT)]
    | Annotated[list[ResponseInputItem], Field(min_length=1), Tag(_ITEMS)],
    Discriminator(
        _input_kind,
        custom_error_type="invalid_input",
        custom_error_message="input must be a string or a list of input items.",
    ),
]


class ResponsesRequest(OpenAIBaseModel):
    """``POST /v1/responses`` body, with the bounds the gateway enforces.

    Booleans are strict (JSON ``true`` or ``false`` only): ``"stream": "yes"`` is refused, not
    read as a stream. Fields this model does not define are kept and sent upstream unchanged,
    since the Responses API is relayed to model servers that implement it.
    """

    model: ModelId = Field(description="A model id from GET /v1/models.")
    input: ResponseInput = Field(description="The prompt: text, or a list of input items.")
    instructions: str | None = None
    # Below 2**63: the bound keeps the value inside what the model server and orjson accept.
    max_output_tokens: int | None = Field(default=None, ge=1, lt=2**63)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    stream: StrictBool = False
    previous_response_id: str | None = None
    store: StrictBool | None = None
    # nilai extras
    web_search: StrictBool = False

    @property
    def requested_max_tokens(self) -> int | None:
        """The output limit the client asked for, if any."""
        return self.max_output_tokens

    def refused_state_fields(self) -> None:
        """Refuse the fields that need server-side state, which this gateway does not keep.

        ``store: false`` (or no ``store``) is accepted: nothing is stored either way.

        Raises:
            InvalidRequest: ``previous_response_id`` or ``conversation`` is set, or ``store``
                or ``background`` is true.
        """
        if self.previous_response_id is not None:
            raise InvalidRequest(
                "previous_response_id is not supported: the gateway keeps no server-side state. "
                "Send the whole conversation in input instead.",
                param="previous_response_id",
                code="not_supported",
            )
        extra = self.model_extra or {}
        if extra.get("conversation") is not None:
            raise InvalidRequest(
                "conversation is not supported: the gateway keeps no server-side state. "
                "Send the whole conversation in input instead.",
                param="conversation",
                code="not_supported",
            )
        for flag in ("store", "background"):
            if getattr(self, flag, None) is True or extra.get(flag) is True:
                raise InvalidRequest(
                    f"{flag}: true is not supported: the gateway keeps no server-side state. "
                    f"Omit {flag} or set it to false.",
                    param=flag,
                    code="not_supported",
                )

    def function_names(self) -> list[str]:
        """The names of the function tools the request declares."""
        return [
            name
            for tool in self.tools or []
            if tool.get("type") == "function" and isinstance(name := tool.get("name"), str)
        ]

    def has_image(self) -> bool:
        """Whether any input message carries an image part."""
        if isinstance(self.input, str):
            return False
        return any(isinstance(item, InputMessage) and item.has_image() for item in self.input)

    def conversation(self) -> list[ChatMessage]:
        """The client's instructions and messages as chat messages of text (for web search).

        Items that are not messages (function calls, their outputs, reasoning) are left out;
        ``developer`` instructions count as the system's.
        """
        messages: list[ChatMessage] = []
        if self.instructions:
            messages.append(ChatMessage(role="system", content=self.instructions))
        if isinstance(self.input, str):
            return [*messages, ChatMessage(role="user", content=self.input)]
        messages.extend(
            ChatMessage(role=item.role, content=item.text())
            for item in self.input
            if isinstance(item, InputMessage)
        )
        return messages


def upstream_payload(request: ResponsesRequest, *, instructions: str | None = None) -> bytes:
    """The JSON sent to the model server: the fields the client set, less nilai's own.

    ``instructions`` (the gateway's context: a private prompt, web search sources) comes first,
    then the client's own instructions, separated by a blank line. Unknown fields pass through;
    streams get nothing extra (the Responses stream ends with its usage anyway). ``store`` is
    always false: a model server that can keep responses (vLLM can) must not keep these.

    Raises:
        ValidationFailed: the request holds an integer outside the 64-bit range.
    """
    data = request.model_dump(mode="json", exclude_unset=True, exclude=set(NILAI_ONLY_FIELDS))
    data["model"] = request.model
    data["store"] = False
    if instructions is not None:
        own = request.instructions
        data["instructions"] = f"{instructions}\n\n{own}" if own else instructions
    try:
        return orjson.dumps(data)
    except TypeError as exc:  # orjson refuses integers beyond 64 bits
        raise ValidationFailed(
            "The request holds a number outside the 64-bit integer range.", code="invalid_value"
        ) from exc
