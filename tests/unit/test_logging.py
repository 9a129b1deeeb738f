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
