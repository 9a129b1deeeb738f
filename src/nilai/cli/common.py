"""What several commands share: reading the settings with a readable failure."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from nilai.settings import NilaiSettings


def load_settings(command: str) -> NilaiSettings | None:
    """The settings from the environment, or None after printing why they are invalid."""
    try:
        return NilaiSettings()
    except (ValidationError, ValueError) as exc:
        print(f"nilai {command}: invalid settings:\n{exc}", file=sys.stderr)
        return None


def fail(command: str, message: str, status: int = 2) -> int:
    """Print ``message`` for ``command`` on stderr and return ``status``."""
    print(f"nilai {command}: {message}", file=sys.stderr)
    return status
