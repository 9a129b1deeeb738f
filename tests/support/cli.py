"""Running ``nilai`` in-process in tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    """What one in-process run of ``nilai`` returned and printed."""

    status: int
    out: str
    err: str
