import json
from typing import Any

import pytest
from pydantic import ValidationError

from nilai.protocol.chat import ChatCompletionRequest, ChatMessage

USER = {"role": "user", "content": "hi"}


def _req(**fields: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": "m", "messages": [USER]}
    body.update(fields)
    return ChatCompletionRequest.model_validate(body)


def _rejected(**fields: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _req(**fields)
    return info.value


def _error_locs(error: ValidationError) -> set[tuple[Any, ...]]:
    return {tuple(e["loc"]) for e in error.errors()}


def test_minimal_request():
    request = _req()
    assert request.model == "m"
    assert request.messages[0].role == "user"
    assert request.stream is False
    assert request.unknown_fields() == []


@pytest.mark.parametrize("value", [0, 0.0, 2.5, 5])
def test_temperature_in_bounds(value: float):
    assert _req(temperature=value).temperature == value


@pytest.mark.parametrize("value", [-0.01, 5.01, 100])
def test_temperature_out_of_bounds(value: float):
    assert ("temperature",) in _error_locs(_rejected(temperature=value))


@pytest.mark.parametrize("value", [0.01, 0.5, 1])
def test_top_p_in_bounds(value: float):
    assert _req(top_p=value).top_p == value


@pytest.mark.parametrize("value", [0, -0.5, 1.01])
def test_top_p_out_of_bounds(value: float):
    assert ("top_p",) in _error_locs(_rejected(top_p=value))


def test_max_tokens_at_least_one():
    assert _req(max_tokens=1).max_tokens == 1
    assert ("max_tokens",) in _error_locs(_rejected(max_tokens=0))
    assert ("max_tokens",) in _error_locs(_rejected(max_tokens=-5))
    assert ("max_completion_tokens",) in _error_locs(_rejected(max_completion_tokens=0))


def test_requested_max_tokens_prefers_max_completion_tokens():
    assert _req().requested_max_tokens is None
    assert _req(max_tokens=10).requested_max_tokens == 10
    assert _req(max_completion_tokens=20, max_tokens=10).requested_max_tokens == 20


def test_n_only_one():
    assert _req(n=1).n == 1
    assert ("n",) in _error_locs(_rejected(n=2))
    assert ("n",) in _error_locs(_rejected(n=0))


def test_messages_must_not_be_empty():
    assert ("messages",) in _error_locs(_rejected(messages=[]))


def test_messages_are_required():
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m"})


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool", "function"])
def test_known_roles(role: str):
    assert _req(messages=[{"role": role, "content": "x"}]).messages[0].role == role


@pytest.mark.parametrize("role", ["robot", "USER", ""])
def test_unknown_role_rejected(role: str):
    assert ("messages", 0, "role") in _error_locs(
        _rejected(messages=[{"role": role, "content": "x"}])
    )


@pytest.mark.parametrize("model", ["", "   ", "\t\n"])
def test_blank_model_rejected(model: str):
    assert ("model",) in _error_locs(_rejected(model=model))


def test_model_whitespace_is_stripped():
    assert _req(model="  llama-3  ").model == "llama-3"


@pytest.mark.parametrize(
    "model",
    [
        "bad\u0000model",
        "a\nfake line",
        "a\rb",
        "a\tb",
        "a\x1b[31mred",
        "a\x7fb",
        "a\x85b",
        "a\u2028b",
        "a\u2029b",
    ],
    ids=["nul", "newline", "cr", "tab", "escape", "del", "nel", "line-sep", "paragraph-sep"],
)
def test_model_id_with_control_characters_is_refused(model: str):
    error = _rejected(model=model)
    assert _error_locs(error) == {("model",)}
    assert error.errors()[0]["type"] == "control_character"


def test_model_id_longer_than_256_characters_is_refused():
    assert _req(model="m" * 256).model == "m" * 256
    assert ("model",) in _error_locs(_rejected(model="m" * 257))


def test_model_id_may_be_any_printable_text():
    assert _req(model="org/Llama-3.1-8B:q4 ünïcode").model == "org/Llama-3.1-8B:q4 ünïcode"


BOOLEAN_FIELDS = [
    ("stream", ("stream",)),
    ("web_search", ("web_search",)),
    ("logprobs", ("logprobs",)),
    ("parallel_tool_calls", ("parallel_tool_calls",)),
    ("stream_options", ("stream_options", "include_usage")),
]


@pytest.mark.parametrize(("field", "loc"), BOOLEAN_FIELDS, ids=[f for f, _ in BOOLEAN_FIELDS])
@pytest.mark.parametrize("value", ["yes", "true", "false", 1, 0, "on"])
def test_booleans_are_strict(field: str, loc: tuple[str, ...], value: object):
    body: dict[str, Any] = {"model": "m", "messages": [USER]}
    body[field] = {"include_usage": value} if field == "stream_options" else value
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(json.dumps(body))
    assert loc in _error_locs(info.value)


@pytest.mark.parametrize(("field", "loc"), BOOLEAN_FIELDS, ids=[f for f, _ in BOOLEAN_FIELDS])
def test_json_booleans_are_accepted(field: str, loc: tuple[str, ...]):
    for value in (True, False):
        body: dict[str, Any] = {"model": "m", "messages": [USER]}
        body[field] = {"include_usage": value} if field == "stream_options" else value
        request = ChatCompletionRequest.model_validate_json(json.dumps(body))
        attribute = getattr(request, loc[0])
        assert (attribute.include_usage if field == "stream_options" else attribute) is value


def test_extras_are_allowed_and_listed():
    request = _req(zeta=1, alpha={"x": 1}, guided_json={"type": "object"})
    assert request.unknown_fields() == ["alpha", "guided_json", "zeta"]
    assert request.model_extra == {"zeta": 1, "alpha": {"x": 1}, "guided_json": {"type": "object"}}


def test_known_fields_are_not_listed_as_unknown():
    request = _req(temperature=1, web_search=False, nilrag=None, top_k=5)
    assert request.unknown_fields() == []


def test_message_extras_are_kept():
    request = _req(messages=[{"role": "user", "content": "x", "reasoning": "r"}])
    message = request.messages[0]
    assert message.unknown_fields() == ["reasoning"]
    assert message.model_dump(exclude_unset=True) == {
        "role": "user",
        "content": "x",
        "reasoning": "r",
    }


def test_include_usage():
    assert _req().include_usage is False
    assert _req(stream=True).include_usage is False
    assert _req(stream=True, stream_options={}).include_usage is False
    assert _req(stream=True, stream_options={"include_usage": False}).include_usage is False
    assert _req(stream=True, stream_options={"include_usage": True}).include_usage is True


@pytest.mark.parametrize("part_type", ["image_url", "input_image"])
def test_has_image(part_type: str):
    content = [{"type": "text", "text": "what is this"}, {"type": part_type, "image_url": {}}]
    request = _req(messages=[USER, {"role": "user", "content": content}])
    assert request.has_image() is True
    assert request.messages[0].has_image() is False
    assert request.messages[1].has_image() is True


def test_text_parts_are_not_images():
    content = [{"type": "text", "text": "a"}, {"type": "input_audio"}]
    assert _req(messages=[{"role": "user", "content": content}]).has_image() is False
    assert _req(messages=[{"role": "assistant", "content": None}]).has_image() is False


def test_chat_message_content_shapes():
    assert ChatMessage(role="user", content="s").content == "s"
    assert ChatMessage(role="assistant").content is None
    with pytest.raises(ValidationError):
        ChatMessage.model_validate({"role": "user", "content": 5})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("top_logprobs", 21),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("top_k", -2),
    ],
)
def test_other_bounds(field: str, value: float):
    assert (field,) in _error_locs(_rejected(**{field: value}))


def test_inline_json_schema_has_no_dangling_refs():
    import json

    from nilai.protocol.base import inline_json_schema

    schema = inline_json_schema(ChatCompletionRequest)
    text = json.dumps(schema)
    assert "$ref" not in text
    assert "$defs" not in text
    assert schema["properties"]["messages"]["items"]["properties"]["role"]["enum"]
