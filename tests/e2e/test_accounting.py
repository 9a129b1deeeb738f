"""Accounting through the real gateway: what the SDK reports is what ``/v1/usage`` adds up.

The gateway runs in front of the fake model server with a real database (SQLite and
PostgreSQL), and callers use keys created in that database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select

from nilai.store.base import Account, ApiKey
from nilai.store.sql import SqlStore
from nilai.store.tables import ApiKeyRow, QueryLogRow
from tests.support.servers import wait_until
from tests.support.stores import (
    create_tenant,
    with_store,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MESSAGES = [{"role": "user", "content": "count the words of this prompt please"}]


@dataclass
class Tenant:
    """An account with one stored key, in the database at ``db_url``."""

    db_url: str
    account: Account
    key: ApiKey
    value: str

    def client(self, gateway: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=self.value, max_retries=0)

    def get_usage(self, gateway: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.value}"}
        return httpx.get(f"{gateway.url}/v1/usage", headers=headers, timeout=5)

    def usage(self, gateway: Any) -> dict[str, int]:
        """The token and query totals (the cost is checked in test_pricing and test_credit)."""
        response = self.get_usage(gateway)
        assert response.status_code == 200, response.text
        totals = response.json()
        totals.pop("cost")
        return totals

    def wait_for_usage(
        self, gateway: Any, expected: dict[str, int], timeout_s: float = 10.0
    ) -> dict[str, int]:
        """Poll ``/v1/usage`` until it equals ``expected`` (one that overshoots never does)."""

        def reached() -> dict[str, int] | None:
            seen = self.usage(gateway)
            return seen if seen == expected else None

        return wait_until(reached, timeout_s, what=f"usage {expected}")

    def logs(self) -> list[QueryLogRow]:
        async def read(store: SqlStore) -> list[QueryLogRow]:
            async with store.session() as session:
                query = select(QueryLogRow).where(QueryLogRow.account_id == self.account.id)
                return list((await session.execute(query)).scalars())

        return with_store(self.db_url, read)

    def wait_for_logs(self, count: int, timeout_s: float = 10.0) -> list[QueryLogRow]:
        """Wait until ``count`` query logs are written; then there must be no more."""

        def written() -> list[QueryLogRow] | None:
            rows = self.logs()
            return rows if len(rows) >= count else None

        rows = wait_until(written, timeout_s, what=f"{count} query logs")
        assert len(rows) == count
        return rows


@pytest.fixture
def tenant(db_url: str) -> Tenant:
    account, key, value = with_store(db_url, lambda store: create_tenant(store, "tenant"))
    return Tenant(db_url, account, key, value)


def _grow(before: dict[str, int], prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": before["prompt_tokens"] + prompt,
        "completion_tokens": before["completion_tokens"] + completion,
        "total_tokens": before["total_tokens"] + prompt + completion,
        "queries": before["queries"] + 1,
    }


def _start(start_fake, start_gateway, db_url: str, **fake: Any):
    upstream = start_fake(**fake)
    gateway = start_gateway(
        database_url=db_url, upstream_urls=[upstream.url], usage_flush_interval_s=0.2
    )
    return upstream, gateway


def test_usage_grows_by_what_the_sdk_reported(tenant: Tenant, start_fake, start_gateway):
    _, gateway = _start(start_fake, start_gateway, tenant.db_url)
    start = tenant.usage(gateway)
    assert start == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "queries": 0}

    with tenant.client(gateway) as client:
        # a whole completion
        completion = client.chat.completions.create(model="fake-model", messages=MESSAGES)
        usage = completion.usage
        assert usage is not None
        assert usage.completion_tokens > 0
        assert usage.prompt_tokens > 0
        after_one = tenant.wait_for_usage(
            gateway, _grow(start, usage.prompt_tokens, usage.completion_tokens)
        )

        # a stream that asked for its usage
        stream = client.chat.completions.create(
            model="fake-model",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        reported = None
        text = ""
        for chunk in stream:
            if chunk.usage is not None:
                reported = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
        assert text.startswith("fake says:")
        assert reported is not None
        assert reported.completion_tokens > 0
        after_two = tenant.wait_for_usage(
            gateway, _grow(after_one, reported.prompt_tokens, reported.completion_tokens)
        )

    # the same totals are in the database, row by row
    rows = tenant.wait_for_logs(2)
    assert sum(row.prompt_tokens for row in rows) == after_two["prompt_tokens"]
    assert sum(row.completion_tokens for row in rows) == after_two["completion_tokens"]
    assert sorted(row.streamed for row in rows) == [False, True]
    assert {row.status_code for row in rows} == {200}
    assert {row.api_key_id for row in rows} == {tenant.key.id}
    assert all(row.ttft_ms is not None for row in rows if row.streamed)


def test_a_dropped_stream_is_accounted_as_far_as_it_went(tenant: Tenant, start_fake, start_gateway):
    upstream, gateway = _start(
        start_fake, start_gateway, tenant.db_url, tokens=200, token_delay_s=0.02
    )
    with tenant.client(gateway) as client:
        first = client.chat.completions.create(model="fake-model", messages=MESSAGES)
        assert first.usage is not None
        prompt_tokens = first.usage.prompt_tokens
        before = tenant.wait_for_usage(gateway, tenant.usage(gateway))

        stream = client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
        for read, _chunk in enumerate(stream, start=1):
            if read == 4:
                break
        stream.close()

    def accounted() -> dict[str, int] | None:
        after = tenant.usage(gateway)
        return after if after["queries"] != before["queries"] else None

    after = wait_until(accounted, what="the dropped stream's accounting")
    assert after["queries"] == before["queries"] + 1
    completion = after["completion_tokens"] - before["completion_tokens"]
    assert 1 <= completion <= 200
    assert after["prompt_tokens"] - before["prompt_tokens"] == prompt_tokens
    assert after["total_tokens"] == after["prompt_tokens"] + after["completion_tokens"]

    rows = tenant.wait_for_logs(2)
    dropped = [row for row in rows if row.streamed]
    assert len(dropped) == 1
    row = dropped[0]
    assert row.status_code == 499
    assert row.streamed is True
    assert row.error_kind == "ClientDisconnected"
    assert row.completion_tokens == completion
    assert row.prompt_tokens == prompt_tokens
    wait_until(lambda: upstream.state.stats.cancelled >= 1, what="the model server's cancellation")
    assert upstream.state.stats.completed == 1  # only the whole completion finished


def test_failed_requests_are_logged_with_their_status_and_no_tokens(
    tenant: Tenant, start_fake, start_gateway
):
    _, gateway = _start(start_fake, start_gateway, tenant.db_url)
    start = tenant.usage(gateway)
    with tenant.client(gateway) as client:
        with pytest.raises(openai.NotFoundError) as not_found:
            client.chat.completions.create(model="no-such-model", messages=MESSAGES)
        assert not_found.value.status_code == 404
        with pytest.raises(openai.UnprocessableEntityError) as invalid:
            client.chat.completions.create(model="fake-model", messages=MESSAGES, temperature=10)
        assert invalid.value.status_code == 422

    rows = tenant.wait_for_logs(2)
    assert sorted(row.status_code for row in rows) == [404, 422]
    for row in rows:
        assert row.prompt_tokens == 0
        assert row.completion_tokens == 0
        assert row.error_kind
        assert row.api_key_id == tenant.key.id
    assert {row.model for row in rows if row.status_code == 404} == {"no-such-model"}
    # they count as queries, never as tokens
    tenant.wait_for_usage(gateway, {**start, "queries": start["queries"] + 2})


def test_key_use_is_recorded(tenant: Tenant, start_fake, start_gateway):
    _, gateway = _start(start_fake, start_gateway, tenant.db_url)
    with tenant.client(gateway) as client:
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    tenant.wait_for_logs(1)

    async def key_row(store: SqlStore) -> ApiKeyRow | None:
        async with store.session() as session:
            return await session.get(ApiKeyRow, tenant.key.id)

    row = with_store(tenant.db_url, key_row)
    assert row is not None
    assert row.last_used_at is not None


def test_a_revoked_key_stops_working_within_seconds(tenant: Tenant, start_fake, start_gateway):
    _, gateway = _start(start_fake, start_gateway, tenant.db_url)
    assert gateway.settings.key_cache_ttl_s <= 5
    assert tenant.get_usage(gateway).status_code == 200
    with tenant.client(gateway) as client:
        client.chat.completions.create(model="fake-model", messages=MESSAGES)

    revoked = with_store(tenant.db_url, lambda store: store.revoke_key(tenant.key.id))
    assert revoked is not None
    assert revoked.revoked_at is not None
    # It works until the gateway's cached copy expires (the TTL above), then no more.
    response = wait_until(
        lambda: (refused := tenant.get_usage(gateway)).status_code != 200 and refused,
        timeout_s=3 * gateway.settings.key_cache_ttl_s,
        what="the revoked key's refusal",
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "revoked_api_key"

    with tenant.client(gateway) as client, pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="fake-model", messages=MESSAGES)


def test_a_disabled_accounts_key_is_refused(tenant: Tenant, start_fake, start_gateway):
    other_account, _, other_value = with_store(
        tenant.db_url, lambda store: create_tenant(store, "disabled")
    )
    with_store(tenant.db_url, lambda store: store.set_active(other_account.id, False))
    _, gateway = _start(start_fake, start_gateway, tenant.db_url)
    disabled = Tenant(tenant.db_url, other_account, tenant.key, other_value)

    response = disabled.get_usage(gateway)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "account_disabled"
    with disabled.client(gateway) as client, pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert tenant.get_usage(gateway).status_code == 200  # other accounts are unaffected

    # disabling an account while the gateway runs takes effect within the cache lifetime
    with_store(tenant.db_url, lambda store: store.set_active(tenant.account.id, False))
    response = wait_until(
        lambda: (refused := tenant.get_usage(gateway)).status_code != 200 and refused,
        timeout_s=3 * gateway.settings.key_cache_ttl_s,
        what="the disabled account's refusal",
    )
    assert response.status_code == 401
    assert disabled.logs() == []  # refused before any chat request was accounted
