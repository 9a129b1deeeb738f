"""Turn a parsed request into a ``ValidatedChat``: the model exists and can do what is asked."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, cast

import orjson

from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.errors import InvalidRequest, NotFound, UpstreamUnavailable, ValidationFailed
from nilai.gateway.pipeline import ModelRequest
from nilai.protocol.chat import NILAI_ONLY_FIELDS, ChatCompletionRequest
from nilai.protocol.models import ModelCard

MODEL_RETRY_AFTER_S = 1
"""Retry-After for a model that vanished moments ago; servers announce again within seconds."""

IGNORED_FIELDS_HEADER = "x-nilai-ignored-fields"
"""Names the request's top-level fields that neither OpenAI, vLLM nor nilai define."""
_IGNORED_NAMES_SHOWN = 16
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class ValidatedChat:
    """A request checked against its model; ``payload`` is what the model server receives."""

    request: ChatCompletionRequest
    card: ModelCard
    payload: bytes
    system_context: tuple[str, ...] = ()
    """What the gateway adds ahead of the client's messages (a private prompt, web sources)."""
    client_system_context: str | None = None
    """Retrieved documents added to the client's own leading system message (NilRAG)."""

    @property
    def model(self) -> str:
        """The model id."""
        return self.card.id

    @property
    def model_request(self) -> ModelRequest:
        """What the pipeline's shared stages need to know of this request."""
        request = self.request
        return ModelRequest(
            card=self.card,
            payload=self.payload,
            stream=request.stream,
            web_search=request.web_search,
            requested_max_tokens=request.requested_max_tokens,
        )

    def with_system_context(self, text: str) -> ValidatedChat:
        """This chat with ``text`` added to the system message the gateway puts first.

        One system message holds every addition, in the order added: chat templates that take
        only a leading system message still see them all. The request is left as sent.
        """
        context = (*self.system_context, text)
        return replace(self, system_context=context)._with_payload()

    def with_retrieved_context(self, text: str) -> ValidatedChat:
        """This chat with retrieved documents (NilRAG) in its first system message.

        The first system message is the gateway's when it added one, else the client's own
        leading one (a string gets ``text`` appended after a blank line; parts get one more
        text part), else a new one at index 0. A request that has a system message never loses
        the documents (upstream dropped them).
        """
        if self.system_context or not self.request.starts_with_system():
            return self.with_system_context(text)
        return replace(self, client_system_context=text)._with_payload()

    def _with_payload(self) -> ValidatedChat:
        system_prompt = "\n\n".join(self.system_context) if self.system_context else None
        payload = upstream_payload(
            self.request, system_prompt=system_prompt, client_system=self.client_system_context
        )
        return replace(self, payload=payload)


def validate_chat(request: ChatCompletionRequest, snapshot: DiscoverySnapshot) -> ValidatedChat:
    """Check ``request`` against the model it names, or raise a ``NilaiError``."""
    card = served_model(request.model, snapshot)
    _check_capabilities(request, card)
    return ValidatedChat(request, card, upstream_payload(request))


def served_model(model: str, snapshot: DiscoverySnapshot) -> ModelCard:
    """The card of ``model``, which some model server announces, or raise a ``NilaiError``.

    Raises:
        NotFound: No model server serves ``model`` (404).
        UpstreamUnavailable: It was served until moments ago (503 with ``Retry-After``).
    """
    card = snapshot.card(model)
    if card is not None:
        return card
    if snapshot.vanished_recently(model):
        # Served moments ago: its server is restarting or announcing itself again.
        raise UpstreamUnavailable(
            f"The model '{model}' is temporarily unavailable (its model servers "
            "are not announced right now); retry shortly.",
            headers={"Retry-After": str(MODEL_RETRY_AFTER_S)},
        )
    raise NotFound(
        f"The model '{model}' does not exist or is not being served; "
        "GET /v1/models lists the available models.",
        param="model",
        code="model_not_found",
    )


def check_output_limit(card: ModelCard, wanted: int | None, param: str) -> None:
    """Refuse an output limit above the model's context length (422 naming ``param``)."""
    limit = card.max_model_len
    if limit is not None and wanted is not None and wanted > limit:
        raise ValidationFailed(
            f"{param} is {wanted}, above the model's limit of {limit} tokens.", param=param
        )


def _check_capabilities(request: ChatCompletionRequest, card: ModelCard) -> None:
    if request.tools and not card.tool_support:
        raise InvalidRequest(f"The model '{card.id}' does not support tools.", param="tools")
    if request.has_image() and not card.multimodal_support:
        raise InvalidRequest(f"The model '{card.id}' does not accept images.", param="messages")
    param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    check_output_limit(card, request.requested_max_tokens, param)


def upstream_payload(
    request: ChatCompletionRequest,
    *,
    system_prompt: str | None = None,
    client_system: str | None = None,
) -> bytes:
    """The JSON sent upstream: only fields the client set, known to OpenAI or vLLM.

    A ``system_prompt`` (the gateway's additions: a private prompt from nilDB, web search
    sources) becomes the first message, ahead of the client's own system message; the request
    itself is left as the client sent it. ``client_system`` is text added to the client's own
    leading system message (retrieved documents).

    Streams always ask the model server for usage, so every stream can be accounted; the
    relay forwards the usage chunk only to clients that asked for it.
    """
    exclude = set(NILAI_ONLY_FIELDS) | set(request.unknown_fields())
    data = request.model_dump(mode="json", exclude_unset=True, exclude=exclude)
    data["model"] = request.model
    if client_system is not None:
        data["messages"][0] = _with_text(data["messages"][0], client_system)
    if system_prompt is not None:
        data["messages"] = [{"role": "system", "content": system_prompt}, *data["messages"]]
    if request.stream:
        # Running totals on every chunk let a stream the client abandons be accounted exactly.
        options = dict(data.get("stream_options") or {})
        options["include_usage"] = True
        options["continuous_usage_stats"] = True
        data["stream_options"] = options
    try:
        return orjson.dumps(data)
    except TypeError as exc:  # orjson refuses integers beyond 64 bits
        raise ValidationFailed(
            "The request holds a number outside the 64-bit integer range.", code="invalid_value"
        ) from exc


def _with_text(message: dict[str, Any], text: str) -> dict[str, Any]:
    """``message`` (a dumped system message) with ``text`` after its own content."""
    content = message.get("content")
    if isinstance(content, list):
        parts = cast(list[object], content)
        return {**message, "content": [*parts, {"type": "text", "text": text}]}
    own = content if isinstance(content, str) else ""
    return {**message, "content": f"{own}\n\n{text}" if own else text}


def ignored_fields_headers(request: ChatCompletionRequest) -> dict[str, str]:
    """``x-nilai-ignored-fields``, naming the fields dropped from the request, if any.

    A mistyped option (``max_tokenz``) is not an error, as with OpenAI clients that send
    extras; the header lets its author see it had no effect. Only plain names are shown (a
    header must stay one printable line); the rest are counted.
    """
    unknown = request.unknown_fields()
    if not unknown:
        return {}
    plain = [name for name in unknown if _PLAIN_NAME.fullmatch(name)][:_IGNORED_NAMES_SHOWN]
    others = len(unknown) - len(plain)
    shown = ", ".join(plain)
    if others:
        shown += f"{', ' if shown else ''}and {others} other{'s' if others > 1 else ''}"
    return {IGNORED_FIELDS_HEADER: shown}
