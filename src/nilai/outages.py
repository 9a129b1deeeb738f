"""Log a dependency's outage when it starts (with the cause), while it lasts, and when it ends.

Anything on a request path that talks to Redis (rate limits, discovery refresh, announcers) would
otherwise log once per request or per retry while Redis is away, drowning the one line that says
why. ``OutageLog`` turns a stream of failures into one line naming the cause, a reminder every
``REMINDER_S`` while it lasts (so a log read an hour later still shows it), and one line saying
how long it lasted.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable

REMINDER_S = 300.0
"""While an outage lasts, a reminder line at most this often (seconds)."""

_MESSAGE_CHARS = 200
# ``scheme://user:password@host``: a client library may put its connection URL in a message.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^@/\s]*@")
# ``scheme://user:password@``: the user name is kept, the password masked.
_URL_PASSWORD = re.compile(r"(?P<head>^[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s]*:)[^@/\s]*@")


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: ``redis://:***@host:6379/0``.

    Log lines and start-up errors name the database or Redis they mean, never its password.
    """
    return _URL_PASSWORD.sub(r"\g<head>***@", url, count=1)


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message (OS error)``, short, printable, credentials masked.

    redis-py's connection errors name the host, port and errno ("Error 111 connecting to
    127.0.0.1:6379. Connect call failed ..."); the OS error they wrap is named after it
    ("ConnectionRefusedError: Connection refused"), which is what an operator needs. A password
    never appears in them, and any ``scheme://user:pass@`` some wrapper might add is masked.
    """
    description = _one_line(error)
    os_error = _wrapped_os_error(error)
    if os_error is not None and os_error.errno:  # always set; the check is for the type checker
        reason = os.strerror(os_error.errno)
        if reason not in description:
            description += f" ({type(os_error).__name__}: {reason})"
    return description


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = _URL_CREDENTIALS.sub(r"\g<scheme>***@", lines[0] if lines else "")
    text = "".join(ch if ch.isprintable() else "?" for ch in text[:_MESSAGE_CHARS])
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def _wrapped_os_error(error: BaseException) -> OSError | None:
    """The innermost ``OSError`` with an errno that ``error`` was raised from or handling."""
    found: OSError | None = None
    seen: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and all(link is not other for other in seen):
        seen.append(link)
        if isinstance(link, OSError) and link.errno:
            found = link
        link = link.__cause__ or link.__context__
    return found


class OutageLog:
    """A warning when ``what`` stops answering, a reminder now and then, one when it answers again.

    Calls may overlap (many requests at once): an attempt that began before the latest failure
    may still succeed on a connection opened earlier, so only an attempt begun after it ends the
    outage; and an attempt begun before the outage ended that fails after it belongs to that
    outage, so it does not start another. ``failed`` and ``answered`` take that start time from
    ``time.monotonic()``; a caller whose attempts never overlap may leave it out.

    While the outage lasts, a failure at least ``reminder_s`` after the last line logs a reminder
    with the latest cause and the failures so far.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        consequence: str,
        *,
        where: str | None = None,
        reminder_s: float = REMINDER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self._where = f" at {where}" if where else ""
        self._consequence = consequence
        self._reminder_s = reminder_s
        self._clock = clock
        self._down_since: float | None = None
        self._said_at = 0.0
        self._last_failure = 0.0
        self._ended_at = float("-inf")
        self.failures = 0
        """Failures in the current (or the last) outage."""

    @property
    def down(self) -> bool:
        """True from the first failure until an attempt begun after the last one succeeds."""
        return self._down_since is not None

    def failed(self, error: BaseException, *, started: float | None = None) -> None:
        """Record a failure of an attempt begun at ``started``; log the first of an outage."""
        now = self._clock()
        if self._down_since is None and started is not None and started < self._ended_at:
            return  # a straggler of the outage that just ended
        self._last_failure = now
        if self._down_since is None:
            self._down_since = now
            self._said_at = now
            self.failures = 1
            self._logger.warning(
                "%s unavailable%s (%s); %s",
                self._what,
                self._where,
                describe_error(error),
                self._consequence,
            )
            return
        self.failures += 1
        if now - self._said_at >= self._reminder_s:
            self._said_at = now
            self._logger.warning(
                "%s still unavailable%s after %.0f s (%d failed attempts; the last: %s); %s",
                self._what,
                self._where,
                now - self._down_since,
                self.failures,
                describe_error(error),
                self._consequence,
            )

    def answered(self, *, started: float | None = None) -> None:
        """Record a success of an attempt begun at ``started``; log the end of an outage."""
        if self._down_since is None:
            return
        if started is not None and started < self._last_failure:
            return
        now = self._clock()
        self._logger.warning(
            "%s available again%s after %.1f s (%d failed attempts)",
            self._what,
            self._where,
            now - self._down_since,
            self.failures,
        )
        self._down_since = None
        self._ended_at = now
