"""Tool rounds: ask the model, run the server tools it called, ask again; then the answer.

One loop for every API; what differs (where the calls are in an answer, how the results go
back into the next request, what the client is shown of each round) is the API's
``ToolDialect``. A round happens only when every tool call of the model's answer is a call of a
server tool the client declared: an answer with no call, or with a call of any other tool, is
the answer (it goes to the client as it is). The rounds' calls are never streamed; after
``max_rounds`` rounds the model is asked once more with ``tool_choice: "none"``, and that call is
the answer's, streamed if the client asked for a stream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nilai.tools.server import ServerTools, ToolCall, ToolResult

ROUNDS_FIELD = "tool_rounds"
"""The field of a signed answer that shows the rounds the gateway ran (docs/API.md)."""


class ToolDialect(Protocol):
    """How one API carries tool calls and their results."""

    def server_calls(self, answer: dict[str, Any]) -> list[ToolCall] | None:
        """The answer's tool calls, if there are any and all are of declared server tools."""
        ...

    def round_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` for a round's call: not streamed."""
        ...

    def next_payload(
        self,
        payload: dict[str, Any],
        answer: dict[str, Any],
        results: list[ToolResult],
        *,
        last: bool,
    ) -> dict[str, Any]:
        """``payload`` with the answer's calls and their results added, for the next call.

        ``last``: the round limit is reached, so the next call may not call tools.
        """
        ...

    def round_record(self, answer: dict[str, Any], results: list[ToolResult]) -> dict[str, Any]:
        """What the client is shown of one round (inside the signed answer)."""
        ...

    def usage(self, answer: dict[str, Any]) -> tuple[int, int]:
        """The answer's prompt (input) and completion (output) tokens."""
        ...


class RoundsRecord(Protocol):
    """Where the loop reports the tokens and tool calls it used: the request context."""

    tool_calls: int

    def count_earlier_call(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Count a call made before the answer's."""
        ...


@dataclass(slots=True)
class ToolRounds:
    """What the tool rounds left: the rounds run, and the answer or the call that makes it."""

    payload: dict[str, Any]
    """The request for the answer's call (when ``answer`` is None)."""
    answer: dict[str, Any] | None = None
    """The model's answer, when a round's call gave one (no server tool call in it)."""
    rounds: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])

    def signed_additions(self) -> dict[str, object]:
        """The rounds, for the signed answer (nothing when no tool ran)."""
        return {ROUNDS_FIELD: self.rounds} if self.rounds else {}


async def run_tool_rounds(
    send: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    payload: dict[str, Any],
    dialect: ToolDialect,
    tools: ServerTools,
    record: RoundsRecord,
    *,
    max_rounds: int,
) -> ToolRounds:
    """Run up to ``max_rounds`` tool rounds, starting from ``payload``.

    ``send`` makes one non-streamed model call (its failures end the request, as for any
    call). Each round's call counts as an earlier call of the request (``record``), so the
    answer's usage is the exact sum of every call, each counted once.
    """
    outcome = ToolRounds(payload)
    for done in range(max_rounds):
        answer = await send(dialect.round_payload(outcome.payload))
        calls = dialect.server_calls(answer)
        if not calls:
            outcome.answer = answer
            return outcome
        record.count_earlier_call(*dialect.usage(answer))
        results = await tools.run_round(calls)
        record.tool_calls += sum(result.ran for result in results)
        outcome.rounds.append(dialect.round_record(answer, results))
        last = done + 1 == max_rounds
        outcome.payload = dialect.next_payload(outcome.payload, answer, results, last=last)
    return outcome
