"""Delegation policies matched against the parsed chat request (issue 14, item 1)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from nuc.policy import Policy

from nilai.auth.base import Principal
from nilai.auth.nuc_policies import (
    REQUEST_FIELDS,
    check_request_policies,
    compile_policies,
    request_document,
)
from nilai.errors import AuthenticationFailed
from nilai.protocol.chat import ChatCompletionRequest

INVOCATION = {
    "iss": "did:nil:02aa",
    "aud": "did:nil:02bb",
    "sub": "did:nil:02cc",
    "cmd": "/nil/ai/generate",
}


def request(**fields: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return ChatCompletionRequest.model_validate({**body, **fields})


def principal(*policies: list[Any]) -> Principal:
    parsed = [Policy.parse(copy.deepcopy(p)) for p in policies]
    return Principal("acct", "nuc", request_policies=compile_policies(parsed, INVOCATION))


def admits(policy: list[Any], **fields: Any) -> bool:
    """Whether the request is admitted; a refusal must be the policy's 401."""
    caught: list[AuthenticationFailed] = []
    try:
        check_request_policies(principal(policy), request(**fields))
    except AuthenticationFailed as error:
        caught.append(error)
    assert all(error.code == "nuc_policy_not_met" for error in caught)
    return not caught


def test_the_request_document_has_every_documented_field():
    document = request_document(request(max_completion_tokens=7, tools=[{"type": "function"}]))
    assert set(document) == set(REQUEST_FIELDS)
    assert document["max_tokens"] == document["max_completion_tokens"] == 7
    assert document["tools"] is True
    assert document["temperature"] is None
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    with_image = request(messages=[{"role": "user", "content": [image]}])
    assert request_document(with_image)["multimodal"] is True


NILRAG = {
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


@pytest.mark.parametrize(
    ("policy", "fields", "admitted"),
    [
        (["==", "$.req.model", "m"], {}, True),
        (["==", ".args.model", "m"], {"model": "n"}, False),
        (["!=", "$.req.model", "n"], {"model": "n"}, False),
        (["anyOf", "$.req.model", ["a", "m"]], {}, True),
        (["==", "$.req.stream", False], {}, True),
        (["==", "$.req.stream", 0], {}, False),
        (["==", "$.req.stream", True], {"stream": True}, True),
        (["==", "$.req.stream", 1], {"stream": True}, False),
        (["anyOf", "$.req.stream", [1, "true"]], {"stream": True}, False),
        (["==", "$.req.max_tokens", 10], {"max_tokens": 10}, True),
        (["==", "$.req.max_tokens", 10.0], {"max_tokens": 10}, True),
        (["==", "$.req.max_completion_tokens", 10], {"max_tokens": 10}, True),
        (["==", "$.req.max_tokens", None], {}, True),
        (["==", "$.req.temperature", 0], {"temperature": 0}, True),
        (["==", "$.req.top_p", None], {"top_p": 0.5}, False),
        (["==", "$.req.nilrag", False], {"nilrag": NILRAG}, False),
        (["==", "$.req.web_search", True], {"web_search": True}, True),
        (["and", []], {}, False),
        (["or", []], {}, False),
        (["not", ["and", []]], {}, True),
        (["==", ".cmd", "/nil/ai/generate"], {}, True),
        (["==", ".sub", "did:nil:other"], {}, False),
        (["or", [["==", ".aud", "did:nil:02bb"], ["==", "$.req.model", "x"]]], {}, True),
    ],
)
def test_a_policy_is_matched_against_the_request(
    policy: list[Any], fields: dict[str, Any], admitted: bool
):
    assert admits(policy, **fields) is admitted


def test_every_policy_of_every_delegation_must_hold():
    both = principal(["==", "$.req.model", "m"], ["==", "$.req.stream", False])
    check_request_policies(both, request())
    with pytest.raises(AuthenticationFailed) as refused:
        check_request_policies(both, request(stream=True))
    assert refused.value.status == 401
    assert refused.value.message == (
        "NUC token rejected: the request does not meet the delegation policy "
        '["==","$.req.stream",false].'
    )


def test_a_principal_without_policies_is_never_refused():
    check_request_policies(Principal("acct", "api_key"), request(model="anything"))


def test_a_long_policy_is_shortened_in_the_message():
    many = [f"model-{i}-{'x' * 40}" for i in range(10)]
    with pytest.raises(AuthenticationFailed) as refused:
        check_request_policies(principal(["anyOf", "$.req.model", many]), request())
    message = refused.value.message
    assert len(message) < 300
    assert message.startswith(
        'NUC token rejected: the request does not meet the delegation policy ["anyOf"'
    )
    assert message.endswith("....")


@pytest.mark.parametrize(
    "selector",
    ["$.req", "$.req.messages", "$.env.x", ".args", ".args.model.id", ".meta.x", ".nonce", ".prf"],
)
def test_a_selector_the_gateway_cannot_evaluate_is_refused_naming_it(selector: str):
    with pytest.raises(AuthenticationFailed) as refused:
        principal(["not", ["!=", selector, 1]])
    assert refused.value.code == "unsupported_nuc_policy"
    assert f'"{selector}"' in refused.value.message


def test_a_selector_with_control_characters_is_escaped_in_the_message():
    with pytest.raises(AuthenticationFailed) as refused:
        principal(["==", "$.env.a\nforged log line", 1])
    assert "\n" not in refused.value.message
    assert "\\n" in refused.value.message
