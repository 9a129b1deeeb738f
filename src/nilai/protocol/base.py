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


def json_list(value: object) -> list[object] | None:
    """``value`` as a JSON array if it is one, for reading untrusted JSON safely."""
    if isinstance(value, list):
        return cast(list[object], value)
    return None


def json_count(value: object) -> int:
    """``value`` if it is a non-negative JSON integer (a token count), else 0."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def inline_json_schema(model: type[BaseModel]) -> dict[str, object]:
    """The model's JSON schema with its ``$defs`` inlined, to embed in an OpenAPI document."""
    schema = model.model_json_schema()
    defs = cast(dict[str, object], schema.pop("$defs", {}))

    def resolve(node: object) -> object:
        if isinstance(node, dict):
            items = cast(dict[str, object], node)
            ref = items.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in items.items()}
        if isinstance(node, list):
            return [resolve(item) for item in cast(list[object], node)]
        return node

    return cast(dict[str, object], resolve(schema))
