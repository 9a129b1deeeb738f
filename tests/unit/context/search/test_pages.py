"""Page fetching against the loopback stand-in pages (tests.fakes.web), behind the policy.

The address policy itself is tested in tests/unit/context/test_addresses.py. Here it allowlists
127.0.0.0/8 so the stand-in itself can be fetched; the forbidden targets (metadata, private
ranges) are not allowlisted, and DNS names are answered by a test resolver, never by real DNS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from nilai.context.search import pages as pages_module
from nilai.context.search.pages import (
    DEFAULT_MAX_BYTES,
    AddressPolicy,
    HttpPageFetcher,
    MemoryPageFetcher,
    PageError,
    normalise_url,
    page_client,
    process_pool,
)
from tests.fakes.web import ARTICLE_TEXT, PLAIN_TEXT, WebState, create_web_app
from tests.support.servers import ServerThread, wait_until_async

LOOPBACK = ["127.0.0.0/8"]


def resolver_of(answers: dict[str, list[str]]):
    """A resolver answering from ``answers``; any other name does not resolve."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        if host not in answers:
            raise OSError("name does not resolve")
        return answers[host]

    resolve.asked = asked  # type: ignore[attr-defined]
    return resolve


def test_urls_are_normalised_for_de_duplication():
    assert normalise_url("HTTP://Example.COM/Path?q=1#frag") == "http://example.com/Path?q=1"
    assert normalise_url("https://example.com:443/") == normalise_url("https://example.com/")


# ---------------------------------------------------------------- fetching


class Body(httpx.AsyncByteStream):
    """A response body that arrives as a stream, as from the network (not read in advance)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._data


@pytest.fixture
def web() -> Iterator[tuple[ServerThread, WebState]]:
    state = WebState()
    server = ServerThread(create_web_app(state)).start()
    try:
        yield server, state
    finally:
        server.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


def fetcher_for(
    http: httpx.AsyncClient, policy: AddressPolicy | None = None, **kwargs: object
) -> HttpPageFetcher:
    return HttpPageFetcher(http, policy or AddressPolicy(allow=LOOPBACK), **kwargs)  # type: ignore[arg-type]


async def test_an_article_is_fetched_and_its_text_extracted(web, http):
    server, state = web
    fetcher = fetcher_for(http)
    [page] = await fetcher.fetch_all([f"{server.url}/article"], deadline_s=10)
    assert page.ok, page.error
    assert ARTICLE_TEXT in page.text
    assert "Copyright" not in page.text  # boilerplate left out by trafilatura
    assert not page.truncated
    assert state.paths() == ["/article"]
    fetcher.close()


async def test_plain_text_is_used_as_is(web, http):
    server, _ = web
    [page] = await fetcher_for(http).fetch_all([f"{server.url}/plain"], deadline_s=10)
    assert page.ok
    assert page.text == PLAIN_TEXT


async def test_duplicates_are_fetched_once_and_reported_once_in_first_order(web, http):
    server, state = web
    urls = [
        f"{server.url}/plain",
        f"{server.url}/article#intro",
        f"HTTP://127.0.0.1:{server.port}/plain",
        f"{server.url}/article",
        f"{server.url}/plain#again",
    ]
    pages = await fetcher_for(http).fetch_all(urls, deadline_s=10)
    assert [page.url for page in pages] == [f"{server.url}/plain", f"{server.url}/article"]
    assert all(page.ok for page in pages)
    assert sorted(state.paths()) == ["/article", "/plain"]


async def test_the_metadata_redirect_target_is_never_requested(web, http):
    server, state = web
    pages = await fetcher_for(http).fetch_all(
        [f"{server.url}/redirect/metadata", f"{server.url}/redirect/private"], deadline_s=10
    )
    assert [page.error for page in pages] == [PageError.FORBIDDEN_ADDRESS] * 2
    assert sorted(state.paths()) == ["/redirect/metadata", "/redirect/private"]


async def test_a_redirect_to_a_name_resolving_to_a_private_address_is_refused(web, http):
    server, state = web
    resolve = resolver_of({"intranet.test": ["10.20.30.40"], "good.test": ["127.0.0.1"]})
    policy = AddressPolicy(allow=["127.0.0.1/32"], resolver=resolve)
    forbidden = f"http://intranet.test:{server.port}/secret"
    allowed = f"http://good.test:{server.port}/secret"
    pages = await fetcher_for(http, policy).fetch_all(
        [f"{server.url}/redirect/to?url={forbidden}", f"{server.url}/redirect/to?url={allowed}"],
        deadline_s=10,
    )
    assert pages[0].error is PageError.FORBIDDEN_ADDRESS
    # The same redirect to an allowed name does reach /secret, so the first was truly stopped.
    assert pages[1].ok
    assert state.hits.count(("/secret", f"good.test:{server.port}")) == 1
    assert [host for path, host in state.hits if path == "/secret"] == [f"good.test:{server.port}"]


async def test_the_connection_goes_to_the_checked_address_not_a_second_lookup(web, http):
    server, state = web
    # A rebinding name: public-looking-safe (allowlisted loopback) on the first lookup, private
    # on any later one. The fetch must connect to what was checked, with no second lookup
    # (".invalid" also never resolves in real DNS, so httpx cannot have looked it up).
    answers = iter([["127.0.0.1"]])
    asked: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers, ["10.0.0.1"])

    policy = AddressPolicy(allow=["127.0.0.1/32"], resolver=rebinding)
    [page] = await fetcher_for(http, policy).fetch_all(
        [f"http://rebind.invalid:{server.port}/article"], deadline_s=10
    )
    assert page.ok, page.error
    assert asked == ["rebind.invalid"]
    assert state.hits == [("/article", f"rebind.invalid:{server.port}")]


async def test_https_requests_carry_the_name_in_host_and_sni_and_go_to_the_ip():
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=Body(b"hello"), headers={"content-type": "text/plain"})

    policy = AddressPolicy(resolver=resolver_of({"news.example": ["93.184.215.14"]}))
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        [page] = await HttpPageFetcher(client, policy).fetch_all(
            ["https://News.Example/story?id=7#top"], deadline_s=10
        )
    assert page.ok
    [request] = seen
    assert str(request.url) == "https://93.184.215.14/story?id=7"
    assert request.headers["host"] == "news.example"
    assert request.headers["connection"] == "close"
    assert request.extensions["sni_hostname"] == "news.example"


async def test_redirect_chains_of_three_are_followed_and_of_four_fail(web, http):
    server, state = web
    pages = await fetcher_for(http).fetch_all(
        [f"{server.url}/chain/3", f"{server.url}/chain/4"], deadline_s=10
    )
    assert pages[0].ok
    assert ARTICLE_TEXT in pages[0].text
    assert pages[1].error is PageError.TOO_MANY_REDIRECTS
    # Four hops requested for /chain/4 (4, 3, 2, 1); the fifth, /chain/0, never.
    assert state.paths().count("/chain/0") == 1
    assert state.paths().count("/chain/4") == 1


async def test_a_huge_page_is_cut_at_the_cap_and_flagged(web, http):
    server, state = web
    [page] = await fetcher_for(http).fetch_all([f"{server.url}/huge"], deadline_s=30)
    assert page.ok, page.error
    assert page.truncated
    assert page.text
    # The client hung up near the cap: nowhere near the 20 MB were sent (socket buffers aside).
    assert state.huge_bytes_sent < 10 * DEFAULT_MAX_BYTES


async def test_the_cap_is_exact(web, http):
    server, _ = web
    bodies: list[str] = []

    def keep(html: str) -> str:
        bodies.append(html)
        return "text"

    [page] = await fetcher_for(http, max_bytes=100_000, extract=keep).fetch_all(
        [f"{server.url}/huge"], deadline_s=30
    )
    assert page.truncated
    assert len(bodies[0].encode()) == 100_000


async def test_gzip_pages_are_inflated(web, http):
    server, _ = web
    [page] = await fetcher_for(http).fetch_all([f"{server.url}/gzip"], deadline_s=10)
    assert page.ok, page.error
    assert ARTICLE_TEXT in page.text


async def test_a_gzip_bomb_is_cut_at_the_cap_after_inflating(web, http):
    server, _ = web
    bodies: list[str] = []

    def keep(html: str) -> str:
        bodies.append(html)
        return "text"

    [page] = await fetcher_for(http, extract=keep).fetch_all(
        [f"{server.url}/gzip-bomb"], deadline_s=30
    )
    assert page.truncated
    assert len(bodies[0].encode()) == DEFAULT_MAX_BYTES


async def test_encodings_not_asked_for_are_refused(web, http):
    server, _ = web
    [page] = await fetcher_for(http).fetch_all([f"{server.url}/brotli"], deadline_s=10)
    assert page.error is PageError.BAD_ENCODING


async def test_page_client_keeps_no_cookies_and_shared_cookies_are_not_sent():
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            stream=Body(b"hi"),
            headers={"content-type": "text/plain", "set-cookie": "id=1; Path=/"},
        )

    policy = AddressPolicy(resolver=resolver_of({"news.example": ["93.184.215.14"]}))
    client = page_client()
    client._transport = httpx.MockTransport(answer)  # the real settings, a fake network
    async with client:
        fetcher = HttpPageFetcher(client, policy)
        await fetcher.fetch_all(["http://news.example/a"], deadline_s=10)
        await fetcher.fetch_all(["http://news.example/b"], deadline_s=10)
        assert len(client.cookies.jar) == 0
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(answer), cookies={"session": "internal"}
    ) as shared:
        await HttpPageFetcher(shared, policy).fetch_all(["http://news.example/c"], deadline_s=10)
    assert all("cookie" not in request.headers for request in seen)
    assert len(seen) == 3


async def test_the_slow_page_does_not_delay_the_others_beyond_the_deadline(web, http):
    server, state = web
    state.slow_s = 60
    started = time.monotonic()
    pages = await fetcher_for(http, per_fetch_timeout_s=60).fetch_all(
        [f"{server.url}/slow", f"{server.url}/article"], deadline_s=1.0
    )
    # Generous: the slow page would take 60 s; the answer comes right after the 1 s deadline.
    assert time.monotonic() - started < 20
    assert pages[0].error is PageError.DEADLINE
    assert pages[1].ok


async def test_the_per_fetch_timeout_fails_a_slow_page(web, http):
    server, state = web
    state.slow_s = 60
    [page] = await fetcher_for(http, per_fetch_timeout_s=0.5).fetch_all(
        [f"{server.url}/slow"], deadline_s=30
    )
    assert page.error is PageError.TIMEOUT


@pytest.mark.parametrize("path", ["/pdf", "/png"])
async def test_non_html_pages_are_refused(web, http, path: str):
    server, _ = web
    [page] = await fetcher_for(http).fetch_all([f"{server.url}{path}"], deadline_s=10)
    assert page.error is PageError.UNSUPPORTED_TYPE


async def test_a_404_fails_the_page(web, http):
    server, _ = web
    [page] = await fetcher_for(http).fetch_all([f"{server.url}/missing"], deadline_s=10)
    assert page.error is PageError.HTTP_STATUS
    assert page.status_code == 404


async def test_unreachable_and_unparseable_urls_fail_without_raising(http):
    pages = await fetcher_for(http).fetch_all(
        ["http://127.0.0.1:1/", "http://[bad", "ftp://127.0.0.1/", "http://a b.test/"],
        deadline_s=10,
    )
    assert [page.error for page in pages] == [
        PageError.NETWORK,
        PageError.BAD_URL,
        PageError.BAD_URL,
        PageError.BAD_URL,
    ]


async def test_extraction_runs_off_the_event_loop_thread(web, http):
    server, _ = web
    loop_thread = threading.get_ident()
    extraction_threads: list[int] = []

    def extract(html: str) -> str:
        extraction_threads.append(threading.get_ident())
        return "extracted"

    pages = await fetcher_for(http, extract=extract).fetch_all(
        [f"{server.url}/article", f"{server.url}/chain/0"], deadline_s=10
    )
    assert [page.text for page in pages] == ["extracted", "extracted"]
    assert len(extraction_threads) == 2
    assert loop_thread not in extraction_threads


async def test_a_failing_extractor_fails_only_its_page(web, http):
    server, _ = web

    def explode(html: str) -> str:
        raise ValueError("cannot parse")

    pages = await fetcher_for(http, extract=explode).fetch_all(
        [f"{server.url}/article", f"{server.url}/plain"], deadline_s=10
    )
    assert pages[0].error is PageError.EXTRACTION
    assert pages[1].ok


async def test_extracted_text_is_capped(web, http):
    server, _ = web
    [page] = await fetcher_for(http, extract=lambda html: "x" * 5000, max_text_chars=100).fetch_all(
        [f"{server.url}/article"], deadline_s=10
    )
    assert page.text == "x" * 100


async def test_concurrency_is_bounded(web, http):
    server, state = web
    state.slow_s = 0.3
    in_flight = 0
    most = 0

    async def counting(request: httpx.Request) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)

    async def done(response: httpx.Response) -> None:
        nonlocal in_flight
        in_flight -= 1

    async with httpx.AsyncClient(
        trust_env=False, event_hooks={"request": [counting], "response": [done]}
    ) as client:
        urls = [f"{server.url}/slow?n={n}" for n in range(6)]
        pages = await fetcher_for(client, concurrency=2).fetch_all(urls, deadline_s=30)
    assert all(page.ok for page in pages)
    assert most == 2


async def test_nothing_logged_contains_page_text(web, http, caplog: pytest.LogCaptureFixture):
    server, _ = web
    caplog.set_level(logging.DEBUG)
    pages = await fetcher_for(http).fetch_all(
        [
            f"{server.url}/article",
            f"{server.url}/plain",
            f"{server.url}/huge",
            f"{server.url}/redirect/metadata",
            f"{server.url}/missing",
        ],
        deadline_s=30,
    )
    assert pages[0].ok
    assert pages[1].ok
    logged = caplog.text + "".join(str(record.args) for record in caplog.records)
    for marker in ("Marrowby", "lighthouse", "otter", "Wendle", "Quartz pelican"):
        assert marker not in logged


async def test_the_deadline_cancels_fetches_cleanly_under_load(web, http):
    server, state = web
    state.slow_s = 60
    urls = [f"{server.url}/slow?n={n}" for n in range(8)]
    pages = await asyncio.wait_for(
        fetcher_for(http, per_fetch_timeout_s=60).fetch_all(urls, deadline_s=0.5), timeout=20
    )
    assert {page.error for page in pages} == {PageError.DEADLINE}


async def test_cancelling_the_call_cancels_its_fetches(web, http):
    server, state = web
    state.slow_s = 60
    call = asyncio.create_task(
        fetcher_for(http, per_fetch_timeout_s=60).fetch_all(
            [f"{server.url}/slow?n=1", f"{server.url}/slow?n=2"], deadline_s=60
        )
    )

    async def both_arrived() -> bool:
        return len(state.hits) == 2

    await wait_until_async(both_arrived, what="both slow requests")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def both_hung_up() -> bool:
        return state.hung_up == 2

    await wait_until_async(both_hung_up, what="the server to see both clients hang up")


# ---------------------------------------------------------------- the in-memory twin


async def test_the_memory_twin_answers_from_its_pages_and_records_calls():
    twin = MemoryPageFetcher(pages={"https://a.example/x": "page a"})
    pages = await twin.fetch_all(
        ["https://A.example/x#top", "https://b.example/", "https://a.example/x"], deadline_s=1
    )
    assert [(page.url, page.text, page.error) for page in pages] == [
        ("https://a.example/x", "page a", None),
        ("https://b.example/", "", PageError.HTTP_STATUS),
    ]
    assert twin.calls == [["https://A.example/x#top", "https://b.example/", "https://a.example/x"]]


# --- extraction in worker processes (production) ---------------------------------------------


def pid_of_extractor(html: str) -> str:
    """An extractor that says which process ran it (module-level: sent to workers by name)."""
    return f"pid {os.getpid()}"


def die_on_crash_marker(html: str) -> str:
    """An extractor whose worker dies on the page holding the crash marker."""
    if "Marrowby" in html:
        os._exit(1)  # as a parser crash or the OOM killer would end it
    return f"pid {os.getpid()}"


def die_unless_in_the_test_process(html: str) -> str:
    """An extractor whose worker processes die at once; in the test process it answers."""
    if str(os.getpid()) != os.environ["NILAI_TEST_PARENT_PID"]:
        os._exit(1)  # as a worker re-running an unguarded main script would end
    return "extracted in the test process"


async def test_production_extraction_runs_in_worker_processes(web, http):
    server, _ = web
    fetcher = fetcher_for(http, extractors=process_pool)
    await fetcher.warm_up()
    [article] = await fetcher.fetch_all([f"{server.url}/article"], deadline_s=60)
    assert ARTICLE_TEXT in article.text  # trafilatura, in a worker
    fetcher.close()
    other = fetcher_for(http, extractors=process_pool, extract=pid_of_extractor)
    [page] = await other.fetch_all([f"{server.url}/chain/0"], deadline_s=60)
    assert page.text.startswith("pid ")
    assert page.text != f"pid {os.getpid()}"
    other.close()


async def test_a_dead_extraction_worker_fails_its_page_and_a_fresh_pool_serves_the_next(web, http):
    server, _ = web
    fetcher = fetcher_for(http, extractors=process_pool, extract=die_on_crash_marker)
    [before] = await fetcher.fetch_all([f"{server.url}/secret"], deadline_s=60)
    [crashed] = await fetcher.fetch_all([f"{server.url}/article"], deadline_s=60)
    assert crashed.error is PageError.EXTRACTION
    # An HTML page without the marker is extracted again, by a worker of a fresh pool.
    [after] = await fetcher.fetch_all([f"{server.url}/secret"], deadline_s=60)
    assert after.ok, after.error
    assert after.text.startswith("pid ")
    assert len({before.text, after.text, f"pid {os.getpid()}"}) == 3  # two workers, not us
    fetcher.close()


async def test_workers_that_die_as_they_start_give_way_to_threads(
    web, http, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    server, _ = web
    monkeypatch.setenv("NILAI_TEST_PARENT_PID", str(os.getpid()))
    fetcher = fetcher_for(http, extractors=process_pool, extract=die_unless_in_the_test_process)
    with caplog.at_level(logging.WARNING, logger="nilai.context.search.pages"):
        await fetcher.warm_up(timeout_s=30)  # the workers die: said, and the pool never worked
        assert "did not all start" in caplog.text
        [first] = await fetcher.fetch_all([f"{server.url}/article"], deadline_s=60)
        [second] = await fetcher.fetch_all([f"{server.url}/article"], deadline_s=60)
    assert first.error is PageError.EXTRACTION
    assert second.text == "extracted in the test process"
    assert caplog.text.count("die as they start") == 1
    fetcher.close()


def test_without_working_processes_extraction_falls_back_to_threads(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    def no_semaphores(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("This platform lacks a functioning sem_open implementation")

    monkeypatch.setattr(pages_module, "ProcessPoolExecutor", no_semaphores)
    with caplog.at_level(logging.WARNING, logger="nilai.context.search.pages"):
        pool = process_pool(1)
    assert isinstance(pool, ThreadPoolExecutor)
    assert "runs in threads, not processes (NotImplementedError)" in caplog.text
    pool.shutdown()
