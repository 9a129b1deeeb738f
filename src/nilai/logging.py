"""Log set-up: request ids on every line, text or JSON, and never any content.

Only the CLI calls ``configure_logging``; library modules just ask for a logger.

A log record is one line whatever a client sent: the text format escapes control characters
in the message (a newline in a model id cannot forge a second line, a NUL or a terminal escape
is never written raw), and the JSON format escapes the ones ``json.dumps`` leaves as they are.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from types import TracebackType
from typing import override

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

# C0 (newline, carriage return, tab, NUL, escape, ...), DEL, C1 (NEL among them), and the
# Unicode line and paragraph separators: each of them ends a line for some reader.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
# What JSON leaves unescaped with ensure_ascii=False but a line-splitting reader may break on.
_JSON_UNESCAPED = re.compile(r"[\x7f-\x9f\u2028\u2029]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_LATIN1_MAX = 0xFF  # written \xHH up to here, \uHHHH beyond


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code <= _LATIN1_MAX else f"\\u{code:04x}"


def escape_control_characters(text: str) -> str:
    r"""``text`` on one line: control characters written as ``\n``, ``\x00``, ``\u2028``."""
    return _CONTROL.sub(_escape, text)


class _RequestIdFilter(logging.Filter):
    @override
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line with time, level, logger, request id and message."""

    @override
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=False)
        return _JSON_UNESCAPED.sub(lambda match: f"\\u{ord(match.group()):04x}", line)


class TextFormatter(logging.Formatter):
    """The text line with its control characters escaped; a traceback keeps its own lines."""

    @override
    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_control_characters(super().formatMessage(record))

    @override
    def formatException(self, ei: ExcInfo) -> str:
        # Tracebacks span lines, but the values they quote (exception messages) are untrusted.
        return _CONTROL_BUT_NEWLINE.sub(_escape, super().formatException(ei))

    @override
    def formatStack(self, stack_info: str) -> str:
        return _CONTROL_BUT_NEWLINE.sub(_escape, super().formatStack(stack_info))


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send logs to stderr in the chosen format, with the request id on every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # No access log: the gateway logs one line per request itself, and the access log would add
    # client addresses and paths to every one. (Worker processes call this after uvicorn has
    # set up its loggers, so it must not turn the access log back on.)
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
    # httpx logs full URLs at INFO; keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
