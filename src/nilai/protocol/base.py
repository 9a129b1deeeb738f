"""Base for OpenAI wire models: unknown fields are accepted and reported by name only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class OpenAIBaseModel(BaseModel):
    """A wire model that tolerates fields it does not know, as OpenAI clients expect."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def unknown_fields(self) -> list[str]:
        """Names of fields the client sent that this model does not define."""
        return sorted(self.model_extra or {})
