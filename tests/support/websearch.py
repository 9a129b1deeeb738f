"""The loopback world a web search needs: a Brave-shaped search API and the pages it points to.

``start_search_world()`` starts three stand-ins: Brave (tests/fakes/brave.py), the result pages
(tests/fakes/web.py) on 127.0.0.1, and a second pages server on 127.0.0.2 that plays a forbidden
address (an internal service): the gateway's settings from ``gateway_settings()`` allow fetching
from 127.0.0.1/32 only, so any hit recorded by ``forbidden`` means the address policy failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.fakes.brave import DEFAULT_API_KEY, BraveState, brave_result, create_brave_app
from tests.fakes.web import WebState, create_web_app
from tests.support.servers import ServerThread

FORBIDDEN_HOST = "127.0.0.2"


@dataclass
class SearchWorld:
    """The running stand-ins and what they recorded."""

    brave: BraveState
    brave_server: ServerThread
    web: WebState
    web_server: ServerThread
    forbidden: WebState
    forbidden_server: ServerThread

    def page(self, path: str) -> str:
        """The URL of a stand-in page (``/article``, ``/huge``, ...)."""
        return f"{self.web_server.url}{path}"

    def forbidden_page(self) -> str:
        """A URL on the forbidden address (``/secret``): must never be requested."""
        return f"{self.forbidden_server.url}/secret"

    def redirect_to_forbidden(self) -> str:
        """A page on the allowed server that redirects to the forbidden address."""
        return self.page(f"/redirect/to?url={self.forbidden_page()}")

    def answer(self, query: str | None, *paths_or_urls: str) -> None:
        """Make Brave answer ``query`` (None: any query) with results for these pages.

        Each entry is a stand-in path (``/article``) or an absolute URL; the result's snippet
        is ``"snippet of <entry>"``.
        """
        items = [
            brave_result(
                f"title of {entry}",
                entry if entry.startswith(("http://", "https://")) else self.page(entry),
                f"snippet of {entry}",
            )
            for entry in paths_or_urls
        ]
        if query is None:
            self.brave.default_results[:] = items
        else:
            self.brave.results[query] = items

    def gateway_settings(self, **overrides: Any) -> dict[str, Any]:
        """``NilaiSettings`` fields that turn web search on against these stand-ins."""
        values: dict[str, Any] = {
            "web_search_api_key": DEFAULT_API_KEY,
            "web_search_base_url": self.brave_server.url,
            "web_search_allow_networks": ["127.0.0.1/32"],
        }
        values.update(overrides)
        return values

    def reset(self) -> None:
        """Forget Brave's results, faults and queries, and every page hit."""
        self.brave.clear()
        self.web.hits.clear()
        self.forbidden.hits.clear()

    def stop(self) -> None:
        """Stop the three servers."""
        for server in (self.brave_server, self.web_server, self.forbidden_server):
            server.stop()


def start_search_world(*, slow_s: float = 30.0) -> SearchWorld:
    """Start Brave, the pages and the forbidden pages on loopback."""
    brave = BraveState()
    web = WebState(slow_s=slow_s)
    forbidden = WebState()
    brave_server = ServerThread(create_brave_app(brave)).start()
    web_server = ServerThread(create_web_app(web)).start()
    forbidden_server = ServerThread(create_web_app(forbidden), host=FORBIDDEN_HOST).start()
    return SearchWorld(brave, brave_server, web, web_server, forbidden, forbidden_server)
