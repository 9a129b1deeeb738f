import json
from typing import Any

import pytest
from pydantic import ValidationError

from nilai.errors import InvalidRequest, ValidationFailed
from nilai.protocol.responses import NILAI_ONLY_FIELDS, ResponsesRequest, upstream_payload

NO_FIELDS: dict[str, Any] = {}


def _req(**fields: Any) -> ResponsesRequest:
    body: dict[str, Any] = {"model": "m", "input": "hi"}
    body.update(fields)
    return ResponsesRequest.model_validate(body)


def _rejected(**fields: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _req(**fields)
    return info.value


def _error_locs(error: ValidationError) -> set[tuple[Any, ...]]:
    return {tuple(e["loc"]) for e in error.errors()}


def _sent(request: ResponsesRequest, **kwargs: Any) -> dict[str, Any]:
    return json.loads(upstream_payload(request, **kwargs))


def test_minimal_string_input():
    request = _req()
    assert request.model == "m"
    assert request.input == "hi"
    assert request.stream is False
    assert request.web_search is False
    assert request.unknown_fields() == []
    assert request.requested_max_tokens is None


def test_item_list_input():
    items: list[dict[str, Any]] = [
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
        {"type": "function_call_output", "call_id": "c1", "output": "{}"},
    ]
    request = _req(input=items)
    assert isinstance(request.input, list)
    assert len(request.input) == 4
    # What the client sent reaches the model server unchanged, item extras included.
    assert _sent(request)["input"] == items


@pytest.mark.parametrize("role", ["user", "assistant", "system", "developer"])
def test_message_roles(role: str):
    assert _req(input=[{"role": role, "content": "x"}]).input


@pytest.mark.parametrize(
    ("value", "loc"),
    [
        ("", ("input", "<text>")),
        ([], ("input", "<items>")),
        (5, ("input",)),
        (None, ("input",)),
        ([1], ("input", "<items>", 0)),
        (["text"], ("input", "<items>", 0)),
        ([NO_FIELDS], ("input", "<items>", 0, "<item>", "type")),
        ([{"role": "tool", "content": "x"}], ("input", "<items>", 0, "<message>", "role")),
        ([{"role": "user"}], ("input", "<items>", 0, "<message>", "content")),
        ([{"type": "message", "content": "x"}], ("input", "<items>", 0, "<message>", "role")),
    ],
)
def test_bad_input(value: Any, loc: tuple[Any, ...]):
    assert loc in _error_locs(_rejected(input=value))


def test_message_content_must_be_text_or_parts():
    error = _rejected(input=[{"role": "user", "content": 5}])
    assert all(
        e["loc"][:5] == ("input", "<items>", 0, "<message>", "content") for e in error.errors()
    )
    parts_without_type = _rejected(input=[{"role": "user", "content": [{"text": "x"}]}])
    assert any("type" in e["loc"] for e in parts_without_type.errors())


def test_input_is_required():
    with pytest.raises(ValidationError):
        ResponsesRequest.model_validate({"model": "m"})


@pytest.mark.parametrize("model", ["", "   ", "a" * 257, "bad\nid"])
def test_model_must_be_plain_and_non_blank(model: str):
    assert ("model",) in _error_locs(_rejected(model=model))


def test_model_is_stripped():
    assert _req(model="  m ").model == "m"


@pytest.mark.parametrize("value", [0, 0.0, 1, 2])
def test_temperature_in_bounds(value: float):
    assert _req(temperature=value).temperature == value


@pytest.mark.parametrize("value", [-0.01, 2.01, 5])
def test_temperature_out_of_bounds(value: float):
    assert ("temperature",) in _error_locs(_rejected(temperature=value))


@pytest.mark.parametrize("value", [0.01, 0.5, 1])
def test_top_p_in_bounds(value: float):
    assert _req(top_p=value).top_p == value


@pytest.mark.parametrize("value", [0, -0.5, 1.01])
def test_top_p_out_of_bounds(value: float):
    assert ("top_p",) in _error_locs(_rejected(top_p=value))


def test_max_output_tokens_bounds():
    assert _req(max_output_tokens=1).requested_max_tokens == 1
    assert ("max_output_tokens",) in _error_locs(_rejected(max_output_tokens=0))
    assert ("max_output_tokens",) in _error_locs(_rejected(max_output_tokens=-3))
    assert ("max_output_tokens",) in _error_locs(_rejected(max_output_tokens=2**63))
    assert _req(max_output_tokens=2**63 - 1).max_output_tokens == 2**63 - 1


@pytest.mark.parametrize("field", ["stream", "web_search", "store"])
@pytest.mark.parametrize("value", ["true", "yes", 1, 0, "false"])
def test_booleans_are_strict(field: str, value: Any):
    assert (field,) in _error_locs(_rejected(**{field: value}))


def test_booleans_accept_json_booleans():
    request = _req(stream=True, web_search=True, store=False)
    assert request.stream is True
    assert request.web_search is True
    assert request.store is False


def test_tools_must_be_objects():
    assert _req(tools=[{"type": "function", "name": "f"}]).tools
    assert ("tools", 0) in _error_locs(_rejected(tools=["f"]))
    assert _req(tool_choice="auto").tool_choice == "auto"
    assert _req(tool_choice={"type": "function", "name": "f"}).tool_choice


def test_previous_response_id_is_refused():
    request = _req(previous_response_id="resp_1")
    with pytest.raises(InvalidRequest) as info:
        request.refused_state_fields()
    assert info.value.status == 400
    assert info.value.param == "previous_response_id"
    assert info.value.code == "not_supported"
    assert "server-side state" in info.value.message


def test_store_true_is_refused():
    with pytest.raises(InvalidRequest) as info:
        _req(store=True).refused_state_fields()
    assert info.value.param == "store"
    assert info.value.code == "not_supported"
    assert "server-side state" in info.value.message


def test_store_false_or_absent_is_accepted():
    _req().refused_state_fields()
    _req(store=False).refused_state_fields()


def test_upstream_payload_sends_only_set_fields():
    assert _sent(_req()) == {"model": "m", "input": "hi", "store": False}
    sent = _sent(_req(model=" m ", temperature=0.5, max_output_tokens=9, stream=True))
    assert sent == {
        "model": "m",
        "input": "hi",
        "temperature": 0.5,
        "max_output_tokens": 9,
        "stream": True,
        "store": False,
    }


def test_upstream_payload_drops_nilai_fields():
    assert "web_search" in NILAI_ONLY_FIELDS
    assert "web_search" not in _sent(_req(web_search=True))
    assert "web_search" not in _sent(_req(web_search=False))


def test_unknown_fields_pass_through():
    request = _req(reasoning={"effort": "low"}, metadata={"k": "v"}, truncation="auto")
    assert request.unknown_fields() == ["metadata", "reasoning", "truncation"]
    sent = _sent(request)
    assert sent["reasoning"] == {"effort": "low"}
    assert sent["metadata"] == {"k": "v"}
    assert sent["truncation"] == "auto"


def test_instructions_merge_gateway_first():
    assert _sent(_req(instructions="mine"))["instructions"] == "mine"
    assert _sent(_req(), instructions="ctx")["instructions"] == "ctx"
    merged = _sent(_req(instructions="mine"), instructions="ctx")
    assert merged["instructions"] == "ctx\n\nmine"
    assert _sent(_req(instructions=None), instructions="ctx")["instructions"] == "ctx"


def test_instructions_merge_leaves_request_unchanged():
    request = _req(instructions="mine")
    upstream_payload(request, instructions="ctx")
    assert request.instructions == "mine"


def test_integers_beyond_64_bits_are_refused():
    with pytest.raises(ValidationFailed) as info:
        upstream_payload(_req(seed=2**64))
    assert info.value.status == 422
    assert info.value.code == "invalid_value"
    with pytest.raises(ValidationFailed):
        upstream_payload(_req(input=[{"role": "user", "content": "x", "n": -(2**70)}]))
