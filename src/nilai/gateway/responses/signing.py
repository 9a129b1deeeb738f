"""Signing Responses API answers as DESIGN §3 specifies, for whole objects and for streams."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nilai.crypto.domains import RESPONSE_COMPLETED, RESPONSE_OBJECT, SignatureDomain
from nilai.crypto.keys import Signer
from nilai.errors import UpstreamProtocolError
from nilai.gateway.chat.signing import (
    SignedSequence,
    claim_object,
    drop_gateway_fields,
    sign_object,
)


def sign_response(
    body: dict[str, Any],
    signer: Signer,
    request_sha256: str,
    *,
    added: Mapping[str, object] | None = None,
) -> bytes:
    """Bind a Responses API object to the request, sign its canonical JSON, return the bytes.

    ``added`` are fields the gateway puts in the signed object itself (``sources``).

    Raises:
        UpstreamProtocolError: The model server's answer says it is not a response.
    """
    return sign_object(
        body,
        signer,
        request_sha256,
        kind=RESPONSE_OBJECT,
        domain=SignatureDomain.RESPONSE,
        added=added,
    )


class ResponseStreamSigner(SignedSequence):
    """Signs a Responses API stream: ``response.completed`` over every earlier event's data.

    As for chat streams (``SignedSequence``), in the ``RESPONSE_STREAM`` domain. The last
    payload carries ``request_sha256`` and ``signature`` at its top level, next to ``type``;
    ``added`` (the gateway's ``sources``) goes inside its ``response`` object, where the
    answer's data is.
    """

    def __init__(
        self, signer: Signer, request_sha256: str, *, added: Mapping[str, object] | None = None
    ) -> None:
        super().__init__(signer, request_sha256, SignatureDomain.RESPONSE_STREAM)
        self._added = dict(added or {})

    def last(self, payload: dict[str, Any]) -> bytes:
        """Sign the ``response.completed`` payload as the final event and return its data.

        Raises:
            UpstreamProtocolError: The payload is not a ``response.completed`` event with a
                response object in it.
        """
        if payload.get("type") != RESPONSE_COMPLETED:
            # Only the completed event ends a stream the verifier accepts; signing another
            # would hand the client an answer that fails verification.
            raise UpstreamProtocolError(
                f"The model server's last stream event is not {RESPONSE_COMPLETED}."
            )
        response: Any = payload.get("response")  # Any: checked just below
        if not isinstance(response, dict):
            raise UpstreamProtocolError(
                f"The model server's {RESPONSE_COMPLETED} event holds no response object."
            )
        inner: dict[str, Any] = response  # pyright: ignore[reportUnknownVariableType]
        claim_object(inner, RESPONSE_OBJECT)
        drop_gateway_fields(payload)
        drop_gateway_fields(inner)
        inner.update(self._added)
        return self.seal(payload)
