"""Graceful shutdown: end what is still open just before the server's grace period runs out.

On SIGTERM or SIGINT the server stops accepting connections and waits up to its grace period
(``NILAI_SHUTDOWN_GRACE_S``) for open requests to finish, then cancels whatever is left: a stream
cut that way stops mid-answer with no error and no ``[DONE]``. ``Drain`` learns about the signal
first and moves every running request's time limit to a cut-off shortly before the grace period
ends, so each one ends on its own terms: a stream with an error event and ``[DONE]``, a
non-streaming request with a 503 the client may retry elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any, Protocol

logger = logging.getLogger(__name__)

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_MAX_MARGIN_S = 1.0
"""How long before the grace period ends the cut-off falls: time to send the last events."""

type _Handler = Callable[[int, FrameType | None], Any] | int | None


class TimeLimit(Protocol):
    """A time limit the drain can pull in: an ``asyncio.Timeout``, or one kept another way."""

    def when(self) -> float | None:
        """When it runs out, in event-loop time (None: never)."""
        ...

    def reschedule(self, when: float | None) -> None:
        """Make it run out at ``when``."""
        ...


class Drain:
    """Tracks the time limits of running requests and pulls them in when shutdown begins."""

    def __init__(self, grace_s: float) -> None:
        self._cut_after_s = max(0.0, grace_s - min(_MAX_MARGIN_S, grace_s / 4))
        self._deadline: float | None = None
        self._watched: set[TimeLimit] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: dict[int, _Handler] = {}

    @property
    def draining(self) -> bool:
        """Whether shutdown has begun."""
        return self._deadline is not None

    def passed(self) -> bool:
        """Whether the cut-off has come: requests still open must end now."""
        return self._deadline is not None and asyncio.get_running_loop().time() >= self._deadline

    def begin(self) -> None:
        """Shutdown has begun: every watched time limit ends at the cut-off at the latest."""
        if self._deadline is not None:
            return
        self._deadline = asyncio.get_running_loop().time() + self._cut_after_s
        logger.info(
            "shutting down: open requests get %.1fs to finish (%d streams or calls waiting)",
            self._cut_after_s,
            len(self._watched),
        )
        for timeout in self._watched:
            self._pull_in(timeout)

    @contextlib.contextmanager
    def watch(self, timeout: TimeLimit) -> Generator[None]:
        """Let ``timeout`` be pulled in to the cut-off while the block runs."""
        self._pull_in(timeout)
        self._watched.add(timeout)
        try:
            yield
        finally:
            self._watched.discard(timeout)

    def _pull_in(self, timeout: TimeLimit) -> None:
        if self._deadline is None:
            return
        when = timeout.when()
        if when is None or when > self._deadline:
            timeout.reschedule(self._deadline)

    def install_signal_handlers(self) -> None:
        """Hear SIGTERM/SIGINT before passing them on to the server's own handlers.

        Only possible in the main thread (where the server installed its handlers); a server
        run in another thread, as tests do, calls ``begin`` itself.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        self._loop = asyncio.get_running_loop()
        for sig in SHUTDOWN_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        """Put back the handlers found at start-up."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.begin)
        previous = self._previous.get(sig)
        if callable(previous):
            previous(sig, frame)
        elif previous == signal.SIG_DFL:
            # Nothing was listening (no server loop): the signal does what it does by default.
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)
