import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import pytest
from secp256k1 import PrivateKey

from nilai.auth.base import PromptDocument
from nilai.auth.nuc_accounts import NucAuthenticator
from nilai.auth.nuc_tokens import NucVerifier
from nilai.errors import AuthenticationFailed
from nilai.store.base import Account
from tests.support.nuc import Holder, did_of, invoke


@dataclass
class FakeAccounts:
    """An in-memory ``AccountRepo`` that counts its calls."""

    accounts: dict[str, Account] = field(default_factory=dict)
    gets: int = 0
    creates: int = 0

    async def create_account(self, name: str, limits: dict[str, int | None]) -> Account:
        self.creates += 1
        if any(account.name == name for account in self.accounts.values()):
            raise ValueError(f"account {name} exists")
        del limits
        account = Account(uuid.uuid4().hex, name, datetime.now(UTC), True)
        self.accounts[account.id] = account
        return account

    async def get_account(self, id_or_name: str) -> Account | None:
        self.gets += 1
        for account in self.accounts.values():
            if id_or_name in (account.id, account.name):
                return account
        return None

    async def list_accounts(self) -> list[Account]:
        return list(self.accounts.values())

    async def set_active(self, account_id: str, active: bool) -> None:
        self.accounts[account_id] = replace(self.accounts[account_id], active=active)


class RacingAccounts(FakeAccounts):
    """Another replica creates the account between our lookup and our insert."""

    async def create_account(self, name: str, limits: dict[str, int | None]) -> Account:
        await FakeAccounts.create_account(self, name, limits)
        raise ValueError(f"account {name} exists")


GATEWAY = PrivateKey()


def authenticator(repo: FakeAccounts, *, auto_accounts: bool = True) -> NucAuthenticator:
    verifier = NucVerifier(GATEWAY.pubkey.serialize())
    return NucAuthenticator(verifier, repo, auto_accounts=auto_accounts, ttl_s=60)


def own_token(holder: Holder) -> str:
    return invoke(holder.root(), holder.key, did_of(GATEWAY))


async def test_auto_accounts_creates_the_holders_account_once():
    repo = FakeAccounts()
    auth = authenticator(repo)
    holder = Holder()
    first = await auth.authenticate(own_token(holder))
    assert repo.creates == 1
    (account,) = repo.accounts.values()
    assert account.name == str(holder.did)
    assert account.active
    assert first.account_id == account.id
    assert first.account == account
    assert first.method == "nuc"
    assert first.key_id is None
    assert first.caller == str(holder.did)

    calls = (repo.gets, repo.creates)
    second = await auth.authenticate(own_token(holder))
    assert (repo.gets, repo.creates) == calls
    assert second.account_id == first.account_id


async def test_the_caller_is_the_invocations_issuer_and_limits_pass_through():
    repo = FakeAccounts()
    auth = authenticator(repo)
    holder, caller = Holder(), PrivateKey()
    owner = str(holder.did)
    meta = {"document_id": "4f0b8a52-3c1d-4e8e-9d51-6a0f2b7c9e11", "document_owner_did": owner}
    proof = holder.delegate(caller, uses=4, meta=meta)
    principal = await auth.authenticate(invoke(proof, caller, did_of(GATEWAY)))
    (account,) = repo.accounts.values()
    assert account.name == str(holder.did)
    assert principal.account_id == account.id
    assert principal.caller == str(did_of(caller))
    (limit,) = principal.token_limits
    assert limit.token_id == proof.token.compute_hash().hex()
    assert limit.uses == 4
    assert principal.prompt_document == PromptDocument(
        "4f0b8a52-3c1d-4e8e-9d51-6a0f2b7c9e11", owner
    )


async def test_two_holders_get_two_accounts():
    repo = FakeAccounts()
    auth = authenticator(repo)
    first = await auth.authenticate(own_token(Holder()))
    second = await auth.authenticate(own_token(Holder()))
    assert first.account_id != second.account_id
    assert repo.creates == 2


async def test_without_auto_accounts_an_unknown_holder_is_refused_until_created():
    repo = FakeAccounts()
    auth = authenticator(repo, auto_accounts=False)
    holder = Holder()
    with pytest.raises(AuthenticationFailed) as info:
        await auth.authenticate(own_token(holder))
    assert info.value.status == 401
    assert info.value.code == "unknown_account"
    assert str(holder.did) in info.value.message
    assert repo.creates == 0
    assert repo.accounts == {}

    account = await repo.create_account(str(holder.did), {})
    principal = await auth.authenticate(own_token(holder))
    assert principal.account_id == account.id
    assert principal.method == "nuc"


async def test_a_disabled_account_is_refused():
    repo = FakeAccounts()
    holder = Holder()
    account = await repo.create_account(str(holder.did), {})
    await repo.set_active(account.id, False)
    for auto_accounts in (True, False):
        auth = authenticator(repo, auto_accounts=auto_accounts)
        with pytest.raises(AuthenticationFailed) as info:
            await auth.authenticate(own_token(holder))
        assert info.value.status == 401
        assert info.value.code == "account_disabled"
    assert repo.creates == 1


async def test_a_bad_token_is_refused_before_any_lookup():
    repo = FakeAccounts()
    auth = authenticator(repo)
    holder = Holder()
    token = invoke(holder.root(), holder.key, did_of(PrivateKey()))
    with pytest.raises(AuthenticationFailed) as info:
        await auth.authenticate(token)
    assert info.value.code == "invalid_nuc_audience"
    assert (repo.gets, repo.creates) == (0, 0)


async def test_a_creation_race_returns_the_account_the_other_side_made():
    repo = RacingAccounts()
    auth = authenticator(repo)
    holder = Holder()
    principal = await auth.authenticate(own_token(holder))
    (account,) = repo.accounts.values()
    assert account.name == str(holder.did)
    assert principal.account_id == account.id
    assert repo.creates == 1
    assert repo.gets == 2
