"""A loopback stand-in for the Brave Search API's web search, in Brave's wire shape.

What it speaks (Brave's API reference, api-dashboard.search.brave.com/api-reference/web/search/get,
and the response-header page api.search.brave.com/app/documentation/web-search/response-headers):

- ``GET /res/v1/web/search?q=…&count=…`` with header ``X-Subscription-Token``. ``q`` is 1 to 400
  characters, ``count`` 1 to 20 (default 20); other parameters (``safesearch``,
  ``text_decorations``, ``result_filter``, ...) are recorded and otherwise ignored. Answers ``200``
  ``{"type": "search", "query": {"original": q, ...}, "web": {"type": "search", "results":
  [{"type": "search_result", "title", "url", "description", "meta_url", ...}]}}`` with at most
  ``count`` results; with no results the ``web`` key is left out, as Brave does.
- Every answer carries ``X-RateLimit-Limit`` / ``-Policy`` / ``-Remaining`` / ``-Reset``: two
  comma-separated windows, per second and per month (``1, 15000``; ``1;w=1, 15000;w=2592000``;
  reset in seconds until each window resets).
- Errors are ``{"type": "ErrorResponse", "error": {"id", "status", "code", "detail", "meta":
  {"component"}}, "time"}``. A wrong token is ``422 SUBSCRIPTION_TOKEN_INVALID`` (Brave answers a
  bad key with 422, not 401); a missing token or a bad parameter ``422 VALIDATION``; a rate limit
  ``429 RATE_LIMITED`` (or ``QUOTA_LIMITED`` for the monthly quota), component ``rate_limiter``.

Control hook for tests (not part of Brave):

- ``POST /_control`` with any of: ``{"results": {query: [item, ...]}}`` (merged into the results
  by query; items are sent as given, so tests can send malformed ones; ``brave_result`` builds a
  realistic one), ``"default_results": [item, ...]`` (for any other query), ``"fail": {"status":
  500|503|429|401|..., "code": "RATE_LIMITED", "retry_after": 7, "remaining": "0, 100", "reset":
  "1, 1000"} | null`` (every search answers that error; ``retry_after`` adds ``Retry-After``),
  ``"delay_s": float`` (hold every search that long), ``"raw_body": str | null`` (answer ``200``
  with this body as ``application/json``, e.g. not JSON at all), ``"api_key": str``, ``"clear":
  true`` (forget results, queries and faults). Answers the settings in force.
- ``GET /_control/queries`` -> ``{"queries": [{"q", "count", "params", "token_ok"}]}``: every
  search received, in order (the token itself is never recorded).

Run alone: ``python -m tests.fakes.brave --port 18400``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DEFAULT_API_KEY = "brave-test-key"
MAX_COUNT = 20
MAX_QUERY_CHARS = 400
_RATE_LIMIT = "1, 15000"
_RATE_POLICY = "1;w=1, 15000;w=2592000"
_ERROR_DETAILS = {
    "SUBSCRIPTION_TOKEN_INVALID": ("The provided subscription token is invalid.", "authentication"),
    "VALIDATION": ("Unable to validate request parameter(s).", "validation"),
    "RATE_LIMITED": ("Request rate limit exceeded for plan.", "rate_limiter"),
    "QUOTA_LIMITED": ("Request quota limit exceeded for plan.", "rate_limiter"),
    "UNAUTHORIZED": ("Unauthorized.", "authentication"),
    "INTERNAL_ERROR": ("Internal server error.", "search"),
    "SERVICE_UNAVAILABLE": ("Service unavailable.", "search"),
}
_DEFAULT_CODES = {401: "UNAUTHORIZED", 422: "VALIDATION", 429: "RATE_LIMITED"}


def brave_result(title: str, url: str, description: str, **extra: Any) -> dict[str, Any]:
    """One web result as Brave sends it (the fields a client reads, and a few it ignores)."""
    parts = urlsplit(url)
    return {
        "type": "search_result",
        "title": title,
        "url": url,
        "description": description,
        "is_source_local": False,
        "is_source_both": False,
        "family_friendly": True,
        "language": "en",
        "profile": {"name": parts.hostname or "", "url": url, "long_name": parts.hostname or ""},
        "meta_url": {
            "scheme": parts.scheme,
            "netloc": parts.netloc,
            "hostname": parts.hostname or "",
            "path": parts.path,
        },
        **extra,
    }


def brave_error(status: int, code: str) -> dict[str, Any]:
    """Brave's error body for ``status`` and its ``code``."""
    detail, component = _ERROR_DETAILS.get(code, ("Error.", "search"))
    error = {
        "id": str(uuid.uuid4()),
        "status": status,
        "code": code,
        "detail": detail,
        "meta": {"component": component},
    }
    return {"type": "ErrorResponse", "error": error, "time": int(time.time())}


@dataclass
class BraveState:
    """What the stand-in answers (set over ``/_control``) and what it received."""

    api_key: str = DEFAULT_API_KEY
    results: dict[str, list[Any]] = field(default_factory=dict[str, list[Any]])
    default_results: list[Any] = field(default_factory=list[Any])
    fail: dict[str, Any] | None = None
    delay_s: float = 0.0
    raw_body: str | None = None
    queries: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])

    def settings(self) -> dict[str, Any]:
        """The control settings in force (never the API key)."""
        return {
            "results": self.results,
            "default_results": self.default_results,
            "fail": self.fail,
            "delay_s": self.delay_s,
            "raw_body": self.raw_body,
        }

    def clear(self) -> None:
        """Forget results, faults and received queries (the key stays)."""
        self.results.clear()
        self.default_results.clear()
        self.fail = None
        self.delay_s = 0.0
        self.raw_body = None
        self.queries.clear()


def _rate_headers(remaining: str = "1, 14999", reset: str = "1, 2592000") -> dict[str, str]:
    return {
        "X-RateLimit-Limit": _RATE_LIMIT,
        "X-RateLimit-Policy": _RATE_POLICY,
        "X-RateLimit-Remaining": remaining,
        "X-RateLimit-Reset": reset,
    }


def _error_response(status: int, code: str, headers: dict[str, str] | None = None) -> Response:
    all_headers = {**_rate_headers(), **(headers or {})}
    return JSONResponse(brave_error(status, code), status_code=status, headers=all_headers)


class _Handlers:
    """The routes of one stand-in, bound to its state."""

    def __init__(self, brave: BraveState) -> None:
        self.brave = brave

    async def search(self, request: Request) -> Response:
        params = dict(request.query_params)
        token = request.headers.get("x-subscription-token")
        query = params.get("q", "")
        count_text = params.get("count", str(MAX_COUNT))
        count = int(count_text) if count_text.isdigit() else -1
        self.brave.queries.append(
            {"q": query, "count": count, "params": params, "token_ok": token == self.brave.api_key}
        )
        if self.brave.delay_s:
            await asyncio.sleep(self.brave.delay_s)
        if token is None:
            return _error_response(422, "VALIDATION")
        if token != self.brave.api_key:
            return _error_response(422, "SUBSCRIPTION_TOKEN_INVALID")
        if not 1 <= len(query) <= MAX_QUERY_CHARS or not 1 <= count <= MAX_COUNT:
            return _error_response(422, "VALIDATION")
        if self.brave.fail is not None:
            return self._failure(self.brave.fail)
        if self.brave.raw_body is not None:
            return Response(
                self.brave.raw_body, media_type="application/json", headers=_rate_headers()
            )
        items = self.brave.results.get(query, self.brave.default_results)[:count]
        body: dict[str, Any] = {
            "type": "search",
            "query": {"original": query, "more_results_available": False},
        }
        if items:
            body["web"] = {"type": "search", "results": items, "family_friendly": True}
        return JSONResponse(body, headers=_rate_headers())

    def _failure(self, fail: dict[str, Any]) -> Response:
        status = int(fail.get("status", 500))
        code = str(fail.get("code") or _DEFAULT_CODES.get(status, "INTERNAL_ERROR"))
        headers: dict[str, str] = {}
        if status == 429:
            headers.update(
                _rate_headers(
                    str(fail.get("remaining", "0, 14000")), str(fail.get("reset", "1, 2592000"))
                )
            )
        if fail.get("retry_after") is not None:
            headers["Retry-After"] = str(fail["retry_after"])
        return _error_response(status, code, headers)

    async def control(self, request: Request) -> Response:
        raw: object = await request.json()
        body = cast(dict[str, Any], raw) if isinstance(raw, dict) else {}
        if body.get("clear"):
            self.brave.clear()
        if "results" in body:
            self.brave.results.update(cast(dict[str, list[Any]], body["results"]))
        if "default_results" in body:
            self.brave.default_results = list(cast(list[Any], body["default_results"]))
        if "fail" in body:
            self.brave.fail = cast(dict[str, Any] | None, body["fail"])
        if "delay_s" in body:
            self.brave.delay_s = float(body["delay_s"])
        if "raw_body" in body:
            self.brave.raw_body = cast(str | None, body["raw_body"])
        if "api_key" in body:
            self.brave.api_key = str(body["api_key"])
        return JSONResponse(self.brave.settings())

    async def queries(self, _request: Request) -> Response:
        return JSONResponse({"queries": self.brave.queries})


def create_brave_app(state: BraveState | None = None) -> Starlette:
    """The stand-in Brave Search API as an ASGI app; its state is ``app.state.brave``."""
    brave = state or BraveState()
    handlers = _Handlers(brave)
    app = Starlette(
        routes=[
            Route("/res/v1/web/search", handlers.search),
            Route("/_control", handlers.control, methods=["POST"]),
            Route("/_control/queries", handlers.queries),
        ]
    )
    app.state.brave = brave
    return app


def main() -> None:
    """Serve the stand-in Brave Search API on loopback until interrupted."""
    parser = argparse.ArgumentParser(description="A loopback stand-in for Brave Search.")
    parser.add_argument("--port", type=int, default=18400)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    print(json.dumps({"brave_url": url}), flush=True)
    uvicorn.run(create_brave_app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
