"""What to search the web for: the model plans a few topics, each with one query.

The planner is one extra, bounded model call made before the answer: its own ``max_tokens``, its
own time limit, no streaming. It asks for JSON (``{"topics": [{"topic", "query"}]}``) and reads
the answer defensively: whatever is not a usable plan (no JSON, wrong shape, empty queries)
gives no topics, and the caller falls back to searching the user's last message. Its tokens are
the caller's to count: the answer's ``usage`` includes them.

Nothing here logs: the conversation, the plan and the queries are the user's content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, cast

from nilai.protocol.base import json_object
from nilai.protocol.chat import ChatMessage

MAX_QUERY_CHARS = 200
"""Longer queries are cut: search providers refuse or ignore very long ones."""
MAX_CONTEXT_CHARS = 4000
"""How much of the conversation (its end) the planner sees."""

PLANNER_INSTRUCTIONS = (
    "You decide what to search the web for so that the assistant can answer the user's last "
    "message with fresh, factual information. Reply with JSON only, in this exact shape: "
    '{"topics": [{"topic": "<what to find out>", "query": "<a web search query>"}]}. '
    "Use at most {max_topics} topics, fewer when fewer are needed; write each query as a person "
    "would type it into a search engine, in the language of the user's message."
)


@dataclass(frozen=True, slots=True)
class SearchTopic:
    """One thing to find out, and the query that should find it."""

    topic: str
    query: str


def planner_messages(messages: list[ChatMessage], *, max_topics: int) -> list[dict[str, str]]:
    """The planner call's messages: the instructions, then the conversation as text."""
    conversation = "\n".join(
        f"{message.role}: {text}" for message in messages if (text := message.text())
    )
    instructions = PLANNER_INSTRUCTIONS.replace("{max_topics}", str(max_topics))
    return [
        {"role": "system", "content": instructions},
        {"role": "user", "content": conversation[-MAX_CONTEXT_CHARS:]},
    ]


def parse_plan(answer: str, *, max_topics: int) -> list[SearchTopic]:
    """The topics in the planner's answer; [] when it holds no usable plan.

    The first JSON object in the text is read (models wrap JSON in prose or code fences);
    topics without a query are dropped, queries are cut to ``MAX_QUERY_CHARS``, repeated queries
    kept once, and at most ``max_topics`` are returned.
    """
    plan = _first_json_object(answer)
    topics = plan.get("topics") if plan is not None else None
    if not isinstance(topics, list):
        return []
    found: list[SearchTopic] = []
    seen: set[str] = set()
    for item in cast("list[object]", topics):
        entry = json_object(item)
        if entry is None:
            continue
        query = _one_line(entry.get("query"))[:MAX_QUERY_CHARS].strip()
        if not query or query.casefold() in seen:
            continue
        seen.add(query.casefold())
        found.append(SearchTopic(_one_line(entry.get("topic")) or query, query))
        if len(found) == max_topics:
            break
    return found


def fallback_query(messages: list[ChatMessage]) -> str | None:
    """The user's last message as a query (when planning failed); None if there is no text."""
    for message in reversed(messages):
        if message.role == "user":
            text = _one_line(message.text())[:MAX_QUERY_CHARS].strip()
            return text or None
    return None


def _one_line(value: object) -> str:
    return " ".join(value.split()) if isinstance(value, str) else ""


_OBJECT_START = re.compile(r"\{")


def _first_json_object(text: str) -> dict[str, Any] | None:
    decoder = json.JSONDecoder()
    for match in _OBJECT_START.finditer(text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        found = json_object(value)
        if found is not None:
            return found
    return None
