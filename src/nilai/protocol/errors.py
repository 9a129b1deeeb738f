"""The OpenAI error shape, for documenting error responses."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorInfo(BaseModel):
    """What went wrong; ``param`` names the request field when one is at fault."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error body: ``{"error": {...}}``."""

    error: ErrorInfo


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these statuses, all in the OpenAI error shape."""
    return {
        status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        for status in statuses
    }


_DESCRIPTIONS = {
    400: "The request cannot be served as sent.",
    401: "Missing or invalid credentials.",
    403: "The caller may not use this endpoint.",
    404: "Unknown model.",
    413: "The body is over the size limit.",
    415: "The body is declared as something other than application/json.",
    422: "A field is missing or out of bounds (param names it).",
    429: "A rate or concurrency limit is reached (see Retry-After).",
    500: "Internal error (no detail is given).",
    502: "The model server answered with something unusable.",
    503: "No model server available, or rate limiting (or nilDB, nilauth) unavailable.",
    504: "The time limit passed.",
}
