import logging
import os
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from secp256k1 import PrivateKey

from nilai.auth.api_keys import StaticApiKeys
from nilai.auth.base import Authenticator
from nilai.auth.nuc_accounts import NucAuthenticator
from nilai.auth.nuc_tokens import NucVerifier
from nilai.auth.stored_keys import generate_key
from nilai.auth.strategies import PRIVATE_KEY_SENT, ByShape, make_authenticator
from nilai.errors import AuthenticationFailed
from nilai.settings import NilaiSettings
from nilai.store.base import Account, ApiKey
from tests.support.nuc import Holder, did_of, invoke

API_KEY = "sk-test-strategies-0123456789"  # pragma: allowlist secret
HEX_KEY = secrets.token_hex(32)
PRIVATE_KEYS = [HEX_KEY, "0x" + HEX_KEY, HEX_KEY.upper()]
GATEWAY = PrivateKey()


@dataclass
class FakeStore:
    """The part of ``Store`` that authentication uses, in memory."""

    accounts: dict[str, Account] = field(default_factory=dict)
    keys: dict[str, tuple[ApiKey, Account]] = field(default_factory=dict)

    async def create_account(self, name: str, limits: dict[str, int | None]) -> Account:
        del limits
        if any(account.name == name for account in self.accounts.values()):
            raise ValueError(f"account {name} exists")
        account = Account(uuid.uuid4().hex, name, datetime.now(UTC), True)
        self.accounts[account.id] = account
        return account

    async def get_account(self, id_or_name: str) -> Account | None:
        for account in self.accounts.values():
            if id_or_name in (account.id, account.name):
                return account
        return None

    async def key_by_prefix(self, prefix: str) -> tuple[ApiKey, Account] | None:
        return self.keys.get(prefix)

    async def add_stored_key(self) -> str:
        account = await self.create_account("key-owner", {})
        new = generate_key()
        record = ApiKey(
            uuid.uuid4().hex, account.id, new.prefix, new.hash, None, datetime.now(UTC), None, None
        )
        self.keys[new.prefix] = (record, account)
        return new.value


def nuc_token(holder: Holder | None = None) -> str:
    holder = holder or Holder()
    return invoke(holder.root(), holder.key, did_of(GATEWAY))


def nuc_strategy(store: FakeStore) -> NucAuthenticator:
    verifier = NucVerifier(GATEWAY.pubkey.serialize())
    return NucAuthenticator(verifier, store, auto_accounts=True, ttl_s=1)


def by_shape(*, api_keys: bool, nuc: bool, keys: tuple[str, ...] = (API_KEY,)) -> ByShape:
    return ByShape(
        api_keys=StaticApiKeys(keys) if api_keys else None,
        nuc=nuc_strategy(FakeStore()) if nuc else None,
    )


async def refused(auth: Authenticator, credential: str) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as info:
        await auth.authenticate(credential)
    assert info.value.status == 401
    assert credential not in info.value.message
    return info.value


# --- ByShape ----------------------------------------------------------------------------------


async def test_both_strategies_accept_an_api_key_and_a_nuc():
    auth = by_shape(api_keys=True, nuc=True)
    by_key = await auth.authenticate(API_KEY)
    by_nuc = await auth.authenticate(nuc_token())
    assert by_key.method == "api_key"
    assert by_nuc.method == "nuc"


async def test_both_strategies_still_refuse_wrong_credentials_of_each_shape():
    auth = by_shape(api_keys=True, nuc=True)
    assert (await refused(auth, "sk-wrong")).message == "Incorrect API key provided."
    other_gateway = invoke(Holder().root(), PrivateKey(), did_of(PrivateKey()))
    assert (await refused(auth, other_gateway)).code == "invalid_nuc_audience"


async def test_a_nuc_only_gateway_refuses_api_keys_with_a_clear_message():
    auth = by_shape(api_keys=False, nuc=True)
    error = await refused(auth, API_KEY)
    assert "accepts NUC tokens only" in error.message
    assert "/v1/public_key" in error.message
    assert (await auth.authenticate(nuc_token())).method == "nuc"


async def test_an_api_key_only_gateway_refuses_nucs():
    auth = by_shape(api_keys=True, nuc=False)
    error = await refused(auth, nuc_token())
    assert error.code == "nuc_not_accepted"
    assert "does not accept NUC tokens" in error.message
    assert (await auth.authenticate(API_KEY)).method == "api_key"


@pytest.mark.parametrize("credential", PRIVATE_KEYS)
@pytest.mark.parametrize(("api_keys", "nuc"), [(True, True), (True, False), (False, True)])
async def test_a_raw_private_key_is_explained(credential: str, api_keys: bool, nuc: bool):
    error = await refused(by_shape(api_keys=api_keys, nuc=nuc), credential)
    assert error.message == PRIVATE_KEY_SENT
    assert error.code == "private_key_sent"
    assert HEX_KEY.lower() not in error.message.lower()


@pytest.mark.parametrize("nuc", [True, False])
async def test_a_configured_api_key_that_looks_like_a_private_key_is_accepted(nuc: bool):
    auth = by_shape(api_keys=True, nuc=nuc, keys=(API_KEY, HEX_KEY))
    principal = await auth.authenticate(HEX_KEY)
    assert principal.method == "api_key"
    # Only the configured spelling: other spellings of the same hex are still a private key.
    assert (await refused(auth, "0x" + HEX_KEY)).code == "private_key_sent"


@pytest.mark.parametrize("credential", ["a" * 63, "a" * 65, "g" * 64, "0x" + "a" * 63])
async def test_almost_private_keys_are_treated_as_api_keys(credential: str):
    error = await refused(by_shape(api_keys=True, nuc=True), credential)
    assert error.message == "Incorrect API key provided."


# --- make_authenticator -----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("NILAI_"):
            monkeypatch.delenv(name)


def settings(tmp_path: Path, strategies: list[str], **values: object) -> NilaiSettings:
    return NilaiSettings(
        data_dir=tmp_path,
        auth_strategies=strategies,
        **values,
    )


def build(config: NilaiSettings, store: FakeStore) -> Authenticator:
    return make_authenticator(config, store, GATEWAY.pubkey.serialize())


async def test_make_authenticator_with_both_strategies(tmp_path: Path):
    store = FakeStore()
    stored_key = await store.add_stored_key()
    auth = build(settings(tmp_path, ["api_key", "nuc"], api_key=API_KEY), store)
    static = await auth.authenticate(API_KEY)
    stored = await auth.authenticate(stored_key)
    holder = Holder()
    by_nuc = await auth.authenticate(nuc_token(holder))
    assert static.method == stored.method == "api_key"
    assert stored.account is not None
    assert stored.account.name == "key-owner"
    assert by_nuc.method == "nuc"
    assert by_nuc.account is not None
    assert by_nuc.account.name == str(holder.did)
    for credential in PRIVATE_KEYS:
        assert (await refused(auth, credential)).code == "private_key_sent"


async def test_make_authenticator_nuc_only(tmp_path: Path):
    auth = build(settings(tmp_path, ["nuc"], api_key=API_KEY), FakeStore())
    error = await refused(auth, API_KEY)
    assert "accepts NUC tokens only" in error.message
    assert (await auth.authenticate(nuc_token())).method == "nuc"
    assert (await refused(auth, HEX_KEY)).code == "private_key_sent"


async def test_make_authenticator_api_key_only(tmp_path: Path):
    auth = build(settings(tmp_path, ["api_key"], api_key=API_KEY), FakeStore())
    assert (await auth.authenticate(API_KEY)).method == "api_key"
    assert (await refused(auth, nuc_token())).code == "nuc_not_accepted"
    assert (await refused(auth, "0x" + HEX_KEY)).code == "private_key_sent"


async def test_make_authenticator_accepts_a_hex_api_key_it_was_given(tmp_path: Path):
    auth = build(settings(tmp_path, ["api_key", "nuc"], api_key=HEX_KEY), FakeStore())
    assert (await auth.authenticate(HEX_KEY)).method == "api_key"


async def test_make_authenticator_without_auto_accounts(tmp_path: Path):
    store = FakeStore()
    config = settings(tmp_path, ["nuc"], nuc_auto_accounts=False)
    auth = build(config, store)
    holder = Holder()
    assert (await refused(auth, nuc_token(holder))).code == "unknown_account"
    assert store.accounts == {}
    await store.create_account(str(holder.did), {})
    assert (await auth.authenticate(nuc_token(holder))).method == "nuc"


async def test_make_authenticator_honours_root_issuers(tmp_path: Path):
    trusted = Holder()
    config = settings(tmp_path, ["nuc"], nuc_root_issuers=[str(trusted.did)])
    auth = build(config, FakeStore())
    assert (await auth.authenticate(nuc_token(trusted))).method == "nuc"
    error = await refused(auth, nuc_token())
    assert "trusted root issuer" in error.message


def test_make_authenticator_warns_when_anyone_can_get_an_account(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING, logger="nilai.auth.strategies"):
        build(settings(tmp_path, ["nuc"]), FakeStore())
    assert "any root issuer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nilai.auth.strategies"):
        build(settings(tmp_path, ["nuc"], nuc_auto_accounts=False), FakeStore())
        build(settings(tmp_path, ["nuc"], nuc_root_issuers=[str(Holder().did)]), FakeStore())
        build(settings(tmp_path, ["api_key"]), FakeStore())
    assert caplog.text == ""
