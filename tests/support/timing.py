"""Time in tests: a clock the test moves, and the one check that something did not wait.

Tests assert on events and state, not on how long things took. Code that reads
``time.monotonic()`` gets a ``FakeClock`` instead (``FakeClock.install``), so the test moves
time by hand. Where the point of a test is that a call did *not* wait for some much longer
timeout, ``finishes_within`` says so with a generous limit, in one place.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType, SimpleNamespace

import pytest


class FakeClock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def install(self, monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> FakeClock:
        """Make ``module``'s ``time.monotonic()`` read this clock (only that module's)."""
        monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=self.monotonic))
        return self


@contextmanager
def finishes_within(seconds: float, what: str) -> Iterator[None]:
    """Fail if the block takes ``seconds`` or longer.

    Only for "this did not wait for that timeout": choose ``seconds`` far above what the block
    normally takes and below the timeout it must not wait for, so a slow machine cannot fail it.
    """
    started = time.monotonic()
    yield
    took = time.monotonic() - started
    assert took < seconds, f"{what} took {took:.1f}s: it waited instead of answering at once"
