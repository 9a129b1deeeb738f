from typing import Any, cast

import orjson
import pytest

from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.errors import InvalidRequest, NotFound, UpstreamUnavailable, ValidationFailed
from nilai.gateway.chat.validate import ignored_fields_headers, upstream_payload, validate_chat
from nilai.protocol.chat import ChatCompletionRequest
from nilai.protocol.models import ModelCard

USER = {"role": "user", "content": "hi"}
IMAGE_MESSAGE = {
    "role": "user",
    "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ],
}


class StubSnapshot:
    def __init__(self, *cards: ModelCard) -> None:
        self.cards = {card.id: card for card in cards}
        self.asked: list[str] = []
        self.vanished: set[str] = set()

    def card(self, model: str) -> ModelCard | None:
        self.asked.append(model)
        return self.cards.get(model)

    def vanished_recently(self, model: str) -> bool:
        return model in self.vanished

    def announces(self, model: str, feature: str) -> bool:
        card = self.cards.get(model)
        return card is not None and feature in card.supported_features


NILRAG: dict[str, Any] = {
    "nodes": [
        {
            "url": f"https://node-{name}.example/api/v1",
            "bearer_token": "t",
            "schema_id": "5b0c7a3e-7f7b-4b8e-9d2a-0b6f4f7f1a11",
            "diff_query_id": "6c1d8b4f-8a8c-4c9f-8e3b-1c7a5a8a2b22",
        }
        for name in "ab"
    ]
}


def _req(**fields: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": "m", "messages": [USER]}
    body.update(fields)
    return ChatCompletionRequest.model_validate(body)


def _payload(**fields: Any) -> dict[str, Any]:
    return orjson.loads(upstream_payload(_req(**fields)))


def _validate(request: ChatCompletionRequest, *cards: ModelCard):
    snapshot = StubSnapshot(*cards) if cards else StubSnapshot(ModelCard(id="m"))
    return validate_chat(request, cast(DiscoverySnapshot, snapshot))


# --- upstream_payload -----------------------------------------------------------------------


def test_payload_has_only_fields_the_client_set():
    assert _payload() == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_payload_keeps_set_fields_with_their_values():
    payload = _payload(temperature=0.5, max_tokens=7, stop=["x"], top_k=3, seed=None)
    assert payload == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.5,
        "max_tokens": 7,
        "stop": ["x"],
        "top_k": 3,
        "seed": None,  # explicitly set by the client, so it is forwarded
    }


def test_payload_drops_unknown_top_level_fields():
    payload = _payload(surprise=1, guided_json={"type": "object"})
    assert "surprise" not in payload
    assert "guided_json" not in payload


def test_payload_drops_nilai_only_fields():
    payload = _payload(web_search=False, nilrag=NILRAG)
    assert "web_search" not in payload
    assert "nilrag" not in payload


def test_payload_uses_stripped_model_name():
    assert _payload(model="  m  ")["model"] == "m"


def test_payload_keeps_message_extras():
    message = {"role": "assistant", "content": "a", "reasoning_content": "because", "name": "bot"}
    payload = _payload(messages=[USER, message])
    assert payload["messages"][1] == message
    assert payload["messages"][0] == USER


def test_stream_forces_include_usage():
    payload = _payload(stream=True)
    assert payload["stream"] is True
    assert payload["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_stream_overrides_include_usage_false_and_keeps_other_options():
    payload = _payload(stream=True, stream_options={"include_usage": False, "continuous": True})
    assert payload["stream_options"] == {
        "include_usage": True,
        "continuous": True,
        "continuous_usage_stats": True,
    }


def test_running_usage_is_asked_for_even_when_the_client_declines_it():
    options = {"include_usage": True, "continuous_usage_stats": False}
    payload = _payload(stream=True, stream_options=options)
    assert payload["stream_options"]["continuous_usage_stats"] is True


def test_non_stream_request_gets_no_stream_options():
    assert "stream_options" not in _payload()
    assert "stream_options" not in _payload(stream=False)


# --- validate_chat --------------------------------------------------------------------------


def test_valid_request_resolves_the_card():
    card = ModelCard(id="m", max_model_len=100)
    request = _req(max_tokens=100)
    snapshot = StubSnapshot(card)
    chat = validate_chat(request, cast(DiscoverySnapshot, snapshot))
    assert snapshot.asked == ["m"]
    assert chat.card is card
    assert chat.model == "m"
    assert chat.request is request
    assert chat.payload == upstream_payload(request)


def test_unknown_model_is_not_found():
    with pytest.raises(NotFound) as info:
        _validate(_req(model="missing"), ModelCard(id="m"))
    assert info.value.status == 404
    assert info.value.param == "model"
    assert info.value.code == "model_not_found"
    assert "/v1/models" in info.value.message
    assert "missing" in info.value.message


def test_model_served_moments_ago_is_unavailable_with_retry_after_not_not_found():
    snapshot = StubSnapshot(ModelCard(id="m"))
    snapshot.vanished.add("gone-a-moment")
    with pytest.raises(UpstreamUnavailable) as info:
        validate_chat(_req(model="gone-a-moment"), cast(DiscoverySnapshot, snapshot))
    assert info.value.status == 503
    assert info.value.type == "service_unavailable"
    assert info.value.headers["Retry-After"] == "1"
    assert "temporarily unavailable" in info.value.message
    assert "retry" in info.value.message
    with pytest.raises(NotFound):  # never served here: still unknown
        validate_chat(_req(model="never-served"), cast(DiscoverySnapshot, snapshot))


def test_tools_need_tool_support():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(InvalidRequest) as info:
        _validate(_req(tools=tools), ModelCard(id="m", tool_support=False))
    assert info.value.status == 400
    assert info.value.param == "tools"
    assert _validate(_req(tools=tools), ModelCard(id="m", tool_support=True)).model == "m"


def test_empty_tools_list_is_fine_without_tool_support():
    assert _validate(_req(tools=[]), ModelCard(id="m")).model == "m"


def test_images_need_multimodal_support():
    request = _req(messages=[IMAGE_MESSAGE])
    with pytest.raises(InvalidRequest) as info:
        _validate(request, ModelCard(id="m"))
    assert info.value.param == "messages"
    assert "images" in info.value.message
    assert _validate(request, ModelCard(id="m", multimodal_support=True)).model == "m"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_above_model_length_fails(field: str):
    card = ModelCard(id="m", max_model_len=4096)
    with pytest.raises(ValidationFailed) as info:
        _validate(_req(**{field: 4097}), card)
    assert info.value.status == 422
    assert info.value.param == field
    assert "4097" in info.value.message
    assert "4096" in info.value.message
    assert _validate(_req(**{field: 4096}), card).model == "m"


def test_max_tokens_unbounded_when_model_length_unknown():
    assert _validate(_req(max_tokens=10**9), ModelCard(id="m")).model == "m"


def test_web_search_passes_validation_and_never_reaches_the_model_server():
    chat = _validate(_req(web_search=True))
    assert "web_search" not in orjson.loads(chat.payload)


def test_system_context_is_one_leading_system_message_in_the_order_added():
    request = _req(
        messages=[{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]
    )
    chat = _validate(request).with_system_context("private").with_system_context("sources")
    messages = orjson.loads(chat.payload)["messages"]
    assert messages[0] == {"role": "system", "content": "private\n\nsources"}
    assert messages[1:] == [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]
    assert chat.system_context == ("private", "sources")
    assert len(chat.request.messages) == 2  # the request itself is left as sent


def test_retrieved_context_goes_into_the_first_system_message():
    # The client's own system message, a string: the documents are appended to it.
    request = _req(messages=[{"role": "system", "content": "mine"}, USER])
    messages = orjson.loads(_validate(request).with_retrieved_context("docs").payload)["messages"]
    assert messages == [{"role": "system", "content": "mine\n\ndocs"}, USER]
    # Its parts: one more text part.
    parts = [{"type": "text", "text": "mine"}]
    request = _req(messages=[{"role": "system", "content": parts}, USER])
    messages = orjson.loads(_validate(request).with_retrieved_context("docs").payload)["messages"]
    assert messages[0]["content"] == [*parts, {"type": "text", "text": "docs"}]
    # No system message: a new one first.
    messages = orjson.loads(_validate(_req()).with_retrieved_context("docs").payload)["messages"]
    assert messages == [{"role": "system", "content": "docs"}, USER]
    # The gateway's own first (a private prompt): the documents join it, the client's stays.
    request = _req(messages=[{"role": "system", "content": "mine"}, USER])
    chat = _validate(request).with_system_context("private").with_retrieved_context("docs")
    messages = orjson.loads(chat.payload)["messages"]
    assert messages[:2] == [
        {"role": "system", "content": "private\n\ndocs"},
        {"role": "system", "content": "mine"},
    ]


def test_retrieved_context_then_sources_keep_both():
    request = _req(messages=[{"role": "system", "content": "mine"}, USER])
    chat = _validate(request).with_retrieved_context("docs").with_system_context("sources")
    messages = orjson.loads(chat.payload)["messages"]
    assert messages == [
        {"role": "system", "content": "sources"},
        {"role": "system", "content": "mine\n\ndocs"},
        USER,
    ]
    assert len(chat.request.messages) == 2  # the request itself is left as sent


# --- ignored fields -----------------------------------------------------------------------


def test_no_header_when_every_field_is_known():
    assert ignored_fields_headers(_req(top_k=5, temperature=0.2, web_search=False)) == {}


def test_the_header_names_each_dropped_field_and_the_payload_leaves_them_out():
    request = _req(max_tokenz=5, frobnicate=True, top_k=5)
    assert ignored_fields_headers(request) == {"x-nilai-ignored-fields": "frobnicate, max_tokenz"}
    sent = orjson.loads(upstream_payload(request))
    assert "max_tokenz" not in sent
    assert "frobnicate" not in sent
    assert sent["top_k"] == 5


def test_names_that_are_not_plain_are_counted_not_echoed():
    request = _req(**{"ok_name": 1, "bad\r\nname": 1, "x" * 65: 1, "é": 1})
    assert ignored_fields_headers(request) == {"x-nilai-ignored-fields": "ok_name, and 3 others"}
    only_bad = _req(**{"bad name": 1})
    assert ignored_fields_headers(only_bad) == {"x-nilai-ignored-fields": "and 1 other"}


def test_at_most_sixteen_names_are_shown():
    request = _req(**{f"f{i:02d}": 1 for i in range(20)})
    shown = ignored_fields_headers(request)["x-nilai-ignored-fields"]
    assert shown.split(", ")[:16] == [f"f{i:02d}" for i in range(16)]
    assert shown.endswith("and 4 others")
