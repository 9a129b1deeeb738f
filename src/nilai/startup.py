"""The error a process reports when it cannot start, shared by every entry point."""

from __future__ import annotations


class StartupError(RuntimeError):
    """A start-up failure said in one line: which setting, what is wrong, what to write."""
