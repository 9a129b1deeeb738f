"""No prompt, no completion and no API key ends up in the logs or in the database.

Distinctive markers go through the gateway (prompt in, completion out, key in the header); then
every log line captured at DEBUG and every row of every table is searched for them.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import select

from nilai.store.tables import QueryLogRow
from tests.conftest import TEST_API_KEY
from tests.support.servers import wait_until
from tests.support.stores import (
    create_tenant,
    dump_database,
    with_store,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def _query_logs(url: str) -> int:
    async def count(store: Any) -> int:
        async with store.session() as session:
            return len((await session.execute(select(QueryLogRow.id))).all())

    return with_store(url, count)


def test_no_content_or_key_in_logs_or_database(
    db_url: str, start_fake, start_gateway, caplog: pytest.LogCaptureFixture, capfd
):
    prompt_marker = f"PRIVATE-PROMPT-{uuid.uuid4()}"
    reply_marker = f"SECRETREPLY{uuid.uuid4().hex[:8]}"
    _, _, key_value = with_store(db_url, lambda store: create_tenant(store, "private"))
    secret_part = key_value.split("_", 2)[2]
    messages = [
        {"role": "system", "content": f"system {prompt_marker}"},
        {"role": "user", "content": f"please repeat {prompt_marker} back"},
    ]

    caplog.set_level(logging.DEBUG)  # the root logger: every library, every thread
    upstream = start_fake(name=reply_marker)
    gateway = start_gateway(
        database_url=db_url,
        upstream_urls=[upstream.url],
        usage_flush_interval_s=0.1,
    )
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key_value, max_retries=0)
    with client:
        whole = client.chat.completions.create(model="fake-model", messages=messages)
        assert reply_marker in (whole.choices[0].message.content or "")

        streamed = ""
        stream = client.chat.completions.create(
            model="fake-model",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            for choice in chunk.choices:
                streamed += choice.delta.content or ""
        assert reply_marker in streamed

        # failures too: a bad request carrying the markers, and an unknown model
        with pytest.raises(openai.UnprocessableEntityError):
            client.chat.completions.create(
                model="fake-model", messages=messages, temperature=10, user=prompt_marker
            )
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=messages)
    with gateway.client() as settings_key_client:  # a settings key as well
        settings_key_client.chat.completions.create(model="fake-model", messages=messages)
    assert upstream.state.stats.completed == 3

    wait_until(lambda: _query_logs(db_url) >= 5, what="the query logs")

    dump = dump_database(db_url)
    captured = capfd.readouterr()
    log_text = "\n".join(
        [caplog.text, *(r.getMessage() for r in caplog.records), captured.out, captured.err]
    )
    db_text = repr(dump)

    assert dump["query_logs"], "nothing to search: the query logs are empty"
    assert caplog.records, "nothing to search: no log records were captured"
    assert any("chat model=" in r.getMessage() for r in caplog.records)  # the gateway's own
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    secrets = {
        "prompt": prompt_marker,
        "reply": reply_marker,
        "api key": key_value,
        "api key secret": secret_part,
        "settings api key": TEST_API_KEY,
    }
    for what, secret in secrets.items():
        assert secret not in log_text, f"the {what} appears in the logs"
        assert secret not in db_text, f"the {what} appears in the database"
    if db_url.startswith("sqlite"):
        raw = b"".join(
            path.read_bytes()
            for path in Path(db_url.removeprefix("sqlite+aiosqlite:///")).parent.glob("nilai.db*")
        )
        for what, secret in secrets.items():
            assert secret.encode() not in raw, f"the {what} appears in the SQLite file"
