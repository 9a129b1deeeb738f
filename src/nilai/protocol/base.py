"""Base for OpenAI wire models: unknown fields are accepted and reported by name only."""

from __future__ import annotations

from typing import cast

from pydantic import BaseModel, ConfigDict


class OpenAIBaseModel(BaseModel):
    """A wire model that tolerates fields it does not know, as OpenAI clients expect."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def unknown_fields(self) -> list[str]:
        """Names of fields the client sent that this model does not define."""
        return sorted(self.model_extra or {})


def json_object(value: object) -> dict[str, object] | None:
    """``value`` as a JSON object if it is one, for reading untrusted JSON safely."""
    if isinstance(value, dict):
        return cast(dict[str, object], value)
    return None
