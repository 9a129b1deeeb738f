"""Property-based API testing with schemathesis against the live gateway's own /openapi.json.

The real gateway runs on loopback in front of the fake model server. Every operation in the
schema gets requests generated from it (valid ones, and for operations with inputs invalid ones
too), sent with the test API key; the answers must never be a 5xx and must match the schema.

Bounded for CI: a few hundred examples in all, derandomized (the same examples every run), no
shrinking, no deadline. Each finding (the 500s, the 501 for unsupported extras, the responses
missing from the schema) is pinned by a strict ``xfail`` test, and only the inputs that trigger
it are kept out of the property run, so everything else is still checked.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from secp256k1 import PrivateKey  # pyright: ignore[reportMissingTypeStubs]

from nilai.gateway.app import create_app
from nilai.settings import NilaiSettings
from tests.conftest import TEST_API_KEY
from tests.fakes.nildb import provision_builder, start_cluster

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
KNOWN_MODEL = "fake-model"
CHAT = "POST /v1/chat/completions"
RESPONSES = "POST /v1/responses"
MODEL_OPERATIONS = (CHAT, RESPONSES)
"""The operations that reach the model server: generated bodies are pointed at its model."""
REPORT = "GET /v1/attestation/report"
SET_PRICE = "PUT /v1/pricing/{model}"
DELETE_PRICE = "DELETE /v1/pricing/{model}"
PRICING = ("GET /v1/pricing", "GET /v1/pricing/{model}")
ADMIN_OPERATIONS = (SET_PRICE, DELETE_PRICE)
"""Sent with the admin token (configured on the gateway under test), not the API key."""
AUTHENTICATED = (
    "GET /v1/models",
    "GET /v1/usage",
    REPORT,
    CHAT,
    RESPONSES,
    *PRICING,
    *ADMIN_OPERATIONS,
)
ADMIN_TOKEN = "schemathesis-admin-token-0123456789"  # pragma: allowlist secret
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def documented_operations() -> tuple[str, ...]:
    """Every operation the app factory documents, read at collection (nothing is started)."""
    settings = NilaiSettings(
        data_dir=Path(tempfile.gettempdir()) / "nilai-unused", docs_enabled=True
    )
    spec = create_app(settings).openapi()
    return tuple(
        f"{method.upper()} {path}" for path, methods in spec["paths"].items() for method in methods
    )


# A new route is fuzzed as soon as it is documented.
OPERATIONS = documented_operations()
# Examples per run: chat and responses are the ones with inputs; the others have one request.
POSITIVE_EXAMPLES = {CHAT: 80, RESPONSES: 50, SET_PRICE: 30}
NEGATIVE_EXAMPLES = {CHAT: 50, RESPONSES: 30, SET_PRICE: 30}
CONFORMANCE_EXAMPLES = {CHAT: 20, RESPONSES: 15}
OTHER_EXAMPLES = 5

Check = Callable[..., Any]


@dataclass
class Live:
    """The gateway under test, the schema it serves, and one HTTP session to send cases on."""

    base_url: str
    schema: schemathesis.BaseSchema
    session: requests.Session

    def operation(self, label: str) -> Any:
        method, path = label.split(" ", 1)
        return self.schema[path][method]


@pytest.fixture
def gateway_url(start_fake, start_gateway) -> Iterator[str]:
    """A gateway with every feature on: nilDB private prompts too (the stand-in cluster), a
    model server that serves the Responses API as well as chat, and an admin token (prices)."""
    fake = start_fake(responses_support=True)
    cluster = start_cluster(2)
    try:
        secret = secrets.token_bytes(32)
        _, collection = provision_builder(cluster, PrivateKey(secret, raw=True))
        yield start_gateway(
            upstream_urls=[fake.url],
            nildb_nodes=cluster.node_urls,
            nildb_nilauth_url=cluster.nilauth_url,
            nildb_builder_key=secret.hex(),
            nildb_collection=collection,
            admin_token=ADMIN_TOKEN,
        ).url
    finally:
        cluster.stop()


@pytest.fixture
def live(gateway_url: str) -> Iterator[Live]:
    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    with requests.Session() as session:
        yield Live(gateway_url, schema, session)


def has_inputs(op: Any) -> bool:
    """Inputs other than the bearer credential (invalid credentials are tested elsewhere)."""
    params = [p for p in op.iter_parameters() if p.name.lower() != "authorization"]
    return bool(params) or len(op.body) > 0


def bounded(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report the first failure
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def with_known_model(case: Any) -> Any:
    """Point a generated chat or responses request at the fake's model, to reach the model path."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = KNOWN_MODEL
    return case


def without_unsupported_extras(case: Any) -> Any:
    """Drop the extras this gateway refuses (nilrag) or is not configured for (web search, 503):
    valid cases stay valid without them."""
    if isinstance(case.body, dict):
        case.body.pop("web_search", None)
        case.body.pop("nilrag", None)
    return case


def cases(op: Any, mode: GenerationMode) -> st.SearchStrategy[Any]:
    strategy = op.as_strategy(mode)
    if op.label not in MODEL_OPERATIONS or mode is not GenerationMode.POSITIVE:
        # Negative cases are left as generated: an edit could make them valid.
        return strategy
    strategy = strategy.map(without_unsupported_extras)
    # Random model names all end in 404; most examples should reach the model server.
    return st.one_of(strategy.map(with_known_model), strategy)


# --- inputs that trigger the bugs pinned below (kept out of the property run) ---------------


def has_int_beyond_64_bits(value: object) -> bool:
    """See ``test_integer_beyond_64_bits_is_a_client_error``."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -(2**63) <= value < 2**64
    if isinstance(value, dict):
        return any(has_int_beyond_64_bits(v) for v in value.values())
    if isinstance(value, list):
        return any(has_int_beyond_64_bits(v) for v in value)
    return False


def has_unhashable_part_type(body: object) -> bool:
    """See ``test_content_part_type_that_is_not_a_string_is_a_client_error``."""
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and isinstance(part.get("type"), list | dict):
                return True
    return False


def asks_for_an_unsupported_extra(body: object) -> bool:
    """Web search or NilRAG asked of a gateway without them: 503 naming the setting (see
    ``test_nilrag_on_a_gateway_without_it_is_503_naming_the_setting`` and the web search one
    below it)."""
    if not isinstance(body, dict):
        return False
    nilrag = body.get("nilrag")
    return body.get("web_search") not in (None, False, 0) or (
        isinstance(nilrag, dict) and bool(nilrag)
    )


def triggers_known_finding(case: Any) -> bool:
    body = case.body
    return (
        has_int_beyond_64_bits(body)
        or has_unhashable_part_type(body)
        or asks_for_an_unsupported_extra(body)
    )


def explicit_cases(op: Any, mode: GenerationMode) -> list[Any]:
    """Hand-written requests every run starts with, so each response kind is always seen."""
    if mode is not GenerationMode.POSITIVE:
        return []
    if op.label == SET_PRICE:
        price = {
            "prompt_tokens_price": 1.5,
            "completion_tokens_price": "2.25",
            "web_search_cost": 0,
        }
        return [
            op.Case(path_parameters={"model": model}, body=price, media_type="application/json")
            for model in (KNOWN_MODEL, "org/not-served-yet")
        ]
    if op.label == RESPONSES:
        return [
            op.Case(body=body, media_type="application/json")
            for body in (
                {"model": KNOWN_MODEL, "input": "hi"},
                {"model": KNOWN_MODEL, "input": "hi", "instructions": "Be brief.", "stream": True},
                {"model": KNOWN_MODEL, "input": [{"role": "user", "content": "hi"}]},
                {"model": KNOWN_MODEL, "input": "hi", "previous_response_id": "resp_1"},
                {"model": "no-such-model", "input": "hi"},
            )
        ]
    if op.label != CHAT:
        return []
    messages = [{"role": "user", "content": "hi"}]
    bodies = [
        {"model": KNOWN_MODEL, "messages": messages},
        {"model": KNOWN_MODEL, "messages": messages, "stream": True},
        {
            "model": KNOWN_MODEL,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {"model": "no-such-model", "messages": messages},
    ]
    return [op.Case(body=body, media_type="application/json") for body in bodies]


# --- the runner ----------------------------------------------------------------------------


def run(
    live: Live,
    label: str,
    mode: GenerationMode,
    checks: list[Check],
    max_examples: int,
    *,
    headers: dict[str, str] | None = None,
) -> dict[int, int]:
    """Send generated cases for one operation; raise AssertionError on the first failed check."""
    op = live.operation(label)
    if headers is None:
        headers = ADMIN if label in ADMIN_OPERATIONS else AUTH
    statuses: dict[int, int] = {}

    def one(case: Any) -> None:
        assume(not triggers_known_finding(case))
        response = case.call(
            base_url=live.base_url, session=live.session, headers=headers, timeout=15
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as group:
            raise AssertionError(str(group)) from None

    test = given(case=cases(op, mode))(one)
    for case in explicit_cases(op, mode):
        test = example(case=case)(test)
    bounded(max_examples)(test)()
    return statuses


# --- property tests ------------------------------------------------------------------------


def test_every_operation_is_fuzzed(live):
    labels = {result.ok().label for result in live.schema.get_all_operations()}
    assert labels == set(OPERATIONS)  # the live gateway documents what was collected
    assert {CHAT, *AUTHENTICATED} <= labels


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_server_error_and_responses_match_the_schema(live, label):
    positive = run(
        live,
        label,
        GenerationMode.POSITIVE,
        [not_a_server_error, response_schema_conformance],
        POSITIVE_EXAMPLES.get(label, OTHER_EXAMPLES),
    )
    assert positive
    if label in MODEL_OPERATIONS:
        assert positive.get(200, 0) >= 10, f"too few requests reached the model: {positive}"
    if label == SET_PRICE:
        assert positive.get(200, 0) >= 2, f"no price was set: {positive}"
    if not has_inputs(live.operation(label)):
        return
    negative = run(
        live,
        label,
        GenerationMode.NEGATIVE,
        [not_a_server_error, response_schema_conformance, negative_data_rejection],
        NEGATIVE_EXAMPLES.get(label, OTHER_EXAMPLES),
    )
    assert negative
    # A case whose only mutation was the credential header is sent with the valid key (the run
    # always sends it), so it may be answered 200; schemathesis' own negative_data_rejection
    # check judges the rest.
    assert all(status < 500 for status in negative), negative
    assert any(400 <= status < 500 for status in negative), negative


def conformance_params() -> Iterator[Any]:
    both = [status_code_conformance, content_type_conformance]
    for label in OPERATIONS:
        if label != CHAT:
            yield pytest.param(label, both, id=label)
    # One finding each, so fixing one of them turns its test into an XPASS.
    yield pytest.param(CHAT, [status_code_conformance], id=f"{CHAT}-status")
    yield pytest.param(CHAT, [content_type_conformance], id=f"{CHAT}-content-type")


@pytest.mark.parametrize(("label", "checks"), list(conformance_params()))
def test_status_codes_and_content_types_are_documented(live, label, checks):
    examples = CONFORMANCE_EXAMPLES.get(label, OTHER_EXAMPLES)
    run(live, label, GenerationMode.POSITIVE, checks, examples)
    if has_inputs(live.operation(label)):
        run(live, label, GenerationMode.NEGATIVE, checks, examples)


def test_unauthenticated_answers_are_documented(live):
    for label in AUTHENTICATED:
        statuses = run(
            live, label, GenerationMode.POSITIVE, [status_code_conformance], 3, headers={}
        )
        assert statuses == {401: statuses[401]}


# --- the bugs found, pinned ----------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(base_url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=10)


def assert_client_error(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "extra",
    [
        {"top_k": 2**70},
        {"messages": [{"role": "user", "content": "hi", "x": 2**70}]},
        {"stream": True, "stream_options": {"include_usage": True, "x": -(2**70)}},
    ],
    ids=["top_k", "message-extra", "stream-options-extra"],
)
def test_integer_beyond_64_bits_is_a_client_error(gateway_url, extra):
    assert_client_error(chat(gateway_url, {"model": KNOWN_MODEL, "messages": MESSAGES, **extra}))


def test_integer_beyond_64_bits_in_an_ignored_field_is_served(gateway_url):
    """Unknown top-level fields are not forwarded, so their values cannot break anything."""
    response = chat(gateway_url, {"model": KNOWN_MODEL, "messages": MESSAGES, "x": 2**70})
    assert response.status_code == 200


@pytest.mark.parametrize("part_type", [["image_url"], {"a": 1}], ids=["list", "object"])
@pytest.mark.parametrize("model", [KNOWN_MODEL, "no-such-model"])
def test_content_part_type_that_is_not_a_string_is_a_client_error(gateway_url, part_type, model):
    messages = [{"role": "user", "content": [{"type": part_type, "text": "hi"}]}]
    assert_client_error(chat(gateway_url, {"model": model, "messages": messages}))


def test_a_malformed_nilrag_is_a_client_error(gateway_url):
    body = {"model": KNOWN_MODEL, "messages": MESSAGES, "nilrag": {"nodes": []}}
    response = chat(gateway_url, body)
    assert_client_error(response)
    assert response.json()["error"]["param"] == "nilrag.nodes"


def test_nilrag_on_a_gateway_without_it_is_503_naming_the_setting(gateway_url):
    node = {
        "bearer_token": "t",
        "schema_id": "5b0c7a3e-7f7b-4b8e-9d2a-0b6f4f7f1a11",
        "diff_query_id": "6c1d8b4f-8a8c-4c9f-8e3b-1c7a5a8a2b22",
    }
    nodes = [{**node, "url": f"https://node-{name}.example/api/v1"} for name in "ab"]
    body = {"model": KNOWN_MODEL, "messages": MESSAGES, "nilrag": {"nodes": nodes}}
    response = chat(gateway_url, body)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "nilrag_not_configured"
    assert "NILAI_NILRAG_ENABLED" in error["message"]


def test_web_search_on_a_gateway_without_a_search_key_is_503_naming_the_setting(gateway_url):
    response = chat(gateway_url, {"model": KNOWN_MODEL, "messages": MESSAGES, "web_search": True})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "web_search_not_configured"
    assert "NILAI_WEB_SEARCH_API_KEY" in error["message"]


def test_known_bug_filters_match_the_pinned_inputs():
    assert has_int_beyond_64_bits({"a": [{"b": 2**64}]})
    assert has_int_beyond_64_bits({"a": -(2**63) - 1})
    assert not has_int_beyond_64_bits({"a": [2**64 - 1, -(2**63), True, 1.5e300]})
    assert has_unhashable_part_type({"messages": [{"content": [{"type": ["x"]}]}]})
    assert not has_unhashable_part_type({"messages": [{"content": [{"type": "text"}]}]})
    assert not has_unhashable_part_type(b"\x00")
    assert asks_for_an_unsupported_extra({"web_search": True})
    assert asks_for_an_unsupported_extra({"web_search": "yes"})  # refused as a non-boolean
    assert asks_for_an_unsupported_extra({"nilrag": {"a": 1}})
    assert not asks_for_an_unsupported_extra({"web_search": False, "nilrag": {}})
