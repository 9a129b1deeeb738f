"""NUC delegation policies, checked against the chat request they are used for.

A delegation's ``pol`` restricts what its holder may do: ``[["==", "$.req.model", "m"]]`` lets
the holder's invocations call model ``m`` only. The ``nuc`` library would match policies against
the invocation's own ``args``, which the invoking party writes and the gateway never compares with
the HTTP body (nilai-py sends ``{}``), so here they are matched against the request itself:

- ``$.req.<field>`` and ``.args.<field>`` both select a field of the parsed chat request
  (``REQUEST_FIELDS``); whatever the invocation put in its own ``args`` is ignored.
- ``.iss``, ``.aud``, ``.sub`` and ``.cmd`` select the invocation's issuer, audience, subject and
  command, as the ``nuc`` library does.

Anything else (another root, another field, a deeper path) cannot be evaluated, and a token whose
policies use it is refused naming the selector: a restriction the gateway cannot check must not
become no restriction. Values compare as JSON values: ``false`` and ``0`` are themselves (the
library reads them as null), a field the request leaves out is ``null``, and ``true`` never
equals ``1``.

The policies are checked when the token is verified (every selector supported, width and depth
within bounds) and again for each request (``check_request_policies``), before it is counted
against any limit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

# nuc ships no type information; pyright reads its (annotated) source instead.
from nuc.policy import (  # pyright: ignore[reportMissingTypeStubs]
    AndConnector,
    AnyOfOperator,
    EqualsOperator,
    NotConnector,
    NotEqualsOperator,
    OperatorPolicy,
    OrConnector,
    Policy,
)
from nuc.selector import Selector, SelectorTarget  # pyright: ignore[reportMissingTypeStubs]
from nuc.validate import PolicyTreeProperties  # pyright: ignore[reportMissingTypeStubs]

from nilai.auth.base import Principal
from nilai.errors import AuthenticationFailed
from nilai.protocol.chat import ChatCompletionRequest
from nilai.protocol.responses import ResponsesRequest

MAX_POLICIES = 10
"""Policies per delegation, and the widest ``and``/``or``/``anyOf`` (the ``nuc`` defaults)."""
MAX_POLICY_DEPTH = 5
_SHOWN_CHARS = 160
"""A policy or selector quoted in an error is cut at this length (values may be long)."""

REQUEST_FIELDS: dict[str, str] = {
    "model": "the model id (string)",
    "stream": "whether the answer is streamed (boolean)",
    "max_tokens": "the completion limit asked for, as max_tokens or max_completion_tokens "
    "(integer, null when not set)",
    "max_completion_tokens": "the same value as max_tokens",
    "temperature": "the sampling temperature (number, null when not set)",
    "top_p": "nucleus sampling (number, null when not set)",
    "tools": "whether the request declares tools (boolean)",
    "web_search": "whether web search is asked for (boolean)",
    "nilrag": "whether nilRAG is asked for (boolean)",
    "multimodal": "whether a message carries an image (boolean)",
}
"""What ``$.req.<field>`` (or ``.args.<field>``) selects; docs/API.md lists the same."""

TOKEN_FIELDS = ("iss", "aud", "sub", "cmd")
"""Fields of the invocation a policy may select with ``.<field>``."""

_REQUEST_ROOTS = {(SelectorTarget.CONTEXT, "req"), (SelectorTarget.TOKEN, "args")}

type Value = str | int | float | bool | None
type Rule = _Fixed | _Compare | _All | _Some | _Not


@dataclass(frozen=True, slots=True)
class _Fixed:
    """A comparison of the invocation's own fields, decided when the token is verified."""

    holds: bool


@dataclass(frozen=True, slots=True)
class _Compare:
    field: str
    operator: Literal["==", "!=", "anyOf"]
    values: tuple[object, ...]
    """The one value of ``==`` and ``!=``, the choices of ``anyOf``."""


@dataclass(frozen=True, slots=True)
class _All:
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class _Some:
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class _Not:
    rule: Rule


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    """One policy of a delegation, ready to be checked against a request."""

    rule: Rule
    text: str
    """The policy as written in the token (JSON, shortened), for error messages."""

    def allows(self, request: Mapping[str, Value]) -> bool:
        """Whether ``request`` (a ``request_document``) meets this policy."""
        return _holds(self.rule, request)


def compile_policies(
    policies: list[Policy], invocation: Mapping[str, str]
) -> tuple[RequestPolicy, ...]:
    """Check one delegation's policies and make them ready for requests.

    ``invocation`` holds the invocation's ``TOKEN_FIELDS``. Raises ``AuthenticationFailed``
    (401) for a policy that is too wide or too deep, or that selects what the gateway cannot
    evaluate; the message names the selector.
    """
    if len(policies) > MAX_POLICIES:
        raise _rejected("a delegation policy is too wide")
    compiled: list[RequestPolicy] = []
    for policy in policies:
        properties = PolicyTreeProperties.from_policy(policy)
        if properties.max_policy_width > MAX_POLICIES:
            raise _rejected("a delegation policy is too wide")
        if properties.max_depth > MAX_POLICY_DEPTH:
            raise _rejected("a delegation policy is too deep")
        compiled.append(RequestPolicy(_compile(policy, invocation), _shown(policy.serialize())))
    return tuple(compiled)


def request_document(request: ChatCompletionRequest | ResponsesRequest) -> dict[str, Value]:
    """The values ``$.req.<field>`` selects, read from the parsed request.

    A Responses API request has the same fields under the same names: ``max_tokens`` is its
    ``max_output_tokens``, and it never asks for nilRAG.
    """
    max_tokens = request.requested_max_tokens
    nilrag = isinstance(request, ChatCompletionRequest) and bool(request.nilrag)
    return {
        "model": request.model,
        "stream": request.stream,
        "max_tokens": max_tokens,
        "max_completion_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "tools": bool(request.tools),
        "web_search": request.web_search,
        "nilrag": nilrag,
        "multimodal": request.has_image(),
    }


def check_request_policies(
    principal: Principal, request: ChatCompletionRequest | ResponsesRequest
) -> None:
    """Refuse ``request`` (401) unless it meets every policy of the caller's delegations."""
    if not principal.request_policies:
        return
    document = request_document(request)
    for policy in principal.request_policies:
        if not policy.allows(document):
            raise AuthenticationFailed(
                "NUC token rejected: the request does not meet the delegation policy "
                f"{policy.text}.",
                code="nuc_policy_not_met",
            )


def _compile(policy: Policy, invocation: Mapping[str, str]) -> Rule:
    body = policy.body
    match body:
        case OperatorPolicy(selector=selector, operator=operator):
            return _compile_operator(selector, operator, invocation)
        case AndConnector(policies=policies):
            return _All(tuple(_compile(p, invocation) for p in policies))
        case OrConnector(policies=policies):
            return _Some(tuple(_compile(p, invocation) for p in policies))
        case NotConnector(policy=inner):
            return _Not(_compile(inner, invocation))


def _compile_operator(
    selector: Selector,
    operator: EqualsOperator | NotEqualsOperator | AnyOfOperator,
    invocation: Mapping[str, str],
) -> Rule:
    name: Literal["==", "!=", "anyOf"]
    match operator:
        case EqualsOperator(arg=value):
            name, values = "==", (value,)
        case NotEqualsOperator(arg=value):
            name, values = "!=", (value,)
        case AnyOfOperator(arg=choices):
            name, values = "anyOf", tuple(choices)
    match list(selector.path):
        case [root, field] if (selector.target, root) in _REQUEST_ROOTS and field in REQUEST_FIELDS:
            return _Compare(field, name, values)
        case [field] if selector.target is SelectorTarget.TOKEN and field in TOKEN_FIELDS:
            return _Fixed(_compares(_Compare(field, name, values), invocation[field]))
        case _:
            pass
    supported = ", ".join(
        [*(f"$.req.{name}" for name in REQUEST_FIELDS), *(f".{name}" for name in TOKEN_FIELDS)]
    )
    raise _rejected(
        f"a delegation policy uses the selector {_shown(str(selector))}, which this gateway "
        f"cannot evaluate (it can: {supported}; .args.<field> reads the same request fields "
        "as $.req.<field>)",
        code="unsupported_nuc_policy",
    )


def _holds(rule: Rule, request: Mapping[str, Value]) -> bool:
    match rule:
        case _Fixed(holds=holds):
            return holds
        case _Compare(field=field):
            return _compares(rule, request[field])
        case _All(rules=rules):
            # As in nuc: an empty "and" holds for nothing.
            return bool(rules) and all(_holds(r, request) for r in rules)
        case _Some(rules=rules):
            return any(_holds(r, request) for r in rules)
        case _Not(rule=inner):
            return not _holds(inner, request)


def _compares(compare: _Compare, value: object) -> bool:
    match compare.operator:
        case "==":
            return _same(value, compare.values[0])
        case "!=":
            return not _same(value, compare.values[0])
        case "anyOf":
            return any(_same(value, choice) for choice in compare.values)


def _same(left: object, right: object) -> bool:
    """JSON equality: Python's would let ``true`` equal ``1`` and ``false`` equal ``0``."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    return left == right


def _shown(value: object) -> str:
    """``value`` as JSON (control characters escaped), cut to a readable length."""
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _rejected(reason: str, *, code: str = "invalid_nuc_token") -> AuthenticationFailed:
    return AuthenticationFailed(f"NUC token rejected: {reason}.", code=code)
