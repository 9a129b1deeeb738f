import json
import logging

import pytest

from nilai.logging import JsonFormatter, configure_logging, request_id_var


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_request_id(capsys):
    configure_logging("info", "json")
    token = request_id_var.set("req-42")
    try:
        logging.getLogger("nilai.test").info("hello %s", "world")
    finally:
        request_id_var.reset(token)
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["request_id"] == "req-42"
    assert entry["message"] == "hello world"
    assert entry["level"] == "info"


@pytest.mark.usefixtures("restore_logging")
def test_text_lines_carry_request_id_and_quiet_httpx(capsys):
    configure_logging("warning", "text")
    logging.getLogger("nilai.test").warning("careful")
    logging.getLogger("nilai.test").info("hidden")
    err = capsys.readouterr().err
    assert "[-] careful" in err
    assert "hidden" not in err
    assert logging.getLogger("httpx").level == logging.WARNING


def test_json_formatter_includes_exceptions():
    try:
        raise ValueError("x")
    except ValueError:
        record = logging.LogRecord("n", logging.ERROR, __file__, 1, "failed", (), None)
        import sys

        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError" in entry["exception"]


FORGED = "a\nfake 2026-01-01 00:00:00,000 INFO nilai.gateway [-] forged"


def _text_formatter() -> logging.Formatter:
    """The formatter ``configure_logging`` installs for text logs."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("info", "text")
        formatter = root.handlers[0].formatter
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert formatter is not None
    return formatter


def _text_line(*args: object, msg: str = "chat model=%s status=%d") -> str:
    record = logging.LogRecord("nilai.test", logging.INFO, __file__, 1, msg, args, None)
    record.request_id = "req-1"
    return _text_formatter().format(record)


def test_text_log_line_cannot_be_forged_by_a_newline_in_a_value():
    line = _text_line(FORGED, 404)
    assert len(line.splitlines()) == 1
    assert "model=a\\nfake 2026-01-01" in line
    assert line.endswith("forged status=404")


def test_text_log_escapes_nul_and_every_other_control_character():
    value = "x\x00y\r\t\x1b[31m\x7f\x85\u2028\u2029z"
    line = _text_line(value, 200)
    assert "x\\x00y\\r\\t\\x1b[31m\\x7f\\x85\\u2028\\u2029z" in line
    assert not any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in line)
    assert len(line.splitlines()) == 1


def test_text_log_leaves_printable_text_alone():
    assert _text_line("llama-3 ünïcode \\n", 200).endswith("model=llama-3 ünïcode \\n status=200")


def test_text_log_traceback_keeps_its_lines_but_escapes_what_it_quotes():
    try:
        raise ValueError("bad\x00value\x1b]")
    except ValueError:
        import sys

        record = logging.LogRecord("n", logging.ERROR, __file__, 1, "failed %s", ("a\nb",), None)
        record.exc_info = sys.exc_info()
    record.request_id = "-"
    text = _text_formatter().format(record)
    first, *traceback = text.splitlines()
    assert first.endswith("failed a\\nb")
    assert traceback[0] == "Traceback (most recent call last):"
    assert traceback[-1] == "ValueError: bad\\x00value\\x1b]"


@pytest.mark.usefixtures("restore_logging")
def test_configured_text_logs_escape_control_characters(capsys):
    configure_logging("info", "text")
    logging.getLogger("nilai.test").info("model=%s", FORGED)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "model=a\\nfake" in err


def test_json_log_line_escapes_every_line_separator():
    value = "a\nb\r\x00\x1b\x7f\x85\u2028\u2029c"
    record = logging.LogRecord("n", logging.INFO, __file__, 1, "model=%s", (value,), None)
    line = JsonFormatter().format(record)
    assert len(line.splitlines()) == 1  # str.splitlines breaks on \x85 and U+2028 too
    assert not any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in line)
    assert "\u2028" not in line
    assert "\u2029" not in line
    assert json.loads(line)["message"] == f"model={value}"
