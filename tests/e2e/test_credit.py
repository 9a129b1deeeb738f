"""Credit metering end to end: a real gateway, fake model servers, the credit service stand-in.

Keys are validated by the stand-in (``NILAI_AUTH_STRATEGIES=credit``); every admitted request
locks its estimated cost and is unlocked exactly once with ``tokens x prices``, whatever
happened to it. Requests refused before admission lock nothing.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select

from nilai.billing.prices import Price
from nilai.store.sql import SqlStore
from nilai.store.tables import QueryLogRow
from tests.fakes.credit import API_TOKEN, Ledger, create_credit_app
from tests.support.nuc import Holder, gateway_did_from_b64, invoke
from tests.support.servers import ServerThread, wait_until
from tests.support.stores import sqlite_url, with_store

PRICE = Price(prompt_per_million=3_000_000, completion_per_million=7_000_000, web_search=50_000)
RICH = 1_000_000_000  # micro-units: 1000 units
ALICE, BOB, CAROL, DAVE, ERIN, POOR = (
    f"key-of-{name}-0123456789" for name in ("alice", "bob", "carol", "dave", "erin", "poor")
)


@pytest.fixture
def ledger() -> Ledger:
    book = Ledger()
    for name, key in (("alice", ALICE), ("bob", BOB), ("carol", CAROL), ("dave", DAVE)):
        book.add_user(name, RICH, key=key)
    book.add_user("erin", RICH, key=ERIN)
    book.add_user("poor", 10, key=POOR)
    return book


@pytest.fixture
def credit_service(ledger: Ledger) -> Iterator[ServerThread]:
    thread = ServerThread(create_credit_app(ledger)).start()
    yield thread
    thread.stop()


def start_metered(
    start_fake: Any, start_gateway: Any, credit_url: str, db_url: str, **overrides: Any
) -> Any:
    plain = start_fake(models=["fake-model"])
    broken = start_fake(models=["broken-model"], fault="http_500")
    slow = start_fake(models=["slow-model"], tokens=200, token_delay_s=0.02)
    settings: dict[str, Any] = {
        "auth_strategies": ["credit"],
        "credit_url": credit_url,
        "credit_api_token": API_TOKEN,
        "credit_retry_after_s": 4,
        "database_url": db_url,
        "upstream_urls": [plain.url, broken.url, slow.url],
        "usage_flush_interval_s": 0.2,
        "price_prompt_per_million": "3",
        "price_completion_per_million": "7",
        "price_web_search": "0.05",
    }
    settings.update(overrides)
    return start_gateway(**settings)


def client(gateway: Any, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)


def query_logs(db_url: str) -> list[QueryLogRow]:
    async def read(store: SqlStore) -> list[QueryLogRow]:
        async with store.session() as session:
            return list((await session.execute(select(QueryLogRow))).scalars())

    return with_store(db_url, read)


def all_unlocked(ledger: Ledger) -> bool:
    return all(lock.unlocks for lock in ledger.locks.values())


def test_a_valid_key_chats_and_pays_tokens_times_prices(
    ledger, credit_service, start_fake, start_gateway, tmp_path: Path
):
    db = sqlite_url(tmp_path)
    gateway = start_metered(start_fake, start_gateway, credit_service.url, db)
    completion = client(gateway, ALICE).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}], max_tokens=50
    )
    assert completion.usage is not None
    expected = PRICE.cost(completion.usage.prompt_tokens, completion.usage.completion_tokens, 0)
    wait_until(lambda: all_unlocked(ledger), what="the unlock")
    (lock,) = ledger.locks.values()
    assert lock.user_id == "alice"
    assert not lock.public
    assert lock.unlocks == [expected]
    assert expected > 0
    # The lock covered the estimate: the body's size as prompt tokens, max_tokens as completion.
    assert lock.amount_micro >= expected
    assert ledger.balances["alice"] == RICH - expected
    (row,) = wait_until(lambda: query_logs(db) or None, what="the query log")
    assert row.cost_micro == expected
    usage = httpx.get(f"{gateway.url}/v1/usage", headers={"Authorization": f"Bearer {ALICE}"})
    assert usage.json()["cost"] == pytest.approx(expected / 1_000_000)


def test_an_unknown_key_is_401_and_locks_nothing(
    ledger, credit_service, start_fake, start_gateway, tmp_path: Path
):
    gateway = start_metered(start_fake, start_gateway, credit_service.url, sqlite_url(tmp_path))
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "not-a-key-anyone-issued").models.list()
    assert ledger.locks == {}


def test_an_empty_balance_is_402_like_upstream(
    ledger, credit_service, start_fake, start_gateway, tmp_path: Path
):
    gateway = start_metered(start_fake, start_gateway, credit_service.url, sqlite_url(tmp_path))
    with pytest.raises(openai.APIStatusError) as refused:
        client(gateway, POOR).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.status_code == 402
    assert refused.value.body["code"] == "insufficient_balance"  # type: ignore[index]
    assert ledger.locks == {}
    assert ledger.balances["poor"] == 10


def test_the_service_down_is_503_with_retry_after_and_recovers_by_itself(
    ledger, start_fake, start_gateway, tmp_path: Path
):
    service = ServerThread(create_credit_app(ledger)).start()
    port = service.port
    gateway = start_metered(
        start_fake, start_gateway, service.url, sqlite_url(tmp_path), key_cache_ttl_s=0.2
    )
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {ALICE}"}
    url = f"{gateway.url}/v1/chat/completions"
    assert httpx.post(url, json=body, headers=headers).status_code == 200
    service.stop()
    # Past the key cache: both the validation and the lock need the service.
    for _ in range(3):
        down = httpx.post(url, json=body, headers=headers)
        assert down.status_code == 503, down.text
        assert down.headers["Retry-After"] == "4"
        assert down.json()["error"]["code"] == "credit_service_unavailable"
    service = ServerThread(create_credit_app(ledger), port).start()
    try:
        wait_until(
            lambda: httpx.post(url, json=body, headers=headers).status_code == 200,
            what="the gateway to use the credit service again",
        )
        wait_until(lambda: all_unlocked(ledger), what="the unlocks")
        assert all(len(lock.unlocks) == 1 for lock in ledger.locks.values())
    finally:
        service.stop()


async def _mixed_traffic(gateway: Any) -> Counter[tuple[str, int]]:
    """100 requests: answered, refused (validation, rate limit, key), failed, abandoned."""
    outcomes: Counter[tuple[str, int]] = Counter()
    chat = f"{gateway.url}/v1/chat/completions"
    gate = asyncio.Semaphore(8)

    def body(model: str, *, stream: bool = False) -> dict[str, Any]:
        return {
            "model": model,
            "messages": [{"role": "user", "content": "count for me"}],
            "max_tokens": 300,
            "stream": stream,
        }

    async def send(http: httpx.AsyncClient, who: str, key: str, payload: dict[str, Any]) -> None:
        async with gate:
            headers = {"Authorization": f"Bearer {key}"}
            if payload.get("stream") and payload["model"] == "slow-model":
                # Leave mid-stream: read the first chunk, then hang up.
                async with http.stream("POST", chat, json=payload, headers=headers) as answer:
                    async for _ in answer.aiter_raw():
                        break
                outcomes[(who, -1)] += 1
                return
            answer = await http.post(chat, json=payload, headers=headers)
            outcomes[(who, answer.status_code)] += 1

    jobs: list[tuple[str, str, dict[str, Any]]] = []
    jobs += [("alice", ALICE, body("fake-model", stream=i % 2 == 0)) for i in range(18)]
    jobs += [("bob", BOB, body("fake-model")) for _ in range(30)]  # 20 a minute, then 429
    jobs += [("carol", CAROL, body("no-such-model")) for _ in range(15)]
    jobs += [("dave", DAVE, body("broken-model")) for _ in range(15)]
    jobs += [("erin", ERIN, body("slow-model", stream=True)) for _ in range(12)]
    jobs += [("frank", "key-nobody-issued-000", body("fake-model")) for _ in range(10)]
    assert len(jobs) == 100
    async with httpx.AsyncClient(timeout=30) as http:
        # Bob's in order, so that exactly the last ten are over his limit.
        await asyncio.gather(*(send(http, *job) for job in jobs if job[0] != "bob"))
        for job in (job for job in jobs if job[0] == "bob"):
            await send(http, *job)
    return outcomes


def test_after_100_mixed_requests_every_lock_is_unlocked_once_at_tokens_times_prices(
    ledger, credit_service, start_fake, start_gateway, tmp_path: Path
):
    db = sqlite_url(tmp_path)
    gateway = start_metered(start_fake, start_gateway, credit_service.url, db, rate_limit_minute=20)
    outcomes = asyncio.run(_mixed_traffic(gateway))
    assert outcomes[("alice", 200)] == 18
    assert (outcomes[("bob", 200)], outcomes[("bob", 429)]) == (20, 10)
    assert outcomes[("carol", 404)] == 15
    assert sum(n for (who, status), n in outcomes.items() if who == "dave" and status >= 500) == 15
    assert outcomes[("erin", -1)] == 12
    assert outcomes[("frank", 401)] == 10

    admitted = 18 + 20 + 15 + 12
    wait_until(
        lambda: len(ledger.locks) == admitted and all_unlocked(ledger),
        timeout_s=30,
        what="every lock to be unlocked",
    )
    locks = list(ledger.locks.values())
    assert all(len(lock.unlocks) == 1 and lock.refused_unlocks == 0 for lock in locks)
    by_user = Counter(lock.user_id for lock in locks)
    assert by_user == {"alice": 18, "bob": 20, "dave": 15, "erin": 12}

    # Every request a key was accepted for is logged (frank's 10 never got that far).
    rows = wait_until(
        lambda: ((found := query_logs(db)) and len(found) >= 90 and found) or None,
        timeout_s=30,
        what="90 query-log rows",
    )
    assert len(rows) == 90
    for row in rows:
        assert row.cost_micro == PRICE.cost(row.prompt_tokens, row.completion_tokens, 0)
    locked_rows = [row for row in rows if row.status_code not in (404, 429)]
    assert sorted(row.cost_micro for row in locked_rows) == sorted(
        lock.unlocks[0] for lock in locks
    )
    # Refusals cost nothing; failed model calls nothing; abandoned streams what they produced.
    assert all(row.cost_micro == 0 for row in rows if row.status_code in (404, 429))
    assert all(lock.unlocks == [0] for lock in locks if lock.user_id == "dave")
    abandoned = [lock.unlocks[0] for lock in locks if lock.user_id == "erin"]
    assert all(
        0 < cost < lock_amount
        for cost, lock_amount in zip(
            abandoned, (lock.amount_micro for lock in locks if lock.user_id == "erin"), strict=True
        )
    )
    for user in ("alice", "bob", "dave", "erin"):
        spent = sum(lock.unlocks[0] for lock in locks if lock.user_id == user)
        assert ledger.balances[user] == RICH - spent


def test_nuc_subscription_holders_are_metered_by_their_did(
    ledger, credit_service, start_fake, start_gateway, tmp_path: Path
):
    holder = Holder()
    ledger.add_user("holder", RICH, did=str(holder.did))
    gateway = start_metered(
        start_fake,
        start_gateway,
        credit_service.url,
        sqlite_url(tmp_path),
        auth_strategies=["nuc", "credit"],
    )
    key = httpx.get(f"{gateway.url}/v1/public_key").json()
    token = invoke(holder.root(), holder.key, gateway_did_from_b64(key))
    completion = client(gateway, token).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}], max_tokens=20
    )
    assert completion.usage is not None
    wait_until(lambda: bool(ledger.locks) and all_unlocked(ledger), what="the unlock")
    (lock,) = ledger.locks.values()
    assert lock.public
    assert lock.user_id == "holder"
    usage = completion.usage
    assert lock.unlocks == [PRICE.cost(usage.prompt_tokens, usage.completion_tokens, 0)]
    # A holder the credit service does not know is refused, and nothing is locked for it.
    stranger = Holder()
    token = invoke(stranger.root(), stranger.key, gateway_did_from_b64(key))
    with pytest.raises(openai.AuthenticationError):
        client(gateway, token).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hello"}]
        )
    assert len(ledger.locks) == 1


def test_the_meter_shows_in_the_metrics(
    ledger, credit_service, start_fake, start_gateway, tmp_path: Path
):
    gateway = start_metered(start_fake, start_gateway, credit_service.url, sqlite_url(tmp_path))
    client(gateway, ALICE).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )

    def made() -> bool:
        text = httpx.get(f"{gateway.url}/metrics").text
        return 'nilai_credit_unlocks{state="made"} 1.0' in text

    wait_until(made, what="the unlock in /metrics")
    text = httpx.get(f"{gateway.url}/metrics").text
    assert 'nilai_credit_unlocks{state="pending"} 0.0' in text
    assert "nilai_credit_unmetered_requests 0.0" in text
