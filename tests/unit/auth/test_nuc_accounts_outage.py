"""NUC account lookups under database outages and bursts (issue 13, item 4 for NUC holders).

Also: one gateway's two strategies share one database, so one outage is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from secp256k1 import PrivateKey

from nilai.auth.base import Principal
from nilai.auth.nuc_accounts import NucAuthenticator
from nilai.auth.nuc_tokens import NucVerifier
from nilai.auth.strategies import make_authenticator
from nilai.errors import NilaiError
from nilai.settings import NilaiSettings
from nilai.store.base import Account, ApiKey
from tests.support.nuc import Holder, did_of, invoke
from tests.support.records import stored_key

GATEWAY = PrivateKey()
TTL_S = 60.0
SAFETY_S = 5.0
OUTAGE_LINE = "accounts database unavailable"


class FakeStore:
    """Accounts and keys in memory; lookups can be held at a gate or fail."""

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.keys: dict[str, tuple[ApiKey, Account]] = {}
        self.gets = 0
        self.creates = 0
        self.failure: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.waiting = asyncio.Event()

    async def _pass(self) -> None:
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure

    async def create_account(self, name: str, limits: dict[str, int | None]) -> Account:
        del limits
        self.creates += 1
        await self._pass()
        if any(account.name == name for account in self.accounts.values()):
            raise ValueError(f"account {name} exists")
        account = Account(uuid.uuid4().hex, name, datetime.now(UTC), True)
        self.accounts[account.id] = account
        return account

    async def get_account(self, id_or_name: str) -> Account | None:
        self.gets += 1
        await self._pass()
        for account in self.accounts.values():
            if id_or_name in (account.id, account.name):
                return account
        return None

    async def key_by_prefix(self, prefix: str) -> tuple[ApiKey, Account] | None:
        await self._pass()
        return self.keys.get(prefix)

    def add_stored_key(self) -> str:
        account = Account(uuid.uuid4().hex, "key-owner", datetime.now(UTC), True)
        self.accounts[account.id] = account
        record, value = stored_key(account)
        self.keys[record.prefix] = (record, account)
        return value


def token(holder: Holder) -> str:
    return invoke(holder.root(), holder.key, did_of(GATEWAY))


def authenticator(store: FakeStore, *, auto_accounts: bool = True) -> NucAuthenticator:
    verifier = NucVerifier(GATEWAY.pubkey.serialize())
    return NucAuthenticator(verifier, store, auto_accounts=auto_accounts, ttl_s=TTL_S)


async def outcome(auth: NucAuthenticator, credential: str) -> Principal | NilaiError:
    try:
        return await auth.authenticate(credential)
    except NilaiError as error:
        return error


def assert_retryable_503(error: Principal | NilaiError) -> None:
    assert isinstance(error, NilaiError), error
    assert (error.status, error.type, error.code) == (
        503,
        "service_unavailable",
        "accounts_unavailable",
    )
    assert int(error.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("auto_accounts", [True, False])
async def test_a_nuc_holder_lookup_in_a_database_outage_answers_503(auto_accounts: bool):
    store = FakeStore()
    holder = Holder()
    store.failure = ConnectionRefusedError(111, "Connect call failed")
    auth = authenticator(store, auto_accounts=auto_accounts)
    assert_retryable_503(await outcome(auth, token(holder)))
    assert store.accounts == {}


async def test_a_known_nuc_holder_keeps_working_during_an_outage_within_the_ttl():
    store = FakeStore()
    holder = Holder()
    auth = authenticator(store)
    assert isinstance(await outcome(auth, token(holder)), Principal)
    store.failure = TimeoutError()
    assert isinstance(await outcome(auth, token(holder)), Principal)
    assert store.gets == 1


async def test_a_new_holders_concurrent_first_requests_create_one_account():
    store = FakeStore()
    holder = Holder()
    auth = authenticator(store)
    store.gate = asyncio.Event()
    first = [asyncio.create_task(outcome(auth, token(holder))) for _ in range(10)]
    async with asyncio.timeout(SAFETY_S):
        await store.waiting.wait()
    store.gate.set()
    results = await asyncio.gather(*first)
    assert all(isinstance(result, Principal) for result in results)
    assert len({result.account_id for result in results if isinstance(result, Principal)}) == 1
    assert (store.gets, store.creates) == (1, 1)


async def test_one_outage_is_logged_once_for_stored_keys_and_nuc_holders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    for name in list(os.environ):
        if name.startswith("NILAI_"):
            monkeypatch.delenv(name)
    caplog.set_level(logging.INFO)
    store = FakeStore()
    key = store.add_stored_key()
    config = NilaiSettings(data_dir=tmp_path, auth_strategies=["api_key", "nuc"])
    auth = make_authenticator(config, store, GATEWAY.pubkey.serialize())
    store.failure = ConnectionRefusedError(111, "Connect call failed")
    for credential in [key, token(Holder()), key, token(Holder())]:
        with pytest.raises(NilaiError) as info:
            await auth.authenticate(credential)
        assert_retryable_503(info.value)
    lines = [r.getMessage() for r in caplog.records if OUTAGE_LINE in r.getMessage()]
    assert len(lines) == 1
