"""What one chat request carries through the pipeline."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from nilai.auth.base import Principal
from nilai.protocol.base import json_object


@dataclass(slots=True)
class RequestContext:
    """Per-request facts: who, which request bytes, and what happened (no content)."""

    request_id: str
    principal: Principal
    request_sha256: str
    started: float = field(default_factory=time.perf_counter)
    endpoint: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    status: int = 200

    @classmethod
    def begin(cls, request_id: str, principal: Principal, raw_body: bytes) -> RequestContext:
        """Start the context for a request whose body is ``raw_body``."""
        return cls(request_id, principal, hashlib.sha256(raw_body).hexdigest())

    def record_usage(self, usage: object) -> None:
        """Take token counts from an OpenAI ``usage`` object, if it is one."""
        counts = json_object(usage)
        if counts is not None:
            prompt = counts.get("prompt_tokens")
            completion = counts.get("completion_tokens")
            self.prompt_tokens = prompt if isinstance(prompt, int) else 0
            self.completion_tokens = completion if isinstance(completion, int) else 0

    def mark_first_token(self) -> None:
        """Note the time to the first streamed chunk."""
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
