import pytest

from nilai.auth.api_keys import StaticApiKeys, key_digest
from nilai.auth.base import Principal
from nilai.errors import AuthenticationFailed

KEY_A = "sk-test-alpha-0123456789"
KEY_B = "sk-test-bravo-9876543210"


async def test_accepts_each_configured_key():
    keys = StaticApiKeys([KEY_A, KEY_B])
    assert len(keys) == 2
    first = await keys.authenticate(KEY_A)
    second = await keys.authenticate(KEY_B)
    assert isinstance(first, Principal)
    assert first.method == "api_key"
    assert first.account_id.startswith("key:")
    assert first.account_id != second.account_id


async def test_account_id_is_stable_and_does_not_contain_the_key():
    keys = StaticApiKeys([KEY_A])
    principal = await keys.authenticate(KEY_A)
    assert principal == await keys.authenticate(KEY_A)
    assert KEY_A not in principal.account_id
    assert "alpha" not in principal.account_id
    assert principal.account_id == "key:" + key_digest(KEY_A).hex()[:16]


@pytest.mark.parametrize(
    "credential", ["", "sk-test-alpha", KEY_A + " ", KEY_A.upper(), KEY_B, "Bearer " + KEY_A]
)
async def test_rejects_other_credentials(credential: str):
    keys = StaticApiKeys([KEY_A])
    with pytest.raises(AuthenticationFailed) as info:
        await keys.authenticate(credential)
    assert info.value.status == 401
    assert info.value.headers == {"WWW-Authenticate": "Bearer"}
    assert info.value.message == "Incorrect API key provided."


@pytest.mark.parametrize("credential", ["", KEY_A, "anything"])
async def test_empty_key_list_rejects_everything(credential: str):
    keys = StaticApiKeys([])
    assert len(keys) == 0
    with pytest.raises(AuthenticationFailed):
        await keys.authenticate(credential)


def test_keys_are_held_only_as_digests():
    keys = StaticApiKeys([KEY_A])
    assert KEY_A not in repr(vars(keys))
    assert key_digest(KEY_A) in keys._digests
    assert all(isinstance(d, bytes) and len(d) == 32 for d in keys._digests)


def test_accepts_any_iterable():
    keys = StaticApiKeys(k for k in [KEY_A, KEY_B])
    assert len(keys) == 2
