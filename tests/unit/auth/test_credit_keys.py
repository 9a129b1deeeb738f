"""API keys validated by the credit service (``CreditApiKeys``) and how they combine."""

from __future__ import annotations

import asyncio

import pytest

from nilai.auth.api_keys import StaticApiKeys
from nilai.auth.credit_keys import CreditApiKeys
from nilai.auth.strategies import LocalOrCredit
from nilai.billing.meter import CreditMeter
from nilai.errors import AuthenticationFailed, BillingUnavailable
from tests.fakes.credit import Ledger, MemoryCreditService
from tests.unit.auth.test_nuc_accounts import FakeAccounts

KEY = "upstream-issued-key-0001"
LOCAL_KEY = "local-settings-key-0001"


@pytest.fixture
def credit() -> MemoryCreditService:
    ledger = Ledger()
    ledger.add_user("user-1", 1_000_000, key=KEY)
    return MemoryCreditService(ledger)


def keys_for(
    credit: MemoryCreditService, accounts: FakeAccounts, *, ttl_s: float = 60.0, **kwargs: float
) -> CreditApiKeys:
    meter = CreditMeter(credit, retry_after_s=9)
    return CreditApiKeys(credit, accounts, meter, ttl_s=ttl_s, **kwargs)


async def test_a_valid_key_gets_an_account_named_by_its_credit_user(credit):
    accounts = FakeAccounts()
    keys = keys_for(credit, accounts)
    principal = await keys.authenticate(KEY)
    assert principal.method == "credit"
    assert principal.account is not None
    assert principal.account.name == "credit:user-1"
    assert principal.credit is not None
    assert principal.credit.credential == KEY
    assert not principal.credit.public
    assert KEY not in repr(principal)
    again = await keys.authenticate(KEY)
    assert again.account_id == principal.account_id
    # Cached: one validation for both.
    assert credit.ledger.calls.count("validate") == 1
    assert accounts.creates == 1


async def test_an_unknown_key_is_401_and_the_miss_is_cached(credit):
    keys = keys_for(credit, FakeAccounts())
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            await keys.authenticate("not-a-key")
    assert credit.ledger.calls.count("validate") == 1


async def test_an_inactive_key_is_401(credit):
    credit.ledger.inactive.add(KEY)
    with pytest.raises(AuthenticationFailed):
        await keys_for(credit, FakeAccounts()).authenticate(KEY)


async def test_the_service_down_is_503_never_401(credit):
    credit.down = True
    with pytest.raises(BillingUnavailable) as down:
        await keys_for(credit, FakeAccounts()).authenticate(KEY)
    assert down.value.headers["Retry-After"] == "9"


async def test_fail_open_accepts_a_recently_validated_key_only(credit):
    keys = keys_for(credit, FakeAccounts(), ttl_s=0.001, fail_open_s=300.0)
    known = await keys.authenticate(KEY)
    credit.down = True
    await asyncio.sleep(0.01)  # past the cache's TTL
    assert (await keys.authenticate(KEY)).account_id == known.account_id
    credit.ledger.add_user("user-2", 1, key="never-seen-key")
    with pytest.raises(BillingUnavailable):
        await keys.authenticate("never-seen-key")


async def test_without_fail_open_a_known_key_is_503_once_its_cache_expires(credit):
    keys = keys_for(credit, FakeAccounts(), ttl_s=0.001)
    await keys.authenticate(KEY)
    credit.down = True
    await asyncio.sleep(0.01)  # past the cache's TTL
    with pytest.raises(BillingUnavailable):
        await keys.authenticate(KEY)


async def test_local_keys_win_and_others_go_to_the_credit_service(credit):
    combined = LocalOrCredit(StaticApiKeys([LOCAL_KEY]), keys_for(credit, FakeAccounts()))
    local = await combined.authenticate(LOCAL_KEY)
    assert local.method == "api_key"
    assert local.credit is None
    assert credit.ledger.calls == []
    remote = await combined.authenticate(KEY)
    assert remote.method == "credit"
    with pytest.raises(AuthenticationFailed):
        await combined.authenticate("neither")
