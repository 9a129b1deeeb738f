"""Turn a parsed Responses request into a ``ValidatedResponses``: served, and able to do it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.errors import InvalidRequest
from nilai.gateway.chat.dispatch import RESPONSES_PATH
from nilai.gateway.chat.validate import check_output_limit, served_model
from nilai.gateway.pipeline import ModelRequest
from nilai.protocol.models import RESPONSES_FEATURE, ModelCard
from nilai.protocol.responses import ResponsesRequest, upstream_payload


@dataclass(frozen=True, slots=True)
class ValidatedResponses:
    """A request checked against its model; ``payload`` is what the model server receives."""

    request: ResponsesRequest
    card: ModelCard
    payload: bytes
    context: tuple[str, ...] = ()
    """What the gateway puts ahead of the client's instructions (a private prompt, sources)."""

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
            path=RESPONSES_PATH,
            feature=RESPONSES_FEATURE,
            conversation_param="input",
        )

    def hide_context(self, response: dict[str, Any]) -> bool:
        """Put the client's own instructions back into a response object; True if changed.

        Model servers echo the ``instructions`` they received, which hold what the gateway
        added (a private prompt that must never reach the client, web sources); the client
        gets back what it sent.
        """
        if not self.context or "instructions" not in response:
            return False
        response["instructions"] = self.request.instructions
        return True

    def with_instructions(self, text: str) -> ValidatedResponses:
        """This request with ``text`` added to the instructions the gateway puts first.

        The additions come in the order added, then the client's own instructions; the
        request itself is left as sent.
        """
        context = (*self.context, text)
        payload = upstream_payload(self.request, instructions="\n\n".join(context))
        return replace(self, context=context, payload=payload)


def validate_responses(
    request: ResponsesRequest, snapshot: DiscoverySnapshot
) -> ValidatedResponses:
    """Check ``request`` against the model it names, or raise a ``NilaiError``.

    Raises:
        InvalidRequest: The request needs server-side state, or the model's servers do not
            serve the Responses API, tools or images (400).
        NotFound: The model is not served (404; 503 if it was until moments ago).
        ValidationFailed: ``max_output_tokens`` is above the model's limit (422).
    """
    request.refused_state_fields()
    if (request.model_extra or {}).get("nilrag") is not None:
        # Never passed through: it holds the client's bearer tokens for its nilDB nodes.
        raise InvalidRequest(
            "nilrag is available on POST /v1/chat/completions only.",
            param="nilrag",
            code="not_supported",
        )
    card = served_model(request.model, snapshot)
    # Any of the model's servers will do: requests go only to those that announce it.
    if not snapshot.announces(card.id, RESPONSES_FEATURE):
        raise InvalidRequest(
            f"The model '{card.id}' is not served with the Responses API: its model servers do "
            f"not announce the '{RESPONSES_FEATURE}' capability (GET /v1/models lists it in "
            "supported_features). Use POST /v1/chat/completions for this model.",
            param="model",
            code="responses_not_supported",
        )
    if request.tools and not card.tool_support:
        raise InvalidRequest(f"The model '{card.id}' does not support tools.", param="tools")
    if request.has_image() and not card.multimodal_support:
        raise InvalidRequest(f"The model '{card.id}' does not accept images.", param="input")
    check_output_limit(card, request.max_output_tokens, "max_output_tokens")
    return ValidatedResponses(request, card, upstream_payload(request))
