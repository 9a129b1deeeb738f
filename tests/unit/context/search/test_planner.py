"""The search planner: its instructions, and reading whatever the model answers."""

import pytest

from nilai.context.search.planner import (
    MAX_CONTEXT_CHARS,
    MAX_QUERY_CHARS,
    SearchTopic,
    fallback_query,
    parse_plan,
    planner_messages,
)
from nilai.protocol.chat import ChatMessage


def message(role: str, content: object) -> ChatMessage:
    return ChatMessage.model_validate({"role": role, "content": content})


def test_a_plan_in_the_asked_shape_is_read():
    answer = (
        '{"topics": [{"topic": "weather", "query": "Paris weather today"},'
        ' {"topic": "events", "query": "Paris events this weekend"}]}'
    )
    assert parse_plan(answer, max_topics=3) == [
        SearchTopic("weather", "Paris weather today"),
        SearchTopic("events", "Paris events this weekend"),
    ]


@pytest.mark.parametrize(
    "answer",
    [
        'Sure! Here is the plan:\n```json\n{"topics": [{"topic": "t", "query": "q one"}]}\n```',
        'Plan {not json} then {"topics": [{"topic": "t", "query": "q one"}]} done',
    ],
)
def test_the_first_json_object_in_prose_or_a_code_fence_is_read(answer: str):
    assert parse_plan(answer, max_topics=3) == [SearchTopic("t", "q one")]


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "no json here",
        "[1, 2, 3]",
        '{"topics": "weather"}',
        '{"topics": [{"topic": "t"}, {"query": ""}, {"query": 7}, "x", null]}',
        '{"plan": [{"topic": "t", "query": "q"}]}',
    ],
)
def test_anything_that_is_not_a_usable_plan_gives_no_topics(answer: str):
    assert parse_plan(answer, max_topics=3) == []


def test_topics_are_capped_deduplicated_one_line_and_bounded():
    long_query = "word " * 100
    answer = (
        '{"topics": ['
        '{"topic": "a", "query": "same query"},'
        '{"topic": "b", "query": "SAME   query"},'
        '{"topic": "c\\nline", "query": "second\\nquery"},'
        f'{{"topic": "d", "query": "{long_query}"}},'
        '{"topic": "e", "query": "fourth"}]}'
    )
    topics = parse_plan(answer, max_topics=3)
    assert [t.query for t in topics][:2] == ["same query", "second query"]
    assert topics[1].topic == "c line"
    assert len(topics) == 3
    assert len(topics[2].query) <= MAX_QUERY_CHARS
    assert "\n" not in topics[2].query


def test_a_topic_without_a_name_is_named_by_its_query():
    assert parse_plan('{"topics": [{"query": "only a query"}]}', max_topics=1) == [
        SearchTopic("only a query", "only a query")
    ]


def test_the_fallback_is_the_last_user_message_on_one_line():
    messages = [
        message("user", "first question"),
        message("assistant", "an answer"),
        message("user", [{"type": "text", "text": "latest\nquestion"}, {"type": "image_url"}]),
        message("assistant", "trailing"),
    ]
    assert fallback_query(messages) == "latest question"
    assert fallback_query([message("system", "be brief")]) is None
    assert fallback_query([message("user", "   ")]) is None
    assert len(fallback_query([message("user", "x" * 1000)]) or "") == MAX_QUERY_CHARS


def test_the_planner_sees_the_instructions_and_the_end_of_the_conversation():
    messages = [message("user", "a" * (MAX_CONTEXT_CHARS * 2)), message("user", "the question")]
    system, user = planner_messages(messages, max_topics=2)
    assert system["role"] == "system"
    assert "at most 2 topics" in system["content"]
    assert '{"topics": [{"topic"' in system["content"]
    assert user["role"] == "user"
    assert user["content"].endswith("user: the question")
    assert len(user["content"]) == MAX_CONTEXT_CHARS
