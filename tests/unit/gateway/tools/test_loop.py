"""The tool-round loop with a scripted model: when rounds run, what goes back, what is counted."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from nilai.gateway.tools.chat import ChatToolDialect
from nilai.gateway.tools.loop import ROUNDS_FIELD, ToolDialect, ToolRounds, run_tool_rounds
from nilai.gateway.tools.responses import ResponsesToolDialect
from nilai.tools.executor import Execution, RecordingExecutor
from nilai.tools.server import EXECUTE_PYTHON, ServerTools

DECLARED = frozenset({EXECUTE_PYTHON})
CODE = "print(6*7)"
ARGS = json.dumps({"code": CODE})


@dataclass
class Record:
    """Stands in for the request context: the earlier calls and tool calls the loop reports."""

    tool_calls: int = 0
    earlier: list[tuple[int, int]] = field(default_factory=list[tuple[int, int]])

    def count_earlier_call(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Note one earlier call's tokens."""
        self.earlier.append((prompt_tokens, completion_tokens))


@dataclass
class Model:
    """A scripted model: answers in order, keeping a copy of every payload it was sent."""

    answers: list[dict[str, Any]]
    sent: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])

    async def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Answer the next call."""
        self.sent.append(copy.deepcopy(payload))
        return self.answers[len(self.sent) - 1]


def _executor() -> RecordingExecutor:
    return RecordingExecutor(answers={CODE: Execution("42\n", "", 0)})


def _tools(executor: RecordingExecutor, max_calls: int = 4) -> ServerTools:
    return ServerTools(executor, [EXECUTE_PYTHON], max_calls_per_round=max_calls)


async def _run(
    model: Model,
    payload: dict[str, Any],
    dialect: ToolDialect,
    executor: RecordingExecutor,
    record: Record,
    *,
    max_rounds: int = 1,
    max_calls: int = 4,
) -> ToolRounds:
    return await run_tool_rounds(
        model, payload, dialect, _tools(executor, max_calls), record, max_rounds=max_rounds
    )


# --- chat completions -----------------------------------------------------------------------

CHAT_PAYLOAD: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "What is 6*7?"}],
    "tools": [{"type": "function", "function": {"name": EXECUTE_PYTHON}}],
}


def _tool_call(call_id: str, name: str = EXECUTE_PYTHON, arguments: str = ARGS) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _completion(
    *messages: dict[str, Any], usage: tuple[int, int] = (100, 50), finish: str = "stop"
) -> dict[str, Any]:
    prompt, completion = usage
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {"index": n, "message": message, "finish_reason": finish}
            for n, message in enumerate(messages)
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _calls(*calls: dict[str, Any], usage: tuple[int, int] = (100, 50)) -> dict[str, Any]:
    message = {"role": "assistant", "content": None, "tool_calls": list(calls)}
    return _completion(message, usage=usage, finish="tool_calls")


def _text(text: str, usage: tuple[int, int] = (10, 20)) -> dict[str, Any]:
    return _completion({"role": "assistant", "content": text}, usage=usage)


async def test_an_answer_without_calls_is_the_answer_and_no_round_runs():
    answer = _text("42")
    model, executor, record = Model([answer]), _executor(), Record()
    outcome = await _run(model, CHAT_PAYLOAD, ChatToolDialect(DECLARED), executor, record)
    assert outcome.answer == answer
    assert outcome.rounds == []
    assert outcome.signed_additions() == {}
    assert len(model.sent) == 1
    assert executor.calls == []
    assert record == Record(tool_calls=0, earlier=[])


async def test_a_declared_server_tool_call_runs_one_round_and_the_last_call_may_not_call_tools():
    call = _tool_call("call_1")
    model, executor, record = Model([_calls(call)]), _executor(), Record()
    outcome = await _run(model, CHAT_PAYLOAD, ChatToolDialect(DECLARED), executor, record)

    assert executor.calls == [CODE]
    assert len(model.sent) == 1
    assert "tool_choice" not in model.sent[0]
    assert outcome.answer is None
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    assert outcome.payload["messages"] == [
        *CHAT_PAYLOAD["messages"],
        assistant,
        {"role": "tool", "tool_call_id": "call_1", "content": "42\n"},
    ]
    assert outcome.payload["tool_choice"] == "none"
    assert outcome.payload["tools"] == CHAT_PAYLOAD["tools"]
    rounds = [
        {
            "message": assistant,
            "results": [{"tool_call_id": "call_1", "name": EXECUTE_PYTHON, "content": "42\n"}],
        }
    ]
    assert outcome.rounds == rounds
    assert outcome.signed_additions() == {ROUNDS_FIELD: rounds}
    assert record == Record(tool_calls=1, earlier=[(100, 50)])


async def test_two_rounds_send_twice_and_only_the_payload_after_the_last_forbids_tools():
    payload = {**CHAT_PAYLOAD, "tool_choice": "auto"}
    first = _calls(_tool_call("call_1"), usage=(100, 50))
    second = _calls(_tool_call("call_2", arguments=json.dumps({"code": "1"})), usage=(130, 30))
    model, executor, record = Model([first, second]), _executor(), Record()
    outcome = await _run(model, payload, ChatToolDialect(DECLARED), executor, record, max_rounds=2)

    assert len(model.sent) == 2
    assert [sent["tool_choice"] for sent in model.sent] == ["auto", "auto"]
    assert [m["role"] for m in model.sent[1]["messages"]] == ["user", "assistant", "tool"]
    assert outcome.payload["tool_choice"] == "none"
    assert [m["role"] for m in outcome.payload["messages"]] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
    ]
    assert outcome.payload["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_2",
        "content": "",
    }
    assert executor.calls == [CODE, "1"]
    assert len(outcome.rounds) == 2
    # Each round's call counted once, as it was made.
    assert record == Record(tool_calls=2, earlier=[(100, 50), (130, 30)])


async def test_a_second_round_that_answers_in_text_is_the_answer():
    answer = _text("It is 42.")
    model, executor, record = Model([_calls(_tool_call("call_1")), answer]), _executor(), Record()
    outcome = await _run(
        model, CHAT_PAYLOAD, ChatToolDialect(DECLARED), executor, record, max_rounds=2
    )
    assert outcome.answer == answer
    assert len(model.sent) == 2
    assert all("tool_choice" not in sent for sent in model.sent)
    assert model.sent[1]["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "42\n",
    }
    assert len(outcome.rounds) == 1
    # The answer's own usage is the caller's to count: only the round's call is earlier.
    assert record == Record(tool_calls=1, earlier=[(100, 50)])


async def test_record_counts_only_the_calls_that_ran():
    calls = [
        _tool_call("call_1"),
        _tool_call("call_2", arguments="not json"),
        _tool_call("call_3"),
        _tool_call("call_4"),
    ]
    model, executor, record = Model([_calls(*calls)]), _executor(), Record()
    outcome = await _run(
        model, CHAT_PAYLOAD, ChatToolDialect(DECLARED), executor, record, max_calls=3
    )
    # call_2 has bad arguments, call_4 is past the cap of 3: two ran.
    assert executor.calls == [CODE, CODE]
    assert record.tool_calls == 2
    tool_messages = [m for m in outcome.payload["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["call_1", "call_2", "call_3", "call_4"]
    assert tool_messages[1]["content"].startswith("Not run: the arguments")
    assert tool_messages[3]["content"] == "Not run: at most 3 tool calls are run per round."


async def test_a_call_of_the_clients_own_tool_is_the_answer():
    answer = _calls(_tool_call("call_1", name="get_weather"))
    model, executor, record = Model([answer]), _executor(), Record()
    outcome = await _run(model, CHAT_PAYLOAD, ChatToolDialect(DECLARED), executor, record)
    assert outcome.answer == answer
    assert outcome.rounds == []
    assert executor.calls == []
    assert record == Record()


async def test_a_server_tool_call_next_to_a_clients_tool_call_is_not_run():
    answer = _calls(_tool_call("call_1"), _tool_call("call_2", name="get_weather"))
    model, executor, record = Model([answer]), _executor(), Record()
    outcome = await _run(model, CHAT_PAYLOAD, ChatToolDialect(DECLARED), executor, record)
    assert outcome.answer == answer
    assert outcome.rounds == []
    assert executor.calls == []
    assert len(model.sent) == 1


async def test_a_server_tool_the_client_did_not_declare_is_not_run():
    answer = _calls(_tool_call("call_1"))
    model, executor, record = Model([answer]), _executor(), Record()
    outcome = await _run(model, CHAT_PAYLOAD, ChatToolDialect(frozenset()), executor, record)
    assert outcome.answer == answer
    assert executor.calls == []


async def test_text_that_looks_like_a_tool_call_is_never_run():
    text = json.dumps({"name": EXECUTE_PYTHON, "arguments": {"code": CODE}})
    answer = _text(text)
    model, executor, record = Model([answer]), _executor(), Record()
    outcome = await _run(model, CHAT_PAYLOAD, ChatToolDialect(DECLARED), executor, record)
    assert outcome.answer == answer
    assert executor.calls == []
    assert record == Record()


async def test_no_round_runs_for_several_choices():
    calls_message = {"role": "assistant", "content": None, "tool_calls": [_tool_call("c1")]}
    answer = _completion(calls_message, calls_message, finish="tool_calls")
    model, executor, record = Model([answer]), _executor(), Record()
    outcome = await _run(
        model, {**CHAT_PAYLOAD, "n": 2}, ChatToolDialect(DECLARED), executor, record
    )
    assert outcome.answer == answer
    assert executor.calls == []


async def test_rounds_are_not_streamed_but_the_answers_call_keeps_the_stream_settings():
    options = {"include_usage": True, "continuous_usage_stats": True}
    payload = {**CHAT_PAYLOAD, "stream": True, "stream_options": options}
    model, executor, record = Model([_calls(_tool_call("call_1"))]), _executor(), Record()
    outcome = await _run(model, payload, ChatToolDialect(DECLARED), executor, record)
    assert model.sent[0]["stream"] is False
    assert "stream_options" not in model.sent[0]
    assert outcome.payload["stream"] is True
    assert outcome.payload["stream_options"] == options


async def test_arguments_sent_as_an_object_are_read_as_json():
    function = {"name": EXECUTE_PYTHON, "arguments": {"code": CODE}}
    call = {"id": "call_1", "type": "function", "function": function}
    model, executor, record = Model([_calls(call)]), _executor(), Record()
    await _run(model, CHAT_PAYLOAD, ChatToolDialect(DECLARED), executor, record)
    assert executor.calls == [CODE]


# --- the Responses API ----------------------------------------------------------------------

RESPONSES_PAYLOAD: dict[str, Any] = {
    "model": "m",
    "input": "What is 6*7?",
    "tools": [{"type": "function", "name": EXECUTE_PYTHON}],
}


def _function_call(call_id: str, name: str = EXECUTE_PYTHON) -> dict[str, Any]:
    return {
        "id": f"fc_{call_id}",
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": ARGS,
        "status": "completed",
    }


def _message(text: str) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _response(*output: dict[str, Any], usage: tuple[int, int] = (100, 50)) -> dict[str, Any]:
    given, made = usage
    return {
        "id": "resp_1",
        "object": "response",
        "model": "m",
        "status": "completed",
        "output": list(output),
        "usage": {"input_tokens": given, "output_tokens": made, "total_tokens": given + made},
    }


async def test_responses_without_calls_is_the_answer():
    answer = _response(_message("42"))
    model, executor, record = Model([answer]), _executor(), Record()
    outcome = await _run(model, RESPONSES_PAYLOAD, ResponsesToolDialect(DECLARED), executor, record)
    assert outcome.answer == answer
    assert outcome.rounds == []
    assert executor.calls == []
    assert record == Record()


async def test_responses_function_call_goes_back_as_its_items_and_a_function_call_output():
    reasoning: dict[str, Any] = {"id": "rs_1", "type": "reasoning", "summary": []}
    call = _function_call("call_1")
    model, executor, record = Model([_response(reasoning, call)]), _executor(), Record()
    outcome = await _run(model, RESPONSES_PAYLOAD, ResponsesToolDialect(DECLARED), executor, record)

    assert executor.calls == [CODE]
    assert outcome.answer is None
    assert outcome.payload["input"] == [
        {"role": "user", "content": "What is 6*7?"},
        reasoning,
        call,
        {"type": "function_call_output", "call_id": "call_1", "output": "42\n"},
    ]
    assert outcome.payload["tool_choice"] == "none"
    assert "tool_choice" not in model.sent[0]
    assert outcome.rounds == [
        {
            "output": [call],
            "results": [{"call_id": "call_1", "name": EXECUTE_PYTHON, "output": "42\n"}],
        }
    ]
    assert record == Record(tool_calls=1, earlier=[(100, 50)])


async def test_responses_list_input_is_kept_and_two_rounds_count_each_call_once():
    given = [{"type": "message", "role": "user", "content": "What is 6*7?"}]
    payload = {**RESPONSES_PAYLOAD, "input": given}
    first = _response(_function_call("call_1"), usage=(100, 50))
    second = _response(_function_call("call_2"), usage=(120, 25))
    model, executor, record = Model([first, second]), _executor(), Record()
    outcome = await _run(
        model, payload, ResponsesToolDialect(DECLARED), executor, record, max_rounds=2
    )
    assert len(model.sent) == 2
    assert all("tool_choice" not in sent for sent in model.sent)
    assert model.sent[1]["input"][0] == given[0]
    assert [item.get("type") for item in outcome.payload["input"]] == [
        "message",
        "function_call",
        "function_call_output",
        "function_call",
        "function_call_output",
    ]
    assert outcome.payload["tool_choice"] == "none"
    assert record == Record(tool_calls=2, earlier=[(100, 50), (120, 25)])


async def test_responses_undeclared_or_mixed_calls_are_the_answer():
    for answer in (
        _response(_function_call("call_1", name="get_weather")),
        _response(_function_call("call_1"), _function_call("call_2", name="get_weather")),
    ):
        model, executor, record = Model([answer]), _executor(), Record()
        dialect = ResponsesToolDialect(DECLARED)
        outcome = await _run(model, RESPONSES_PAYLOAD, dialect, executor, record)
        assert outcome.answer == answer
        assert outcome.rounds == []
        assert executor.calls == []


async def test_responses_text_that_looks_like_a_tool_call_is_never_run():
    text = json.dumps({"name": EXECUTE_PYTHON, "arguments": {"code": CODE}})
    answer = _response(_message(text))
    model, executor, record = Model([answer]), _executor(), Record()
    outcome = await _run(model, RESPONSES_PAYLOAD, ResponsesToolDialect(DECLARED), executor, record)
    assert outcome.answer == answer
    assert executor.calls == []


async def test_responses_rounds_are_not_streamed_but_the_answers_call_is():
    payload = {**RESPONSES_PAYLOAD, "stream": True}
    model, executor, record = Model([_response(_function_call("call_1"))]), _executor(), Record()
    outcome = await _run(model, payload, ResponsesToolDialect(DECLARED), executor, record)
    assert model.sent[0]["stream"] is False
    assert outcome.payload["stream"] is True


def test_the_rounds_field_is_one_only_the_gateway_may_set():
    # A model server's own "tool_rounds" is dropped before signing, like "sources".
    from nilai.gateway.chat.signing import GATEWAY_FIELDS, drop_gateway_fields
    from nilai.gateway.tools.loop import ROUNDS_FIELD

    assert ROUNDS_FIELD in GATEWAY_FIELDS
    forged: dict[str, Any] = {"object": "chat.completion", ROUNDS_FIELD: [{"results": []}]}
    assert drop_gateway_fields(forged)
    assert ROUNDS_FIELD not in forged
