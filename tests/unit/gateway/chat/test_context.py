"""What a request is charged when its model server never reported usage (``settle``)."""

from __future__ import annotations

import pytest

from nilai.auth.base import Principal
from nilai.gateway.chat.context import RESPONSES_API, RequestContext


def _ctx(api: str = "chat") -> RequestContext:
    return RequestContext.begin("r", Principal("acct", "api_key"), b"{}", api=api)


@pytest.mark.parametrize(
    ("texts", "tokens"), [([], 0), (["abc"], 1), (["abcd"], 1), (["ab", "cde"], 2)]
)
def test_the_estimate_is_four_characters_a_token_rounded_up(texts: list[str], tokens: int):
    ctx = _ctx()
    ctx.estimate_prompt(texts)
    assert ctx.prompt_estimate == tokens


def test_an_accepted_request_without_usage_is_charged_the_estimate_once():
    ctx = _ctx()
    ctx.count_earlier_call(5, 2)  # a web search's planner, already counted
    ctx.estimate_prompt(["x" * 40])
    ctx.model_accepted = True
    ctx.count_chunk()
    ctx.settle()
    ctx.settle()  # accounting twice must not charge twice
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (15, 3)


def test_reported_usage_wins_over_the_estimate():
    ctx = _ctx(RESPONSES_API)
    ctx.estimate_prompt(["x" * 400])
    ctx.model_accepted = True
    ctx.record_usage({"input_tokens": 7, "output_tokens": 3})
    ctx.settle()
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (7, 3)


def test_a_request_no_model_server_accepted_costs_nothing():
    ctx = _ctx()
    ctx.estimate_prompt(["x" * 400])
    ctx.endpoint = "model-a"  # it answered, but not 200 (a rejection, an overload)
    ctx.settle()
    assert ctx.prompt_tokens == 0
