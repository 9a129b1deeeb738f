"""One round of server tool calls: order, concurrency, the per-round cap, untrusted arguments."""

from __future__ import annotations

import asyncio
import json

import pytest

from nilai.tools.executor import Execution, RecordingExecutor, SandboxKind
from nilai.tools.server import EXECUTE_PYTHON, ServerTools, ToolCall, ToolResult

BAD_ARGUMENTS = 'Not run: the arguments must be a JSON object with a string "code".'


def _call(call_id: str, code: str) -> ToolCall:
    return ToolCall(call_id, EXECUTE_PYTHON, json.dumps({"code": code}))


def _tools(executor: RecordingExecutor, max_calls: int = 4) -> ServerTools:
    return ServerTools(executor, [EXECUTE_PYTHON], max_calls_per_round=max_calls)


class GatedExecutor:
    """Lets no run finish until ``expected`` runs are in flight at once.

    If the calls ran one after another, the first run would wait forever (the test's
    ``asyncio.timeout`` turns that into a failure): only concurrent runs pass.
    """

    kind: SandboxKind = "test"

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.in_flight = 0
        self.most_in_flight = 0
        self.all_started = asyncio.Event()

    async def run(self, code: str) -> Execution:
        """Wait until every expected run has started, then echo ``code``."""
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.in_flight == self.expected:
            self.all_started.set()
        await self.all_started.wait()
        self.in_flight -= 1
        return Execution(f"ran {code}\n", "", exit_code=0)

    async def aclose(self) -> None:
        """Nothing to release."""


async def test_results_come_in_the_calls_order_with_what_the_model_reads():
    executor = RecordingExecutor(
        answers={
            "print(1)": Execution("1\n", "", 0),
            "boom()": Execution("", "NameError: boom", 1),
            "while True: pass": Execution("", "", None, timed_out=True),
        }
    )
    calls = [_call("c1", "print(1)"), _call("c2", "boom()"), _call("c3", "while True: pass")]
    results = await _tools(executor).run_round(calls)
    assert results == [
        ToolResult("c1", EXECUTE_PYTHON, "1\n", ran=True),
        ToolResult("c2", EXECUTE_PYTHON, "[stderr]\nNameError: boom\n[exit status 1]", ran=True),
        ToolResult("c3", EXECUTE_PYTHON, "[killed: time limit reached]", ran=True),
    ]
    assert executor.calls == ["print(1)", "boom()", "while True: pass"]


async def test_a_rounds_calls_run_concurrently():
    executor = GatedExecutor(expected=3)
    tools = ServerTools(executor, [EXECUTE_PYTHON], max_calls_per_round=3)
    calls = [_call(f"c{n}", f"print({n})") for n in range(3)]
    # Only a deadlock (calls run one by one) reaches this limit; it is not a timing assertion.
    async with asyncio.timeout(30):
        results = await tools.run_round(calls)
    assert executor.most_in_flight == 3
    assert [(r.call_id, r.output, r.ran) for r in results] == [
        ("c0", "ran print(0)\n", True),
        ("c1", "ran print(1)\n", True),
        ("c2", "ran print(2)\n", True),
    ]


async def test_calls_beyond_the_per_round_cap_are_answered_without_running():
    executor = RecordingExecutor()
    calls = [_call(f"c{n}", f"print({n})") for n in range(4)]
    results = await _tools(executor, max_calls=2).run_round(calls)
    assert executor.calls == ["print(0)", "print(1)"]
    assert [(r.call_id, r.ran) for r in results] == [
        ("c0", True),
        ("c1", True),
        ("c2", False),
        ("c3", False),
    ]
    for skipped in results[2:]:
        assert skipped.output == "Not run: at most 2 tool calls are run per round."
        assert skipped.name == EXECUTE_PYTHON


@pytest.mark.parametrize(
    "arguments",
    [
        "print(6*7)",  # not JSON
        '{"code": "print(1)"',  # cut off
        '["print(1)"]',  # not an object
        '"print(1)"',  # a JSON string, not an object
        "null",
        "{}",  # no code
        '{"source": "print(1)"}',
        '{"code": 42}',  # code not a string
        '{"code": ["print(1)"]}',
        '{"code": null}',
    ],
    ids=[
        "not-json",
        "truncated",
        "list",
        "string",
        "null",
        "empty",
        "other-key",
        "int-code",
        "list-code",
        "null-code",
    ],
)
async def test_bad_arguments_are_answered_without_running(arguments: str):
    executor = RecordingExecutor()
    results = await _tools(executor).run_round([ToolCall("c1", EXECUTE_PYTHON, arguments)])
    assert results == [ToolResult("c1", EXECUTE_PYTHON, BAD_ARGUMENTS, ran=False)]
    assert executor.calls == []


async def test_a_bad_call_does_not_stop_the_good_ones_of_its_round():
    executor = RecordingExecutor(answers={"print(2)": Execution("2\n", "", 0)})
    calls = [ToolCall("c1", EXECUTE_PYTHON, "nope"), _call("c2", "print(2)")]
    results = await _tools(executor).run_round(calls)
    assert [(r.call_id, r.output, r.ran) for r in results] == [
        ("c1", BAD_ARGUMENTS, False),
        ("c2", "2\n", True),
    ]
    assert executor.calls == ["print(2)"]


async def test_an_empty_round_runs_nothing():
    executor = RecordingExecutor()
    assert await _tools(executor).run_round([]) == []
    assert executor.calls == []


def test_implemented_is_the_declared_tools_the_gateway_runs():
    tools = _tools(RecordingExecutor())
    assert tools.implemented(["get_weather", EXECUTE_PYTHON]) == frozenset({EXECUTE_PYTHON})
    assert tools.implemented(["get_weather"]) == frozenset()
    assert tools.implemented([]) == frozenset()
    off = ServerTools(RecordingExecutor(), [], max_calls_per_round=4)
    assert off.implemented([EXECUTE_PYTHON]) == frozenset()


def test_sandbox_is_the_executors_kind():
    assert _tools(RecordingExecutor()).sandbox == "test"
