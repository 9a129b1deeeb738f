"""What one chat request carries through the pipeline: facts and outcome, never content."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nilai.auth.base import Principal
from nilai.billing.meter import CreditLock
from nilai.billing.prices import Price
from nilai.errors import NilaiError, RateLimited
from nilai.gateway.disconnect import ClientGone
from nilai.limits.base import Limit
from nilai.protocol.base import json_count, json_object
from nilai.store.base import QueryLog

CLIENT_CLOSED = 499

CHARS_PER_TOKEN = 4
"""A prompt's size in tokens, estimated from its text where the model server never said: about
four characters per token for English text under the usual tokenizers."""

CHAT_API = "chat"
RESPONSES_API = "responses"

CHAT_USAGE = ("prompt_tokens", "completion_tokens")
"""The names a chat completion's ``usage`` gives its prompt and completion token counts."""
RESPONSES_USAGE = ("input_tokens", "output_tokens")
"""The names a Responses API object's ``usage`` gives them."""


@dataclass(slots=True)
class RequestContext:
    """Per-request facts: who, which request bytes, and what happened."""

    request_id: str
    principal: Principal
    request_sha256: str
    api: str = CHAT_API
    """Which API the request came through (``chat``, ``responses``): logs and metrics."""
    usage_names: tuple[str, str] = CHAT_USAGE
    """The names of the prompt and completion token counts in the API's ``usage`` objects."""
    started: float = field(default_factory=time.perf_counter)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    model: str = ""
    streamed: bool = False
    tools: bool = False
    web_search: bool = False
    nilrag: bool = False
    multimodal: bool = False
    prompt_document: bool = False
    searches: int = 0
    tool_calls: int = 0
    nilrag_chunks: int = 0
    earlier_prompt_tokens: int = 0
    earlier_completion_tokens: int = 0
    endpoint: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False
    model_accepted: bool = False
    """A model server answered 200: it started working on the request."""
    prompt_estimate: int = 0
    """The prompt's tokens as estimated from its text (``estimate_tokens``)."""
    first_token_s: float | None = None
    upstream_s: float | None = None
    status: int = 200
    error_kind: str | None = None
    refused_by: Limit | None = None
    price: Price | None = None
    """The model's price when the request was admitted (None before: a refusal costs nothing)."""
    credit_lock: CreditLock | None = None
    """Funds locked at the credit service for this request, until it is accounted."""
    cost_micro: int = 0

    @classmethod
    def begin(
        cls, request_id: str, principal: Principal, raw_body: bytes, *, api: str = CHAT_API
    ) -> RequestContext:
        """Start the context for a request to ``api`` whose body is ``raw_body``."""
        usage_names = RESPONSES_USAGE if api == RESPONSES_API else CHAT_USAGE
        sha256 = hashlib.sha256(raw_body).hexdigest()
        return cls(request_id, principal, sha256, api=api, usage_names=usage_names)

    def record_usage(self, usage: object) -> None:
        """Take token counts from an OpenAI ``usage`` object of the request's API, if it is one.

        The counts are the answer's as the client sees them: with the tokens of the request's
        earlier model calls in (``add_earlier_calls``).
        """
        counts = json_object(usage)
        if counts is None:
            return
        prompt, completion = self.usage_names
        self.prompt_tokens = json_count(counts.get(prompt))
        self.completion_tokens = json_count(counts.get(completion))
        self.usage_reported = True

    def count_earlier_call(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Count a model call made before the answer's in this request's tokens.

        The request's earlier calls: a web search's planner, and each tool round's call. Each
        is counted once, here; the answer's own usage is counted when it comes.
        """
        self.earlier_prompt_tokens += prompt_tokens
        self.earlier_completion_tokens += completion_tokens
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def add_earlier_calls(self, usage: object) -> bool:
        """Add the earlier calls' tokens to the answer's ``usage`` object in place.

        The client pays for every model call of its request (a web search's planner, each tool
        round), so the ``usage`` it gets (and the query log) counts them: ``prompt_tokens``,
        ``completion_tokens`` and ``total_tokens`` each include them, once (under the API's
        names: ``input_tokens`` and ``output_tokens`` for the Responses API). True if ``usage``
        was changed.
        """
        counts = json_object(usage)
        prompt, completion = self.earlier_prompt_tokens, self.earlier_completion_tokens
        if counts is None or not (prompt or completion):
            return False
        prompt_name, completion_name = self.usage_names
        counts[prompt_name] = json_count(counts.get(prompt_name)) + prompt
        counts[completion_name] = json_count(counts.get(completion_name)) + completion
        counts["total_tokens"] = json_count(counts.get("total_tokens")) + prompt + completion
        return True

    def settle(self) -> None:
        """Charge the estimated prompt of a request whose model server never reported usage.

        A stream the client leaves before the model server reported its usage (a Responses
        stream reports it only at the end; a chat stream with its first chunk), or an answer
        that never arrived whole, still had its prompt processed: it is charged at the
        estimate rather than not at all. Requests no model server accepted cost nothing.
        """
        if self.model_accepted and not self.usage_reported:
            self.prompt_tokens += self.prompt_estimate
            self.prompt_estimate = 0

    def count_chunk(self) -> None:
        """A content chunk arrived; counts as a token when the server reports no usage."""
        if not self.usage_reported:
            self.completion_tokens += 1

    def mark_first_token(self) -> None:
        """Note the time to the first streamed chunk."""
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started

    def fail(self, error: BaseException) -> None:
        """Record how the request ended badly."""
        if isinstance(error, RateLimited):
            self.refused_by = error.decision.limit
        if isinstance(error, NilaiError):
            self.status, self.error_kind = error.status, type(error).__name__
        elif isinstance(error, (GeneratorExit, asyncio.CancelledError, ClientGone)):
            self.status, self.error_kind = CLIENT_CLOSED, "ClientDisconnected"
        else:
            self.status, self.error_kind = 500, "InternalError"

    def estimate_prompt(self, texts: Iterable[str]) -> None:
        """Estimate the prompt's tokens from ``texts``, everything the model server reads."""
        chars = sum(len(text) for text in texts)
        self.prompt_estimate = -(-chars // CHARS_PER_TOKEN)

    def query_log(self) -> QueryLog:
        """The accounting row for this request."""
        ttft = None if self.first_token_s is None else self.first_token_s * 1000
        return QueryLog(
            id=uuid.uuid4().hex,
            request_id=self.request_id,
            account_id=self.principal.account_id,
            api_key_id=self.principal.key_id,
            model=self.model[:200],
            started_at=self.started_at,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            ttft_ms=ttft,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            status_code=self.status,
            error_kind=self.error_kind,
            streamed=self.streamed,
            tools=self.tools,
            web_search=self.web_search,
            nilrag=self.nilrag,
            multimodal=self.multimodal,
            prompt_document=self.prompt_document,
            searches=self.searches,
            tool_calls=self.tool_calls,
            nilrag_chunks=self.nilrag_chunks,
            cost_micro=self.cost_micro,
        )
