"""The tools the gateway runs itself, and how one round of tool calls is run.

A tool call is run only when the client declared the tool in its request and the model called
it with a structured tool call (never from text the model wrote). ``ServerTools.run_round``
runs one round's calls concurrently, at most ``max_calls_per_round`` of them: a call beyond that
is answered without running. Each call's arguments must be a JSON object with a string ``code``;
anything else is answered with an explanation, not run. The results are what the model reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nilai.tools.executor import CodeExecutor, SandboxKind

logger = logging.getLogger(__name__)

EXECUTE_PYTHON = "execute_python"
"""The tool that runs Python code in the gateway's sandbox and returns what it printed."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A structured call of a tool, as the model made it."""

    id: str
    name: str
    arguments: str
    """The arguments as the model wrote them: a JSON text, not yet trusted."""


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool call returned to the model."""

    call_id: str
    name: str
    output: str
    ran: bool
    """False when the call was answered without running (bad arguments, too many calls)."""


class ServerTools:
    """The server tools a gateway runs, over one ``CodeExecutor``."""

    def __init__(
        self, executor: CodeExecutor, names: Iterable[str], *, max_calls_per_round: int
    ) -> None:
        self._executor = executor
        self.names = frozenset(names)
        self._max_calls = max_calls_per_round

    @property
    def sandbox(self) -> SandboxKind:
        """How the code of ``execute_python`` is isolated."""
        return self._executor.kind

    def implemented(self, declared: Iterable[str]) -> frozenset[str]:
        """The tools among ``declared`` (the client's) that the gateway runs itself."""
        return self.names.intersection(declared)

    async def run_round(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Run one round's calls concurrently; the results in the calls' order."""
        runnable = calls[: self._max_calls]
        skipped = [
            ToolResult(
                call.id,
                call.name,
                f"Not run: at most {self._max_calls} tool calls are run per round.",
                ran=False,
            )
            for call in calls[self._max_calls :]
        ]
        results = await asyncio.gather(*(self._run(call) for call in runnable))
        return [*results, *skipped]

    async def _run(self, call: ToolCall) -> ToolResult:
        code = _code_argument(call.arguments)
        if code is None:
            return ToolResult(
                call.id,
                call.name,
                'Not run: the arguments must be a JSON object with a string "code".',
                ran=False,
            )
        execution = await self._executor.run(code)
        logger.info(
            "tool call name=%s exit=%s timed_out=%s truncated=%s",
            call.name,
            execution.exit_code,
            execution.timed_out,
            execution.truncated,
        )
        return ToolResult(call.id, call.name, execution.for_model(), ran=True)

    async def aclose(self) -> None:
        """Stop the executor's runs still going."""
        await self._executor.aclose()


def _code_argument(arguments: str) -> str | None:
    try:
        parsed: object = json.loads(arguments)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    code = parsed.get("code")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    return code if isinstance(code, str) else None
