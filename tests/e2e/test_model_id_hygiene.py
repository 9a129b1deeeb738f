"""A model id a client sends never reaches the query log unless it is plain text (issue 13).

On PostgreSQL, one row holding a NUL made the whole batch fail, and with it every later query
log. The id is refused at the protocol boundary (422), so the refused request's row carries no
model at all, and the rows around it are written.
"""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from nilai.store.sql import SqlStore
from nilai.store.tables import QueryLogRow
from tests.support.servers import wait_until
from tests.support.stores import create_tenant, pg_url, with_store

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MESSAGES = [{"role": "user", "content": "hi"}]


def _rows(db_url: str, account_id: str) -> list[QueryLogRow]:
    async def read(store: SqlStore) -> list[QueryLogRow]:
        async with store.session() as session:
            query = select(QueryLogRow).where(QueryLogRow.account_id == account_id)
            return list((await session.execute(query)).scalars())

    return with_store(db_url, read)


def test_model_id_with_a_nul_is_refused_and_every_query_log_is_written(
    pg_database: str, start_fake, start_gateway
):
    database_url = pg_url(pg_database)
    account, _, key = with_store(database_url, lambda store: create_tenant(store, "tenant"))
    fake = start_fake()
    gateway = start_gateway(
        database_url=database_url, upstream_urls=[fake.url], usage_flush_interval_s=0.1
    )
    url = f"{gateway.url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}"}

    refused = httpx.post(
        url, json={"model": "bad\u0000model", "messages": MESSAGES}, headers=headers, timeout=10
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["param"] == "model"
    served = httpx.post(
        url, json={"model": "fake-model", "messages": MESSAGES}, headers=headers, timeout=10
    )
    assert served.status_code == 200, served.text

    def both_rows() -> list[QueryLogRow] | None:
        rows = _rows(database_url, account.id)
        return rows if len(rows) == 2 else None  # the refused request and the served one

    rows = wait_until(both_rows)
    assert sorted(row.status_code for row in rows) == [200, 422]
    assert sorted(row.model for row in rows) == ["", "fake-model"]
