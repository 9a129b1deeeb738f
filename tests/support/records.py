"""Factories for store records used by several test modules."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any

from nilai.auth.stored_keys import generate_key
from nilai.store.base import Account, ApiKey, QueryLog


def query_log(account_id: str, prompt: int = 3, completion: int = 5, **fields: Any) -> QueryLog:
    """A successful, non-streamed query log with fresh ids; ``fields`` override any field."""
    log = QueryLog(
        id=uuid.uuid4().hex,
        request_id=uuid.uuid4().hex,
        account_id=account_id,
        api_key_id=None,
        model="fake-model",
        started_at=datetime.now(UTC),
        latency_ms=10.0,
        ttft_ms=None,
        prompt_tokens=prompt,
        completion_tokens=completion,
        status_code=200,
        error_kind=None,
        streamed=False,
    )
    return dataclasses.replace(log, **fields)


def stored_key(account: Account) -> tuple[ApiKey, str]:
    """A new stored API key record of ``account`` and the key's value (shown once)."""
    made = generate_key()
    record = ApiKey(
        id=uuid.uuid4().hex,
        account_id=account.id,
        prefix=made.prefix,
        hash=made.hash,
        name=None,
        created_at=datetime.now(UTC),
        last_used_at=None,
        revoked_at=None,
    )
    return record, made.value


class ListSink:
    """A usage sink that collects query logs in a list instead of writing them."""

    def __init__(self) -> None:
        self.logs: list[Any] = []

    def put(self, log: Any) -> None:
        """Keep ``log``."""
        self.logs.append(log)
