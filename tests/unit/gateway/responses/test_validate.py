"""A Responses request checked against its model: what is refused, and what is sent upstream."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest

from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.errors import InvalidRequest, NilaiError, NotFound, ValidationFailed
from nilai.gateway.responses.validate import ValidatedResponses, validate_responses
from nilai.protocol.models import ModelCard
from nilai.protocol.responses import ResponsesRequest, upstream_payload
from tests.unit.gateway.chat.test_validate import StubSnapshot

RESPONSES_CARD = ModelCard(id="m", supported_features=["chat_completion", "responses"])
IMAGE_INPUT = [
    {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "what is this?"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
        ],
    }
]
TOOLS = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]


def _req(**fields: Any) -> ResponsesRequest:
    body: dict[str, Any] = {"model": "m", "input": "hi"}
    body.update(fields)
    return ResponsesRequest.model_validate(body)


def _validate(
    request: ResponsesRequest, *cards: ModelCard, snapshot: StubSnapshot | None = None
) -> ValidatedResponses:
    snapshot = snapshot or StubSnapshot(*(cards or (RESPONSES_CARD,)))
    return validate_responses(request, cast(DiscoverySnapshot, snapshot))


def _refusal(request: ResponsesRequest, *cards: ModelCard) -> NilaiError:
    with pytest.raises(NilaiError) as info:
        _validate(request, *cards)
    return info.value


def _payload(validated: ValidatedResponses) -> dict[str, Any]:
    return orjson.loads(validated.payload)


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"conversation": {"id": "conv_1"}}, "conversation"),
        ({"store": True}, "store"),
        ({"background": True}, "background"),
    ],
)
def test_fields_that_need_server_side_state_are_refused_before_the_model_is_looked_up(
    fields: dict[str, Any], param: str
):
    snapshot = StubSnapshot(RESPONSES_CARD)
    with pytest.raises(InvalidRequest) as info:
        _validate(_req(**fields), snapshot=snapshot)
    error = info.value
    assert (error.status, error.code, error.param) == (400, "not_supported", param)
    assert error.type == "invalid_request_error"
    assert "server-side state" in error.message
    assert snapshot.asked == []


@pytest.mark.parametrize(
    "fields",
    [
        {"store": False},
        {"background": False},
        {"conversation": None},
        {"previous_response_id": None},
    ],
)
def test_state_fields_that_ask_for_no_state_are_accepted(fields: dict[str, Any]):
    assert _validate(_req(**fields)).card is RESPONSES_CARD


def test_an_unknown_model_is_not_found():
    error = _refusal(_req(model="missing"))
    assert isinstance(error, NotFound)
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
    assert "missing" in error.message


def test_a_model_whose_servers_do_not_serve_the_responses_api_is_refused():
    error = _refusal(_req(), ModelCard(id="m"))
    assert isinstance(error, InvalidRequest)
    assert (error.status, error.code, error.param) == (400, "responses_not_supported", "model")
    assert "/v1/chat/completions" in error.message


def test_tools_need_tool_support():
    error = _refusal(_req(tools=TOOLS), RESPONSES_CARD)
    assert isinstance(error, InvalidRequest)
    assert (error.status, error.param) == (400, "tools")
    with_tools = RESPONSES_CARD.model_copy(update={"tool_support": True})
    assert _payload(_validate(_req(tools=TOOLS), with_tools))["tools"] == TOOLS


def test_an_empty_tools_list_needs_no_tool_support():
    assert _validate(_req(tools=[])).card is RESPONSES_CARD


def test_images_need_multimodal_support():
    error = _refusal(_req(input=IMAGE_INPUT), RESPONSES_CARD)
    assert isinstance(error, InvalidRequest)
    assert (error.status, error.param) == (400, "input")
    assert "images" in error.message
    seeing = RESPONSES_CARD.model_copy(update={"multimodal_support": True})
    assert _payload(_validate(_req(input=IMAGE_INPUT), seeing))["input"] == IMAGE_INPUT


def test_max_output_tokens_above_the_models_length_is_422():
    card = RESPONSES_CARD.model_copy(update={"max_model_len": 4096})
    error = _refusal(_req(max_output_tokens=4097), card)
    assert isinstance(error, ValidationFailed)
    assert (error.status, error.param) == (422, "max_output_tokens")
    assert "4097" in error.message
    assert "4096" in error.message
    assert _validate(_req(max_output_tokens=4096), card).card is card


# --- what the model server receives -----------------------------------------------------------


def test_the_payload_is_what_the_client_set_with_store_false():
    assert _payload(_validate(_req())) == {"model": "m", "input": "hi", "store": False}
    assert _payload(_validate(_req(store=False)))["store"] is False


def test_web_search_is_never_sent_and_unknown_fields_pass_through():
    fields: dict[str, Any] = {
        "web_search": True,
        "reasoning": {"effort": "low"},
        "metadata": {"k": "v"},
        "surprise": [1, {"x": None}],
        "temperature": 0.5,
        "max_output_tokens": 7,
        "stream": True,
    }
    payload = _payload(_validate(_req(**fields)))
    assert payload == {
        "model": "m",
        "input": "hi",
        "reasoning": {"effort": "low"},
        "metadata": {"k": "v"},
        "surprise": [1, {"x": None}],
        "temperature": 0.5,
        "max_output_tokens": 7,
        "stream": True,
        "store": False,
    }


def test_input_items_pass_through_as_sent():
    items: list[dict[str, Any]] = [
        {"type": "message", "role": "developer", "content": "be brief", "id": "m0"},
        {"role": "user", "content": [{"type": "input_text", "text": "q"}]},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
    ]
    assert _payload(_validate(_req(input=items)))["input"] == items


def test_the_model_id_is_sent_stripped():
    assert _payload(_validate(_req(model="  m  ")))["model"] == "m"


def test_gateway_context_comes_first_then_the_clients_instructions():
    validated = _validate(_req(instructions="mine"))
    with_context = validated.with_instructions("private").with_instructions("sources")
    payload = _payload(with_context)
    assert payload["instructions"] == "private\n\nsources\n\nmine"
    assert payload["store"] is False
    assert with_context.context == ("private", "sources")
    # The request itself is left as sent, and so is the validated request it came from.
    assert with_context.request is validated.request
    assert validated.request.instructions == "mine"
    assert _payload(validated)["instructions"] == "mine"
    assert validated.context == ()


def test_gateway_context_alone_when_the_client_gave_no_instructions():
    validated = _validate(_req(web_search=True)).with_instructions("sources")
    payload = _payload(validated)
    assert payload["instructions"] == "sources"
    assert "web_search" not in payload
    assert validated.request.instructions is None


def test_the_model_request_goes_to_the_responses_path_of_servers_that_serve_it():
    card = RESPONSES_CARD.model_copy(update={"max_model_len": 100})
    validated = _validate(_req(stream=True, web_search=True, max_output_tokens=50), card)
    model_request = validated.model_request
    assert model_request.path == "/v1/responses"
    assert model_request.feature == "responses"
    assert model_request.card is card
    assert model_request.model == "m"
    assert model_request.payload == validated.payload
    assert model_request.stream is True
    assert model_request.web_search is True
    assert model_request.requested_max_tokens == 50
    with_context = validated.with_instructions("sources")
    assert with_context.model_request.payload == with_context.payload
    assert with_context.model_request.payload != validated.payload


def test_nilrag_is_refused_and_never_relayed():
    # It holds the client's node tokens: the model server must never receive it.
    request = ResponsesRequest.model_validate(
        {"model": "m", "input": "hi", "nilrag": {"nodes": []}}
    )
    with pytest.raises(InvalidRequest) as info:
        validate_responses(
            request, StubSnapshot(ModelCard(id="m", supported_features=["responses"]))
        )
    assert (info.value.status, info.value.param, info.value.code) == (
        400,
        "nilrag",
        "not_supported",
    )
    assert "nilrag" not in orjson.loads(upstream_payload(request))
