"""The Brave Search adapter against the loopback stand-in (tests/fakes/brave.py), its hold after
Brave's 429 on an injected clock, and the in-memory twin.

The gateway-wide searches-per-second limit is not the adapter's (the web-search service applies
it through ``nilai.limits``), so it is tested with that service and the limiters, not here.

Failures Brave cannot be made to produce on loopback on demand (a read timeout, a body over the
cap, a 401) go through ``httpx.MockTransport``. No test waits on the wall clock.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from nilai.context.search.provider import (
    KEY_REFUSED_CODE,
    MAX_COUNT,
    MAX_HOLD_S,
    MAX_SNIPPET_CHARS,
    MAX_TITLE_CHARS,
    RATE_LIMITED_CODE,
    UNAVAILABLE_CODE,
    BraveSearch,
    MemorySearch,
    SearchProvider,
    SearchRateLimited,
    SearchResult,
    bounded_query,
)
from nilai.errors import ContextUnavailable, RateLimited, to_error_body
from tests.fakes.brave import DEFAULT_API_KEY, BraveState, brave_result, create_brave_app
from tests.support.servers import ServerThread, free_port

LOGGER = "nilai.context.search.provider"
QUERY = "private question about zorblax"
SECRET_SNIPPET = "the snippet nobody may log"
SECRET_URL = "https://secret.example.org/zorblax-page"


class FakeClock:
    """Monotonic seconds that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def brave_server() -> Iterator[ServerThread]:
    server = ServerThread(create_brave_app()).start()
    yield server
    server.stop()


@pytest.fixture
def brave(brave_server: ServerThread) -> BraveState:
    state: BraveState = brave_server.app.state.brave
    state.clear()
    state.api_key = DEFAULT_API_KEY
    return state


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_brave(
    http: httpx.AsyncClient,
    base_url: str,
    clock: FakeClock,
    *,
    api_key: str = DEFAULT_API_KEY,
    timeout_s: float = 5.0,
) -> BraveSearch:
    return BraveSearch(http, base_url=base_url, api_key=api_key, timeout_s=timeout_s, clock=clock)


@pytest.fixture
def search(http: httpx.AsyncClient, brave_server: ServerThread, clock: FakeClock) -> BraveSearch:
    return make_brave(http, brave_server.url, clock)


def mock_brave(
    http_answer: Callable[[httpx.Request], httpx.Response], clock: FakeClock
) -> tuple[BraveSearch, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(http_answer))
    return make_brave(client, "http://brave.test", clock), client


def three_results() -> list[dict[str, Any]]:
    return [
        brave_result("First page", "https://one.example.com/a", "About the first."),
        brave_result("Second page", "http://two.example.com/b?x=1", "About the second."),
        brave_result("Third page", "https://three.example.com/", "About the third."),
    ]


# --- the happy path ----------------------------------------------------------------------------


async def test_results_are_mapped_and_the_request_is_brave_shaped(
    search: BraveSearch, brave: BraveState
) -> None:
    brave.results[QUERY] = three_results()

    results = await search.search(QUERY, count=2)

    assert results == [
        SearchResult("First page", "https://one.example.com/a", "About the first."),
        SearchResult("Second page", "http://two.example.com/b?x=1", "About the second."),
    ]
    [received] = brave.queries
    assert received["q"] == QUERY
    assert received["count"] == 2
    assert received["token_ok"] is True
    assert received["params"]["result_filter"] == "web"
    assert received["params"]["text_decorations"] == "false"
    assert received["params"]["safesearch"] == "moderate"


async def test_count_is_capped_at_brave_maximum_and_at_least_one(
    search: BraveSearch, brave: BraveState
) -> None:
    brave.default_results = [
        brave_result(f"Page {i}", f"https://example.com/{i}", f"Snippet {i}.") for i in range(30)
    ]

    assert len(await search.search("many", count=50)) == MAX_COUNT
    assert len(await search.search("none", count=0)) == 1
    assert [query["count"] for query in brave.queries] == [MAX_COUNT, 1]


async def test_no_web_key_means_no_results(search: BraveSearch, brave: BraveState) -> None:
    assert await search.search("nothing matches this", count=5) == []
    assert len(brave.queries) == 1


async def test_a_query_is_cut_to_brave_limits_and_an_empty_one_asks_nothing(
    search: BraveSearch, brave: BraveState
) -> None:
    assert await search.search(" \n\t ", count=5) == []
    assert brave.queries == []

    long_query = " ".join(f"word{i}" for i in range(80))
    await search.search(long_query, count=5)
    sent = brave.queries[0]["q"]
    assert len(sent.split()) == 50
    assert bounded_query("a\x00b\nc   d") == "a b c d"
    assert len(bounded_query("x" * 1000)) == 400


# --- what is kept of Brave's answer ------------------------------------------------------------


async def test_malformed_items_are_skipped_and_texts_are_bounded(
    search: BraveSearch, brave: BraveState
) -> None:
    good = brave_result("Good <strong>one</strong> &amp; co", "https://good.example.com/", "ok")
    brave.results[QUERY] = [
        "not an object",
        {"title": "no url"},
        {"url": "https://no-title.example.com/"},
        brave_result("FTP", "ftp://files.example.com/x", "ftp"),
        brave_result("Script", "javascript:alert(1)", "js"),
        brave_result("File", "file:///etc/passwd", "file"),
        brave_result("No host", "https:///path-only", "nohost"),
        brave_result("Spaces", "https://example.com/a b", "space"),
        brave_result("Bad port", "https://example.com:99999999/", "port"),
        brave_result("Long", "https://example.com/" + "a" * 3000, "long url"),
        {**brave_result("Number title", "https://n.example.com/", "n"), "title": 42},
        good,
        brave_result("Duplicate", "https://good.example.com/", "again"),
        brave_result("T" * 1000, "https://big.example.com/", "S" * 5000),
        {**brave_result("", "https://untitled.example.com/p", ""), "extra_snippets": ["extra"]},
    ]

    results = await search.search(QUERY, count=20)

    assert [result.url for result in results] == [
        "https://good.example.com/",
        "https://big.example.com/",
        "https://untitled.example.com/p",
    ]
    assert results[0] == SearchResult("Good one & co", "https://good.example.com/", "ok")
    assert len(results[1].title) == MAX_TITLE_CHARS
    assert len(results[1].snippet) == MAX_SNIPPET_CHARS
    assert results[2] == SearchResult("untitled.example.com", results[2].url, "extra")


@pytest.mark.parametrize(
    "body",
    [
        "<html>not json</html>",
        "[1, 2, 3]",
        '{"something": "else"}',
        '{"type": "search", "web": {"results": "not a list"}}',
        '{"type": "search", "web": []}',
    ],
)
async def test_an_unusable_answer_is_503_web_search_unavailable(
    search: BraveSearch, brave: BraveState, body: str
) -> None:
    brave.raw_body = body

    with pytest.raises(ContextUnavailable) as raised:
        await search.search(QUERY, count=5)

    assert raised.value.status == 503
    assert raised.value.code == UNAVAILABLE_CODE


# --- failures ----------------------------------------------------------------------------------


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


async def test_server_errors_are_503_and_the_outage_is_logged_once_and_its_end_once(
    search: BraveSearch, brave: BraveState, caplog: pytest.LogCaptureFixture
) -> None:
    brave.fail = {"status": 500}
    brave.default_results = three_results()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(4):
            with pytest.raises(ContextUnavailable) as raised:
                await search.search(QUERY, count=3)
            assert raised.value.code == UNAVAILABLE_CODE
            assert raised.value.headers["Retry-After"] == "1"
        brave.fail = None
        assert len(await search.search(QUERY, count=3)) == 3
        assert len(await search.search(QUERY, count=3)) == 3

    lines = outage_lines(caplog)
    assert len(lines) == 2
    assert "Brave Search unavailable" in lines[0]
    assert "status 500 INTERNAL_ERROR" in lines[0]
    assert "available again" in lines[1]
    assert "4 failed attempts" in lines[1]


async def test_a_timeout_is_503_web_search_unavailable(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def times_out(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    search, client = mock_brave(times_out, clock)
    async with client:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            for _ in range(3):
                with pytest.raises(ContextUnavailable) as raised:
                    await search.search(QUERY, count=3)
                assert raised.value.code == UNAVAILABLE_CODE

    [line] = outage_lines(caplog)
    assert "ReadTimeout" in line


async def test_a_slow_answer_is_cut_at_the_timeout(
    http: httpx.AsyncClient, brave_server: ServerThread, brave: BraveState, clock: FakeClock
) -> None:
    brave.delay_s = 1.0
    search = make_brave(http, brave_server.url, clock, timeout_s=0.05)

    with pytest.raises(ContextUnavailable) as raised:
        await search.search(QUERY, count=3)

    assert raised.value.code == UNAVAILABLE_CODE


async def test_an_unreachable_brave_is_503_naming_the_os_error(
    http: httpx.AsyncClient, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    search = make_brave(http, f"http://127.0.0.1:{free_port()}", clock)

    with (
        caplog.at_level(logging.WARNING, logger=LOGGER),
        pytest.raises(ContextUnavailable) as raised,
    ):
        await search.search(QUERY, count=3)

    assert raised.value.code == UNAVAILABLE_CODE
    [line] = outage_lines(caplog)
    assert "ConnectError" in line


async def test_an_answer_over_the_cap_is_refused(clock: FakeClock) -> None:
    huge = b'{"type": "search", "web": {"results": [' + b" " * (3 * 1024 * 1024) + b"]}}"
    search, client = mock_brave(lambda _request: httpx.Response(200, content=huge), clock)
    async with client:
        with pytest.raises(ContextUnavailable) as raised:
            await search.search(QUERY, count=3)

    assert raised.value.code == UNAVAILABLE_CODE


async def test_a_refused_key_is_503_key_refused_logged_once_as_the_operators_problem(
    http: httpx.AsyncClient,
    brave_server: ServerThread,
    brave: BraveState,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong_key = "wrong-key-value-123"
    search = make_brave(http, brave_server.url, clock, api_key=wrong_key)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            with pytest.raises(ContextUnavailable) as raised:
                await search.search(QUERY, count=3)
            assert raised.value.status == 503
            assert raised.value.code == KEY_REFUSED_CODE
            assert "API key" in raised.value.message

    [line] = outage_lines(caplog)
    assert "Brave Search API key unavailable" in line
    assert "SUBSCRIPTION_TOKEN_INVALID" in line
    assert wrong_key not in caplog.text
    assert all(not query["token_ok"] for query in brave.queries)


@pytest.mark.parametrize("status", [401, 403])
async def test_401_and_403_are_key_refused_too(clock: FakeClock, status: int) -> None:
    search, client = mock_brave(lambda _request: httpx.Response(status, json={}), clock)
    async with client:
        with pytest.raises(ContextUnavailable) as raised:
            await search.search(QUERY, count=3)

    assert raised.value.code == KEY_REFUSED_CODE


async def test_brave_429_is_429_with_brave_retry_after(
    search: BraveSearch, brave: BraveState
) -> None:
    brave.fail = {"status": 429, "code": "RATE_LIMITED", "retry_after": 3}

    with pytest.raises(SearchRateLimited) as raised:
        await search.search(QUERY, count=3)

    error = raised.value
    assert isinstance(error, RateLimited)
    assert error.status == 429
    assert error.headers["Retry-After"] == "3"
    assert "x-should-retry" not in error.headers
    body = to_error_body(error)["error"]
    assert body["type"] == "rate_limit_error"
    assert body["code"] == RATE_LIMITED_CODE
    assert "Retry after 3 s" in body["message"]


async def test_brave_429_without_retry_after_reads_the_exhausted_window(
    search: BraveSearch, brave: BraveState, clock: FakeClock
) -> None:
    # Per-second window at 0: retry in a second; the monthly window still has requests.
    brave.fail = {"status": 429, "code": "RATE_LIMITED", "remaining": "0, 500", "reset": "1, 9999"}
    with pytest.raises(SearchRateLimited) as raised:
        await search.search(QUERY, count=3)
    assert raised.value.headers["Retry-After"] == "1"
    assert raised.value.headers["X-RateLimit-Limit"] == "1"

    # The monthly quota at 0: its reset is far off, and the SDK is told not to sleep it out.
    clock.now += MAX_HOLD_S
    brave.fail = {
        "status": 429,
        "code": "QUOTA_LIMITED",
        "remaining": "1, 0",
        "reset": "1, 1419704",
    }
    with pytest.raises(SearchRateLimited) as raised:
        await search.search(QUERY, count=3)
    assert raised.value.headers["Retry-After"] == "1419704"
    assert raised.value.headers["X-RateLimit-Limit"] == "15000"
    assert raised.value.headers["x-should-retry"] == "false"


async def test_after_brave_429_brave_search_holds_searches_without_asking_brave(
    search: BraveSearch, brave: BraveState, clock: FakeClock
) -> None:
    brave.fail = {"status": 429, "code": "RATE_LIMITED", "retry_after": 5}
    with pytest.raises(SearchRateLimited):
        await search.search(QUERY, count=3)
    brave.fail = None
    brave.default_results = three_results()

    with pytest.raises(SearchRateLimited) as raised:
        await search.search(QUERY, count=3)
    assert raised.value.code == RATE_LIMITED_CODE
    assert raised.value.headers["Retry-After"] == "5"
    assert len(brave.queries) == 1

    clock.now += 3.5  # the remaining hold, rounded up
    with pytest.raises(SearchRateLimited) as raised:
        await search.search(QUERY, count=3)
    assert raised.value.headers["Retry-After"] == "2"
    assert len(brave.queries) == 1

    clock.now += 1.5
    assert len(await search.search(QUERY, count=3)) == 3
    assert len(brave.queries) == 2


async def test_the_hold_after_brave_quota_429_lasts_at_most_max_hold_s(
    search: BraveSearch, brave: BraveState, clock: FakeClock
) -> None:
    brave.fail = {"status": 429, "code": "QUOTA_LIMITED", "retry_after": 1419704}
    with pytest.raises(SearchRateLimited) as raised:
        await search.search(QUERY, count=3)
    assert raised.value.headers["Retry-After"] == "1419704"  # Brave's wait, told as it is
    brave.fail = None
    brave.default_results = three_results()

    clock.now += MAX_HOLD_S - 1
    with pytest.raises(SearchRateLimited) as raised:
        await search.search(QUERY, count=3)
    assert raised.value.headers["Retry-After"] == "1"
    assert len(brave.queries) == 1

    clock.now += 1
    assert len(await search.search(QUERY, count=3)) == 3
    assert len(brave.queries) == 2


def test_an_empty_key_or_unknown_safesearch_is_refused_at_start(
    http: httpx.AsyncClient,
) -> None:
    with pytest.raises(ValueError, match="key is empty"):
        BraveSearch(http, base_url="http://x", api_key=" ", timeout_s=1)
    with pytest.raises(ValueError, match="safesearch"):
        BraveSearch(http, base_url="http://x", api_key="k", timeout_s=1, safesearch="maybe")


# --- privacy -----------------------------------------------------------------------------------


async def test_logs_never_hold_the_query_the_results_or_the_key(
    http: httpx.AsyncClient,
    brave_server: ServerThread,
    brave: BraveState,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As in production (nilai.logging): httpx's INFO lines carry full URLs, query included.
    httpx_logger = logging.getLogger("httpx")
    level = httpx_logger.level
    httpx_logger.setLevel(logging.WARNING)
    try:
        await _search_every_way(http, brave_server, brave, clock, caplog)
    finally:
        httpx_logger.setLevel(level)


async def _search_every_way(
    http: httpx.AsyncClient,
    brave_server: ServerThread,
    brave: BraveState,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    brave.results[QUERY] = [brave_result("Secret title", SECRET_URL, SECRET_SNIPPET)]
    search = make_brave(http, brave_server.url, clock)
    errors: list[Exception] = []

    with caplog.at_level(logging.DEBUG):
        assert (await search.search(QUERY, count=3))[0].url == SECRET_URL
        for fail in ({"status": 500}, {"status": 429, "retry_after": 1}, None):
            brave.fail = fail
            clock.now += MAX_HOLD_S
            try:
                await search.search(QUERY, count=3)
            except (ContextUnavailable, SearchRateLimited) as exc:
                errors.append(exc)
        brave.raw_body = f'{{"not": "{SECRET_SNIPPET}"}}'
        with pytest.raises(ContextUnavailable) as raised:
            await search.search(QUERY, count=3)
        errors.append(raised.value)
        bad_key = make_brave(http, brave_server.url, clock, api_key="another-secret-key")
        with pytest.raises(ContextUnavailable) as raised:
            await bad_key.search(QUERY, count=3)
        errors.append(raised.value)

    assert len(errors) == 4
    assert "Brave Search unavailable" in caplog.text  # the check below is not vacuous
    assert "Brave Search API key unavailable" in caplog.text
    logged = "\n".join(
        f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        for record in caplog.records
    )
    texts = [logged, *(str(error) for error in errors), *(repr(error) for error in errors)]
    for secret in (QUERY, "zorblax", SECRET_URL, SECRET_SNIPPET, DEFAULT_API_KEY, "another-sec"):
        assert all(secret not in text for text in texts), secret
    assert "another-secret-key" not in repr(bad_key.__dict__)


# --- the in-memory twin ------------------------------------------------------------------------


async def test_memory_search_answers_by_query_records_and_fails_on_demand() -> None:
    found = [SearchResult(f"T{i}", f"https://example.com/{i}", f"S{i}") for i in range(5)]
    fallback = [SearchResult("Default", "https://default.example.com/", "D")]
    twin = MemorySearch({"known": found}, default=fallback)
    provider: SearchProvider = twin

    assert await provider.search("known", count=3) == found[:3]
    assert await provider.search("other", count=3) == fallback

    twin.failure = ContextUnavailable("down (twin)", code=UNAVAILABLE_CODE)
    with pytest.raises(ContextUnavailable):
        await provider.search("known", count=3)

    assert twin.queries == ["known", "other", "known"]
    assert twin.searches[0] == ("known", 3)
