"""Fetching the pages behind search results, safely, and reducing them to their text.

A search result's URL comes from the open web: it may name, or redirect to, an address inside
the operator's network (loopback, a private range, the cloud metadata service).
``nilai.context.addresses.AddressPolicy`` decides which URLs may be fetched and at which
address (see that module: all addresses of the host public, no DNS rebinding between check and
connect). ``HttpPageFetcher`` sends each request to the checked IP address itself, with the
``Host`` header and, for https, the SNI name set to the host name (``pinned_url``,
``host_header``, ``pinned_extensions``), and ``Connection: close`` on every request: the pool
keys connections by IP origin, so a TLS connection verified for one name must never be reused
for another name at the same address. Search results are on many different sites, so
keep-alive would buy little. Redirects are followed here, not by httpx
(``follow_redirects=False``), so every hop is checked and pinned the same way; at most
``max_redirects`` of them.

``page_client()`` builds such a client: HTTP/1.1, no proxy from the environment, and a cookie
jar that refuses every cookie (one user's pages must not set cookies another user's fetches
send; a ``Cookie`` header a shared client would add is removed from page requests as well).

``HttpPageFetcher.fetch_all`` de-duplicates the URLs (lower-case scheme and host, no fragment,
first order kept), fetches at most ``concurrency`` at a time, stops reading a body at
``max_bytes`` (the page is then ``truncated``; gzip and deflate bodies are inflated here with
the cap on the inflated size, so a compression bomb stops at the cap too, and other encodings
are refused), keeps only HTML, XHTML and plain text, gives
each fetch ``per_fetch_timeout_s`` and the whole call ``deadline_s``: what has not finished by
then is cancelled and reported failed, so a slow page never delays the answer.

**Text extraction** (trafilatura, 12-121 ms of CPU per page, most of it Python) runs in worker
*processes* in production (``process_pool``): in threads it would hold the interpreter lock the
event loop needs, and every stream the gateway relays would stall behind it. The pool is the
fetcher's own (not the loop's default executor, which also runs ``getaddrinfo``) and bounds the
extraction work even when fetches are cancelled at the deadline: a cancelled fetch stops
waiting, its extraction finishes in its worker and is dropped. A pool whose worker died (a page
that crashed the parser, the OOM killer) is replaced on the next extraction. Tests use threads
(the default), which take any callable. trafilatura is imported on first extraction only, so a
gateway without the ``nilai[websearch]`` extra imports this module fine.

Nothing of a page (its text, its body, its URL's query) is ever logged; failures are reported
on the ``Page`` as a short kind (``PageError``), never with content.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import logging
import multiprocessing
import zlib
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from enum import StrEnum
from http import HTTPStatus
from typing import Protocol

import httpx

from nilai.context.addresses import (
    AddressPolicy,
    Refused,
    host_header,
    parse_url,
    pinned_extensions,
    pinned_url,
)

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAX_BYTES = 2 * MIB
DEFAULT_MAX_TEXT_CHARS = 20_000
"""Extracted text kept per page (characters): a page is context for a prompt, not an archive."""

KEPT_MEDIA_TYPES = frozenset({"text/html", "application/xhtml+xml", "text/plain"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HTML_ACCEPT = "text/html,application/xhtml+xml,text/plain;q=0.9"


class PageError(StrEnum):
    """Why a page was not used: a short kind, never page content."""

    BAD_URL = "bad_url"
    FORBIDDEN_ADDRESS = "forbidden_address"
    DNS = "dns"
    NETWORK = "network"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    HTTP_STATUS = "http_status"
    UNSUPPORTED_TYPE = "unsupported_type"
    BAD_ENCODING = "bad_encoding"
    TIMEOUT = "timeout"
    DEADLINE = "deadline"
    NO_TEXT = "no_text"
    EXTRACTION = "extraction"


@dataclass(frozen=True)
class Page:
    """One fetched page: its extracted text, or why there is none.

    ``url`` is the URL as asked for (normalised), not where redirects led.
    """

    url: str
    text: str = ""
    truncated: bool = False
    error: PageError | None = None
    status_code: int | None = None

    @property
    def ok(self) -> bool:
        """Whether the page was fetched and has text."""
        return self.error is None


def normalise_url(url: str) -> str:
    """``url`` with lower-case scheme and host, no default port and no fragment.

    Raises:
        Refused: The URL cannot be parsed, or has no host.
    """
    parsed = parse_url(url)
    return str(parsed.copy_with(fragment=None))


def page_client() -> httpx.AsyncClient:
    """The client ``HttpPageFetcher`` is meant for, kept apart from the gateway's other clients.

    HTTP/1.1 only (``Connection: close`` must hold, see the module docstring), no proxy from the
    environment, no redirects followed by httpx, and a cookie jar that refuses every cookie: one
    user's pages must not set cookies that another user's fetches send.
    """
    no_cookies = http.cookiejar.CookieJar(
        policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
    )
    return httpx.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        cookies=no_cookies,
        headers={"User-Agent": "nilai-web-search"},
    )


class PageFetcher(Protocol):
    """Fetches result pages and reduces them to text."""

    async def fetch_all(self, urls: list[str], *, deadline_s: float) -> list[Page]:
        """One ``Page`` per distinct URL, in first-seen order, within ``deadline_s``.

        Never raises for a page: a page that cannot be had is returned with its ``error``.
        """
        ...


def extract_with_trafilatura(html: str) -> str:
    """The main text of an HTML page (trafilatura, imported on first use); "" if none."""
    # Imported here: the gateway imports this module without the nilai[websearch] extra.
    import trafilatura  # noqa: PLC0415  # pyright: ignore[reportMissingTypeStubs]

    text: object = trafilatura.extract(html, include_comments=False)  # pyright: ignore[reportUnknownMemberType]
    return text if isinstance(text, str) else ""


def thread_pool(workers: int) -> Executor:
    """Extraction in threads: for tests and for extractors that are not module-level functions."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nilai-extract")


def process_pool(workers: int) -> Executor:
    """Extraction in worker processes, so that it never holds the event loop's interpreter lock.

    Started fresh (``spawn``): never a fork of a process with threads and open sockets. Where
    processes cannot be had (no working ``sem_open``, as in some sandboxes), threads, said once.
    """
    try:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(max_workers=workers, mp_context=context)
    except (OSError, ImportError, NotImplementedError) as exc:
        logger.warning(
            "web search: text extraction runs in threads, not processes (%s); under load it "
            "slows the event loop",
            type(exc).__name__,
        )
        return thread_pool(workers)


class _Failed(Exception):
    def __init__(self, kind: PageError, status_code: int | None = None) -> None:
        super().__init__(kind.value)
        self.kind = kind
        self.status_code = status_code


@dataclass
class _Body:
    data: bytes
    truncated: bool
    media_type: str
    charset: str | None


class HttpPageFetcher:
    """The real ``PageFetcher``: HTTP(S) behind an ``AddressPolicy``; see the module docstring."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        policy: AddressPolicy,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        per_fetch_timeout_s: float = 5.0,
        max_redirects: int = 3,
        concurrency: int = 4,
        extract: Callable[[str], str] | None = None,
        extract_workers: int = 2,
        extractors: Callable[[int], Executor] | None = None,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    ) -> None:
        """Fetch with ``http`` (HTTP/1.1, ``trust_env=False``) what ``policy`` allows.

        Args:
            http: The client; its redirect setting is overridden per request.
            policy: Decides each hop's address.
            max_bytes: Body bytes read per page; the rest is not downloaded.
            per_fetch_timeout_s: One page, all its hops and its body.
            max_redirects: Redirects followed per page; one more fails the page.
            concurrency: Pages fetched at once per ``fetch_all`` call.
            extract: HTML to text; trafilatura if unset. With ``process_pool``, a module-level
                function (it is sent to the workers by name).
            extract_workers: Extractions at once, for all calls together.
            extractors: Makes the pool that runs ``extract`` (given ``extract_workers``):
                ``process_pool`` in production; threads if unset.
            max_text_chars: Extracted text kept per page.
        """
        self._http = http
        self._policy = policy
        self._max_bytes = max_bytes
        self._per_fetch_timeout_s = per_fetch_timeout_s
        self._max_redirects = max_redirects
        self._concurrency = concurrency
        self._extract = extract or extract_with_trafilatura
        self._max_text_chars = max_text_chars
        self._workers = extract_workers
        self._make_pool = extractors or thread_pool
        self._extractors = self._make_pool(extract_workers)
        self._pool_worked = False
        """Whether the current pool has finished an extraction: one that breaks before ever
        working is not replaced by another of its kind (see ``_pool_broke``)."""

    async def warm_up(self, timeout_s: float = 60.0) -> None:
        """Start the extraction workers and wait until each has extracted a page.

        At start-up, so that the first user's pages are not extracted by workers still
        importing trafilatura (a second or more of CPU each, which would miss a page deadline).
        Workers that fail or take longer than ``timeout_s`` are left to the first pages: the
        gateway starts anyway.
        """
        loop = asyncio.get_running_loop()
        page = "<html><body><p>warm-up</p></body></html>"
        warming = [
            loop.run_in_executor(self._extractors, self._extract, page)
            for _ in range(self._workers)
        ]
        done, _ = await asyncio.wait(warming, timeout=timeout_s)
        started = [task for task in done if not task.cancelled() and task.exception() is None]
        if started:
            self._pool_worked = True
        if len(started) < len(warming):
            logger.warning(
                "web search: the text extraction workers did not all start within %gs; "
                "the first pages may fall back to their search snippets",
                timeout_s,
            )

    def close(self) -> None:
        """Stop the extraction workers (queued extractions are dropped)."""
        self._extractors.shutdown(wait=False, cancel_futures=True)

    async def fetch_all(self, urls: list[str], *, deadline_s: float) -> list[Page]:
        """See ``PageFetcher.fetch_all``."""
        distinct = _distinct(urls)
        slots = asyncio.Semaphore(self._concurrency)
        tasks: dict[str, asyncio.Task[Page]] = {}
        pages: dict[str, Page] = {}
        for url in distinct:
            if isinstance(url, Page):  # unparseable: reported as such, never fetched
                pages[url.url] = url
            else:
                tasks[url] = asyncio.create_task(self._fetch_page(url, slots))
        if tasks:
            try:
                _, pending = await asyncio.wait(tasks.values(), timeout=deadline_s)
            except BaseException:
                # The caller was cancelled (the client hung up): the fetches go with it.
                for task in tasks.values():
                    task.cancel()
                raise
            for task in pending:
                task.cancel()
            # Let the cancelled fetches close their connections before answering.
            await asyncio.gather(*pending, return_exceptions=True)
        for url, task in tasks.items():
            if task.cancelled() or not task.done():
                pages[url] = Page(url, error=PageError.DEADLINE)
            else:
                pages[url] = task.result()
        return [pages[page.url if isinstance(page, Page) else page] for page in distinct]

    async def _fetch_page(self, url: str, slots: asyncio.Semaphore) -> Page:
        try:
            async with slots:
                try:
                    async with asyncio.timeout(self._per_fetch_timeout_s):
                        body = await self._download(url)
                except TimeoutError:
                    raise _Failed(PageError.TIMEOUT) from None
            text = await self._text(body)
        except _Failed as failure:
            return Page(url, error=failure.kind, status_code=failure.status_code)
        except Refused as refusal:
            # The policy's kinds are page errors of the same name (bad_url, dns, ...).
            return Page(url, error=PageError(refusal.kind.value))
        if not text.strip():
            return Page(url, truncated=body.truncated, error=PageError.NO_TEXT)
        return Page(url, text=text, truncated=body.truncated, status_code=HTTPStatus.OK)

    async def _download(self, url: str) -> _Body:
        current = parse_url(url)
        for _ in range(self._max_redirects + 1):
            target = await self._policy.check(current)
            request = self._http.build_request(
                "GET",
                pinned_url(target),
                headers={
                    "Host": host_header(target),
                    "Connection": "close",
                    "Accept": _HTML_ACCEPT,
                    "Accept-Encoding": "gzip, deflate",
                },
                extensions=pinned_extensions(target),
                timeout=self._per_fetch_timeout_s,
            )
            # A shared client's cookies are never sent to pages (see ``page_client``).
            request.headers.pop("cookie", None)
            try:
                response = await self._http.send(request, stream=True, follow_redirects=False)
            except httpx.HTTPError:
                raise _Failed(PageError.NETWORK) from None
            try:
                location = response.headers.get("location")
                if response.status_code in _REDIRECTS and location:
                    try:
                        current = current.join(location).copy_with(fragment=None)
                    except (httpx.InvalidURL, ValueError):
                        raise _Failed(PageError.BAD_URL) from None
                    continue
                return await self._read(response)
            finally:
                await response.aclose()
        raise _Failed(PageError.TOO_MANY_REDIRECTS)

    async def _read(self, response: httpx.Response) -> _Body:
        if response.status_code != HTTPStatus.OK:
            raise _Failed(PageError.HTTP_STATUS, response.status_code)
        media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type not in KEPT_MEDIA_TYPES:
            raise _Failed(PageError.UNSUPPORTED_TYPE, response.status_code)
        decoder = _decoder(response.headers.get("content-encoding", ""))
        # One byte more than the cap tells a page that is exactly the cap from a longer one.
        limit = self._max_bytes + 1
        body = bytearray()
        try:
            # Raw bytes, decompressed here with a bound on the output: httpx's own decoding
            # would inflate each network chunk whole (a 64 KiB gzip chunk can be 64 MiB).
            async for chunk in response.aiter_raw():
                body += decoder.take(chunk, limit - len(body))
                if len(body) >= limit:
                    # The rest is never downloaded: closing the response drops the connection.
                    break
        except httpx.HTTPError:
            raise _Failed(PageError.NETWORK) from None
        except zlib.error:
            raise _Failed(PageError.BAD_ENCODING) from None
        truncated = len(body) > self._max_bytes
        return _Body(
            bytes(body[: self._max_bytes]), truncated, media_type, response.charset_encoding
        )

    def _pool_broke(self, pool: Executor) -> None:
        """Replace a pool whose worker died (this page may have crashed it).

        A pool that broke before finishing a single extraction has workers that die as they
        start (e.g. an embedding script without the ``if __name__ == "__main__"`` guard that
        ``spawn`` needs): its like would break again, so threads take over, said once.
        """
        if self._pool_worked:
            self._extractors = self._make_pool(self._workers)
        else:
            logger.warning(
                "web search: the text extraction workers die as they start; extraction runs in "
                "threads from now on, which slows the event loop under load"
            )
            self._extractors = thread_pool(self._workers)
        self._pool_worked = False
        pool.shutdown(wait=False, cancel_futures=True)

    async def _text(self, body: _Body) -> str:
        document = _decode(body)
        if body.media_type == "text/plain":
            return document[: self._max_text_chars]
        loop = asyncio.get_running_loop()
        pool = self._extractors
        try:
            text = await loop.run_in_executor(pool, self._extract, document)
        except BrokenProcessPool:
            if self._extractors is pool:
                self._pool_broke(pool)
            raise _Failed(PageError.EXTRACTION) from None
        except Exception:  # noqa: BLE001 - a page the extractor chokes on is just not used
            raise _Failed(PageError.EXTRACTION) from None
        if self._extractors is pool:
            self._pool_worked = True
        return text[: self._max_text_chars]


class _Decoder:
    """Decompresses a body (gzip, deflate, or none), never more than asked for per call."""

    def __init__(self, wbits: int | None) -> None:
        self._wbits = wbits
        self._inflate = zlib.decompressobj(wbits) if wbits is not None else None
        self._started = False

    def take(self, chunk: bytes, most: int) -> bytes:
        """Up to ``most`` (> 0) decoded bytes from ``chunk`` and whatever is left from before."""
        if self._inflate is None:
            return chunk[:most]
        try:
            out = self._inflate.decompress(chunk, most)
        except zlib.error:
            if self._started or self._wbits != zlib.MAX_WBITS:
                raise
            # "deflate" is zlib-wrapped by the standard, raw deflate by some servers.
            self._wbits = -zlib.MAX_WBITS
            self._inflate = zlib.decompressobj(self._wbits)
            out = self._inflate.decompress(chunk, most)
        self._started = True
        # Whatever did not fit stays in ``unconsumed_tail``: it is only wanted if there is room.
        while self._inflate.unconsumed_tail and len(out) < most:
            out += self._inflate.decompress(self._inflate.unconsumed_tail, most - len(out))
        return out


def _decoder(content_encoding: str) -> _Decoder:
    encoding = content_encoding.strip().lower()
    if encoding in {"", "identity"}:
        return _Decoder(None)
    if encoding in {"gzip", "x-gzip"}:
        return _Decoder(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return _Decoder(zlib.MAX_WBITS)
    # Only gzip and deflate are asked for; anything else (br, zstd, stacked) is refused.
    raise _Failed(PageError.BAD_ENCODING)


def _decode(body: _Body) -> str:
    try:
        return body.data.decode(body.charset or "utf-8", errors="replace")
    except LookupError:  # an unknown charset name
        return body.data.decode("utf-8", errors="replace")


def _distinct(urls: list[str]) -> list[str | Page]:
    """The URLs normalised, duplicates dropped (first kept); unparseable ones as failed pages."""
    seen: set[str] = set()
    distinct: list[str | Page] = []
    for url in urls:
        try:
            key = normalise_url(url)
        except Refused:
            key = url
            if key not in seen:
                seen.add(key)
                distinct.append(Page(url, error=PageError.BAD_URL))
            continue
        if key not in seen:
            seen.add(key)
            distinct.append(key)
    return distinct


@dataclass
class MemoryPageFetcher:
    """The in-memory ``PageFetcher``: pages by URL; unknown URLs fail with a 404.

    ``calls`` records each ``fetch_all`` call's URLs as given.
    """

    pages: dict[str, str] = field(default_factory=dict[str, str])
    calls: list[list[str]] = field(default_factory=list[list[str]])

    async def fetch_all(self, urls: list[str], *, deadline_s: float) -> list[Page]:
        """Known pages' text, others failed; duplicates dropped as the real fetcher does."""
        self.calls.append(list(urls))
        known = {normalise_url(url): text for url, text in self.pages.items()}
        results: list[Page] = []
        for url in _distinct(urls):
            if isinstance(url, Page):
                results.append(url)
            elif url in known:
                results.append(Page(url, text=known[url], status_code=HTTPStatus.OK))
            else:
                results.append(
                    Page(url, error=PageError.HTTP_STATUS, status_code=HTTPStatus.NOT_FOUND)
                )
        return results
