"""The web search provider: Brave's Search API behind a small protocol, and an in-memory twin.

``BraveSearch`` asks ``GET <base>/res/v1/web/search`` (header ``X-Subscription-Token``) for web
results only (``result_filter=web``) without highlight markup (``text_decorations=false``), and
keeps what is safe to hand on: http(s) URLs, bounded titles and snippets, at most ``count``
results, malformed items skipped. Its failures reach the client as:

- Brave unreachable, too slow, a 5xx, or an answer that is not a usable web search result:
  ``ContextUnavailable`` (503, ``web_search_unavailable``); the outage is logged once (and when
  it ends), not per request.
- Brave refuses the gateway's key (401/403, or its ``SUBSCRIPTION_TOKEN_INVALID`` /
  ``SUBSCRIPTION_NOT_FOUND`` codes, which it sends with 422/404): 503
  ``web_search_key_refused``, logged once as the operator's problem.
- Brave's own rate limit or monthly quota (429): ``SearchRateLimited`` (429,
  ``web_search_rate_limited``) with ``Retry-After`` from Brave's ``Retry-After`` or
  ``X-RateLimit-Remaining``/``X-RateLimit-Reset`` headers. This adapter (in this process)
  then holds searches itself for Brave's ``Retry-After`` (at most ``MAX_HOLD_S``): while held,
  a search is refused at once with the same 429 and the hold's remaining seconds, without
  asking Brave, so as not to spend requests that Brave would refuse.

The gateway-wide searches-per-second limit (``NILAI_WEB_SEARCH_RPS``, shared by all replicas
through Redis) is not applied here: the web-search service (``nilai.context.search.service``)
checks it per search through ``nilai.limits`` before asking this adapter. Per-account web-search
limits (minute/hour/day/lifetime) are ``nilai.limits``' business too.

Privacy: the query and the results are the user's content, and the API key is a secret. Nothing
here logs any of them: outage lines name the failure's kind (``ConnectError``, ``status 503``,
Brave's upper-case error code), never a URL with its query string, a body, or a header.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

from nilai.errors import ContextUnavailable, RateLimited
from nilai.limits.base import Decision, Limit
from nilai.outages import OutageLog, mask_url
from nilai.upstream.http import read_capped

logger = logging.getLogger(__name__)

SEARCH_PATH = "/res/v1/web/search"
MAX_COUNT = 20
"""Brave's largest ``count``."""
MAX_QUERY_CHARS = 400
MAX_QUERY_WORDS = 50
"""Brave refuses longer queries (422), so they are cut rather than sent."""
MAX_TITLE_CHARS = 300
MAX_SNIPPET_CHARS = 1000
MAX_URL_CHARS = 2048
MAX_RESPONSE_BYTES = 2 * 1024 * 1024
"""A web search answer with 20 results is tens of KiB; more is not a search answer."""
MAX_HOLD_S = 60.0
"""The longest ``BraveSearch`` holds searches after Brave's 429: a monthly quota's reset (weeks)
would otherwise outlast a plan upgrade; a minute's hold lets one search a minute find out."""
SAFESEARCH_LEVELS = ("off", "moderate", "strict")

UNAVAILABLE_CODE = "web_search_unavailable"
KEY_REFUSED_CODE = "web_search_key_refused"
RATE_LIMITED_CODE = "web_search_rate_limited"

_KEY_REFUSED_CODES = frozenset(
    {"SUBSCRIPTION_TOKEN_INVALID", "SUBSCRIPTION_TOKEN_MISSING", "SUBSCRIPTION_NOT_FOUND"}
)
_BRAVE_CODE = re.compile(r"[A-Z0-9_]{1,64}")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TAGS = re.compile(r"<[^<>]{0,200}>")
_SPACES = re.compile(r"\s+")
_POLICY_WINDOW = re.compile(r"w=(\d+)")
_MAX_SECONDS = 1e9  # a header value beyond this (decades) is not a wait
_MAX_COUNT_VALUE = 1e12
_HTTP_OK = 200
_HTTP_TOO_MANY_REQUESTS = 429


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One web result: what the page is called, where it is, and the provider's snippet of it."""

    title: str
    url: str
    snippet: str


class SearchProvider(Protocol):
    """Searches the web."""

    async def search(self, query: str, *, count: int) -> list[SearchResult]:
        """At most ``count`` results for ``query``, best first (an empty list when none).

        Raises:
            ContextUnavailable: the provider cannot be reached, answers unusably, or refuses the
                gateway's key.
            SearchRateLimited: the provider's rate limit or quota is reached (or was, within
                the hold after its 429).
        """
        ...


class SearchRateLimited(RateLimited):
    """Web search's rate limit is reached: the gateway-wide one, or the provider's plan.

    A ``RateLimited`` (so the query log and metrics see the limit that decided), with its own
    code so a client can tell it from its account's limits.
    """

    default_code = RATE_LIMITED_CODE

    def __init__(self, decision: Decision, reason: str) -> None:
        super().__init__(decision)
        retry = decision.retry_after_s
        self.message = f"Web search rate limit reached: {reason}. Retry after {retry} s."
        self.args = (self.message,)


class BraveFailure(Exception):
    """Why a search at Brave failed, for the outage log.

    A kind (``ConnectError``, ``status 503``), never a URL, body or header.
    """


class BraveSearch:
    """``SearchProvider`` over Brave's Search API, on the gateway's shared HTTP client."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str,
        api_key: SecretStr | str,
        timeout_s: float,
        safesearch: str = "moderate",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        if not key.get_secret_value().strip():
            raise ValueError("the Brave Search API key is empty")
        if safesearch not in SAFESEARCH_LEVELS:
            raise ValueError(f"safesearch must be one of {', '.join(SAFESEARCH_LEVELS)}")
        self._http = http
        self._url = base_url.rstrip("/") + SEARCH_PATH
        self._key = key
        self._timeout_s = timeout_s
        self._safesearch = safesearch
        self._clock = clock
        # Set after Brave's 429: until then searches are refused here, with the limit Brave
        # named (if any), rather than sent to Brave to be refused there.
        self._held_until = -math.inf
        self._held_limit: Limit | None = None
        where = mask_url(base_url)
        self._outage = OutageLog(logger, "Brave Search", "web search requests get 503", where=where)
        self._key_refused = OutageLog(
            logger,
            "Brave Search API key",
            "Brave refuses the gateway's key: check the configured key and its subscription; "
            "web search requests get 503",
            where=where,
        )
        self._quota = OutageLog(
            logger,
            "Brave Search quota",
            "the plan's monthly quota is used up: web search requests get 429 until it resets "
            "or the plan is changed",
            where=where,
        )

    async def search(self, query: str, *, count: int) -> list[SearchResult]:
        """See ``SearchProvider.search``; an empty query gives no results and asks nothing."""
        query = bounded_query(query)
        if not query:
            return []
        count = max(1, min(count, MAX_COUNT))
        self._refuse_while_held()
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout_s):
                status, headers, body = await self._get(query, count)
        except (httpx.HTTPError, TimeoutError, BraveFailure) as exc:
            raise self._unavailable(exc, started) from None
        if status == _HTTP_OK:
            try:
                results = parse_results(body, count)
            except BraveFailure as exc:
                raise self._unavailable(exc, started) from None
            self._answered(started)
            return results
        brave_code = _brave_error_code(body)
        if status in (401, 403) or brave_code in _KEY_REFUSED_CODES:
            self._outage.answered(started=started)
            self._key_refused.failed(BraveFailure(_status_reason(status, brave_code)))
            raise ContextUnavailable(
                "Web search is unavailable: the search provider refuses this gateway's API "
                "key. The gateway's operator must fix it.",
                code=KEY_REFUSED_CODE,
            )
        if status == _HTTP_TOO_MANY_REQUESTS:
            self._outage.answered(started=started)
            self._key_refused.answered(started=started)
            raise self._rate_limited(headers, brave_code)
        raise self._unavailable(BraveFailure(_status_reason(status, brave_code)), started)

    def _refuse_while_held(self) -> None:
        """Raise ``SearchRateLimited`` while the hold after Brave's last 429 lasts."""
        remaining = self._held_until - self._clock()
        if remaining > 0:
            decision = Decision(False, self._held_limit, 0, remaining)
            raise SearchRateLimited(decision, "the search provider's plan allows no more now")

    async def _get(self, query: str, count: int) -> tuple[int, httpx.Headers, bytes]:
        params = {
            "q": query,
            "count": str(count),
            "result_filter": "web",
            "text_decorations": "false",
            "safesearch": self._safesearch,
        }
        headers = {
            "Accept": "application/json",
            "X-Subscription-Token": self._key.get_secret_value(),
        }
        request = self._http.stream(
            "GET", self._url, params=params, headers=headers, timeout=self._timeout_s
        )
        async with request as response:
            body = await read_capped(response, MAX_RESPONSE_BYTES)
            if body is None:
                raise BraveFailure("an answer larger than the cap")
            return response.status_code, response.headers, body

    def _answered(self, started: float) -> None:
        self._outage.answered(started=started)
        self._key_refused.answered(started=started)
        self._quota.answered(started=started)

    def _unavailable(self, error: BaseException, started: float) -> ContextUnavailable:
        # The outage line names the failure's kind only: httpx messages can carry the request
        # URL, and with it the user's query.
        failure = error if isinstance(error, BraveFailure) else BraveFailure(type(error).__name__)
        failure.__cause__ = error  # describe_error finds an OS error (ECONNREFUSED) through it
        self._outage.failed(failure, started=started)
        return ContextUnavailable(
            "Web search is unavailable: the search provider cannot be reached or answered "
            "with something unusable; try again later.",
            code=UNAVAILABLE_CODE,
        )

    def _rate_limited(self, headers: httpx.Headers, brave_code: str | None) -> SearchRateLimited:
        window = _exhausted_window(headers)
        retry_after = _retry_after_header(headers)
        reset_s = retry_after if retry_after is not None else (window[2] if window else 1.0)
        if brave_code == "QUOTA_LIMITED":
            self._quota.failed(BraveFailure(brave_code))
        limit = None
        if window is not None:
            count, window_s, _ = window
            limit = Limit(
                "web_search:provider_plan",
                "searches allowed by the search provider's plan",
                count,
                window_s,
                kind="web_search_provider_plan",
            )
        self._held_until = self._clock() + min(reset_s, MAX_HOLD_S)
        self._held_limit = limit
        decision = Decision(False, limit, 0, reset_s)
        return SearchRateLimited(decision, "the search provider's plan allows no more now")


def bounded_query(query: str) -> str:
    """``query`` on one line, within Brave's limits (400 characters, 50 words)."""
    words = _CONTROL_CHARS.sub(" ", query).split()
    return " ".join(words[:MAX_QUERY_WORDS])[:MAX_QUERY_CHARS].strip()


def parse_results(body: bytes, count: int) -> list[SearchResult]:
    """The usable web results in Brave's answer, at most ``count``; ``BraveFailure`` if none can be.

    An answer without ``web`` is a search with no results (Brave leaves the key out then); an
    item that is not a result with an http(s) URL and a title is skipped, as is a repeated URL.
    """
    try:
        payload: object = json.loads(body)
    except ValueError:
        raise BraveFailure("an answer that is not JSON") from None
    if not isinstance(payload, dict):
        raise BraveFailure("an answer that is not a JSON object")
    answer = cast(dict[str, Any], payload)
    if "web" not in answer:
        if answer.get("type") == "search" or "query" in answer:
            return []
        raise BraveFailure("an answer that is not a web search")
    web: object = answer["web"]
    items: object = cast(dict[str, Any], web).get("results") if isinstance(web, dict) else None
    if not isinstance(items, list):
        raise BraveFailure("an answer without a result list")
    results: list[SearchResult] = []
    seen: set[str] = set()
    for item in cast(list[object], items):
        result = _result(item)
        if result is None or result.url in seen:
            continue
        seen.add(result.url)
        results.append(result)
        if len(results) >= count:
            break
    return results


def _result(item: object) -> SearchResult | None:
    if not isinstance(item, dict):
        return None
    fields = cast(dict[str, Any], item)
    url, title = fields.get("url"), fields.get("title")
    if not isinstance(url, str) or not isinstance(title, str):
        return None
    url = url.strip()
    if not _fetchable_url(url):
        return None
    snippet = fields.get("description")
    if not isinstance(snippet, str) or not snippet.strip():
        extra: object = fields.get("extra_snippets")
        extras = cast(list[object], extra) if isinstance(extra, list) else []
        snippet = next((text for text in extras if isinstance(text, str)), "")
    clean_title = _clean_text(title, MAX_TITLE_CHARS) or (urlsplit(url).hostname or url)
    return SearchResult(clean_title, url, _clean_text(snippet, MAX_SNIPPET_CHARS))


def _fetchable_url(url: str) -> bool:
    if len(url) > MAX_URL_CHARS or _CONTROL_CHARS.search(url) or any(c.isspace() for c in url):
        return False
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises for a port out of range or not a number
    except ValueError:  # a malformed port or IPv6 literal
        return False
    return parts.scheme.lower() in ("http", "https") and bool(host)


def _clean_text(text: str, limit: int) -> str:
    """Plain text: markup (``<strong>`` highlights) and entities resolved, one line, cut."""
    plain = html.unescape(_TAGS.sub("", text))
    return _SPACES.sub(" ", _CONTROL_CHARS.sub(" ", plain)).strip()[:limit]


def _brave_error_code(body: bytes) -> str | None:
    """Brave's error code, if the body has one that looks like one (it goes into logs).

    Brave sends ``{"error": {"code"}}``; some of its reference pages show ``{"errors": [{...}]}``.
    """
    try:
        payload: object = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    fields = cast(dict[str, Any], payload)
    error: object = fields.get("error")
    errors: object = fields.get("errors")
    if not isinstance(error, dict) and isinstance(errors, list) and errors:
        error = cast(list[object], errors)[0]
    code: object = cast(dict[str, Any], error).get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and _BRAVE_CODE.fullmatch(code) else None


def _status_reason(status: int, brave_code: str | None) -> str:
    return f"status {status} {brave_code}" if brave_code else f"status {status}"


def _numbers(value: str | None) -> list[float]:
    """``"1, 1419704"`` -> ``[1.0, 1419704.0]``; anything unreadable -> ``[]``."""
    if not value:
        return []
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        return []


def _retry_after_header(headers: httpx.Headers) -> float | None:
    numbers = _numbers(headers.get("retry-after"))
    return numbers[0] if len(numbers) == 1 and 0 <= numbers[0] < _MAX_SECONDS else None


def _exhausted_window(headers: httpx.Headers) -> tuple[int, int, float] | None:
    """The (limit, window seconds, seconds to reset) of the window Brave says is used up.

    Brave sends one value per window, comma-separated (per second, per month): ``Remaining``
    says which is at 0 and ``Reset`` when it resets. With none at 0, the shortest reset.
    """
    resets = _numbers(headers.get("x-ratelimit-reset"))
    if not resets or any(not 0 <= reset < _MAX_SECONDS for reset in resets):
        return None
    remaining = _numbers(headers.get("x-ratelimit-remaining"))
    limits = _numbers(headers.get("x-ratelimit-limit"))
    policies = (headers.get("x-ratelimit-policy") or "").split(",")
    exhausted = [i for i, left in enumerate(remaining[: len(resets)]) if left <= 0]
    index = (
        max(exhausted, key=lambda i: resets[i])
        if exhausted
        else min(range(len(resets)), key=lambda i: resets[i])
    )
    window = _POLICY_WINDOW.search(policies[index]) if index < len(policies) else None
    count = (
        int(limits[index]) if index < len(limits) and 0 <= limits[index] < _MAX_COUNT_VALUE else 0
    )
    return count, int(window.group(1)) if window else 1, resets[index]


class MemorySearch:
    """The in-memory twin: results by query, every search recorded, a failure on demand."""

    def __init__(
        self,
        results: Mapping[str, Sequence[SearchResult]] | None = None,
        *,
        default: Sequence[SearchResult] = (),
    ) -> None:
        self.results: dict[str, list[SearchResult]] = {
            query: list(found) for query, found in (results or {}).items()
        }
        self.default = list(default)
        self.searches: list[tuple[str, int]] = []
        """Every ``(query, count)`` asked, in order, failed ones included."""
        self.failure: Exception | None = None
        """When set, every search raises it (after being recorded)."""

    @property
    def queries(self) -> list[str]:
        """The queries asked, in order."""
        return [query for query, _ in self.searches]

    async def search(self, query: str, *, count: int) -> list[SearchResult]:
        """The results set for ``query`` (else the default ones), at most ``count``."""
        self.searches.append((query, count))
        if self.failure is not None:
            raise self.failure
        return list(self.results.get(query, self.default))[: max(0, count)]
