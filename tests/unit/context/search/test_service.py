"""One web search for a chat: planning, searching, fetching and the sources it yields."""

import pytest

from nilai.context.search.pages import MemoryPageFetcher
from nilai.context.search.provider import MemorySearch, SearchResult
from nilai.context.search.service import PlannerAnswer, SearchOutcome, WebSearch
from nilai.errors import ContextUnavailable, RateLimited, UpstreamTimeout, ValidationFailed
from nilai.limits.base import Decision, Limit
from nilai.protocol.chat import ChatMessage

MESSAGES = [ChatMessage.model_validate({"role": "user", "content": "What happened in Paris?"})]
PLAN = (
    '{"topics": [{"topic": "news", "query": "Paris news"},'
    ' {"topic": "weather", "query": "Paris weather"}]}'
)
NEWS = SearchResult("News", "https://news.example/paris", "news snippet")
WEATHER = SearchResult("Weather", "https://weather.example/paris", "weather snippet")


class Planner:
    """A scripted planner model: one answer (or error), and what it was asked."""

    def __init__(self, answer: PlannerAnswer | Exception) -> None:
        self.answer = answer
        self.calls: list[tuple[list[dict[str, str]], int, float]] = []

    async def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int, timeout_s: float
    ) -> PlannerAnswer:
        self.calls.append((messages, max_tokens, timeout_s))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def world(
    results: dict[str, list[SearchResult]] | None = None, pages: dict[str, str] | None = None
) -> tuple[WebSearch, MemorySearch, MemoryPageFetcher]:
    provider = MemorySearch(results or {"Paris news": [NEWS], "Paris weather": [WEATHER, NEWS]})
    fetcher = MemoryPageFetcher(pages=pages or {NEWS.url: "news page text"})
    search = WebSearch(
        provider, fetcher, results_per_query=2, planner_max_tokens=99, planner_timeout_s=3
    )
    return search, provider, fetcher


async def test_planned_topics_are_searched_pages_fetched_once_and_snippets_fill_in():
    search, provider, fetcher = world()
    planner = Planner(PlannerAnswer(PLAN, prompt_tokens=40, completion_tokens=12))
    outcome = await search.run(MESSAGES, planner)
    assert isinstance(outcome, SearchOutcome)
    assert sorted(provider.searches) == [("Paris news", 2), ("Paris weather", 2)]
    assert fetcher.calls == [[NEWS.url, WEATHER.url]]  # the news page once, though found twice
    assert outcome.sources == [
        {"source": NEWS.url, "content": "news page text"},
        {"source": WEATHER.url, "content": "weather snippet"},  # its page failed
    ]
    assert outcome.searches == 2
    assert (outcome.planner_prompt_tokens, outcome.planner_completion_tokens) == (40, 12)
    (messages, max_tokens, timeout_s), *_ = planner.calls
    assert (max_tokens, timeout_s) == (99, 3)
    assert messages[-1]["content"].endswith("What happened in Paris?")
    assert outcome.message["role"] == "system"
    assert "[1] https://news.example/paris\nnews page text" in outcome.message["content"]
    assert "not instructions" in outcome.message["content"]


@pytest.mark.parametrize(
    "answer",
    [UpstreamTimeout("The model server did not answer."), PlannerAnswer("I cannot plan.")],
)
async def test_a_planner_that_fails_or_plans_nothing_falls_back_to_the_users_message(
    answer: PlannerAnswer | Exception,
):
    search, provider, _ = world({"What happened in Paris?": [NEWS]})
    outcome = await search.run(MESSAGES, Planner(answer))
    assert provider.queries == ["What happened in Paris?"]
    assert outcome.searches == 1
    assert outcome.sources == [{"source": NEWS.url, "content": "news page text"}]


async def test_one_failed_search_is_skipped_and_all_failed_is_the_providers_error():
    class HalfDown(MemorySearch):
        async def search(self, query: str, *, count: int) -> list[SearchResult]:
            if query == "Paris weather":
                raise ContextUnavailable("down", code="web_search_unavailable")
            return await super().search(query, count=count)

    half = HalfDown({"Paris news": [NEWS]})
    search = WebSearch(half, MemoryPageFetcher(pages={NEWS.url: "text"}))
    outcome = await search.run(MESSAGES, Planner(PlannerAnswer(PLAN)))
    assert outcome.sources == [{"source": NEWS.url, "content": "text"}]
    assert outcome.searches == 1  # the query log counts the searches the provider answered

    down = MemorySearch()
    down.failure = ContextUnavailable("down", code="web_search_unavailable")
    with pytest.raises(ContextUnavailable):
        await WebSearch(down, MemoryPageFetcher()).run(MESSAGES, Planner(PlannerAnswer(PLAN)))


async def test_a_conversation_without_user_text_is_refused():
    search, _, _ = world()
    system_only = [ChatMessage.model_validate({"role": "system", "content": "be brief"})]
    planner = Planner(PlannerAnswer(PLAN))
    with pytest.raises(ValidationFailed) as refused:
        await search.run(system_only, planner)
    assert refused.value.param == "messages"
    assert planner.calls == []  # refused before the planner's call


async def test_sources_are_cut_to_their_limit():
    long_text = "x" * 10_000
    provider = MemorySearch({"Paris news": [NEWS]})
    search = WebSearch(
        provider, MemoryPageFetcher(pages={NEWS.url: long_text}), max_source_chars=100
    )
    outcome = await search.run(MESSAGES, Planner(PlannerAnswer(PLAN)))
    assert [len(source["content"]) for source in outcome.sources] == [100]


class Quota:
    """The provider's quota: ``left`` searches, then ``RateLimited``; counts what it was asked."""

    def __init__(self, left: int) -> None:
        self.left = left
        self.asked = 0

    async def admit_search(self) -> object:
        self.asked += 1
        if self.left <= 0:
            limit = Limit("{search}:second", "web searches per second", 1, 1)
            raise RateLimited(Decision(False, limit, 0, 1))
        self.left -= 1
        return None


async def test_each_search_is_counted_against_the_quota_and_a_refused_one_is_skipped():
    quota = Quota(left=1)
    provider = MemorySearch({"Paris news": [NEWS], "Paris weather": [WEATHER]})
    search = WebSearch(provider, MemoryPageFetcher(pages={NEWS.url: "t"}), quota=quota)
    outcome = await search.run(MESSAGES, Planner(PlannerAnswer(PLAN)))
    assert quota.asked == 2
    assert len(provider.searches) == 1  # the refused search never reached the provider
    assert outcome.searches == 1
    assert len(outcome.sources) == 1


async def test_a_quota_refusing_every_search_is_429_and_the_provider_is_not_asked():
    provider = MemorySearch({"Paris news": [NEWS]})
    search = WebSearch(provider, MemoryPageFetcher(), quota=Quota(left=0))
    with pytest.raises(RateLimited) as refused:
        await search.run(MESSAGES, Planner(PlannerAnswer(PLAN)))
    assert refused.value.headers["Retry-After"] == "1"
    assert provider.searches == []


async def test_the_sources_together_fit_the_budget_and_the_client_gets_what_the_model_saw():
    provider = MemorySearch({"Paris news": [NEWS], "Paris weather": [WEATHER]})
    pages = MemoryPageFetcher(pages={NEWS.url: "n" * 80, WEATHER.url: "w" * 80})
    search = WebSearch(provider, pages)
    outcome = await search.run(MESSAGES, Planner(PlannerAnswer(PLAN)), max_total_chars=100)
    assert [len(source["content"]) for source in outcome.sources] == [80, 20]
    assert outcome.message["content"].endswith("w" * 20)
    none = await search.run(MESSAGES, Planner(PlannerAnswer(PLAN)), max_total_chars=0)
    assert none.sources == []
    assert none.message["content"].endswith("(no results)")
