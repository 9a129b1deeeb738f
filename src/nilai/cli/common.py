"""What several commands share: reading the settings with a readable failure."""

from __future__ import annotations

import os
import sys

from pydantic import ValidationError

from nilai.settings import NilaiSettings, settings_problems, unknown_variables


def load_settings(command: str) -> NilaiSettings | None:
    """The settings from the environment, or None after printing why they are invalid.

    Unknown ``NILAI_*`` variables (a mistyped name) are warned about first, one line each.
    Each problem is printed as where and what (``settings_problems``), never with the value:
    a value may be a URL with its password or an API key (SECURITY.md).
    """
    for line in unknown_variables(os.environ):
        print(f"nilai {command}: warning: {line}", file=sys.stderr)
    try:
        return NilaiSettings()
    except ValidationError as exc:
        problems = "".join(f"\n  {problem}" for problem in settings_problems(exc))
        print(f"nilai {command}: invalid settings:{problems}", file=sys.stderr)
        return None
    except ValueError as exc:
        print(f"nilai {command}: invalid settings: {exc}", file=sys.stderr)
        return None


def fail(command: str, message: str, status: int = 2) -> int:
    """Print ``message`` for ``command`` on stderr and return ``status``."""
    print(f"nilai {command}: {message}", file=sys.stderr)
    return status
