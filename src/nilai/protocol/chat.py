"""Chat completion requests as clients send them (OpenAI shape plus nilai's extras)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StringConstraints
from pydantic_core import PydanticCustomError

from nilai.protocol.base import OpenAIBaseModel
from nilai.protocol.nilrag import NilragRequest

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

MAX_MODEL_ID_LENGTH = 256
# C0, DEL, C1 and the Unicode line and paragraph separators: characters that end or forge log
# lines, and that PostgreSQL refuses in text (NUL).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _no_control_characters(value: str) -> str:
    if CONTROL_CHARACTERS.search(value):
        raise PydanticCustomError(
            "control_character", "A model id cannot contain control characters."
        )
    return value


# The model id reaches logs, metrics and the query log: it is refused here, at the protocol
# boundary, unless it is short plain text.
ModelId = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_MODEL_ID_LENGTH),
    AfterValidator(_no_control_characters),
]


IMAGE_PARTS = ("image_url", "input_image")


class ContentPart(OpenAIBaseModel):
    """One part of a multi-part message (text, image, ...); other fields pass through."""

    type: str


class ChatMessage(OpenAIBaseModel):
    """One message of the conversation; extra fields travel to the model server unchanged."""

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def has_image(self) -> bool:
        """Whether the content carries an image part."""
        if not isinstance(self.content, list):
            return False
        return any(part.type in IMAGE_PARTS for part in self.content)

    def text(self) -> str:
        """The message's text: its string content, or its text parts joined (images left out)."""
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        texts = [
            text
            for part in self.content
            if part.type == "text" and isinstance(text := (part.model_extra or {}).get("text"), str)
        ]
        return "\n".join(texts)


class StreamOptions(BaseModel):
    """OpenAI ``stream_options``."""

    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False


class ChatCompletionRequest(OpenAIBaseModel):
    """``POST /v1/chat/completions`` body, with the bounds the gateway enforces.

    Booleans are strict (JSON ``true`` or ``false`` only): ``"stream": "yes"`` is refused, not
    read as a stream. The most messages a request may hold is a setting
    (``NILAI_MAX_MESSAGES``), checked before the body is parsed.
    """

    model: ModelId = Field(description="A model id from GET /v1/models.")
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=5)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=1, description="Only one choice is supported.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    # sampling extensions understood by vLLM
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    # nilai extras
    web_search: StrictBool = False
    nilrag: NilragRequest | None = None

    @property
    def include_usage(self) -> bool:
        """Whether the client asked for the usage chunk at the end of a stream."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def requested_max_tokens(self) -> int | None:
        """The completion limit the client asked for, under either of its names."""
        return self.max_completion_tokens or self.max_tokens

    def has_image(self) -> bool:
        """Whether any message carries an image."""
        return any(message.has_image() for message in self.messages)

    def starts_with_system(self) -> bool:
        """Whether the first message is a system message."""
        return bool(self.messages) and self.messages[0].role == "system"

    def last_user_text(self) -> str:
        """The text of the last user message (its string, or its text parts joined)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        return ""

    def function_names(self) -> list[str]:
        """The names of the function tools the request declares."""
        names: list[str] = []
        for tool in self.tools or []:
            function = tool.get("function") if tool.get("type") == "function" else None
            name = function.get("name") if isinstance(function, dict) else None  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
            if isinstance(name, str):
                names.append(name)
        return names


NILAI_ONLY_FIELDS = frozenset({"web_search", "nilrag"})
