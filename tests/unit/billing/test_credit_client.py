"""``HttpCreditService`` against the loopback stand-in of the credit service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from pydantic import SecretStr

from nilai.billing.credit import (
    CredentialRejected,
    CreditUnavailable,
    HttpCreditService,
    InsufficientBalance,
    UnlockRefused,
)
from tests.fakes.credit import API_TOKEN, Ledger, create_credit_app
from tests.support.servers import ServerThread, free_port

KEY = "upstream-key-0001"
DID = "did:nil:02" + "ab" * 32


@pytest.fixture
def ledger() -> Ledger:
    book = Ledger()
    book.add_user("user-1", 1_000_000, key=KEY, did=DID)
    return book


@pytest.fixture
def server(ledger: Ledger) -> Iterator[ServerThread]:
    thread = ServerThread(create_credit_app(ledger)).start()
    yield thread
    thread.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def service(http: httpx.AsyncClient, url: str, token: str = API_TOKEN) -> HttpCreditService:
    return HttpCreditService(http, url, SecretStr(token), timeout_s=2.0)


async def test_validate_lock_and_unlock_speak_the_wire_protocol(server, ledger, http):
    credit = service(http, server.url)
    holder = await credit.validate(KEY, public=False)
    assert (holder.user_id, holder.public) == ("user-1", False)
    lock_id = await credit.lock(KEY, 123_456, public=False)
    assert ledger.locks[lock_id].amount_micro == 123_456
    await credit.unlock(lock_id, 7)
    assert ledger.locks[lock_id].unlocks == [7]
    assert ledger.balances["user-1"] == 1_000_000 - 7
    public_lock = await credit.lock(DID, 1, public=True)
    assert ledger.locks[public_lock].public


async def test_unknown_and_inactive_credentials_are_rejected(server, ledger, http):
    credit = service(http, server.url)
    with pytest.raises(CredentialRejected):
        await credit.validate("nobody", public=False)
    ledger.inactive.add(KEY)
    with pytest.raises(CredentialRejected) as rejected:
        await credit.validate(KEY, public=False)
    assert rejected.value.reason == "inactive"
    with pytest.raises(CredentialRejected):
        await credit.lock("nobody", 1, public=False)


async def test_a_lock_over_the_balance_is_insufficient(server, http):
    credit = service(http, server.url)
    await credit.lock(KEY, 600_000, public=False)
    with pytest.raises(InsufficientBalance):
        await credit.lock(KEY, 600_000, public=False)


async def test_a_second_unlock_is_refused(server, ledger, http):
    credit = service(http, server.url)
    lock_id = await credit.lock(KEY, 10, public=False)
    await credit.unlock(lock_id, 10)
    with pytest.raises(UnlockRefused):
        await credit.unlock(lock_id, 10)
    with pytest.raises(UnlockRefused):
        await credit.unlock("no-such-lock", 1)
    assert ledger.locks[lock_id].unlocks == [10]


@pytest.mark.parametrize("mode", ["error", "garbage"])
async def test_a_broken_service_is_unavailable_not_a_rejection(server, ledger, http, mode):
    ledger.mode = mode
    credit = service(http, server.url)
    with pytest.raises(CreditUnavailable):
        await credit.validate(KEY, public=False)
    with pytest.raises(CreditUnavailable):
        await credit.lock(KEY, 1, public=False)


async def test_a_wrong_api_token_fails_locks_as_unavailable(server, http):
    # The service answers 401 for a wrong token; on validate that is also its answer for an
    # inactive credential, so only locks and unlocks can tell it apart.
    credit = service(http, server.url, "wrong-token")
    with pytest.raises(CreditUnavailable):
        await credit.lock(KEY, 1, public=False)
    with pytest.raises(CreditUnavailable):
        await credit.unlock("any", 1)


async def test_a_service_that_is_down_is_unavailable(http):
    with pytest.raises(CreditUnavailable) as down:
        await service(http, f"http://127.0.0.1:{free_port()}").lock(KEY, 1, public=False)
    assert KEY not in str(down.value)


async def test_an_oversized_or_odd_answer_is_unavailable(http):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def huge(_: object) -> Response:
        return Response(b"{" + b" " * (128 * 1024) + b"}", media_type="application/json")

    async def odd(_: object) -> Response:
        return JSONResponse({"lock_id": "x\u0000y"})

    app = Starlette(
        routes=[
            Route("/v1/credential/validate", huge, methods=["POST"]),
            Route("/v1/balance/lock/private", odd, methods=["POST"]),
        ]
    )
    thread = ServerThread(app).start()
    try:
        credit = service(http, thread.url)
        with pytest.raises(CreditUnavailable):
            await credit.validate(KEY, public=False)
        with pytest.raises(CreditUnavailable):
            await credit.lock(KEY, 1, public=False)
    finally:
        thread.stop()


async def test_a_service_slower_than_the_timeout_is_unavailable(server, ledger, http):
    ledger.delay_s = 1.0
    slow = HttpCreditService(http, server.url, SecretStr(API_TOKEN), timeout_s=0.1)
    with pytest.raises(CreditUnavailable) as late:
        await slow.lock(KEY, 1, public=False)
    assert str(late.value) == "ReadTimeout"
