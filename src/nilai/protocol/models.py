"""Model descriptions: OpenAI's model object plus nilai's metadata."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

CHAT_COMPLETION_FEATURE = "chat_completion"
RESPONSES_FEATURE = "responses"
"""In ``supported_features``: the model server serves ``POST /v1/responses`` (vLLM does)."""


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "nilai"
    name: str = ""
    version: str = ""
    description: str = ""
    author: str = ""
    license: str = ""
    source: str = ""
    supported_features: list[str] = Field(default_factory=lambda: [CHAT_COMPLETION_FEATURE])
    tool_support: bool = False
    multimodal_support: bool = False
    max_model_len: int | None = None
    server_tools: list[str] = Field(default_factory=list[str])
    """Tools the gateway runs itself for this model (``execute_python``); set by the gateway."""

    @property
    def responses_support(self) -> bool:
        """Whether the model's servers serve the Responses API."""
        return RESPONSES_FEATURE in self.supported_features


class ModelList(BaseModel):
    """``GET /v1/models`` body."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
