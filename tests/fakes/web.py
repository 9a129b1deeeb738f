"""A loopback stand-in for the web pages behind search results, for tests of page fetching.

Run it with ``tests.support.servers.ServerThread(create_web_app(state))``; ``state.hits`` lists
every request it served as ``(path with query, Host header)``, in order, so a test can prove that
a forbidden page was never requested and that no URL was fetched twice.

Routes (all ``GET``):

- ``/article``: an HTML article (``ARTICLE_TEXT`` is its body's marker sentence).
- ``/plain``: ``text/plain`` (``PLAIN_TEXT``).
- ``/slow``: waits ``state.slow_s`` (default 30 s) before answering with an HTML page;
  ``state.hung_up`` counts the clients that disconnected while it waited.
- ``/huge``: streams ``HUGE_BYTES`` (20 MB) of HTML paragraphs; ``state.huge_bytes_sent`` counts
  what went out before the client hung up.
- ``/gzip``: the article, ``Content-Encoding: gzip``.
- ``/gzip-bomb``: ``GZIP_BOMB_BYTES`` (20 MB) of HTML, gzip-compressed to a few tens of KB.
- ``/brotli``: claims ``Content-Encoding: br`` (an encoding the fetcher does not ask for).
- ``/pdf``: ``application/pdf``; ``/png``: ``image/png``.
- ``/missing``: ``404``.
- ``/redirect/metadata``: ``302`` to ``http://169.254.169.254/latest/meta-data/``.
- ``/redirect/private``: ``302`` to ``http://10.0.0.1/``.
- ``/redirect/to?url=<absolute URL>``: ``302`` to that URL (for a name the test resolver maps).
- ``/chain/{n}``: ``302`` to ``/chain/{n-1}``; ``/chain/0`` is the article. So ``/chain/3`` is
  three redirects, ``/chain/4`` four.
- ``/secret``: a page no test should ever reach when its address is forbidden.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

ARTICLE_TEXT = (
    "The lighthouse keeper of Marrowby counted four hundred and twelve ships in the winter storm."
)
PLAIN_TEXT = "Plain notes: the otter population of the Wendle estuary doubled since 2019.\n"
HUGE_BYTES = 20 * 1000 * 1000
GZIP_BOMB_BYTES = 20 * 1000 * 1000
HUGE_CHUNK = b"<p>" + b"Quartz pelican paragraph filler text. " * 50 + b"</p>\n"

ARTICLE_HTML = f"""<!doctype html>
<html><head><title>Marrowby lighthouse</title></head>
<body>
<nav><a href="/">Home</a> | <a href="/news">News</a></nav>
<article>
<h1>The Marrowby lighthouse in the storm</h1>
<p>{ARTICLE_TEXT}</p>
<p>She wrote each name in a ledger that is now kept at the harbour museum, where visitors can
read the entries of that night, page after page, in her careful hand.</p>
<p>Most of the ships reached the harbour before dawn; three sheltered behind the northern cape
until the wind dropped on the following afternoon.</p>
</article>
<footer>Copyright the Marrowby Gazette</footer>
</body></html>
"""


@dataclass
class WebState:
    """What the stand-in served, and its knobs."""

    hits: list[tuple[str, str]] = field(default_factory=list[tuple[str, str]])
    slow_s: float = 30.0
    huge_bytes_sent: int = 0
    hung_up: int = 0
    """Slow requests whose client disconnected before the answer."""

    def paths(self) -> list[str]:
        """The request paths served, in order."""
        return [path for path, _ in self.hits]


def create_web_app(state: WebState) -> Starlette:
    """The stand-in pages app; see the module docstring for its routes."""

    def record(request: Request) -> None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        state.hits.append((path, request.headers.get("host", "")))

    async def article(request: Request) -> Response:
        record(request)
        return HTMLResponse(ARTICLE_HTML)

    async def plain(request: Request) -> Response:
        record(request)
        return PlainTextResponse(PLAIN_TEXT)

    async def slow(request: Request) -> Response:
        record(request)
        # Waits in steps so that a client that hung up frees the server at once (tests stop it).
        waited = 0.0
        while waited < state.slow_s:
            if await request.is_disconnected():
                state.hung_up += 1
                return Response(status_code=499)
            await asyncio.sleep(0.05)
            waited += 0.05
        return HTMLResponse(ARTICLE_HTML)

    async def huge(request: Request) -> Response:
        record(request)

        async def body() -> AsyncIterator[bytes]:
            yield b"<!doctype html><html><head><title>Huge</title></head><body><article>"
            while state.huge_bytes_sent < HUGE_BYTES:
                state.huge_bytes_sent += len(HUGE_CHUNK)
                yield HUGE_CHUNK
                # Once the client has hung up, uvicorn drops each chunk without awaiting
                # anything: without this, the loop would run to 20 MB before Starlette's
                # disconnect listener got a turn to stop it, and the count would mean nothing.
                await asyncio.sleep(0)
            yield b"</article></body></html>"

        return StreamingResponse(body(), media_type="text/html")

    async def gzipped(request: Request) -> Response:
        record(request)
        return Response(
            gzip.compress(ARTICLE_HTML.encode()),
            media_type="text/html",
            headers={"Content-Encoding": "gzip"},
        )

    bomb = gzip.compress(b"<html><body><p>" + b"a" * GZIP_BOMB_BYTES + b"</p></body></html>")

    async def gzip_bomb(request: Request) -> Response:
        record(request)
        return Response(bomb, media_type="text/html", headers={"Content-Encoding": "gzip"})

    async def brotli(request: Request) -> Response:
        record(request)
        return Response(
            b"\x0b\x02\x80hello\x03", media_type="text/html", headers={"Content-Encoding": "br"}
        )

    async def pdf(request: Request) -> Response:
        record(request)
        return Response(b"%PDF-1.4\n%fake\n", media_type="application/pdf")

    async def png(request: Request) -> Response:
        record(request)
        return Response(b"\x89PNG\r\n\x1a\n", media_type="image/png")

    async def missing(request: Request) -> Response:
        record(request)
        return HTMLResponse("<html><body><p>Not here.</p></body></html>", status_code=404)

    async def redirect_metadata(request: Request) -> Response:
        record(request)
        return RedirectResponse("http://169.254.169.254/latest/meta-data/", status_code=302)

    async def redirect_private(request: Request) -> Response:
        record(request)
        return RedirectResponse("http://10.0.0.1/", status_code=302)

    async def redirect_to(request: Request) -> Response:
        record(request)
        return RedirectResponse(request.query_params["url"], status_code=302)

    async def chain(request: Request) -> Response:
        record(request)
        hops = int(request.path_params["n"])
        if hops <= 0:
            return HTMLResponse(ARTICLE_HTML)
        return RedirectResponse(f"/chain/{hops - 1}", status_code=302)

    async def secret(request: Request) -> Response:
        record(request)
        return HTMLResponse("<html><body><p>Internal secret page.</p></body></html>")

    return Starlette(
        routes=[
            Route("/article", article),
            Route("/plain", plain),
            Route("/slow", slow),
            Route("/huge", huge),
            Route("/gzip", gzipped),
            Route("/gzip-bomb", gzip_bomb),
            Route("/brotli", brotli),
            Route("/pdf", pdf),
            Route("/png", png),
            Route("/missing", missing),
            Route("/redirect/metadata", redirect_metadata),
            Route("/redirect/private", redirect_private),
            Route("/redirect/to", redirect_to),
            Route("/chain/{n:int}", chain),
            Route("/secret", secret),
        ]
    )
