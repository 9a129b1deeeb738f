"""Build the web search service from the settings (called from the gateway's lifespan)."""

from __future__ import annotations

import importlib
from contextlib import AsyncExitStack

import httpx

from nilai.context.addresses import AddressPolicy
from nilai.context.search.pages import HttpPageFetcher, page_client, process_pool
from nilai.context.search.provider import BraveSearch
from nilai.context.search.service import SearchQuota, WebSearch
from nilai.settings import NilaiSettings
from nilai.startup import StartupError

NOT_CONFIGURED = "NILAI_WEB_SEARCH_API_KEY is not set"


async def make_web_search(
    settings: NilaiSettings,
    http: httpx.AsyncClient,
    quota: SearchQuota,
    stack: AsyncExitStack,
) -> WebSearch | None:
    """The web search service, or None when no search provider key is configured.

    Searches go through the gateway's shared client ``http``; pages are fetched with a client
    of their own (``page_client``: no cookies, no proxy, every connection pinned to a checked
    address), closed with the extraction workers when ``stack`` closes. Returns once the
    extraction workers have started.

    Raises:
        StartupError: The ``nilai[websearch]`` extra (trafilatura) is not installed.
    """
    if not settings.web_search_enabled or settings.web_search_api_key is None:
        return None
    try:
        # Imported now, at start-up: the first search's extraction would otherwise pay for the
        # import (~0.5 s) while holding a request.
        importlib.import_module("trafilatura")
    except ImportError:
        raise StartupError(
            "NILAI_WEB_SEARCH_API_KEY is set, but trafilatura, which extracts the text of result "
            "pages, is not installed: pip install 'nilai[websearch]'"
        ) from None
    provider = BraveSearch(
        http,
        base_url=settings.web_search_base_url,
        api_key=settings.web_search_api_key,
        timeout_s=settings.web_search_timeout_s,
        safesearch=settings.web_search_safesearch,
    )
    client = page_client()
    stack.push_async_callback(client.aclose)
    pages = HttpPageFetcher(
        client,
        AddressPolicy(allow=settings.web_search_allow_networks),
        max_bytes=settings.web_search_max_page_bytes,
        per_fetch_timeout_s=settings.web_search_page_timeout_s,
        extractors=process_pool,
    )
    stack.callback(pages.close)
    await pages.warm_up()
    return WebSearch(
        provider,
        pages,
        quota=quota,
        results_per_query=settings.web_search_results_per_query,
        max_topics=settings.web_search_max_topics,
        planner_max_tokens=settings.web_search_planner_max_tokens,
        planner_timeout_s=settings.web_search_planner_timeout_s,
        pages_deadline_s=settings.web_search_deadline_s,
        max_source_chars=settings.web_search_max_source_chars,
    )
