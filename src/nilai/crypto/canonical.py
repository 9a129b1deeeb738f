"""Canonical JSON: the exact bytes that signatures cover (DESIGN §3)."""

from __future__ import annotations

import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` with sorted keys, no spaces and raw UTF-8, as signatures require."""
    # Any: signed objects are arbitrary JSON values received from model servers.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
